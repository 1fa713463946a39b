"""BN folding and op normalisation: same function (checked in onnxruntime), expected graph shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh.errors import QuantizationError
from onnxdgh.quantization.fold import prepare

from .helpers_quantize import conv_weight, images, make_model, op_counts, rng, run

N = helper.make_node


def _bn_params(prefix: str, channels: int, seed: int) -> dict[str, np.ndarray]:
    r = rng(seed)
    return {
        f"{prefix}_gamma": r.uniform(0.5, 2.0, channels).astype(np.float32),
        f"{prefix}_beta": r.standard_normal(channels).astype(np.float32) * 0.3,
        f"{prefix}_mean": r.standard_normal(channels).astype(np.float32) * 0.5,
        f"{prefix}_var": r.uniform(0.2, 3.0, channels).astype(np.float32),
    }


def _bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return N(
        "BatchNormalization",
        [x, f"{prefix}_gamma", f"{prefix}_beta", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        name=prefix,
        epsilon=1e-3,
    )


def _same_function(model: onnx.ModelProto, folded: onnx.ModelProto, shape=(3, 8, 8)) -> None:
    x = images(4, shape, seed=11)
    expected = run(model, x)
    got = run(folded, x)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_conv_bn_folds_with_and_without_bias() -> None:
    nodes = [
        N("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        _bn("bn0", "c0", "h"),
        N("Conv", ["h", "w1"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "y"),
    ]
    inits = {"w0": conv_weight(4, 3), "b0": np.full(4, 0.2, np.float32), "w1": conv_weight(5, 4, 1, 2)}
    inits |= _bn_params("bn0", 4, 1) | _bn_params("bn1", 5, 2)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn0", "bn1"] and report.converted == []
    assert op_counts(folded) == {"Conv": 2}
    assert len(folded.graph.node[1].input) == 3  # conv1 gained a bias
    _same_function(model, folded)


def test_grouped_conv_transpose_bn_folds() -> None:
    w = rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)  # C_in 4, group 2 -> C_out 6
    nodes = [
        N("Conv", ["x", "w0"], ["h0"], name="conv0"),
        N("ConvTranspose", ["h0", "wt", "bt"], ["t"], name="deconv", group=2, strides=[2, 2]),
        _bn("bn", "t", "y"),
    ]
    inits = {"w0": conv_weight(4, 3, 1), "wt": w, "bt": np.linspace(-1, 1, 6).astype(np.float32)}
    inits |= _bn_params("bn", 6, 4)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn"]
    _same_function(model, folded)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn_folds_with_alpha_beta(trans_b: int) -> None:
    w = rng(5).standard_normal((6, 192) if trans_b else (192, 6)).astype(np.float32) * 0.1
    nodes = [
        N("Flatten", ["x"], ["f"], name="flat"),
        N("Gemm", ["f", "w", "c"], ["g"], name="gemm", transB=trans_b, alpha=0.5, beta=2.0),
        _bn("bn", "g", "y"),
    ]
    inits = {"w": w, "c": np.linspace(-0.5, 0.5, 6).astype(np.float32)} | _bn_params("bn", 6, 6)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn"] and report.gemm_normalised == 1
    gemm = next(node for node in folded.graph.node if node.op_type == "Gemm")
    assert all(attr.f == 1.0 for attr in gemm.attribute if attr.name in ("alpha", "beta"))
    _same_function(model, folded)


def test_gemms_sharing_b_and_c_get_their_own_scaled_copies() -> None:
    # Rewriting a shared B or C under a fresh name once read the fresh (absent) initializer.
    nodes = [
        N("Flatten", ["x"], ["f"], name="flat"),
        N("Gemm", ["f", "w", "c"], ["g0"], name="gemm0", alpha=0.5, beta=2.0),
        N("Gemm", ["f", "w", "c"], ["g1"], name="gemm1", alpha=0.5, beta=2.0),
        N("Add", ["g0", "g1"], ["y"], name="add"),
    ]
    w = rng(7).standard_normal((192, 6)).astype(np.float32) * 0.1
    model = make_model(nodes, {"w": w, "c": np.linspace(-0.5, 0.5, 6).astype(np.float32)})
    folded, report = prepare(model)
    assert report.gemm_normalised == 2
    gemms = [node for node in folded.graph.node if node.op_type == "Gemm"]
    assert gemms[0].input[1] != gemms[1].input[1] and gemms[0].input[2] != gemms[1].input[2]
    _same_function(model, folded)


def test_bn_with_nothing_to_fold_into_becomes_depthwise_conv() -> None:
    # BN after a residual Add (pre-activation style): no producer to fold into.
    nodes = [
        N("Conv", ["x", "w0"], ["a"], name="conv0", pads=[1, 1, 1, 1]),
        N("Add", ["a", "x"], ["s"], name="add"),
        _bn("bn", "s", "y"),
    ]
    inits = {"w0": conv_weight(3, 3)} | _bn_params("bn", 3, 7)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.converted == ["bn"] and report.folded == []
    conv = [node for node in folded.graph.node if node.op_type == "Conv"][-1]
    assert helper.get_attribute_value(next(a for a in conv.attribute if a.name == "group")) == 3
    _same_function(model, folded)


def test_bn_whose_conv_output_has_other_readers_is_not_folded() -> None:
    nodes = [
        N("Conv", ["x", "w0"], ["c"], name="conv0"),
        _bn("bn", "c", "b"),
        N("Add", ["b", "c"], ["y"], name="add"),
    ]
    model = make_model(nodes, {"w0": conv_weight(4, 3, 1)} | _bn_params("bn", 4, 8))
    folded, report = prepare(model)
    assert report.converted == ["bn"]
    _same_function(model, folded)


def test_rank2_bn_becomes_mul_add() -> None:
    nodes = [N("Flatten", ["x"], ["f"], name="flat"), N("ReduceMean", ["f"], ["m"], name="rm", axes=[1], keepdims=1),
             N("Sub", ["f", "m"], ["d"], name="sub"), _bn("bn", "d", "y")]
    model = make_model(nodes, _bn_params("bn", 48, 9), input_shape=("batch", 3, 4, 4))
    folded, report = prepare(model)
    assert report.converted == ["bn"]
    assert op_counts(folded).get("Mul") == 1 and op_counts(folded).get("Add") == 1
    _same_function(model, folded, shape=(3, 4, 4))


def test_shared_weight_is_copied_not_rescaled_twice() -> None:
    nodes = [
        N("Conv", ["x", "w"], ["c0"], name="conv0"),
        _bn("bn0", "c0", "h0"),
        N("Conv", ["x", "w"], ["c1"], name="conv1"),
        _bn("bn1", "c1", "h1"),
        N("Add", ["h0", "h1"], ["y"], name="add"),
    ]
    model = make_model(nodes, {"w": conv_weight(4, 3, 1)} | _bn_params("bn0", 4, 10) | _bn_params("bn1", 4, 11))
    folded, report = prepare(model)
    assert report.folded == ["bn0", "bn1"]
    convs = [node for node in folded.graph.node if node.op_type == "Conv"]
    assert convs[0].input[1] != convs[1].input[1]
    _same_function(model, folded)


def test_div_by_constant_becomes_mul_and_dropout_goes() -> None:
    nodes = [
        N("Div", ["x", "d"], ["a"], name="div"),
        N("Dropout", ["a"], ["b"], name="drop"),
        N("Div", ["b", "x"], ["y"], name="div_by_tensor"),
    ]
    model = make_model(nodes, {"d": np.array(4.0, np.float32)})
    folded, report = prepare(model)
    assert report.div_to_mul == 1 and report.dropout_removed == 1
    assert op_counts(folded) == {"Mul": 1, "Div": 1}
    x = images(2, seed=3) + 5.0
    np.testing.assert_allclose(run(folded, x)[0], run(model, x)[0], rtol=1e-6)


def test_training_mode_bn_is_refused() -> None:
    bn = N(
        "BatchNormalization", ["x", "g_gamma", "g_beta", "g_mean", "g_var"], ["y", "rm", "rv"], name="bn_train",
        training_mode=1,
    )
    model = make_model([bn], _bn_params("g", 3, 12), opset=15)
    with pytest.raises(QuantizationError, match="bn_train"):
        prepare(model)


def test_input_model_is_not_modified() -> None:
    nodes = [N("Conv", ["x", "w0"], ["c0"], name="conv0"), _bn("bn0", "c0", "y")]
    model = make_model(nodes, {"w0": conv_weight(4, 3, 1)} | _bn_params("bn0", 4, 13))
    before = model.SerializeToString()
    prepare(model)
    assert model.SerializeToString() == before


# ------------------------------------------------------------ affine constants


def _conv_then(op: str, constant: np.ndarray, *, constant_first: bool = False, out_ch: int = 4) -> onnx.ModelProto:
    """Conv (3 -> out_ch, 8x8 kept) -> op(constant) -> Relu."""
    operands = ["k", "c"] if constant_first else ["c", "k"]
    nodes = [
        N("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        N(op, operands, ["a"], name="affine"),
        N("Relu", ["a"], ["y"], name="relu"),
    ]
    inits = {"w": conv_weight(out_ch, 3), "b": np.linspace(-0.5, 0.5, out_ch).astype(np.float32), "k": constant}
    return make_model(nodes, inits)


_PER_CHANNEL = np.array([0.5, -1.5, 2.0, 0.25], np.float32)


@pytest.mark.parametrize(
    ("op", "constant", "constant_first"),
    [
        ("Add", _PER_CHANNEL.reshape(4, 1, 1), False),
        ("Add", _PER_CHANNEL.reshape(1, 4, 1, 1), True),
        ("Add", np.array(0.75, np.float32), False),
        ("Add", np.array([0.75], np.float32), False),
        ("Sub", _PER_CHANNEL.reshape(4, 1, 1), False),
        ("Sub", _PER_CHANNEL.reshape(1, 4, 1, 1), True),  # k - x: the weights change sign
        ("Mul", _PER_CHANNEL.reshape(4, 1, 1), False),  # a negative scale
        ("Mul", np.array([0.0, 1.0, -2.0, 3.0], np.float32).reshape(1, 4, 1, 1), True),  # a zero channel
        ("Div", _PER_CHANNEL.reshape(4, 1, 1), False),  # Mul by the reciprocal
        ("Div", np.array(4.0, np.float32), False),
    ],
)
def test_affine_constant_after_conv_folds(op: str, constant: np.ndarray, constant_first: bool) -> None:
    model = _conv_then(op, constant, constant_first=constant_first)
    folded, report = prepare(model)
    assert report.affine_folded == ["affine"]
    assert op_counts(folded) == {"Conv": 1, "Relu": 1}
    assert folded.graph.node[1].input == ["a"]  # the Relu reads the layer directly
    _same_function(model, folded)


def test_affine_chain_folds_around_bn() -> None:
    # Conv -> Mul -> BN -> Add -> Sub(k - x) -> Div -> Relu: every step folds into the Conv.
    nodes = [
        N("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        N("Mul", ["c", "m"], ["c1"], name="mul"),
        _bn("bn", "c1", "h"),
        N("Add", ["h", "a"], ["h1"], name="add"),
        N("Sub", ["s", "h1"], ["h2"], name="sub"),
        N("Div", ["h2", "d"], ["h3"], name="div"),
        N("Relu", ["h3"], ["y"], name="relu"),
    ]
    inits = {
        "w": conv_weight(4, 3),
        "m": _PER_CHANNEL.reshape(4, 1, 1),
        "a": np.array(0.3, np.float32),
        "s": np.linspace(-1, 1, 4).astype(np.float32).reshape(1, 4, 1, 1),
        "d": np.array([2.0, 4.0, 0.5, 8.0], np.float32).reshape(4, 1, 1),
    } | _bn_params("bn", 4, 21)
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.folded == ["bn"] and report.affine_folded == ["mul", "add", "sub", "div"]
    assert op_counts(folded) == {"Conv": 1, "Relu": 1}
    _same_function(model, folded)


def test_affine_constant_after_grouped_conv_transpose_and_gemm_folds() -> None:
    w = rng(3).standard_normal((4, 3, 3, 3)).astype(np.float32)  # C_in 4, group 2 -> C_out 6
    fc = rng(4).standard_normal((5, 6 * 16 * 16)).astype(np.float32) * 0.01
    nodes = [
        N("Conv", ["x", "w0"], ["h0"], name="conv0"),
        N("ConvTranspose", ["h0", "wt"], ["t"], name="deconv", group=2, strides=[2, 2], pads=[1, 1, 1, 1],
          output_padding=[1, 1]),
        N("Add", ["t", "kt"], ["t1"], name="add_t"),
        N("Flatten", ["t1"], ["f"], name="flat"),
        N("Gemm", ["f", "fc", "fb"], ["g"], name="fc", transB=1),
        N("Mul", ["g", "kg"], ["g1"], name="mul_g"),
        N("Sub", ["g1", "sg"], ["y"], name="sub_g"),
    ]
    inits = {
        "w0": conv_weight(4, 3, 1),
        "wt": w,
        "kt": np.linspace(-1, 1, 6).astype(np.float32).reshape(1, 6, 1, 1),
        "fc": fc,
        "fb": np.linspace(0, 1, 5).astype(np.float32),
        "kg": np.array([1.0, -2.0, 0.5, 3.0, 0.0], np.float32),
        "sg": np.array([[0.1, 0.2, 0.3, 0.4, 0.5]], np.float32),
    }
    model = make_model(nodes, inits)
    folded, report = prepare(model)
    assert report.affine_folded == ["add_t", "mul_g", "sub_g"]
    assert op_counts(folded) == {"Conv": 1, "ConvTranspose": 1, "Flatten": 1, "Gemm": 1}
    _same_function(model, folded)


@pytest.mark.parametrize(
    ("constant", "why"),
    [
        (rng(5).standard_normal((8,)).astype(np.float32), "[C] aligns with W, not C"),
        (rng(6).standard_normal((1, 8, 1, 8)).astype(np.float32), "varies over W"),
        (rng(7).standard_normal((8, 8, 1)).astype(np.float32), "varies over H"),
        (rng(8).standard_normal((2, 8, 1, 1)).astype(np.float32), "widens the batch"),
        (rng(9).standard_normal((1, 1, 8, 1, 1)).astype(np.float32), "widens the rank"),
    ],
)
def test_constant_that_is_not_per_channel_is_not_folded(constant: np.ndarray, why: str) -> None:
    model = _conv_then("Add", constant, out_ch=8)
    folded, report = prepare(model)
    assert report.affine_folded == [], why
    assert op_counts(folded) == {"Conv": 1, "Add": 1, "Relu": 1}


def test_affine_constant_is_not_folded_when_the_layer_output_has_another_reader() -> None:
    nodes = [
        N("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        N("Add", ["c", "k"], ["a"], name="add"),
        N("Mul", ["a", "c"], ["y"], name="mul"),  # c is read twice
        N("Mul", ["c", "k"], ["z"], name="out_mul"),
    ]
    model = make_model(nodes, {"w": conv_weight(4, 3), "k": _PER_CHANNEL.reshape(4, 1, 1)}, outputs=("y", "z"))
    folded, report = prepare(model)
    assert report.affine_folded == []
    assert op_counts(folded) == op_counts(model)
    # A layer output that is a graph output stays as it is, too.
    nodes = [N("Conv", ["x", "w"], ["c"], name="conv"), N("Add", ["c", "k"], ["y"], name="add")]
    model = make_model(nodes, {"w": conv_weight(4, 3, 1), "k": _PER_CHANNEL.reshape(4, 1, 1)}, outputs=("c", "y"))
    assert prepare(model)[1].affine_folded == []


def test_affine_op_without_a_layer_or_constant_is_not_folded() -> None:
    nodes = [
        N("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        N("Div", ["k", "c"], ["a"], name="div_by_layer"),  # k / x is not affine
        N("Relu", ["a"], ["r"], name="relu"),
        N("Add", ["r", "k"], ["y"], name="add_after_relu"),  # its producer is no layer
    ]
    model = make_model(nodes, {"w": conv_weight(4, 3), "k": _PER_CHANNEL.reshape(4, 1, 1)})
    folded, report = prepare(model)
    assert report.affine_folded == [] and op_counts(folded) == op_counts(model)
    _same_function(model, folded)


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_quantized_model_has_no_layer_constant_pattern_left(op: str) -> None:
    # Conv -> Q/DQ -> Add(quantized constant) is what OpenVINO 2026.4 mis-executes; after
    # folding the Conv is fused with its Relu and only the input and the Relu are quantized.
    # Mul: a zero and a negative per-channel factor (a dead and a sign-flipped channel).
    from onnxdgh.load import load_model_proto
    from onnxdgh.profile import load_profile
    from onnxdgh.quantization import QuantizeConfig, quantize
    from onnxdgh.validation.checks import check_model

    constant = np.array([0.5, -1.5, 0.0, 0.25], np.float32).reshape(4, 1, 1)
    model = _conv_then(op, constant)
    calib = images(16, seed=4)
    # mse pinned: the tolerance below is in steps of its grid (a conv map's default is noclip)
    result = quantize(load_model_proto(model), calib, QuantizeConfig(threshold="mse"), progress=False)
    q = result.model
    assert result.report["fold"]["affine_folded"] == 1
    assert op not in op_counts(q)
    assert op_counts(q)["QuantizeLinear"] == 2  # x and y; the Conv output is inside Conv+Relu
    assert [(p["producer"], p["consumer"]) for p in result.report["tensors"]["fused"]] == [("conv", "relu")]
    assert [v.to_dict() for v in check_model(q, load_profile("generic-pot-int8"))] == []
    x = images(4, seed=6)
    step = float(result.report["tensors"]["activations"][-1]["scale"])
    np.testing.assert_allclose(run(q, x)[0], run(model, x)[0], rtol=0, atol=4 * step)
