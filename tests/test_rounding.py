"""Rounding optimisation (AdaRound) and bias correction on tiny hand-built QDQ models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from onnxdgh.errors import CalibrationDataError, InvalidInputError, QuantizationError
from onnxdgh.quantization.rounding import RoundingConfig, bias_correction, optimize_rounding, weighted_layers

from .conftest import TinyConvBnRelu, export_onnx, settle_bn
from .helpers_rounding import (
    _init,
    _model,
    conv_model,
    convtranspose_model,
    matmul_model,
    quantize_for_test,
    residual_model,
    run,
)

torch.set_num_threads(1)

MODELS = {
    "conv": (conv_model, (3, 10, 10)),
    "convtranspose": (convtranspose_model, (4, 6, 6)),
    "matmul": (matmul_model, (1, 4, 4)),
}


def _images(shape: tuple[int, ...], n: int = 64, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _setup(kind: str, weight_bits: int = 2) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    build, shape = MODELS[kind]
    float_model = build()
    images = _images(shape)
    return float_model, quantize_for_test(float_model, images, weight_bits=weight_bits), images


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


FAST = RoundingConfig(weight_bits=2, iterations=300, batch_size=32, mode="layer", learn_bias=False)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_learned_rounding_beats_nearest(kind: str) -> None:
    """Covers Conv (plain, grouped, depthwise), ConvTranspose (grouped), Gemm (both transB) and MatMul."""
    float_model, qdq, images = _setup(kind)
    optimized, report = optimize_rounding(qdq, float_model, images, FAST, progress=False)

    weighted = [n.name for n in qdq.graph.node if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")]
    assert [name for row in report["units"] for name in row["nodes"]] == weighted
    assert report["skipped"] == []
    learned = [row for row in report["units"] if row["kept"] == "learned"]
    assert learned, report["units"]
    for row in learned:
        assert row["mse_optimized"] < row["mse_nearest"]
        assert 0 < row["changed"] < 1

    # Independently of the report: the model output is closer to the float model's.
    reference = run(float_model, images)[0]
    assert _mse(run(optimized, images)[0], reference) < 0.9 * _mse(run(qdq, images)[0], reference)


def test_first_layer_reconstruction_error_drops_in_onnxruntime() -> None:
    """The first layer sees the same input in both models: its fused output (Conv+SiLU) error must drop."""
    float_model, qdq, images = _setup("convtranspose")
    optimized, report = optimize_rounding(
        qdq, float_model, images, RoundingConfig(weight_bits=2, iterations=400, mode="layer", learn_bias=False), progress=False
    )
    assert report["units"][0]["kept"] == "learned" and report["units"][0]["target"] == "activation"
    (reference,) = run(float_model, images, ["silu"])
    (before,) = run(qdq, images, ["silu"])
    (after,) = run(optimized, images, ["silu"])
    assert _mse(after, reference) < _mse(before, reference)


def test_integers_in_range_scales_and_structure_unchanged() -> None:
    float_model, qdq, images = _setup("conv")
    optimized, report = optimize_rounding(qdq, float_model, images, FAST, progress=False)
    before, after = _inits(qdq), _inits(optimized)
    assert before.keys() == after.keys()
    weight_ints = {n.input[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_w_quantized")}
    assert len(weight_ints) == 4
    changed = 0
    for name, value in before.items():
        if name in weight_ints:
            assert after[name].dtype == value.dtype and after[name].shape == value.shape
            assert after[name].min() >= -2 and after[name].max() <= 1
            # AdaRound only chooses floor or ceil: every integer stays within 1 of nearest.
            assert np.abs(after[name].astype(int) - value.astype(int)).max() <= 1
            changed += int(np.sum(after[name] != value))
        else:  # scales, zero points, biases, activation parameters: bit-identical
            assert after[name].dtype == value.dtype
            np.testing.assert_array_equal(after[name], value)
            if name.endswith("_scale"):
                mantissa, _ = np.frexp(value.astype(np.float64))
                assert np.all(mantissa == 0.5), name  # still exact powers of two
    assert changed > 0
    assert [(n.op_type, list(n.input), list(n.output)) for n in optimized.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in qdq.graph.node
    ]
    onnx.checker.check_model(optimized)


def test_same_seed_same_integers() -> None:
    float_model, qdq, images = _setup("matmul")
    config = RoundingConfig(weight_bits=2, iterations=150, seed=3)
    first, report = optimize_rounding(qdq, float_model, images, config, progress=False)
    second, _ = optimize_rounding(qdq, float_model, images, config, progress=False)
    assert first.SerializeToString() == second.SerializeToString()
    # The defaults: blocks, biases learned with the rounding.
    assert {row["unit"] for row in report["units"]} == {"block"}
    assert any(row.get("bias_learned") for row in report["units"])


def test_inputs_are_not_modified() -> None:
    float_model, qdq, images = _setup("matmul")
    saved_q, saved_f = qdq.SerializeToString(), float_model.SerializeToString()
    optimize_rounding(qdq, float_model, images, RoundingConfig(weight_bits=2, iterations=20, bias_correction=True), progress=False)
    bias_correction(qdq, float_model, images, progress=False)
    assert qdq.SerializeToString() == saved_q and float_model.SerializeToString() == saved_f


def _channel_bias_error(model: onnx.ModelProto, float_model: onnx.ModelProto, images: np.ndarray, tensor: str) -> np.ndarray:
    (quant,) = run(model, images, [tensor])
    (ref,) = run(float_model, images, [tensor])
    return np.abs((ref.astype(np.float64) - quant).mean(axis=(0, 2, 3)))


def test_bias_correction_removes_mean_error_and_adds_missing_bias() -> None:
    float_model, qdq, images = _setup("conv")
    corrected, report = bias_correction(qdq, float_model, images, progress=False)
    outcomes = {row["node"]: row["outcome"] for row in report["layers"]}
    assert outcomes == {"conv1": "corrected", "conv2": "corrected", "dwconv": "corrected", "fc": "corrected"}
    # The first layer sees identical inputs before and after: its per-channel mean error
    # must shrink to within half a step of the int32 bias grid.
    before = _channel_bias_error(qdq, float_model, images, "c1")
    after = _channel_bias_error(corrected, float_model, images, "c1")
    assert after.mean() < 0.5 * before.mean()
    assert np.all(after <= 0.5 * _inits(qdq)["c1_b_scale"] + 1e-6)

    # The depthwise Conv had no bias: it gets one in the emitter's convention.
    dw = next(n for n in corrected.graph.node if n.name == "dwconv")
    assert len(dw.input) == 3 and dw.input[2]
    dq = next(n for n in corrected.graph.node if n.output[0] == dw.input[2])
    inits = _inits(corrected)
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32
    assert np.all(inits[dq.input[2]] == 0)
    in_scale = float(inits["r2_scale"])
    np.testing.assert_array_equal(inits[dq.input[1]], (in_scale * inits["c3_w_scale"]).astype(np.float32))
    onnx.checker.check_model(corrected)
    reference = run(float_model, images)[0]
    assert _mse(run(corrected, images)[0], reference) < _mse(run(qdq, images)[0], reference)


def test_bias_correction_skips_matmul_without_bias_and_runs_inside_rounding() -> None:
    float_model, qdq, images = _setup("matmul")
    _, report = bias_correction(qdq, float_model, images, progress=False)
    outcomes = {row["node"]: row["outcome"] for row in report["layers"]}
    assert outcomes["matmul"].startswith("skipped") and outcomes["gemm"] == "corrected"
    optimized, report = optimize_rounding(
        qdq, float_model, images, RoundingConfig(weight_bits=2, iterations=100, bias_correction=True, mode="layer", learn_bias=False), progress=False
    )
    assert [row["bias_correction"] for row in report["units"]] == [[outcomes["matmul"]], ["corrected"]]
    gemm_bias = "g_b_quantized"
    assert not np.array_equal(_inits(optimized)[gemm_bias], _inits(qdq)[gemm_bias])


@pytest.mark.parametrize(
    "attributes, weight_shape, op",
    [
        ({"pads": [0, 1, 2, 1], "dilations": [2, 1]}, (4, 3, 3, 3), "Conv"),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, (4, 3, 2, 2), "Conv"),
        ({"auto_pad": "SAME_LOWER", "strides": [2, 2]}, (4, 3, 2, 2), "Conv"),
        ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, (3, 4, 3, 3), "ConvTranspose"),
        ({"strides": [2, 2], "output_shape": [11, 11]}, (3, 4, 3, 3), "ConvTranspose"),
        ({"strides": [2, 1], "dilations": [1, 2], "output_padding": [1, 0]}, (3, 4, 3, 3), "ConvTranspose"),
    ],
)
def test_torch_reimplementation_agrees_with_onnxruntime(attributes: dict, weight_shape: tuple, op: str) -> None:
    """Every attribute combination here must be understood (a disagreement would skip the layer)."""
    rng = np.random.default_rng(0)
    out_channels = weight_shape[1] if op == "ConvTranspose" else weight_shape[0]
    nodes = [helper.make_node(op, ["input", "w", "b"], ["logits"], name="layer", **attributes)]
    inits = [
        _init("w", (rng.standard_normal(weight_shape) * 0.3).astype(np.float32)),
        _init("b", rng.standard_normal(out_channels).astype(np.float32) * 0.1),
    ]
    float_model = _model(nodes, inits, [3, 6, 6])
    images = _images((3, 6, 6), n=16)
    qdq = quantize_for_test(float_model, images, weight_bits=3)
    _, report = optimize_rounding(qdq, float_model, images, RoundingConfig(weight_bits=3, iterations=5, mode="layer"), progress=False)
    assert report["skipped"] == [] and len(report["units"]) == 1


def test_shared_weight_is_skipped_with_reason() -> None:
    float_model, qdq, images = _setup("matmul")
    graph = qdq.graph
    mm_dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "m_w_quantized")
    # A second DequantizeLinear of the same integers feeding a second MatMul.
    graph.node.append(helper.make_node("DequantizeLinear", list(mm_dq.input), ["m_w_dq2"], axis=1, name="dq2"))
    graph.node.append(helper.make_node("MatMul", ["flat", "m_w_dq2"], ["extra"], name="matmul2"))
    graph.output.append(onnx.ValueInfoProto(name="extra"))
    layers, skipped = weighted_layers(qdq, float_model)
    assert [layer.node.name for layer in layers] == ["gemm"]
    assert {row["node"] for row in skipped} == {"matmul", "matmul2"}
    assert all("shared" in row["reason"] for row in skipped)


@pytest.mark.parametrize(
    "field, value",
    [("weight_bits", 1), ("weight_bits", 9), ("iterations", -1), ("batch_size", 0), ("lr", 0.0),
     ("lr", float("nan")), ("bias_lr", 0.0), ("mode", "net"), ("reg_weight", -1.0), ("warmup", 1.0), ("beta_start", 1.0), ("target", "block")],
)
def test_bad_config_is_rejected(field: str, value: object) -> None:
    with pytest.raises(InvalidInputError, match=field):
        RoundingConfig(**{field: value})


def test_bad_images_are_rejected() -> None:
    float_model, qdq, images = _setup("matmul")
    with pytest.raises(CalibrationDataError):
        optimize_rounding(qdq, float_model, images[:0], FAST, progress=False)
    bad = images.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationDataError):
        bias_correction(qdq, float_model, bad, progress=False)


def test_wrong_float_model_is_rejected() -> None:
    _, qdq, images = _setup("matmul")
    with pytest.raises(QuantizationError, match="matmul") as info:
        optimize_rounding(qdq, matmul_model(seed=5), images, FAST, progress=False)
    assert "BatchNorm-folded" in (info.value.hint or "")


def test_weight_bits_narrower_than_stored_integers_is_rejected() -> None:
    float_model, qdq, images = _setup("matmul", weight_bits=4)
    with pytest.raises(QuantizationError, match="2-bit range"):
        optimize_rounding(qdq, float_model, images, FAST, progress=False)


def test_block_mode_reconstructs_the_residual_block_jointly() -> None:
    float_model = residual_model()
    images = _images((4, 8, 8))
    qdq = quantize_for_test(float_model, images, weight_bits=2)
    optimized, report = optimize_rounding(
        qdq, float_model, images, RoundingConfig(weight_bits=2, iterations=300, mode="block", learn_bias=False), progress=False
    )
    assert report["block_fallbacks"] == [] and report["skipped"] == []
    assert [(row["unit"], row["nodes"]) for row in report["units"]] == [
        ("block", ["conv_a", "conv_b"]), ("block", ["conv_c"]), ("block", ["fc"])
    ]
    first = report["units"][0]
    assert first["kept"] == "learned" and first["mse_optimized"] < first["mse_nearest"]
    # Independently, in onnxruntime: the block output (Add, before its quantizer) is
    # closer to the float model's; both models see the same block input.
    (reference,) = run(float_model, images, ["sum"])
    (before,) = run(qdq, images, ["sum"])
    (after,) = run(optimized, images, ["sum"])
    assert _mse(after, reference) < _mse(before, reference)
    # ... and the report's figures are those same errors (the simulation of the
    # block agrees with onnxruntime).
    assert first["mse_nearest"] == pytest.approx(_mse(before, reference), rel=1e-3)
    assert first["mse_optimized"] == pytest.approx(_mse(after, reference), rel=1e-3)
    final = run(float_model, images)[0]
    assert _mse(run(optimized, images)[0], final) < _mse(run(qdq, images)[0], final)


def test_block_with_an_unknown_op_falls_back_to_layers() -> None:
    float_model = residual_model(branch_op="ThresholdedRelu")  # onnxruntime runs it, onnx2torch does not
    images = _images((4, 8, 8))
    qdq = quantize_for_test(float_model, images, weight_bits=2)
    _, report = optimize_rounding(
        qdq, float_model, images, RoundingConfig(weight_bits=2, iterations=50, mode="block", learn_bias=False), progress=False
    )
    assert len(report["block_fallbacks"]) == 1
    fallback = report["block_fallbacks"][0]
    assert fallback["nodes"] == ["conv_a", "conv_b"] and "ThresholdedRelu" in fallback["reason"]
    assert [(row["unit"], row["nodes"]) for row in report["units"]][:2] == [("layer", ["conv_a"]), ("layer", ["conv_b"])]


def test_block_mode_with_bias_correction_corrects_every_layer() -> None:
    float_model = residual_model()
    images = _images((4, 8, 8))
    qdq = quantize_for_test(float_model, images, weight_bits=2)
    optimized, report = optimize_rounding(
        qdq, float_model, images,
        RoundingConfig(weight_bits=2, iterations=30, mode="block", bias_correction=True, learn_bias=False), progress=False,
    )
    assert [row["bias_correction"] for row in report["units"]] == [["corrected", "corrected"], ["corrected"], ["corrected"]]
    onnx.checker.check_model(optimized)


def test_real_quantizer_output_keeps_its_profile(tmp_path) -> None:
    """End to end with onnxdgh.quantize: the optimised model still passes the validator's profile."""
    from onnxdgh.load import load_model
    from onnxdgh.quantization import QuantizeConfig, quantize
    from onnxdgh.quantization.fold import prepare
    from onnxdgh.validation import validate

    torch.manual_seed(0)
    path = export_onnx(settle_bn(TinyConvBnRelu(), (3, 12, 12)), (3, 12, 12), tmp_path / "tiny.onnx")
    loaded = load_model(path)
    images = _images((3, 12, 12), n=48)
    nearest = QuantizeConfig(weight_bits=4, act_bits=4, optimize_rounding=False, bias_correction=False)
    result = quantize(loaded, images, nearest, progress=False)
    folded, _ = prepare(loaded.model)
    for mode in ("layer", "block"):
        config = RoundingConfig(weight_bits=4, iterations=100, mode=mode, bias_correction=True)
        optimized, report = optimize_rounding(result.model, folded, images, config, progress=False)
        assert report["skipped"] == [] and report["block_fallbacks"] == []
        assert sum(len(row["nodes"]) for row in report["units"]) == 3
        assert any(row["changed"] > 0 and row["kept"] == "learned" for row in report["units"])
        checked = validate(optimized, loaded, data=images)
        assert checked.violations == (), checked.violations
        reference = run(loaded.model, images)[0]
        assert _mse(run(optimized, images)[0], reference) < _mse(run(result.model, images)[0], reference)


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_learned_biases_join_the_reconstruction(mode: str) -> None:
    float_model, qdq, images = _setup("conv")
    config = RoundingConfig(weight_bits=2, iterations=200, mode=mode, learn_bias=True)
    optimized, report = optimize_rounding(qdq, float_model, images, config, progress=False)
    learned = [row for row in report["units"] if row.get("bias_learned")]
    assert learned and all(row["kept"] == "learned" for row in learned)
    before, after = _inits(qdq), _inits(optimized)
    assert any(not np.array_equal(before[n], after[n]) for n in ("c1_b_quantized", "c2_b_quantized", "fc_b_quantized"))
    for name in ("c1_b_scale", "c2_b_scale", "fc_b_scale"):
        np.testing.assert_array_equal(before[name], after[name])
    if any("dwconv" in row["nodes"] for row in learned):
        # The depthwise Conv had no bias: it now reads an int32 one in the emitter's convention.
        dw = next(n for n in optimized.graph.node if n.name == "dwconv")
        dq = next(n for n in optimized.graph.node if n.output[0] == dw.input[2])
        assert after[dq.input[0]].dtype == np.int32
        np.testing.assert_array_equal(after[dq.input[1]], (float(after["r2_scale"]) * after["c3_w_scale"]).astype(np.float32))
    onnx.checker.check_model(optimized)
    # The first unit (conv1 + Relu) sees the same input in both models: in onnxruntime its
    # output error is the report's and lower than with nearest rounding and the old bias.
    first = report["units"][0]
    assert first["nodes"] == ["conv1"] and first.get("bias_learned")
    (reference,) = run(float_model, images, ["r1"])
    (before_r1,) = run(qdq, images, ["r1"])
    (after_r1,) = run(optimized, images, ["r1"])
    assert _mse(after_r1, reference) == pytest.approx(first["mse_optimized"], rel=1e-3)
    assert _mse(after_r1, reference) < _mse(before_r1, reference)


