"""Shift negative correction: the float rewrite keeps the function, the quantized result is
unsigned, exact and valid, and nothing changes where nothing is eligible."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import helper, numpy_helper

from onnxdgh.cli import main
from onnxdgh.errors import ProfileError
from onnxdgh.fileio import save_images_npz
from onnxdgh.load import load_model_proto
from onnxdgh.profile import load_profile, profile_from_dict
from onnxdgh.quantization import QuantizeConfig, quantize
from onnxdgh.quantization.api import rounding_inputs
from onnxdgh.quantization.calibrate import TensorStats
from onnxdgh.quantization.rounding import RoundingConfig, optimize_rounding
from onnxdgh.quantization.shift import Shift, apply_shifts
from onnxdgh.runtime import make_session, with_extra_outputs
from onnxdgh.validation.checks import check_model

from .helpers_quantize import conv_weight, images, make_model, op_counts, run

LOWBIT = load_profile("pot-lowbit")
LOWBIT_PATH = Path(__file__).resolve().parents[1] / "onnxdgh" / "profiles" / "pot-lowbit.json"


def _silu_conv(
    *, group: int = 1, pads: tuple[int, ...] = (1, 1, 1, 1), strides: int = 1, dilations: int = 1,
    bias: bool = True, extra_reader: str | None = None, act: str = "SiLU", seed: int = 0,
) -> onnx.ModelProto:
    """x -> Conv -> activation -> Conv(group, pads, ...) -> y (plus an optional second reader)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": conv_weight(8, 3, seed=seed), "b1": rng.normal(0.3, 0.5, 8).astype(np.float32),
             "w2": conv_weight(8, 8 // group, seed=seed + 1)}
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1])]
    if act == "SiLU":
        nodes += [helper.make_node("Sigmoid", ["a"], ["s"], name="sig"), helper.make_node("Mul", ["a", "s"], ["t"], name="silu")]
    else:
        attrs = {"alpha": 1.0} if act == "LeakyRelu" else {}
        nodes.append(helper.make_node(act, ["a"], ["t"], name="act", **attrs))
    conv2_inputs = ["t", "w2"]
    if bias:
        inits["b2"] = rng.normal(0, 0.2, 8).astype(np.float32)
        conv2_inputs.append("b2")
    nodes.append(helper.make_node("Conv", conv2_inputs, ["y"], name="conv2", group=group, pads=list(pads),
                                  strides=[strides, strides], dilations=[dilations, dilations]))
    outputs = ["y"]
    if extra_reader == "Add":
        nodes.append(helper.make_node("Add", ["t", "a"], ["z"], name="residual"))
        outputs.append("z")
    return make_model(nodes, inits, input_shape=("batch", 3, 8, 8), outputs=outputs)


def _gemm(*, trans_b: int, alpha: float, beta: float, bias: str) -> onnx.ModelProto:
    """x(16) -> Gemm -> HardSwish -> Gemm(transB, alpha, beta, C absent / scalar / vector) -> y."""
    rng = np.random.default_rng(3)
    inits = {"w1": rng.normal(0, 0.5, (16, 12)).astype(np.float32), "b1": rng.normal(0.5, 0.5, 12).astype(np.float32)}
    w2 = rng.normal(0, 0.5, (12, 5)).astype(np.float32)
    inits["w2"] = w2.T.copy() if trans_b else w2
    inputs = ["t", "w2"]
    if bias != "none":
        inits["c2"] = np.float32(0.7) if bias == "scalar" else rng.normal(0, 0.3, 5).astype(np.float32)
        inputs.append("c2")
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="gemm1"),
        helper.make_node("HardSwish", ["a"], ["t"], name="hswish"),
        helper.make_node("Gemm", inputs, ["y"], name="gemm2", transB=trans_b, alpha=alpha, beta=beta),
    ]
    return make_model(nodes, inits, input_shape=("batch", 16))


def _shift(tensor: str, node: str, offset: float, consumers: tuple[str, ...]) -> Shift:
    return Shift(tensor=tensor, node=node, activation="test", shift=offset, threshold=4.0, scale=0.25,
                 minimum=-offset, maximum=3.0, error_signed=1.0, error_shifted=0.5, consumers=consumers,
                 shifted_tensor=f"{tensor}_shifted", add_node=f"{node}_shift")


