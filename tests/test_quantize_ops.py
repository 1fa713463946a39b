"""Every op family on a tiny graph: fully quantized structure, ORT on/off agreement, float closeness."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh.load import load_model_proto
from onnxdgh.profile import load_profile
from onnxdgh.quantization import QuantizeConfig, quantize
from onnxdgh.validation.checks import check_model

from .helpers_quantize import (
    bias_scale_problems,
    conv_weight,
    images,
    make_model,
    op_counts,
    output_scale,
    rng,
    run,
    structure_problems,
)

N = helper.make_node
GENERIC = load_profile("generic-pot-int8")
FUSED = {(chain[i], chain[i + 1]) for chain in GENERIC.fused_patterns for i in range(len(chain) - 1)}


def _conv(name: str, x: str, y: str, out_ch: int = 4, in_ch: int = 3, group: int = 1, seed: int = 0, **attrs) -> tuple[list, dict]:
    w = conv_weight(out_ch, in_ch // group, 3, seed)
    b = rng(seed + 7).standard_normal(out_ch).astype(np.float32) * 0.1
    node = N("Conv", [x, f"{name}_w", f"{name}_b"], [y], name=name, group=group, pads=[1, 1, 1, 1], **attrs)
    return [node], {f"{name}_w": w, f"{name}_b": b}


def _with_conv(tail: Callable[[str], tuple[list, dict]], out_ch: int = 4) -> onnx.ModelProto:
    nodes, inits = _conv("c0", "x", "h", out_ch=out_ch)
    more, more_inits = tail("h")
    return make_model(nodes + more, {**inits, **more_inits})


def m_conv_grouped() -> onnx.ModelProto:
    nodes, inits = _conv("c0", "x", "h", out_ch=6)
    n2, i2 = _conv("c1", "h", "y", out_ch=6, in_ch=6, group=3, seed=3)
    return make_model(nodes + n2, {**inits, **i2})


def m_depthwise() -> onnx.ModelProto:
    nodes, inits = _conv("c0", "x", "h", out_ch=4)
    n2, i2 = _conv("dw", "h", "r", out_ch=4, in_ch=4, group=4, seed=5)
    return make_model(nodes + n2 + [N("Relu", ["r"], ["y"], name="relu")], {**inits, **i2})


def m_conv_transpose() -> onnx.ModelProto:
    w = rng(2).standard_normal((3, 2, 2, 2)).astype(np.float32) * 0.5  # (Cin, Cout/g, k, k)
    w2 = rng(3).standard_normal((4, 2, 3, 3)).astype(np.float32) * 0.3  # grouped: g=2, Cout=4
    b2 = rng(4).standard_normal(4).astype(np.float32) * 0.1
    nodes = [
        N("ConvTranspose", ["x", "wt"], ["h"], name="ct", strides=[2, 2]),
        N("Relu", ["h"], ["r"], name="relu"),
        N("Conv", ["r", "pw", "pb"], ["p"], name="pw"),
        N("ConvTranspose", ["p", "wt2", "bt2"], ["y"], name="ct_grouped", group=2, pads=[1, 1, 1, 1]),
    ]
    pw = conv_weight(4, 2, 1, 9)
    return make_model(nodes, {"wt": w, "wt2": w2, "bt2": b2, "pw": pw, "pb": np.zeros(4, np.float32)})


def m_gemm() -> onnx.ModelProto:
    w_t = rng(5).standard_normal((10, 4 * 16)).astype(np.float32) * 0.2
    w = rng(6).standard_normal((10, 5)).astype(np.float32) * 0.3
    nodes, inits = _conv("c0", "x", "h", out_ch=4, strides=[2, 2])
    nodes += [
        N("Flatten", ["h"], ["f"], name="flat"),
        N("Gemm", ["f", "w_t", "b_t"], ["g"], name="gemm_tb", transB=1, alpha=0.5),
        N("Relu", ["g"], ["r"], name="relu"),
        N("Gemm", ["r", "w", "b"], ["y"], name="gemm_nt", beta=2.0),
    ]
    return make_model(nodes, {**inits, "w_t": w_t, "b_t": np.full(10, 0.1, np.float32), "w": w, "b": np.full(5, -0.2, np.float32)})


def m_matmul() -> onnx.ModelProto:
    w = rng(7).standard_normal((8, 5)).astype(np.float32) * 0.4
    return _with_conv(lambda h: ([N("MatMul", [h, "mw"], ["y"], name="mm")], {"mw": w}))


def m_arith_constants() -> onnx.ModelProto:
    def tail(h: str) -> tuple[list, dict]:
        return (
            [
                N("Add", [h, "c_add"], ["a"], name="add"),
                N("Mul", ["a", "c_mul"], ["m"], name="mul"),
                N("Sub", ["m", "c_sub"], ["s"], name="sub"),
                N("Div", ["s", "c_div"], ["y"], name="div"),
            ],
            {
                "c_add": np.array(0.75, np.float32),
                "c_mul": rng(8).uniform(0.5, 1.5, (4, 1, 1)).astype(np.float32),
                "c_sub": np.array([0.1], np.float32),
                "c_div": np.array(3.0, np.float32),
            },
        )

    return _with_conv(tail)


def m_residual_add() -> onnx.ModelProto:
    nodes, inits = _conv("c0", "x", "h", out_ch=4)
    n2, i2 = _conv("c1", "h", "h2", out_ch=4, in_ch=4, seed=2)
    nodes += n2 + [N("Add", ["h", "h2"], ["s"], name="add"), N("Relu", ["s"], ["y"], name="relu")]
    return make_model(nodes, {**inits, **i2})


def m_concat() -> onnx.ModelProto:
    nodes, inits = _conv("c0", "x", "a", out_ch=4)
    n2, i2 = _conv("c1", "x", "b", out_ch=2, seed=4)
    # c1's output is 10x larger: the shared scale must cover it.
    i2["c1_w"] = i2["c1_w"] * 10
    nodes += n2 + [N("Concat", ["a", "b"], ["y"], name="cat", axis=1)]
    return make_model(nodes, {**inits, **i2})


def _activation(op: str, **attrs) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        inputs = ["h"]
        extra: dict = {}
        if op == "Clip":
            inputs = ["h", "lo", "hi"]
            extra = {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
        if op == "PRelu":
            inputs = ["h", "slope"]
            extra = {"slope": rng(9).uniform(0.05, 0.3, (4, 1, 1)).astype(np.float32)}
        # A Conv output read twice (by the activation and an Add) cannot fuse: the op stands alone.
        return _with_conv(
            lambda h: (
                [N(op, inputs, ["act"], name=op.lower(), **attrs), N("Add", ["act", "h"], ["y"], name="add")],
                extra,
            )
        )

    return build


def m_silu() -> onnx.ModelProto:
    return _with_conv(lambda h: ([N("Sigmoid", [h], ["sg"], name="sig"), N("Mul", [h, "sg"], ["y"], name="silu")], {}))


def m_pools() -> onnx.ModelProto:
    return _with_conv(
        lambda h: (
            [
                N("MaxPool", [h], ["mp"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
                N("AveragePool", ["mp"], ["ap"], name="avgpool", kernel_shape=[2, 2], strides=[1, 1]),
                N("ReduceMean", ["ap"], ["rm"], name="rmean", axes=[3], keepdims=1),
                N("GlobalAveragePool", ["rm"], ["y"], name="gap"),
            ],
            {},
        )
    )


def m_shape_ops() -> onnx.ModelProto:
    def tail(h: str) -> tuple[list, dict]:
        return (
            [
                N("Transpose", [h], ["t"], name="transpose", perm=[0, 2, 3, 1]),
                N("Reshape", ["t", "shape"], ["r"], name="reshape"),
                N("Unsqueeze", ["r", "ax1"], ["u"], name="unsqueeze"),
                N("Squeeze", ["u", "ax1"], ["s"], name="squeeze"),
                N("Slice", ["s", "starts", "ends", "axes"], ["sl"], name="slice"),
                N("Split", ["sl", "split"], ["p0", "p1"], name="split", axis=1),
                N("Pad", ["p0", "pads"], ["pd"], name="pad"),
                N("Flatten", ["pd"], ["f0"], name="flatten"),
                N("Flatten", ["p1"], ["f1"], name="flatten1"),
                N("Concat", ["f0", "f1"], ["y"], name="cat", axis=1),
            ],
            {
                "shape": np.array([0, 64, 4], np.int64),
                "ax1": np.array([1], np.int64),
                "starts": np.array([8], np.int64),
                "ends": np.array([40], np.int64),
                "axes": np.array([1], np.int64),
                "split": np.array([16, 16], np.int64),
                "pads": np.array([0, 1, 0, 0, 1, 0], np.int64),
            },
        )

    return _with_conv(tail)


def m_resize() -> onnx.ModelProto:
    scales = np.array([1, 1, 2, 2], np.float32)
    return _with_conv(
        lambda h: (
            [
                N("Resize", [h, "", "scales"], ["near"], name="resize_nearest", mode="nearest"),
                N("Resize", ["near", "", "scales"], ["y"], name="resize_linear", mode="linear"),
            ],
            {"scales": scales},
        )
    )


def m_softmax() -> onnx.ModelProto:
    w = rng(10).standard_normal((4 * 64, 6)).astype(np.float32) * 0.1
    return _with_conv(
        lambda h: (
            [
                N("Flatten", [h], ["f"], name="flat"),
                N("MatMul", ["f", "w"], ["logits"], name="mm"),
                N("Softmax", ["logits"], ["y"], name="softmax", axis=1),
            ],
            {"w": w},
        )
    )


def _tokens(tail: Callable[[str], tuple[list, dict]], channels: int = 8) -> onnx.ModelProto:
    """Conv features as a token sequence ``(batch, 64, channels)`` (Reshape, Transpose: a
    vision transformer's patch embedding), then ``tail`` on the tokens."""
    nodes, inits = _conv("c0", "x", "h", out_ch=channels)
    nodes += [
        N("Reshape", ["h", "tok_shape"], ["hf"], name="flatten_hw"),
        N("Transpose", ["hf"], ["t"], name="to_tokens", perm=[0, 2, 1]),
    ]
    more, more_inits = tail("t")
    return make_model(nodes + more, {**inits, "tok_shape": np.array([0, channels, -1], np.int64), **more_inits})


def _affine(channels: int, seed: int) -> dict:
    r = rng(seed)
    return {
        "gamma": r.uniform(0.5, 1.5, channels).astype(np.float32),
        "beta": (r.standard_normal(channels) * 0.1).astype(np.float32),
    }


# LayerNorm over 16 channels: over fewer, tokens of near-constant channels divide their
# input's rounding error by a tiny deviation (real models normalise 100+ channels).
def m_layernorm_decomposed() -> onnx.ModelProto:
    # Paddle2ONNX's LayerNorm (the PP-OCRv4 recogniser): ReduceMean/Sub/Pow/Sqrt/Div/Mul/Add.
    return _tokens(
        lambda t: (
            [
                N("ReduceMean", [t], ["mu"], name="ln_mean", axes=[-1]),
                N("Sub", [t, "mu"], ["d"], name="ln_center"),
                N("Pow", ["d", "two"], ["d2"], name="ln_square"),
                N("ReduceMean", ["d2"], ["var"], name="ln_var", axes=[-1]),
                N("Add", ["var", "eps"], ["ve"], name="ln_eps"),
                N("Sqrt", ["ve"], ["sd"], name="ln_sqrt"),
                N("Div", ["d", "sd"], ["n"], name="ln_div"),
                N("Mul", ["n", "gamma"], ["ng"], name="ln_scale"),
                N("Add", ["ng", "beta"], ["y"], name="ln_shift"),
            ],
            {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), **_affine(16, 11)},
        ),
        channels=16,
    )


