"""quantize(): the QDQ contract on a Conv-BN-ReLU model, bit widths, naming, profiles and every error path."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxdgh.errors import CalibrationDataError, InvalidInputError, ProfileError, QuantizationError
from onnxdgh.load import load_model, load_model_proto
from onnxdgh.quantization import QuantizeConfig, quantize

from .conftest import TinyConvBnRelu, export_onnx, settle_bn
from .helpers_quantize import (
    bias_scale_problems,
    conv_weight,
    images,
    is_pow2,
    make_model,
    op_counts,
    output_scale,
    qdq_scale,
    rng,
    run,
    session,
    structure_problems,
)

N = helper.make_node
CONV_RELU = {("Conv", "Relu"), ("Gemm", "Relu")}


def _calib(n: int = 48, seed: int = 1) -> np.ndarray:
    return (rng(seed).standard_normal((n, 3, 12, 12)) * 1.5 + 0.3).astype(np.float32)


def _nodes(model: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == op]


def _init(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(init for init in model.graph.initializer if init.name == name))


@pytest.fixture
def tiny(tiny_model_path: Path) -> Path:
    model = onnx.load(str(tiny_model_path))
    helper.set_model_props(model, {"input_mean": "[0.5]", "input_std": "[0.25]", "class_names": '["a","b","c","d"]'})
    onnx.save(model, str(tiny_model_path))
    return tiny_model_path


def test_w8a8_contract_on_conv_bn_relu(tiny: Path) -> None:
    before = tiny.read_bytes()
    result = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False)
    q = result.model
    assert tiny.read_bytes() == before
    assert structure_problems(q, CONV_RELU) == []
    assert bias_scale_problems(q) == []
    counts = op_counts(q)
    assert "BatchNormalization" not in counts
    # input, the Relu output of each fused Conv->Relu (2), pool, flatten (same scale), logits
    assert counts["QuantizeLinear"] == 6
    assert result.report["fold"]["bn_folded"] == 2 and result.report["counts"]["fused_pairs"] == 2

    # Relu outputs (and the pool / flatten after them) are unsigned; input and logits signed.
    for node in _nodes(q, "QuantizeLinear"):
        zp = _init(q, node.input[2])
        expected = np.int8 if node.input[0] in ("input", "logits_prequant") else np.uint8
        assert zp.dtype == expected, node.input[0]
    # Flatten keeps its input's scale.
    flat = _nodes(q, "Flatten")[0]
    flat_in_dq = next(n for n in q.graph.node if n.output[0] == flat.input[0])
    flat_out_q = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == flat.output[0])
    assert qdq_scale(q, flat_in_dq) == qdq_scale(q, flat_out_q)

    x = _calib(16, seed=9)
    expected = run(onnx.load(str(tiny)), x)[0]
    got = run(q, x)[0]
    assert np.mean(expected.argmax(1) == got.argmax(1)) >= 0.9
    assert np.sqrt(np.mean((got - expected) ** 2)) < 0.05 * np.abs(expected).max()

    meta = {prop.key: prop.value for prop in q.metadata_props}
    assert meta["input_mean"] == "[0.5]" and meta["class_names"] == '["a","b","c","d"]'
    assert meta["onnxdgh.weight_bits"] == "8" and meta["onnxdgh.act_bits"] == "8"
    assert meta["onnxdgh.threshold"] == "mse" and meta["onnxdgh.profile"] == "generic-pot-int8"
    assert meta["onnxdgh.calibration_source"] == "array" and meta["onnxdgh.calibration_images"] == "48"
    assert meta["onnxdgh.seed"] == "0" and "onnxdgh.version" in meta
    assert result.report["timings"]["quantize_s"] > 0


def test_naming_convention(tiny: Path) -> None:
    q = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False).model
    graph = q.graph
    outputs = {node.output[0]: node for node in graph.node}
    # graph input X -> X_q -> X_dq
    q_in = outputs["input_q"]
    assert q_in.op_type == "QuantizeLinear" and list(q_in.input) == ["input", "input_scale", "input_zero_point"]
    assert outputs["input_dq"].op_type == "DequantizeLinear"
    # graph output: producer writes logits_prequant, Q -> logits_q, final DQ writes logits
    assert outputs["logits_prequant"].op_type == "Gemm"
    assert outputs["logits_q"].input[0] == "logits_prequant"
    assert outputs["logits"].op_type == "DequantizeLinear" and outputs["logits"].input[0] == "logits_q"
    assert [o.name for o in graph.output] == ["logits"] and graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    # internal T: T_q and T_dq, consumers read T_dq
    for node in _nodes(q, "QuantizeLinear"):
        source = node.input[0]
        if source in ("input", "logits_prequant"):
            continue
        assert node.output[0] == f"{source}_q"
        readers = [n for n in graph.node if source in n.input]
        assert readers == [node]
        assert outputs[f"{source}_dq"].input[0] == f"{source}_q"
    # weights: W_quantized / W_scale / W_zero_point -> W_dq on the right axis
    gemm = _nodes(q, "Gemm")[0]
    w_dq = outputs[gemm.input[1]]
    base = gemm.input[1][: -len("_dq")]
    assert list(w_dq.input) == [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
    assert helper.get_attribute_value(w_dq.attribute[0]) == 0  # Gemm transB=1: axis 0
    assert _init(q, f"{base}_quantized").dtype == np.int8
    b_dq = outputs[gemm.input[2]]
    assert _init(q, b_dq.input[0]).dtype == np.int32 and _init(q, b_dq.input[2]).dtype == np.int32


def test_ort_optimiser_keeps_qdq_and_outputs_match(tiny: Path, tmp_path: Path) -> None:
    q = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False).model
    path = tmp_path / "q.onnx"
    onnx.save(q, str(path))
    optimised_path = tmp_path / "q_opt.onnx"
    session(str(path), optimize=True, save_to=optimised_path)
    optimised = onnx.load(str(optimised_path))
    kinds = {node.op_type for node in optimised.graph.node}
    assert "QuantizeLinear" in kinds and "DequantizeLinear" in kinds
    assert {"QLinearConv", "QGemm"} & kinds, kinds  # ORT fused the QDQ groups into integer kernels
    x = _calib(8, seed=4)
    on = session(q, optimize=True).run(None, {"input": x})[0]
    off = session(q, optimize=False).run(None, {"input": x})[0]
    step = float(qdq_scale(q, next(n for n in q.graph.node if n.output[0] == "logits")))
    assert np.max(np.abs(on - off)) <= step * 1.01


@pytest.mark.parametrize(("weight_bits", "act_bits"), [(4, 8), (4, 4), (2, 8)])
def test_sub8bit_ranges(tiny: Path, weight_bits: int, act_bits: int) -> None:
    config = QuantizeConfig(weight_bits=weight_bits, act_bits=act_bits, optimize_rounding=False)
    result = quantize(str(tiny), _calib(), config, progress=False)
    q = result.model
    assert structure_problems(q, CONV_RELU) == []
    low, high = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    for node in _nodes(q, "DequantizeLinear"):
        values = _init(q, node.input[0]) if node.input[0].endswith("_quantized") else None
        if values is not None and values.dtype == np.int8:
            assert values.min() >= low and values.max() <= high, node.input[0]
    clips = {node.output[0]: node for node in _nodes(q, "Clip")}
    for node in _nodes(q, "QuantizeLinear"):
        scale = float(qdq_scale(q, node))
        unsigned = _init(q, node.input[2]).dtype == np.uint8
        if act_bits == 8:
            assert node.input[0] not in clips
            continue
        clip = clips[node.input[0]]
        assert clip.output[0].endswith("_clip")
        lo, hi = float(_init(q, clip.input[1])), float(_init(q, clip.input[2]))
        assert (lo, hi) == ((0.0, 15 * scale) if unsigned else (-8 * scale, 7 * scale))
    assert result.report["profile"] == ("pot-w4a8" if (weight_bits, act_bits) == (4, 8) else "pot-lowbit")
    x = _calib(8, seed=4)
    step = float(qdq_scale(q, next(n for n in q.graph.node if n.output[0] == "logits")))
    assert np.max(np.abs(run(q, x, optimize=True)[0] - run(q, x)[0])) <= 1.01 * step
    # At run time, every quantized activation stays on its narrow grid.
    from onnxdgh.runtime import with_extra_outputs

    q_outputs = [node.output[0] for node in _nodes(q, "QuantizeLinear")]
    values = run(with_extra_outputs(q, q_outputs), _calib(8, seed=4) * 3)
    for name, value in zip(q_outputs, values[1:]):
        if act_bits == 4:
            assert value.min() >= (0 if value.dtype == np.uint8 else -8) and value.max() <= (15 if value.dtype == np.uint8 else 7), name


def test_int4_types_match_int8_containers(tiny: Path) -> None:
    config = QuantizeConfig(weight_bits=4, act_bits=4, optimize_rounding=False, bias_correction=False)
    narrow = quantize(str(tiny), _calib(), config, progress=False).model
    typed_config = QuantizeConfig(weight_bits=4, act_bits=4, int4_types=True, optimize_rounding=False, bias_correction=False)
    typed = quantize(str(tiny), _calib(), typed_config, progress=False).model
    assert typed.opset_import[0].version == 21 and "Clip" not in op_counts(typed)
    types = {init.data_type for init in typed.graph.initializer if init.name.endswith("_zero_point")}
    assert {TensorProto.INT4, TensorProto.UINT4} <= types
    x = _calib(8, seed=6)
    np.testing.assert_array_equal(run(typed, x)[0], run(narrow, x)[0])
    np.testing.assert_array_equal(run(typed, x, optimize=True)[0], run(typed, x)[0])


def test_rounding_runs_below_8_bits_and_keeps_the_contract(tiny: Path) -> None:
    nearest = quantize(str(tiny), _calib(), QuantizeConfig(weight_bits=4, optimize_rounding=False), progress=False)
    assert "rounding" not in nearest.report and nearest.report["config"]["bias_correction"] is False
    result = quantize(str(tiny), _calib(), QuantizeConfig(weight_bits=4, rounding_iterations=10), progress=False)
    q = result.model
    # Bias correction stays off by default: the rounding optimisation learns the biases.
    assert result.report["config"]["optimize_rounding"] is True and result.report["config"]["bias_correction"] is False
    assert "rounding" in result.report and result.report["timings"]["rounding_s"] > 0
    assert structure_problems(q, CONV_RELU) == [] and bias_scale_problems(q) == []
    meta = {prop.key: prop.value for prop in q.metadata_props}
    assert meta["onnxdgh.optimize_rounding"] == "true" and meta["onnxdgh.bias_correction"] == "false"
    # Only stored integers change: same nodes, same scales.
    assert [n.op_type for n in q.graph.node] == [n.op_type for n in nearest.model.graph.node]
    scales = lambda m: {i.name: i.raw_data for i in m.graph.initializer if i.name.endswith("_scale")}  # noqa: E731
    assert scales(q) == scales(nearest.model)
    for node in _nodes(q, "DequantizeLinear"):
        if node.input[0].endswith("weight_quantized"):
            values = _init(q, node.input[0])
            assert values.min() >= -8 and values.max() <= 7
    w8 = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False)
    assert "rounding" not in w8.report  # W8A8: nearest rounding, no extra time


def test_per_tensor_weights_and_strict_profile(tiny: Path) -> None:
    q = quantize(str(tiny), _calib(), QuantizeConfig(per_channel=False), progress=False).model
    strict = quantize(str(tiny), _calib(), QuantizeConfig(profile="strict-pot-int8"), progress=False).model
    for model in (q, strict):
        for node in _nodes(model, "DequantizeLinear"):
            assert qdq_scale(model, node).size == 1
            assert not any(attr.name == "axis" for attr in node.attribute)
        assert bias_scale_problems(model) == []


def test_observed_non_negative_input_is_unsigned(tiny: Path) -> None:
    pixels = rng(3).uniform(0, 1, (32, 3, 12, 12)).astype(np.float32)
    q = quantize(str(tiny), pixels, QuantizeConfig(), progress=False).model
    assert _init(q, "input_zero_point").dtype == np.uint8
    assert float(_init(q, "input_scale")) == 2.0**-8  # max < 255/256: t = 1, step 1/256


def test_concat_shares_one_scale() -> None:
    w_small = conv_weight(2, 3, 1, 1) * 0.1
    w_big = conv_weight(2, 3, 1, 2) * 10
    nodes = [
        N("Conv", ["x", "ws"], ["a"], name="small"),
        N("Conv", ["x", "wb"], ["b"], name="big"),
        N("Concat", ["a", "b"], ["c"], name="cat", axis=1),
        N("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2]),
    ]
    model = make_model(nodes, {"ws": w_small, "wb": w_big})
    q = quantize(load_model_proto(model), images(16), QuantizeConfig(), progress=False).model
    scales = {node.input[0]: float(qdq_scale(q, node)) for node in _nodes(q, "QuantizeLinear")}
    assert scales["a"] == scales["b"] == scales["c"] == scales["y_prequant"]
    assert scales["x"] != scales["a"]
    assert all(is_pow2(value) for value in scales.values())


def test_fixed_batch_model_keeps_its_interface(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(1)
    module = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    path = export_onnx(module, (3, 12, 12), tmp_path / "fixed.onnx", dynamic_batch=False)
    loaded = load_model(path)
    assert loaded.batch_fixed
    q = quantize(loaded, _calib(10), QuantizeConfig(), progress=False).model
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert structure_problems(q, CONV_RELU) == []
    x = _calib(1, seed=2)
    assert run(q, x)[0].shape == (1, 4)


_PADDLE_STYLE_HEAD = """
<ir_version: 7, opset_import: ["" : 11]>
paddle_head (float[N, 3, 12, 12] x) => (float[N, 2] y)
<float[4, 3, 3, 3] w = {%s}, float[4, 2] fc = {0.5, -0.25, 0.75, 0.125, -0.5, 0.25, 0.375, -0.625},
 int64[1] first = {0}, int64[1] one = {1}, int32[1] four = {4}>
{
  c = Conv<pads = [1, 1, 1, 1]>(x, w)
  r = Relu(c)
  p = GlobalAveragePool(r)
  s = Shape(p)
  s32 = Cast<to = 6>(s)
  n = Slice(s32, first, one, first)
  n64 = Cast<to = 7>(n)
  k64 = Cast<to = 7>(four)
  t = Concat<axis = -1>(n64, k64)
  f = Reshape(p, t)
  logits = MatMul(f, fc)
  y = Softmax<axis = 1>(logits)
}
"""


def test_shape_computed_reshape_and_opset11_softmax_pass_validation() -> None:
    # The RapidOCR classifier's head: Shape -> Cast -> Slice -> Cast -> Concat -> Reshape, and an
    # opset-11 Softmax that the conversion to opset 13 rewrites around a Shape when it cannot see
    # the rank. Both used to leave Shape/Cast nodes (op-not-allowed) in the quantized model.
    from onnxdgh.profile import load_profile
    from onnxdgh.validation.checks import check_model

    weights = ", ".join(f"{v:.4f}" for v in conv_weight(4, 3, 3, seed=3).reshape(-1))
    model = onnx.parser.parse_model(_PADDLE_STYLE_HEAD % weights)
    q = quantize(load_model_proto(model), _calib(16), QuantizeConfig(), progress=False).model
    assert [v.to_dict() for v in check_model(q, load_profile("generic-pot-int8"))] == []
    assert not {"Shape", "Cast", "Slice", "Concat"} & set(op_counts(q))
    x = _calib(3, seed=2)
    together = run(q, x)[0]  # the batch stays dynamic
    alone = np.concatenate([run(q, x[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, run(model, x)[0], atol=0.05)


def test_opset_conversion_folds_the_shape_ops_it_adds() -> None:
    from onnxdgh.quantization.api import _convert_opset

    model = onnx.parser.parse_model(_PADDLE_STYLE_HEAD % ", ".join(["0.1"] * 108))
    raw = onnx.version_converter.convert_version(model, 13)
    assert sum(node.op_type == "Shape" for node in raw.graph.node) == 2  # the converter's own Shape + the export's
    converted = _convert_opset(model, 13, "test")
    assert not {"Shape", "Cast", "Slice", "Concat"} & {node.op_type for node in converted.graph.node}
    x = _calib(3, seed=4)
    np.testing.assert_allclose(run(converted, x)[0], run(model, x)[0], atol=1e-6)


def test_reproducible(tiny: Path) -> None:
    first = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False).model
    second = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False).model
    assert first.SerializeToString() == second.SerializeToString()


def test_generates_dgh_data_when_no_images_given(tiny: Path) -> None:
    from onnxdgh.generation import GenerateConfig

    result = quantize(str(tiny), None, QuantizeConfig(seed=3),
                      generate_config=GenerateConfig(images=8, iterations=2, batch_size=8, seed=3), progress=False)
    meta = {prop.key: prop.value for prop in result.model.metadata_props}
    assert meta["onnxdgh.calibration_source"] == "dgh:dgh" and meta["onnxdgh.calibration_images"] == "8"
    assert '"iterations": 2' in meta["onnxdgh.generation"]
    assert "generation" in result.report and "generate_s" in result.report["timings"]


def test_bias_that_overflows_int32_raises_its_weight_scale() -> None:
    w = conv_weight(2, 3, 1, 3)
    w[1] = 1e-9  # a nearly dead channel: tiny weight scale, huge bias / scale ratio
    nodes = [N("Conv", ["x", "w", "b"], ["y"], name="conv")]
    model = make_model(nodes, {"w": w, "b": np.array([0.1, 500.0], np.float32)})
    result = quantize(load_model_proto(model), images(8), QuantizeConfig(), progress=False)
    assert result.report["counts"]["bias_values_clipped"] == 0
    assert result.report["counts"]["weight_scales_raised_for_bias"] == 1
    q = result.model
    assert bias_scale_problems(q) == []
    assert structure_problems(q) == []
    got = run(q, images(4, seed=3))[0][:, 1]
    np.testing.assert_allclose(got, 500.0, rtol=0, atol=output_scale(q))  # the channel is its bias


def test_bias_beyond_the_largest_weight_scale_is_clipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # Even the largest threshold (2^40) leaves 1e20 out of int32 range: the one case left to clip.
    w = conv_weight(2, 3, 1, 3)
    nodes = [N("Conv", ["x", "w", "b"], ["y"], name="conv")]
    model = make_model(nodes, {"w": w, "b": np.array([0.1, 1e20], np.float32)})
    with caplog.at_level(logging.WARNING, logger="onnxdgh"):
        result = quantize(load_model_proto(model), images(8), QuantizeConfig(), progress=False)
    assert result.report["counts"]["bias_values_clipped"] == 1
    assert any("bias b of node conv" in r.getMessage() and "largest weight threshold" in r.getMessage()
               for r in caplog.records)
    assert bias_scale_problems(result.model) == []


# ---------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"weight_bits": 3}, "--weight-bits 3"),
        ({"act_bits": 2}, "--act-bits 2"),
        ({"threshold": "minmax"}, "--threshold 'minmax'"),
        ({"seed": -1}, "--seed -1"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"histogram_bins": 1000}, "histogram_bins"),
        ({"rounding_iterations": 0}, "--rounding-iterations 0"),
        ({"optimize_rounding": "auto"}, "optimize_rounding"),
    ],
)
def test_bad_config_values(kwargs: dict, text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        QuantizeConfig(**kwargs)
    assert text in info.value.message and info.value.hint


def test_profile_conflicts(tiny: Path) -> None:
    with pytest.raises(ProfileError, match="allows weight bits"):
        quantize(str(tiny), _calib(), QuantizeConfig(weight_bits=4, profile="generic-pot-int8"), progress=False)
    with pytest.raises(ProfileError, match="int4-types"):
        quantize(str(tiny), _calib(), QuantizeConfig(int4_types=True, profile="strict-pot-int8"), progress=False)
    with pytest.raises(ProfileError, match="unknown profile"):
        quantize(str(tiny), _calib(), QuantizeConfig(profile="no-such-target"), progress=False)


def test_unsupported_op_names_op_and_node() -> None:
    model = make_model([N("Conv", ["x", "w"], ["c"], name="conv"), N("Sin", ["c"], ["y"], name="the_sine")],
                       {"w": conv_weight(2, 3, 1)})
    with pytest.raises(QuantizationError) as info:
        quantize(load_model_proto(model), images(4), QuantizeConfig(), progress=False)
    assert "Sin" in info.value.message and "the_sine" in info.value.message and info.value.hint


def test_op_not_allowed_by_profile() -> None:
    model = make_model([N("Conv", ["x", "w"], ["c"], name="conv"), N("Sigmoid", ["c"], ["y"], name="sig")],
                       {"w": conv_weight(2, 3, 1)})
    with pytest.raises(QuantizationError, match="Sigmoid .*sig.*strict-pot-int8"):
        quantize(load_model_proto(model), images(4), QuantizeConfig(profile="strict-pot-int8"), progress=False)


def test_already_quantized_model_is_refused(tiny: Path) -> None:
    q = quantize(str(tiny), _calib(), QuantizeConfig(), progress=False).model
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(load_model_proto(q), _calib(), QuantizeConfig(), progress=False)


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (np.zeros((4, 3, 8, 8), np.float32), "shape"),
        (np.zeros((0, 3, 12, 12), np.float32), "no images"),
        (np.full((2, 3, 12, 12), np.nan, np.float32), "NaN"),
        (np.zeros((2, 3, 12, 12), np.int64), "dtype"),
        ([[1.0]], "numpy array"),
    ],
)
def test_bad_calibration_data(tiny: Path, data: object, text: str) -> None:
    with pytest.raises(CalibrationDataError, match=text):
        quantize(str(tiny), data, QuantizeConfig(), progress=False)  # type: ignore[arg-type]