def _close(a: np.ndarray, b: np.ndarray) -> None:
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4 * float(np.abs(a).max()))


# ------------------------------------------------------------------ float rewrite


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"pads": (0, 0, 0, 0)},
        {"group": 2, "pads": (0, 1, 1, 0), "strides": 2},
        {"group": 8, "pads": (2, 2, 2, 2), "dilations": 2},
        {"bias": False},
    ],
    ids=["pads", "no-pads", "grouped-asymmetric-stride", "depthwise-dilated", "no-bias"],
)
def test_shifted_conv_computes_the_same_function(settings: dict) -> None:
    model = _silu_conv(**settings)
    shifted, pads = apply_shifts(model, [_shift("t", "silu", 0.375, ("conv2",))])
    x = images(8)
    _close(run(shifted, x)[0], run(model, x)[0])
    counts = op_counts(shifted)
    assert counts["Add"] == 1
    padded = any(settings.get("pads", (1,)))
    assert counts.get("Pad", 0) == int(padded) and len(pads) == int(padded)
    conv2 = next(node for node in shifted.graph.node if node.name == "conv2")
    assert all(v == 0 for v in helper.get_attribute_value(next(a for a in conv2.attribute if a.name == "pads")))
    if padded:  # the pad value is the shift itself, read from the same constant as the Add
        pad = next(node for node in shifted.graph.node if node.op_type == "Pad")
        add = next(node for node in shifted.graph.node if node.op_type == "Add")
        assert pad.input[2] == add.input[1]


@pytest.mark.parametrize("trans_b, alpha, beta, bias", [(0, 1.0, 1.0, "vector"), (1, 0.5, 2.0, "scalar"), (1, 2.0, 0.5, "none")])
def test_shifted_gemm_computes_the_same_function(trans_b: int, alpha: float, beta: float, bias: str) -> None:
    model = _gemm(trans_b=trans_b, alpha=alpha, beta=beta, bias=bias)
    shifted, pads = apply_shifts(model, [_shift("t", "hswish", 0.5, ("gemm2",))])
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    _close(run(shifted, x)[0], run(model, x)[0])
    assert not pads


def test_shifted_statistics_move_exactly() -> None:
    stats = TensorStats("t")
    values = np.random.default_rng(0).normal(1.0, 1.0, 5000).astype(np.float32)
    stats.add(values)
    moved = stats.shifted(0.5, "t_shifted")
    assert moved.name == "t_shifted" and moved.count == stats.count
    assert moved.minimum == stats.minimum + 0.5 and moved.maximum == stats.maximum + 0.5
    np.testing.assert_allclose(moved.histogram.sums.sum(), values.astype(np.float64).sum() + 0.5 * values.size)


# ------------------------------------------------------------------ quantized


def _quantize(model: onnx.ModelProto, **settings: object):
    config = QuantizeConfig(**{"weight_bits": 8, "act_bits": 4, "optimize_rounding": False, **settings})
    return quantize(load_model_proto(model), images(48, seed=2) * 1.5, config, progress=False)