def m_layernorm() -> onnx.ModelProto:
    return _tokens(
        lambda t: ([N("LayerNormalization", [t, "gamma", "beta"], ["y"], name="ln", axis=-1)], _affine(16, 12)),
        channels=16,
    )


def m_gelu_erf() -> onnx.ModelProto:
    # x * 0.5 * (1 + Erf(x / sqrt 2)), as torch exports nn.GELU().
    return _with_conv(
        lambda h: (
            [
                N("Div", [h, "sqrt2"], ["hs"], name="gelu_div"),
                N("Erf", ["hs"], ["e"], name="gelu_erf"),
                N("Add", ["e", "one"], ["e1"], name="gelu_add"),
                N("Mul", [h, "e1"], ["m"], name="gelu_mul"),
                N("Mul", ["m", "half"], ["y"], name="gelu_half"),
            ],
            {"sqrt2": np.array(2**0.5, np.float32), "one": np.array(1.0, np.float32), "half": np.array(0.5, np.float32)},
        )
    )


def m_gelu_tanh() -> onnx.ModelProto:
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), nn.GELU(approximate="tanh").
    return _with_conv(
        lambda h: (
            [
                N("Pow", [h, "three"], ["h3"], name="gelu_cube"),
                N("Mul", ["h3", "c"], ["h3c"], name="gelu_coef"),
                N("Add", [h, "h3c"], ["inner"], name="gelu_inner"),
                N("Mul", ["inner", "k"], ["ik"], name="gelu_k"),
                N("Tanh", ["ik"], ["th"], name="gelu_tanh"),
                N("Add", ["th", "one"], ["t1"], name="gelu_add"),
                N("Mul", [h, "t1"], ["m"], name="gelu_mul"),
                N("Mul", ["m", "half"], ["y"], name="gelu_half"),
            ],
            {
                "three": np.array(3.0, np.float32),
                "c": np.array(0.044715, np.float32),
                "k": np.array((2 / np.pi) ** 0.5, np.float32),
                "one": np.array(1.0, np.float32),
                "half": np.array(0.5, np.float32),
            },
        )
    )