def test_graph_helpers_used_by_rounding() -> None:
    """set_initializer_value keeps INT4 packing; pruned_copy keeps only what the outputs need."""
    from onnxdgh import graph as g

    graph = helper.make_graph([], "g", [], [], initializer=[helper.make_tensor("w", onnx.TensorProto.INT4, [3], [-8, 7, 1])])
    g.set_initializer_value(graph, "w", np.array([1, -2, 3]))
    assert graph.initializer[0].data_type == onnx.TensorProto.INT4
    assert numpy_helper.to_array(graph.initializer[0]).astype(int).tolist() == [1, -2, 3]
    with pytest.raises(KeyError):
        g.set_initializer_value(graph, "missing", np.zeros(1))

    float_model = matmul_model()
    pruned = g.pruned_copy(float_model, ["flat"])
    assert [n.op_type for n in pruned.graph.node] == ["Flatten"] and not pruned.graph.initializer
    images = _images((1, 4, 4), n=4)
    np.testing.assert_array_equal(run(pruned, images)[0], images.reshape(4, -1))


def test_gated_activation_is_reconstructed_whole() -> None:
    """Conv -> Mul(x, Sigmoid(x)): the layer unit runs through the gate to the output
    quantizer, and its simulation is onnxruntime's (the HardSigmoid gate, fused by the
    real quantizer: tests/test_simulate.py)."""
    from onnxdgh.quantization.rounding import _layer_unit
    from onnxdgh.quantization.simulate import simulate

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c"], ["g"], name="gate"),
        helper.make_node("Mul", ["c", "g"], ["logits"], name="mul"),
    ]
    inits = [_init("w", (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)), _init("b", np.zeros(4, np.float32))]
    float_model = _model(nodes, inits, [3, 6, 6])
    images = _images((3, 6, 6), n=16)
    qdq = quantize_for_test(float_model, images, weight_bits=3)
    layers, _ = weighted_layers(qdq, float_model)
    unit = _layer_unit(qdq, layers[0], "activation", {"c", "g", "logits", "input"})
    assert unit.target == "activation" and unit.output == "logits_prequant" and unit.float_name == "logits"
    (x,) = run(qdq, images, ["input_dq"])
    (reference,) = run(qdq, images, ["logits_prequant"])
    sim = simulate(qdq, inputs=unit.inputs, outputs=[unit.output], check=[x])
    np.testing.assert_allclose(sim.run([x])[0], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["layer", "block"])
def test_quantized_target_reconstructs_through_the_output_quantizer(mode: str) -> None:
    float_model, qdq, images = _setup("conv")
    config = RoundingConfig(weight_bits=2, iterations=30, mode=mode, target="quantized", learn_bias=False)
    _, report = optimize_rounding(qdq, float_model, images, config, progress=False)
    assert report["skipped"] == [] and report["block_fallbacks"] == []
    # Every unit but the last (its output is the graph output, quantized too) ends at a DequantizeLinear.
    assert {row["target"] for row in report["units"]} == {"quantized"}