def _tensor(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    session = make_session(with_extra_outputs(model, names), optimize=False)
    return session.run(names, {"x": x})


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def test_quantized_shift_is_unsigned_exact_and_valid() -> None:
    model = _silu_conv(group=2)
    result = _quantize(model)
    q = result.model
    (item,) = result.report["shift_negative"]["shifted"]
    assert item["tensor"] == "t" and item["consumers"] == ["conv2"] and item["activation"] == "SiLU"
    assert item["min"] < 0 and item["error_shifted"] < item["error_signed"]
    assert check_model(q, LOWBIT) == []
    by_type = {node.op_type: node for node in q.graph.node}
    add, pad = by_type["Add"], by_type["Pad"]
    shift = float(_init(q, pad.input[2]))
    assert shift == item["shift"] and shift >= -item["min"]
    # The shifted tensor is quantized unsigned (uint8 container, 4-bit grid) with zero point 0.
    quant = next(node for node in q.graph.node if node.op_type == "QuantizeLinear"
                 and node.input[0] in (add.output[0], add.output[0] + "_clip"))
    zero, scale = _init(q, quant.input[2]), float(_init(q, quant.input[1]))
    assert zero.dtype == np.uint8 and int(zero) == 0 and scale == item["scale"]
    assert shift / scale == round(shift / scale)
    x = images(16, seed=5)
    shifted_dq, padded_dq, out = _tensor(q, [add.output[0] + "_dq", pad.output[0] + "_dq", "y_prequant"], x)
    assert shifted_dq.min() >= 0.0
    # conv2 on the shifted input with its corrected int32 bias equals conv2 on the unshifted
    # input (zero padding) with the float model's bias, up to the bias's own rounding.
    conv2 = next(node for node in q.graph.node if node.name == "conv2")
    producers = {out_: node for node in q.graph.node for out_ in node.output}
    w_dq, b_dq = producers[conv2.input[1]], producers[conv2.input[2]]
    weight = _init(q, w_dq.input[0]).astype(np.float64) * _init(q, w_dq.input[1]).astype(np.float64).reshape(-1, 1, 1, 1)
    bias_scale = _init(q, b_dq.input[1]).astype(np.float64)
    bias = _init(q, b_dq.input[0]).astype(np.float64) * bias_scale
    b2 = _init(model, "b2").astype(np.float64)
    np.testing.assert_array_less(np.abs(bias - (b2 - shift * weight.reshape(8, -1).sum(1))), bias_scale / 2 + 1e-12)
    reference = F.conv2d(torch.from_numpy(padded_dq.astype(np.float64) - shift), torch.from_numpy(weight),
                         torch.from_numpy(b2), groups=2).numpy()
    assert np.abs(out - reference).max() <= bias_scale.max() / 2 + 1e-4


def test_rounding_optimisation_keeps_the_shift() -> None:
    model = _silu_conv()
    result = _quantize(model, weight_bits=4, optimize_rounding=True, rounding_iterations=20)
    q = result.model
    assert len(result.report["shift_negative"]["shifted"]) == 1
    assert check_model(q, LOWBIT) == []
    rounding = result.report["rounding"]
    assert rounding["skipped"] == [] and rounding["block_fallbacks"] == []
    assert {"conv1", "conv2"} <= {name for unit in rounding["units"] for name in unit["nodes"]}
    assert op_counts(q)["Pad"] == 1 and op_counts(q)["Add"] == 1
    x = images(16, seed=5)
    float_y, quant_y = run(model, x)[0], run(q, x)[0]
    assert np.corrcoef(float_y.reshape(-1), quant_y.reshape(-1))[0, 1] > 0.9


def test_result_carries_the_float_reference_of_a_shifted_graph() -> None:
    """A separate rounding run needs the shifted float model and the shifts (the rounding
    benchmark does exactly this); with them it matches the quantizer's own run."""
    model = _silu_conv()
    result = _quantize(model, weight_bits=4)
    (item,) = result.report["shift_negative"]["shifted"]
    float_model, input_shifts = rounding_inputs(result)
    assert input_shifts == {"conv2": item["shift"]}
    assert "Add" in op_counts(float_model)
    assert not hasattr(result, "float_model") and "_rounding_inputs" not in repr(result)  # not in the public result
    x = images(8)
    _close(run(float_model, x)[0], run(model, x)[0])
    config = RoundingConfig(weight_bits=4, iterations=20, seed=0, bias_correction=False)  # quantize's own settings
    separate, report = optimize_rounding(result.model, float_model, images(48, seed=2) * 1.5, config,
                                         progress=False, input_shifts=input_shifts)
    inline = _quantize(model, weight_bits=4, optimize_rounding=True, rounding_iterations=20).model
    assert report["skipped"] == [] and report["block_fallbacks"] == []
    assert separate.graph.SerializeToString() == inline.graph.SerializeToString()


def test_hardswish_fused_behind_its_conv_is_shifted() -> None:
    """Conv -> HardSwish -> Add(c): one fused chain, only the Add's output is quantized."""
    result = _quantize(_silu_conv(act="HardSwish"), weight_bits=4, optimize_rounding=True, rounding_iterations=20)
    (item,) = result.report["shift_negative"]["shifted"]
    assert item["activation"] == "HardSwish" and item["min"] >= -0.375 and item["shift"] >= 0.375
    fused = {(f["producer"], f["consumer"]) for f in result.report["tensors"]["fused"]}
    assert {("conv1", "act"), ("act", "act_shift")} <= fused
    assert check_model(result.model, LOWBIT) == []
    assert result.report["rounding"]["block_fallbacks"] == [] and result.report["rounding"]["skipped"] == []


@pytest.mark.parametrize("mode", ["layer", "block"])
@pytest.mark.parametrize("learn_bias", [False, True])
def test_rounding_rederives_the_correction_for_its_integers(mode: str, learn_bias: bool) -> None:
    """The stored bias of a shifted consumer is ``b - c * sum(W)`` for the *learned* integers:
    onnxruntime on the result reproduces the error the optimiser measured."""
    model = _silu_conv()
    base = _quantize(model, weight_bits=4)
    (item,) = base.report["shift_negative"]["shifted"]
    shift = item["shift"]
    shifted_float, _ = apply_shifts(model, [_shift("t", "silu", shift, ("conv2",))])
    calib = images(48, seed=2) * 1.5
    config = RoundingConfig(weight_bits=4, iterations=100, mode=mode, learn_bias=learn_bias)  # type: ignore[arg-type]
    rounded, report = optimize_rounding(base.model, shifted_float, calib, config, progress=False,
                                        input_shifts={"conv2": shift})
    unit = next(u for u in report["units"] if "conv2" in u["nodes"])
    assert unit["kept"] == "learned" and unit["changed"] > 0 and report["block_fallbacks"] == []
    # conv2's output passes the 4-bit range Clip before its quantizer; the layer target is
    # the float output through the same Clip, the block target the float block output.
    (y_q,) = _tensor(rounded, ["y_clip"], calib)
    y_f = run(model, calib)[0]
    if mode == "layer":
        y_f = np.clip(y_f, _init(rounded, "y_clip_min"), _init(rounded, "y_clip_max"))
    assert float(np.mean((y_q.astype(np.float64) - y_f) ** 2)) == pytest.approx(unit["mse_optimized"], rel=1e-3)

    def unshifted_bias(q: onnx.ModelProto) -> np.ndarray:
        producers = {out: node for node in q.graph.node for out in node.output}
        conv2 = next(node for node in q.graph.node if node.name == "conv2")
        w_dq, b_dq = producers[conv2.input[1]], producers[conv2.input[2]]
        weight = _init(q, w_dq.input[0]).astype(np.float64) * _init(q, w_dq.input[1]).reshape(-1, 1, 1, 1)
        return _init(q, b_dq.input[0]) * _init(q, b_dq.input[1]).astype(np.float64) + shift * weight.reshape(8, -1).sum(1)

    if not learn_bias:  # the bias of the unshifted input is kept; only the correction moved
        scale = float(np.max(_init(rounded, "conv2_shift_bias_scale")))
        assert np.abs(unshifted_bias(rounded) - unshifted_bias(base.model)).max() <= scale / 2 + 1e-9


@pytest.mark.parametrize(
    "model, reason",
    [
        (lambda: _silu_conv(extra_reader="Add"), "Add reads it"),
        (lambda: _silu_conv(act="LeakyRelu"), "does not lower its quantization error"),
        (lambda: _silu_pool_gemm(pool_output=True), "passes it to a graph output"),
    ],
    ids=["add-consumer", "symmetric-leakyrelu", "pooled-output"],
)
def test_activations_left_alone(model, reason: str) -> None:
    report = _quantize(model()).report
    assert report["shift_negative"]["shifted"] == []
    (left,) = report["shift_negative"]["left"]
    assert left["tensor"] == "t" and reason in left["reason"]


def test_shift_off_and_nothing_eligible_change_nothing(tiny_model_path: Path) -> None:
    off = _quantize(_silu_conv(), shift_negative=False)
    assert "shift_negative" not in off.report and off.report["config"]["shift_negative"] is False
    assert "Add" not in op_counts(off.model) and "Pad" not in op_counts(off.model)
    mul_q = next(node for node in off.model.graph.node if node.op_type == "QuantizeLinear" and node.input[0].startswith("t"))
    assert _init(off.model, mul_q.input[2]).dtype == np.int8
    # A ReLU model has nothing to shift: the option does not change a byte.
    relu_images = images(24, (3, 12, 12), seed=3)
    with_shift = quantize(str(tiny_model_path), relu_images, QuantizeConfig(act_bits=4, optimize_rounding=False,
                                                                            shift_negative=True), progress=False)
    without = quantize(str(tiny_model_path), relu_images, QuantizeConfig(act_bits=4, optimize_rounding=False,
                                                                         shift_negative=False), progress=False)
    assert with_shift.report["shift_negative"]["shifted"] == []
    assert with_shift.model.SerializeToString() == without.model.SerializeToString()
    # Automatic: off with 8-bit activations.
    assert _quantize(_silu_conv(), act_bits=8).report["config"]["shift_negative"] is False


def test_shift_needs_a_profile_that_fuses_the_add() -> None:
    with pytest.raises(ProfileError, match="does not") as info:
        _quantize(_silu_conv(), act_bits=8, profile="generic-pot-int8", shift_negative=True)
    assert "pot-lowbit" in info.value.hint


def test_validator_refuses_a_pad_value_off_the_grid() -> None:
    q = _quantize(_silu_conv()).model
    pad = next(node for node in q.graph.node if node.op_type == "Pad")
    value = next(t for t in q.graph.initializer if t.name == pad.input[2])
    step = float(next(numpy_helper.to_array(t) for t in q.graph.initializer
                      if t.name == pad.input[0].replace("_dq", "_scale")))
    for bad in (float(numpy_helper.to_array(value)) + step / 2, 16 * step):
        broken = onnx.ModelProto()
        broken.CopyFrom(q)
        target = next(t for t in broken.graph.initializer if t.name == pad.input[2])
        target.CopyFrom(numpy_helper.from_array(np.array(bad, np.float32), pad.input[2]))
        rules = [v.rule for v in check_model(broken, LOWBIT)]
        assert rules == ["pad-value-off-grid"]


def test_cli_option(tiny_model_path: Path, tmp_path: Path) -> None:
    calib = save_images_npz(tmp_path / "calib.npz", images(16, (3, 12, 12)), {"source": "test"})
    for flag, expected in (("--shift-negative", True), ("--no-shift-negative", False)):
        result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(tmp_path / f"{flag}.onnx"),
                                           "--calib-data", str(calib), "--act-bits", "4", "--no-optimize-rounding",
                                           flag, "--no-validate", "--json", "-"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["config"]["shift_negative"] is expected


# ------------------------------------------------------------------ gated activation fusion


def test_silu_is_one_activation_fused_behind_its_conv() -> None:
    """Conv -> Sigmoid + Mul(x, Sigmoid(x)): the pattern [Conv, Sigmoid, Mul] leaves the
    Conv output and the gate unquantized (one hardware op); a profile without it refuses."""
    result = _quantize(_silu_conv(), shift_negative=False)
    q = result.model
    fused = {(f["producer"], f["consumer"], f["tensor"]) for f in result.report["tensors"]["fused"]}
    assert {("conv1", "sig", "a"), ("sig", "silu", "s")} <= fused
    quantized = {node.input[0] for node in q.graph.node if node.op_type == "QuantizeLinear"}
    assert not {"a", "s", "a_clip", "s_clip"} & quantized
    assert check_model(q, LOWBIT) == []
    # The same graph under a profile that fuses Conv->Sigmoid but not the gate's Mul
    # (patterns are pairwise, so every chain with Sigmoid->Mul goes).
    data = json.loads(Path(LOWBIT_PATH).read_text())
    data["fused_patterns"] = [p for p in data["fused_patterns"] if "Sigmoid" not in p] + [["Conv", "Sigmoid"]]
    data["name"] = "no-gated-mul"
    rules = {(v.rule, v.node) for v in check_model(q, profile_from_dict(data))}
    assert ("float-input-not-dequantized", "silu") in rules
    # A third reader of the fused tensor is a branch that fused hardware never exposes.
    branched = onnx.ModelProto()
    branched.CopyFrom(q)
    branched.graph.node.append(helper.make_node("Relu", ["a"], ["leak"], name="leak"))
    branched.graph.output.append(helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    rules = {v.rule for v in check_model(branched, LOWBIT)}
    assert "fused-pattern-branch" in rules


def test_squeeze_excitation_gate_keeps_its_quantizer() -> None:
    """Mul(t, HardSigmoid(fc(pool(t)))) scales *another* tensor: not a gated activation, so
    the gate's output is quantized although the profile lists HardSigmoid -> Mul."""
    rng = np.random.default_rng(7)
    inits = {"w1": conv_weight(8, 3, seed=7), "b1": rng.normal(0.3, 0.5, 8).astype(np.float32),
             "w2": conv_weight(8, 8, k=1, seed=8), "b2": rng.normal(0, 0.5, 8).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["t"], name="relu"),
        helper.make_node("GlobalAveragePool", ["t"], ["p"], name="pool"),
        helper.make_node("Conv", ["p", "w2", "b2"], ["e"], name="fc"),
        helper.make_node("HardSigmoid", ["e"], ["s"], name="gate"),
        helper.make_node("Mul", ["t", "s"], ["y"], name="scale"),
    ]
    q = _quantize(make_model(nodes, inits, input_shape=("batch", 3, 8, 8))).model
    assert {"s", "s_clip"} & {node.input[0] for node in q.graph.node if node.op_type == "QuantizeLinear"}
    assert check_model(q, LOWBIT) == []
    # Reading the gate directly is refused.
    broken = onnx.ModelProto()
    broken.CopyFrom(q)
    scale = next(node for node in broken.graph.node if node.name == "scale")
    for position, name in enumerate(scale.input):
        if name.startswith("s_"):
            scale.input[position] = "s"
    messages = [v.message for v in check_model(broken, LOWBIT) if v.rule == "float-input-not-dequantized"]
    assert any("gated activation" in m for m in messages)


def test_a_gate_read_elsewhere_is_not_fused() -> None:
    """x also read by a residual Add: the Conv output keeps its quantizer."""
    result = _quantize(_silu_conv(extra_reader="Add"), shift_negative=False)
    assert ("conv1", "sig", "a") not in {(f["producer"], f["consumer"], f["tensor"]) for f in result.report["tensors"]["fused"]}
    assert "a" in {a["tensor"] for a in result.report["tensors"]["activations"]}
    assert check_model(result.model, LOWBIT) == []


# ------------------------------------------------------------------ shift through pooling and residual Adds


def _silu_pool_gemm(*, pool_output: bool = False) -> onnx.ModelProto:
    """x -> Conv -> SiLU -> GlobalAveragePool -> Flatten -> Gemm -> y (and the pooled tensor)."""
    rng = np.random.default_rng(4)
    inits = {"w1": conv_weight(8, 3, seed=4), "b1": rng.normal(0.3, 0.5, 8).astype(np.float32),
             "w2": rng.normal(0, 0.5, (5, 8)).astype(np.float32), "b2": rng.normal(0, 0.2, 5).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Mul", ["a", "s"], ["t"], name="silu"),
        helper.make_node("GlobalAveragePool", ["t"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"], name="fc", transB=1),
    ]
    return make_model(nodes, inits, input_shape=("batch", 3, 8, 8), outputs=["y", "p"] if pool_output else ["y"])


def _silu_residual() -> onnx.ModelProto:
    """x -> Conv -> SiLU = t; y = Add(t, Conv2(t)): an identity shortcut around a padded conv."""
    rng = np.random.default_rng(5)
    inits = {"w1": conv_weight(8, 3, seed=5), "b1": rng.normal(0.3, 0.5, 8).astype(np.float32),
             "w2": conv_weight(8, 8, seed=6), "b2": rng.normal(0, 0.2, 8).astype(np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["a"], ["s"], name="sig"),
        helper.make_node("Mul", ["a", "s"], ["t"], name="silu"),
        helper.make_node("Conv", ["t", "w2", "b2"], ["u"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["t", "u"], ["y"], name="residual"),
    ]
    return make_model(nodes, inits, input_shape=("batch", 3, 8, 8))


def test_shift_through_pooling_and_residual_add_keeps_the_function() -> None:
    x = images(8)
    pooled = _silu_pool_gemm()
    item = replace(_shift("t", "silu", 0.5, ("fc",)), passed=("p", "f"))
    shifted, pads = apply_shifts(pooled, [item])
    _close(run(shifted, x)[0], run(pooled, x)[0])
    assert not pads and next(n for n in shifted.graph.node if n.name == "pool").input[0] == "t_shifted"
    residual = _silu_residual()
    item = replace(_shift("t", "silu", 0.375, ("conv2",)), counters=("conv2",), countered=("u",))
    shifted, pads = apply_shifts(residual, [item])
    _close(run(shifted, x)[0], run(residual, x)[0])
    add = next(n for n in shifted.graph.node if n.name == "residual")
    assert "t_shifted" in add.input and len(pads) == 1
    conv2 = next(n for n in shifted.graph.node if n.name == "conv2")
    w2 = _init(residual, "w2").astype(np.float64)
    expected = _init(residual, "b2") - 0.375 * w2.reshape(8, -1).sum(1) - 0.375
    np.testing.assert_allclose(_init(shifted, conv2.input[2]), expected, rtol=1e-6, atol=1e-6)


def test_residual_counter_on_a_gemm_divides_by_beta() -> None:
    """t = HardSwish(Gemm1(x)); y = t + Gemm2(t) with beta 2 and alpha 0.5: C takes -c / beta."""
    rng = np.random.default_rng(6)
    inits = {"w1": rng.normal(0, 0.5, (16, 12)).astype(np.float32), "b1": rng.normal(0.5, 0.5, 12).astype(np.float32),
             "w2": rng.normal(0, 0.5, (12, 12)).astype(np.float32), "c2": rng.normal(0, 0.3, 12).astype(np.float32)}
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["a"], name="gemm1"),
        helper.make_node("HardSwish", ["a"], ["t"], name="hswish"),
        helper.make_node("Gemm", ["t", "w2", "c2"], ["u"], name="gemm2", alpha=0.5, beta=2.0),
        helper.make_node("Add", ["t", "u"], ["y"], name="residual"),
    ]
    model = make_model(nodes, inits, input_shape=("batch", 16))
    item = replace(_shift("t", "hswish", 0.5, ("gemm2",)), counters=("gemm2",), countered=("u",))
    shifted, _pads = apply_shifts(model, [item])
    x = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    _close(run(shifted, x)[0], run(model, x)[0])


@pytest.mark.parametrize("build", [_silu_pool_gemm, _silu_residual], ids=["pool-gemm", "residual-add"])
def test_quantized_shift_through_pooling_and_residual_add(build) -> None:
    result = _quantize(build())
    (item,) = result.report["shift_negative"]["shifted"]
    assert item["tensor"] == "t"
    q = result.model
    assert check_model(q, LOWBIT) == []
    marks = {a["tensor"]: a for a in result.report["tensors"]["activations"]}
    if build is _silu_pool_gemm:
        assert item["passed_through"] == ["p", "f"] and item["consumers"] == ["fc"]
        assert marks["p"]["signed"] is False  # the pooled mean carries +c too: unsigned
    else:
        assert item["residual_counters"] == ["conv2"] and item["consumers"] == ["conv2"]
    # Same function in float, and at 4-bit activations the unsigned grid is closer to it.
    x = images(16, seed=5)
    float_y = run(build(), x)[0]
    unshifted = _quantize(build(), shift_negative=False).model
    error = float(np.mean((run(q, x)[0] - float_y) ** 2))
    assert error < float(np.mean((run(unshifted, x)[0] - float_y) ** 2))