def m_hard_swish_decomposed() -> onnx.ModelProto:
    # Paddle2ONNX's hardswish at opset < 14: x * Clip(x + 3, 0, 6) / 6.
    return _with_conv(
        lambda h: (
            [
                N("Add", [h, "three"], ["a"], name="hs_add"),
                N("Clip", ["a", "zero", "six"], ["c"], name="hs_clip"),
                N("Mul", [h, "c"], ["m"], name="hs_mul"),
                N("Div", ["m", "six"], ["hs"], name="hs_div"),
                # PP-LCNetV3's learnable affine after the activation: part of the same function of h.
                N("Mul", ["s", "hs"], ["hsm"], name="lab_scale"),
                N("Add", ["hsm", "b"], ["y"], name="lab_shift"),
            ],
            {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32),
             "s": np.array([0.7], np.float32), "b": np.array([-0.2], np.float32)},
        )
    )


def _attention(heads: str) -> Callable[[], onnx.ModelProto]:
    """Self-attention over the tokens, 2 heads of 4: one qkv projection cut into q, k, v
    by ``heads`` ("gather": Reshape/Transpose then Gather per head, as Paddle2ONNX writes
    it with Slice+Squeeze; "split": Split of the last axis, then per-head Reshape), scores
    ``MatMul(q, k^T)`` and context ``MatMul(softmax, v)`` between two activations."""

    def tail(t: str) -> tuple[list, dict]:
        w = rng(13).standard_normal((8, 24)).astype(np.float32) * 0.15
        wo = rng(14).standard_normal((8, 8)).astype(np.float32) * 0.4
        consts = {"wqkv": w, "wo": wo, "bo": np.full(8, 0.05, np.float32), "inv_sqrt_d": np.array(0.5, np.float32),
                  "ctx_shape": np.array([0, 64, 8], np.int64)}
        nodes = [N("MatMul", [t, "wqkv"], ["qkv"], name="qkv")]
        if heads == "gather":
            consts.update({"qkv_shape": np.array([0, 64, 3, 2, 4], np.int64),
                           "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(2, np.int64)})
            nodes += [
                N("Reshape", ["qkv", "qkv_shape"], ["qkv5"], name="qkv_heads"),
                N("Transpose", ["qkv5"], ["qkvt"], name="qkv_perm", perm=[2, 0, 3, 1, 4]),
                N("Gather", ["qkvt", "i0"], ["q"], name="take_q", axis=0),
                N("Gather", ["qkvt", "i1"], ["k"], name="take_k", axis=0),
                N("Gather", ["qkvt", "i2"], ["v"], name="take_v", axis=0),
            ]
        else:
            consts.update({"split": np.array([8, 8, 8], np.int64), "head_shape": np.array([0, 64, 2, 4], np.int64),
                           "starts": np.array([0], np.int64), "ends": np.array([8], np.int64), "axes": np.array([2], np.int64)})
            nodes += [N("Split", ["qkv", "split"], ["q0", "k0", "v_all"], name="split_qkv", axis=2),
                      N("Slice", ["v_all", "starts", "ends", "axes"], ["v0"], name="slice_v")]
            for name in ("q", "k", "v"):
                nodes += [
                    N("Reshape", [f"{name}0", "head_shape"], [f"{name}4"], name=f"{name}_heads"),
                    N("Transpose", [f"{name}4"], [name], name=f"{name}_perm", perm=[0, 2, 1, 3]),
                ]
        nodes += [
            N("Transpose", ["k"], ["kt"], name="k_transpose", perm=[0, 1, 3, 2]),
            N("MatMul", ["q", "kt"], ["scores"], name="scores"),
            N("Mul", ["scores", "inv_sqrt_d"], ["scaled"], name="scale_scores"),
            N("Softmax", ["scaled"], ["attn"], name="softmax", axis=-1),
            N("MatMul", ["attn", "v"], ["ctx"], name="context"),
            N("Transpose", ["ctx"], ["ctxt"], name="ctx_perm", perm=[0, 2, 1, 3]),
            N("Reshape", ["ctxt", "ctx_shape"], ["ctx3"], name="merge_heads"),
            N("MatMul", ["ctx3", "wo"], ["proj"], name="out_proj"),
            N("Add", ["proj", "bo"], ["y"], name="out_bias"),
        ]
        return nodes, consts

    return lambda: _tokens(tail)


FAMILIES: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_grouped": m_conv_grouped,
    "depthwise": m_depthwise,
    "conv_transpose": m_conv_transpose,
    "gemm": m_gemm,
    "matmul": m_matmul,
    "arith_constants": m_arith_constants,
    "residual_add": m_residual_add,
    "concat": m_concat,
    "relu": _activation("Relu"),
    "relu6": _activation("Clip"),
    "leaky_relu": _activation("LeakyRelu", alpha=0.1),
    "prelu": _activation("PRelu"),
    "sigmoid": _activation("Sigmoid"),
    "hard_sigmoid": _activation("HardSigmoid"),
    "hard_swish": _activation("HardSwish"),
    "tanh": _activation("Tanh"),
    "silu": m_silu,
    "pools": m_pools,
    "shape_ops": m_shape_ops,
    "resize": m_resize,
    "softmax": m_softmax,
    "layernorm_decomposed": m_layernorm_decomposed,
    "layernorm": m_layernorm,
    "hard_swish_decomposed": m_hard_swish_decomposed,
    "gelu_erf": m_gelu_erf,
    "gelu_tanh": m_gelu_tanh,
    "attention_gather_heads": _attention("gather"),
    "attention_split_heads": _attention("split"),
}

# A LayerNorm or HardSwish written out is one op: its inner tensors and constants stay
# float; its input and output (and everything else) are quantized.
FLOAT_INSIDE = {
    "layernorm_decomposed": ("mu", "d", "d2", "var", "ve", "sd", "eps"),
    # The Div by 6 is folded to a Mul by six_reciprocal.
    "hard_swish_decomposed": ("a", "c", "m", "hs", "hsm", "three", "six_reciprocal", "s", "b"),
}


@pytest.mark.parametrize("threshold", ["mse", "noclip"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fully_quantized_and_close(family: str, threshold: str) -> None:
    float_model = FAMILIES[family]()
    x = images(32)
    result = quantize(load_model_proto(float_model), x, QuantizeConfig(threshold=threshold), progress=False)
    q = result.model

    assert structure_problems(q, FUSED, FLOAT_INSIDE.get(family, ())) == []
    assert bias_scale_problems(q) == []
    violations = [v.to_dict() for v in check_model(q, GENERIC)]
    assert violations == []
    assert "BatchNormalization" not in op_counts(q)
    # A Div by a constant is folded into a Mul; only a Div by an activation (LayerNorm's) stays.
    inits = {init.name for init in q.graph.initializer}
    producer = {out: node for node in q.graph.node for out in node.output}
    assert not [n.name for n in q.graph.node if n.op_type == "Div" and producer[n.input[1]].input[0] in inits]

    test = images(8, seed=5)
    expected = run(float_model, test)[0]
    plain = run(q, test, optimize=False)[0]
    optimised = run(q, test, optimize=True)[0]
    step = output_scale(q)
    # Fused integer kernels round once where the reference rounds twice: one step apart at most.
    assert np.max(np.abs(plain - optimised)) <= 1.01 * step
    span = float(np.max(np.abs(expected)))
    if threshold == "noclip":
        # Test images from the calibration distribution: nothing clips, every error is rounding.
        error = float(np.max(np.abs(plain - expected)))
        assert error <= 0.06 * span + 2 * step, f"{family}: max error {error:.4g} vs output range {span:.4g}"
    else:
        # MSE thresholds clip rare tails on purpose: the typical (RMS) error is what they keep small.
        rms = float(np.sqrt(np.mean((plain - expected) ** 2)))
        assert rms <= 0.03 * span + step, f"{family}: RMS error {rms:.4g} vs output range {span:.4g}"


def test_value_preserving_op_on_a_constant_shares_the_constant_scale() -> None:
    # PaddleOCR's SE blocks: the conv bias arrives as Reshape(offset, [1, C, 1, 1]) + Add. The
    # Reshape output used to get its own threshold from calibration statistics (1.0 by the
    # histogram MSE search on these two values) while the constant got its own (0.5): two
    # scales across an op that only moves values (the value-preserving-scale rule).
    offset = np.array([-0.00783745, -0.3192839], np.float32)
    nodes = [
        N("Conv", ["x", "w"], ["h"], name="conv", pads=[1, 1, 1, 1]),
        N("Reshape", ["offset", "shape"], ["offset4"], name="reshape_offset"),
        N("Add", ["h", "offset4"], ["y"], name="add"),
    ]
    model = make_model(nodes, {"w": conv_weight(2, 3), "offset": offset, "shape": np.array([1, 2, 1, 1], np.int64)})
    result = quantize(load_model_proto(model), images(32), QuantizeConfig(threshold="mse"), progress=False)
    q = result.model
    assert [v.to_dict() for v in check_model(q, GENERIC)] == []
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in q.graph.initializer}
    (reshape,) = [node for node in q.graph.node if node.op_type == "Reshape"]
    (constant_dq,) = [node for node in q.graph.node if node.output[0] == reshape.input[0]]
    (output_q,) = [node for node in q.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == reshape.output[0]]
    assert float(inits[constant_dq.input[1]]) == float(inits[output_q.input[1]]) == 2.0**-8  # covers 0.319, 8 bits signed
    # The constant is stored exactly on that grid, and nothing about it needs calibration.
    np.testing.assert_allclose(inits[constant_dq.input[0]] * 2.0**-8, offset, atol=2.0**-9)
    assert "offset4" not in result.report["statistics"]


def test_decomposed_layer_norm_is_one_op_only_where_the_profile_allows_layer_normalization(tmp_path) -> None:
    import dataclasses
    import json

    float_model = m_layernorm_decomposed()
    x = images(32)
    fused = quantize(load_model_proto(float_model), x, QuantizeConfig(), progress=False).model
    without = dataclasses.replace(
        GENERIC, name="no-layernorm", allowed_ops=tuple(op for op in GENERIC.allowed_ops if op != "LayerNormalization")
    )
    # The fused model reads the pattern's inner tensors in float: only a LayerNorm unit may.
    rules = {(v.rule, v.tensor) for v in check_model(fused, without)}
    assert {("float-input-not-dequantized", name) for name in ("mu", "d", "d2", "var", "sd", "eps")} <= rules
    # Without that op, the pattern is ordinary ops: every inner tensor gets its own quantizer.
    path = tmp_path / "no-layernorm.json"
    path.write_text(json.dumps(without.to_dict()))
    split = quantize(load_model_proto(float_model), x, QuantizeConfig(profile=str(path)), progress=False).model
    assert structure_problems(split, FUSED) == []
    assert [v.to_dict() for v in check_model(split, without)] == []
    quantized = {node.input[0] for node in split.graph.node if node.op_type == "QuantizeLinear"}
    assert {"mu", "d", "d2", "var", "ve", "sd"} <= quantized


def test_decomposed_layer_norm_pattern_matches_only_that_dataflow() -> None:
    from onnxdgh.graph import GraphView
    from onnxdgh.ops import decomposed_layer_norm

    model = m_layernorm_decomposed()
    mean = next(n for n in model.graph.node if n.name == "ln_mean")
    pattern = decomposed_layer_norm(GraphView(model), mean)
    assert pattern is not None and pattern.inner == ("mu", "d", "d2", "var", "ve", "sd")
    assert (pattern.op, pattern.data, pattern.output, pattern.parameters) == ("LayerNormalization", "t", "n", ("eps",))

    def variant(edit: Callable[[onnx.ModelProto], None]) -> object:
        changed = m_layernorm_decomposed()
        edit(changed)
        view = GraphView(changed)
        return decomposed_layer_norm(view, next(n for n in changed.graph.node if n.name == "ln_mean"))

    def cube(m: onnx.ModelProto) -> None:
        two = next(i for i in m.graph.initializer if i.name == "two")
        two.CopyFrom(onnx.numpy_helper.from_array(np.array(3.0, np.float32), "two"))

    def leak(m: onnx.ModelProto) -> None:  # the variance also read outside the pattern
        m.graph.node.append(N("Relu", ["var"], ["leak"], name="leak"))
        m.graph.output.append(helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))

    def two_axes(m: onnx.ModelProto) -> None:
        for n in m.graph.node:
            if n.op_type == "ReduceMean":
                del n.attribute[:]
                n.attribute.append(helper.make_attribute("axes", [1, 2]))

    assert variant(cube) is None
    assert variant(leak) is None
    assert variant(two_axes) is None


def test_pow_with_a_computed_exponent_is_refused() -> None:
    from onnxdgh.errors import QuantizationError

    model = _with_conv(lambda h: ([N("Pow", [h, h], ["y"], name="pow_by_itself")], {}))
    with pytest.raises(QuantizationError, match="pow_by_itself.*not a constant scalar"):
        quantize(load_model_proto(model), images(8), QuantizeConfig(), progress=False)


def test_pow_by_two_is_unsigned_and_pow_by_three_signed() -> None:
    model = _with_conv(
        lambda h: (
            [N("Pow", [h, "two"], ["sq"], name="square"), N("Pow", [h, "three"], ["cube"], name="cube"),
             N("Add", ["sq", "cube"], ["y"], name="add")],
            {"two": np.array(2.0, np.float32), "three": np.array(3.0, np.float32)},
        )
    )
    q = quantize(load_model_proto(model), images(16), QuantizeConfig(), progress=False).model
    assert [v.to_dict() for v in check_model(q, GENERIC)] == []
    kinds = {n.input[0]: n.output[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(q).graph.value_info}
    assert types[kinds["sq"]] == onnx.TensorProto.UINT8
    assert types[kinds["cube"]] == onnx.TensorProto.INT8


def test_written_out_hard_swish_matches_only_x_clip_x_plus_3_over_6() -> None:
    from onnxdgh.graph import GraphView
    from onnxdgh.ops import decomposed_hard_swish

    def match(edit: Callable[[onnx.ModelProto], None] | None = None) -> object:
        model = m_hard_swish_decomposed()
        if edit is not None:
            edit(model)
        return decomposed_hard_swish(GraphView(model), next(n for n in model.graph.node if n.name == "hs_add"))

    def constant(name: str, value: float | list[float]) -> Callable[[onnx.ModelProto], None]:
        def edit(model: onnx.ModelProto) -> None:
            init = next(i for i in model.graph.initializer if i.name == name)
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(value, np.float32), name))
        return edit

    def leak(model: onnx.ModelProto) -> None:  # the Clip output also read outside
        model.graph.node.append(N("Relu", ["c"], ["leak"], name="leak"))
        model.graph.output.append(helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))

    found = match()
    assert found is not None and found.op == "HardSwish" and found.output == "y"
    assert (found.inner, found.parameters) == (("a", "c", "m", "hs", "hsm"), ("three", "six", "s", "b"))
    assert match(constant("s", [0.5, 2.0])).output == "hs"  # a per-channel scale is no part of it
    assert match(constant("three", 2.0)) is None
    assert match(constant("zero", -1.0)) is None
    assert match(leak) is None
