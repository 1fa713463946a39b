"""Numerical report: SQNR, cosine, agreement and accuracy against independent numpy figures; gates; bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxdgh import ValidateConfig, load_model_proto, validate
from onnxdgh.errors import CalibrationDataError, InvalidInputError, ProfileError
from onnxdgh.validation.checks import analyse
from onnxdgh.validation.report import match_layers, sqnr_db

from .conftest import ort_run
from .helpers_validate import copy, float_model, images, node, quantized_model, set_init

FLOAT = float_model()
QUANT8 = quantized_model(FLOAT)
QUANT4 = quantized_model(FLOAT, weight_bits=4, activation_bits=4)
DATA = images(24, seed=5)


def _sqnr(x: np.ndarray, y: np.ndarray) -> float:
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    return 10 * np.log10(np.sum(x64**2) / np.sum((x64 - y64) ** 2))


def test_output_metrics_match_an_independent_computation() -> None:
    report = validate(QUANT8, FLOAT, data=DATA)
    x = ort_run(FLOAT, DATA)[0]
    y = ort_run(QUANT8, DATA)[0]
    (out,) = report.outputs
    assert out.name == "logits"
    assert out.sqnr_db == pytest.approx(_sqnr(x, y), abs=1e-3)
    cos = np.mean(np.sum(x * y, 1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)))
    assert out.cosine == pytest.approx(float(cos), abs=1e-6)
    assert out.top1_agreement == pytest.approx(float(np.mean(x.argmax(1) == y.argmax(1))))
    assert out.max_abs_error == pytest.approx(float(np.abs(x - y).max()), rel=1e-6)
    assert report.passed and report.data is not None and report.data.source == "given"


def test_layers_are_matched_by_structure_and_sorted_worst_first() -> None:
    report = validate(QUANT8, FLOAT, data=DATA)
    assert {layer.tensor for layer in report.layers} == {"input", "relu_out", "pool_out", "cat_out", "gap_out", "flat_out"}
    values = [layer.sqnr_db for layer in report.layers]
    assert values == sorted(values)
    relu = next(layer for layer in report.layers if layer.tensor == "relu_out")
    probe = copy(FLOAT)
    probe.graph.output.append(onnx.ValueInfoProto(name="relu_out"))
    qprobe = copy(QUANT8)
    qprobe.graph.output.append(onnx.ValueInfoProto(name="relu_out_dq"))
    assert relu.sqnr_db == pytest.approx(_sqnr(ort_run(probe, DATA)[1], ort_run(qprobe, DATA)[1]), abs=1e-3)
    assert relu.quantized_tensor == "relu_out_dq" and relu.op_type == "Relu" and relu.bits == 8
    assert report.unmatched_layers == ()


def test_fewer_bits_means_lower_sqnr() -> None:
    eight = validate(QUANT8, FLOAT, ValidateConfig(profile="pot-lowbit"), data=DATA)
    four = validate(QUANT4, FLOAT, ValidateConfig(profile="pot-lowbit"), data=DATA)
    assert eight.passed and four.passed
    assert four.outputs[0].sqnr_db < eight.outputs[0].sqnr_db - 6
    assert {layer.bits for layer in four.layers} == {4}
    assert four.quantization["weights_by_bits"] == {"4": 2}


def test_identical_model_is_exact_and_json_safe() -> None:
    report = validate(FLOAT, FLOAT, data=DATA)
    assert report.outputs[0].sqnr_db == math.inf
    data = report.to_dict()
    text = json.dumps(data, allow_nan=False)  # strict JSON: no Infinity/NaN
    assert json.loads(text)["outputs"][0]["sqnr_db"] is None
    assert data["outputs"][0]["exact"] is True
    assert not report.passed  # the float model is not quantized
    assert "graph-input-not-quantized" in data["violation_counts"]


def test_labels_give_accuracies() -> None:
    labels = np.arange(DATA.shape[0]) % 4
    report = validate(QUANT8, FLOAT, data=DATA, labels=labels)
    x = ort_run(FLOAT, DATA)[0]
    y = ort_run(QUANT8, DATA)[0]
    out = report.outputs[0]
    assert out.float_accuracy == pytest.approx(float(np.mean(x.argmax(1) == labels)))
    assert out.quantized_accuracy == pytest.approx(float(np.mean(y.argmax(1) == labels)))
    assert report.data is not None and report.data.labelled


def test_gates_turn_figures_into_pass_fail() -> None:
    base = validate(QUANT8, FLOAT, data=DATA).outputs[0].sqnr_db
    ok = validate(QUANT8, FLOAT, ValidateConfig(min_sqnr=base - 1, min_agreement=0.5), data=DATA)
    assert ok.passed and [g.passed for g in ok.gates] == [True, True]
    low = validate(QUANT8, FLOAT, ValidateConfig(min_sqnr=base + 1), data=DATA)
    assert not low.passed and low.failed_gates[0].gate == "min-sqnr"
    assert low.failed_gates[0].value == pytest.approx(base)
    strict = validate(QUANT4, FLOAT, ValidateConfig(profile="pot-lowbit", min_agreement=1.0), data=DATA)
    agreement = strict.outputs[0].top1_agreement
    assert strict.passed == (agreement == 1.0)


def test_random_images_when_no_data_given() -> None:
    first = validate(QUANT8, FLOAT, ValidateConfig(random_images=8, seed=3))
    again = validate(QUANT8, FLOAT, ValidateConfig(random_images=8, seed=3))
    assert first.data is not None and first.data.source == "random" and first.data.count == 8
    assert first.outputs[0].sqnr_db == again.outputs[0].sqnr_db  # reproducible with a seed


def test_random_images_follow_metadata_normalisation() -> None:
    model = copy(FLOAT)
    for key, value in (("input_mean", "[0.5]"), ("input_std", "[0.25]")):
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    report = validate(QUANT8, model, ValidateConfig(random_images=4))
    assert report.data is not None and "mean/std" in report.data.description


def test_structure_only_without_reference() -> None:
    report = validate(QUANT8)
    assert report.passed and report.outputs == () and report.data is None
    assert report.to_dict()["reference"] is None


def test_fixed_batch_models() -> None:
    def fix(model: onnx.ModelProto) -> onnx.ModelProto:
        out = copy(model)
        for value in list(out.graph.input) + list(out.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = 1
        return out

    report = validate(fix(QUANT8), fix(FLOAT), ValidateConfig(batch_size=8), data=DATA[:3])
    assert report.passed and report.data is not None and report.data.count == 3


def test_float_tensor_feeding_a_folded_batchnorm_is_compared_after_the_bn() -> None:
    """A quantized Conv output whose float twin only feeds a BN (folded away) is compared with the BN output."""
    reference = copy(FLOAT)
    for name, value in (("bn_s", 2.0), ("bn_b", 0.0), ("bn_m", 0.0), ("bn_v", 1.0)):
        reference.graph.initializer.append(numpy_helper.from_array(np.full(3, value, np.float32), name))
    node(reference, "relu").input[0] = "bn_out"
    nodes = list(reference.graph.node)
    nodes.insert(1, helper.make_node("BatchNormalization", ["conv_out", "bn_s", "bn_b", "bn_m", "bn_v"], ["bn_out"], name="bn"))
    del reference.graph.node[:]
    reference.graph.node.extend(nodes)
    quant = copy(QUANT8)
    set_init(quant, "conv_out_scale", np.array(2.0**-4, np.float32))
    set_init(quant, "conv_out_zero_point", np.array(0, np.int8))
    relu = node(quant, "relu")
    relu.input[0] = "conv_out_dq"
    quant.graph.node.insert(
        list(quant.graph.node).index(relu),
        helper.make_node("QuantizeLinear", ["conv_out", "conv_out_scale", "conv_out_zero_point"], ["conv_out_q"], name="cq"),
    )
    quant.graph.node.insert(
        list(quant.graph.node).index(relu),
        helper.make_node("DequantizeLinear", ["conv_out_q", "conv_out_scale", "conv_out_zero_point"], ["conv_out_dq"], name="cdq"),
    )
    pairs, unmatched = match_layers(reference, analyse(load_model_proto(quant).model))
    by_quant = {pair.quant_tensor: pair.float_tensor for pair in pairs}
    assert by_quant["conv_out_dq"] == "bn_out"
    assert by_quant["relu_out_dq"] == "relu_out"
    assert unmatched == []


def test_sqnr_edge_cases() -> None:
    assert sqnr_db(1.0, 0.0) == math.inf
    assert sqnr_db(0.0, 1.0) == -math.inf
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"data": np.zeros((2, 3, 6, 6), np.float32)}, CalibrationDataError, "N x 1 x 6 x 6"),
        ({"data": np.full((2, 1, 6, 6), np.nan, np.float32)}, CalibrationDataError, "finite"),
        ({"data": DATA, "labels": np.zeros(3, np.int64)}, InvalidInputError, "one label per image"),
        ({"data": DATA, "labels": np.zeros(DATA.shape[0], np.float32)}, InvalidInputError, "not integers"),
        ({"min_agreement": 1.5}, InvalidInputError, "between 0 and 1"),
        ({"min_sqnr": float("nan")}, InvalidInputError, "min-sqnr"),
        ({"profile": "nope"}, ProfileError, "unknown profile"),
    ],
)
def test_bad_input_raises(kwargs: dict, error: type, pattern: str) -> None:
    data_keys = {"data", "labels"}
    with pytest.raises(error, match=pattern) as info:
        config = ValidateConfig(**{k: v for k, v in kwargs.items() if k not in data_keys})
        validate(QUANT8, FLOAT, config, **{k: v for k, v in kwargs.items() if k in data_keys})
    assert info.value.hint


def test_gates_and_data_need_a_reference() -> None:
    with pytest.raises(InvalidInputError, match="reference"):
        validate(QUANT8, config=ValidateConfig(min_sqnr=10))
    with pytest.raises(InvalidInputError, match="labels were given without"):
        validate(QUANT8, FLOAT, labels=np.zeros(4, np.int64))


def test_agreement_gate_needs_an_output_with_a_metric() -> None:
    # Float model cut after the pooling: the output is N x 6 x 1 x 1 feature maps, not class scores.
    def cut(model: onnx.ModelProto, out_name: str) -> onnx.ModelProto:
        out = copy(model)
        del out.graph.output[:]
        out.graph.output.append(helper.make_tensor_value_info(out_name, onnx.TensorProto.FLOAT, ["batch", 6, 1, 1]))
        return out

    with pytest.raises(InvalidInputError, match="an output with an agreement metric"):
        validate(cut(QUANT8, "gap_out_dq"), cut(FLOAT, "gap_out"), ValidateConfig(min_agreement=0.9), data=DATA)


def test_mismatched_reference_is_refused() -> None:
    other = copy(FLOAT)
    other.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 8
    with pytest.raises(InvalidInputError, match="reference takes"):
        validate(QUANT8, other, data=DATA)


def test_profile_defaults_to_the_one_recorded_by_quantize() -> None:
    model = copy(QUANT8)
    model.metadata_props.append(onnx.StringStringEntryProto(key="onnxdgh.profile", value="strict-pot-int8"))
    recorded = validate(model)
    assert recorded.profile.name == "strict-pot-int8"
    assert "per-channel-weights" in recorded.violation_counts
    assert validate(model, config=ValidateConfig(profile="generic-pot-int8")).passed
    unknown = copy(QUANT8)
    unknown.metadata_props.append(onnx.StringStringEntryProto(key="onnxdgh.profile", value="my-npu"))
    assert validate(unknown).profile.name == "generic-pot-int8"
    assert validate(QUANT8).profile.name == "generic-pot-int8"


def test_quantized_model_onnxruntime_cannot_run_is_a_failed_check() -> None:
    from onnxdgh.errors import CheckFailedError

    model = copy(QUANT8)
    flatten = node(model, "flatten")
    flatten.op_type = "Reshape"
    del flatten.attribute[:]
    set_init(model, "bad_shape", np.array([2, -1], np.int64))  # fails only at run time: Gemm then sees K != 6
    flatten.input.append("bad_shape")
    with pytest.raises(CheckFailedError, match="onnxruntime cannot run the quantized model") as info:
        validate(model, FLOAT, data=DATA)
    assert info.value.exit_code == 1 and info.value.hint
    with pytest.raises(InvalidInputError, match="onnxruntime cannot run the reference model"):
        validate(FLOAT, model, data=DATA)
