"""Agreement metrics of non-classifiers: IoU of thresholded probability maps, greedy-CTC sequence agreement.

Exact values on constructed cases (the metric functions, and ``validate`` on a float model
against a changed copy whose answers are known), then a 1-channel sigmoid segmentation net
and a T x classes sequence net quantized by onnxdgh and judged by ``onnxdgh validate --data``:
exit codes and report fields.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxdgh import QuantizeConfig, ValidateConfig, load_model_proto, quantize, validate
from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.validation.metrics import (
    IouAccumulator,
    SequenceAccumulator,
    ctc_greedy_decode,
    edit_distance,
    fits,
)

from .conftest import ort_run

OPSET = 13


def _model(nodes: list[onnx.NodeProto], inits: dict[str, np.ndarray], in_shape: list[int], out_name: str,
           out_shape: list[object]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", *out_shape])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def shifted_sigmoid(shift: float, *, sigmoid: bool = True) -> onnx.ModelProto:
    """N x 1 x 2 x 3 -> Sigmoid(x + shift) (or x + shift): a probability map whose cut is known."""
    nodes = [helper.make_node("Add", ["input", "shift"], ["z" if sigmoid else "prob"], name="add")]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["z"], ["prob"], name="sigmoid"))
    return _model(nodes, {"shift": np.array(shift, np.float32)}, [1, 2, 3], "prob", [1, 2, 3])


def forced_steps(bias: np.ndarray) -> onnx.ModelProto:
    """N x 1 x T x C -> Squeeze -> + bias (T x C): step scores whose decoding is known."""
    nodes = [helper.make_node("Squeeze", ["input", "axes"], ["steps"], name="squeeze"),
             helper.make_node("Add", ["steps", "bias"], ["scores"], name="add")]
    return _model(nodes, {"axes": np.array([1], np.int64), "bias": bias.astype(np.float32)},
                  [1, *bias.shape], "scores", list(bias.shape))


def one_hot(rows: list[list[int]], classes: int) -> np.ndarray:
    """N x 1 x T x C images whose per-step arg-max is ``rows``."""
    return np.eye(classes, dtype=np.float32)[np.asarray(rows)][:, None]


# ----------------------------------------------------------------- the functions


def test_ctc_greedy_decoding_collapses_repeats_and_drops_the_blank() -> None:
    scores = np.eye(4)[[[1, 1, 0, 1, 3, 3, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0], [2, 0, 2, 2, 0, 2, 1, 1]]]
    assert ctc_greedy_decode(scores) == [(1, 1, 3), (), (2, 2, 2, 1)]


@pytest.mark.parametrize(("a", "b", "expected"), [
    ((), (), 0), ((1, 2, 3), (), 3), ((), (4,), 1), ((1, 2, 3), (1, 2, 3), 0),
    ((1, 2, 3), (1, 3), 1), ((1, 2, 3), (1, 4, 3), 1), ((1, 2), (2, 1), 2), ("kitten", "sitting", 3),
])
def test_edit_distance(a: tuple, b: tuple, expected: int) -> None:
    assert edit_distance(a, b) == expected == edit_distance(b, a)


def test_accumulators_pool_over_batches() -> None:
    iou = IouAccumulator(0.5)
    iou.add(np.array([[0.9, 0.9, 0.1, 0.1]]), np.array([[0.9, 0.1, 0.9, 0.1]]))  # 1 shared of 3 marked
    iou.add(np.array([[0.9, 0.1]]), np.array([[0.9, 0.1]]))  # 1 of 1
    assert iou.value == pytest.approx(2 / 4) and iou.probability_map
    iou.add(np.array([[1.5]]), np.array([[1.5]]))
    assert not iou.probability_map
    empty = IouAccumulator(0.5)
    empty.add(np.zeros((2, 3)), np.zeros((2, 3)))
    assert empty.value == 1.0  # neither marks anything: they agree
    seq = SequenceAccumulator()
    seq.add(np.eye(3)[[[1, 2, 0]]], np.eye(3)[[[1, 0, 0]]])  # (1, 2) vs (1,): 1 edit, length 2
    seq.add(np.eye(3)[[[0, 0, 0]]], np.eye(3)[[[0, 0, 0]]])  # () vs (): exact
    assert seq.value == pytest.approx(0.5) and seq.exact_share == pytest.approx(0.5)


def test_shapes_each_metric_reads() -> None:
    assert fits("top1", (4, 10)) and not fits("top1", (4, 1)) and not fits("top1", (4, 10, 3))
    assert fits("sequence", (4, 40, 6625)) and not fits("sequence", (4, 40, 1))
    assert fits("iou", (4, 1, 8, 8)) and not fits("iou", (4, 2, 8, 8)) and not fits("iou", (4, 8, 8))


# ------------------------------------------------- validate() on constructed answers

MAP_VALUES = np.array([-2.0, -0.5, 0.5, 2.0], np.float32)


def _map_images() -> np.ndarray:
    # 4 images of 6 pixels; the pixel values cycle through MAP_VALUES: 6 of each over the set.
    return np.resize(MAP_VALUES, 24).reshape(4, 1, 2, 3)


def test_iou_of_a_shifted_probability_map_is_exact() -> None:
    # Cut at 0.5: the float map marks x > 0 (12 pixels), the shifted one x > -1 (18, a superset).
    report = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), data=_map_images())
    (out,) = report.outputs
    assert out.metric == "iou" and out.iou == pytest.approx(12 / 18) and out.agreement == out.iou
    assert out.top1_agreement is None and out.sequence_agreement is None and out.iou_threshold == 0.5
    # Cut at 0.3 (sigmoid > 0.3 <=> x > -0.847): both mark {-0.5, 0.5, 2}.
    at_03 = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), ValidateConfig(iou_threshold=0.3), data=_map_images())
    assert at_03.outputs[0].iou == 1.0
    data = at_03.to_dict()["outputs"][0]
    assert data["metric"] == "iou" and data["agreement"] == 1.0 and data["iou_threshold"] == 0.3


def test_auto_skips_a_map_outside_0_1_and_iou_can_be_forced() -> None:
    logits, shifted = shifted_sigmoid(0.0, sigmoid=False), shifted_sigmoid(1.0, sigmoid=False)
    auto = validate(shifted, logits, data=_map_images())
    assert auto.outputs[0].metric is None and auto.outputs[0].agreement is None
    forced = validate(shifted, logits, ValidateConfig(metric="iou", iou_threshold=0.0), data=_map_images())
    assert forced.outputs[0].metric == "iou" and forced.outputs[0].iou == pytest.approx(12 / 18)


def test_sequence_agreement_of_a_forced_step_is_exact() -> None:
    classes, steps = 4, 6
    bias = np.zeros((steps, classes), np.float32)
    bias[1, 2] = 10.0  # the changed model reads class 2 at step 1, whatever the input
    rows = [[1, 1, 0, 3, 3, 0],   # (1, 3)  -> (1, 2, 3): 1 edit of 3
            [0, 0, 0, 0, 0, 0],   # ()      -> (2,):      1 edit of 1
            [2, 2, 2, 2, 2, 2]]   # (2,)    -> (2,):      exact
    report = validate(forced_steps(bias), forced_steps(np.zeros_like(bias)), data=one_hot(rows, classes))
    (out,) = report.outputs
    assert out.metric == "sequence"
    assert out.sequence_agreement == pytest.approx(1 - 2 / 5) and out.sequence_exact == pytest.approx(1 / 3)
    gated = validate(forced_steps(bias), forced_steps(np.zeros_like(bias)), ValidateConfig(min_agreement=0.6),
                     data=one_hot(rows, classes))
    (gate,) = [g for g in gated.gates if g.gate == "min-agreement"]
    assert gate.metric == "sequence" and gate.passed and gate.value == pytest.approx(0.6)
    assert gate.to_dict()["metric"] == "sequence"
    failed = validate(forced_steps(bias), forced_steps(np.zeros_like(bias)), ValidateConfig(min_agreement=0.61),
                      data=one_hot(rows, classes))
    (gate,) = [g for g in failed.failed_gates if g.gate == "min-agreement"]
    assert "sequence agreement 60.00 %, below 61 %" in gate.describe(failed.profile.name)


def test_on_given_images_a_map_is_judged_by_its_iou_not_its_sqnr() -> None:
    # Sigmoid(x + 1) against Sigmoid(x): every value moved (SQNR ~10 dB, under the profile's
    # 15 dB), yet cut at 0.3 both maps mark the same pixels.
    good = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), ValidateConfig(iou_threshold=0.3), data=_map_images())
    assert good.outputs[0].sqnr_db < good.profile.min_output_sqnr_db
    assert [(g.gate, g.metric, g.origin, g.passed) for g in good.gates] == [("min-agreement", "iou", "profile", True)]
    # Cut at 0.5 the same map agrees on 12 of 18 pixels: under the floor, it fails.
    bad = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), data=_map_images())
    (gate,) = bad.failed_gates
    assert gate.gate == "min-agreement" and gate.value == pytest.approx(12 / 18)
    assert gate.threshold == bad.profile.min_top1_agreement
    # Random images carry no answer to agree on: the SQNR floor judges there; --min-sqnr always applies.
    random = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), ValidateConfig(iou_threshold=0.3))
    assert [(g.gate, g.passed) for g in random.gates] == [("min-sqnr", False)]
    asked = validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), ValidateConfig(iou_threshold=0.3, min_sqnr=12),
                     data=_map_images())
    assert [(g.gate, g.origin, g.passed) for g in asked.gates] == [("min-sqnr", "option", False),
                                                                  ("min-agreement", "profile", True)]


def test_on_given_images_step_scores_are_judged_by_their_sequence_agreement() -> None:
    classes, steps = 4, 6
    bias = np.zeros((steps, classes), np.float32)
    bias[1, 2] = 10.0
    rows = [[1, 1, 0, 3, 3, 0], [0, 0, 0, 0, 0, 0], [2, 2, 2, 2, 2, 2]]
    report = validate(forced_steps(bias), forced_steps(np.zeros_like(bias)), data=one_hot(rows, classes))
    assert [(g.gate, g.metric, g.passed) for g in report.gates] == [("min-agreement", "sequence", False)]
    assert report.gates[0].value == pytest.approx(0.6)


def test_a_named_metric_that_no_output_fits_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="--metric sequence reads N x T x C step scores") as info:
        validate(shifted_sigmoid(1.0), shifted_sigmoid(0.0), ValidateConfig(metric="sequence"), data=_map_images())
    assert info.value.hint


@pytest.mark.parametrize(("fields", "pattern"), [
    ({"metric": "f1"}, "--metric 'f1' is not one of"),
    ({"iou_threshold": math.nan}, "--iou-threshold nan"),
    ({"random_images": 0}, "--random-images 0"),
    ({"batch_size": True}, "--batch-size True"),
    ({"seed": -1}, "--seed -1"),
    ({"input_shape": (3, 0, 8)}, "--input-shape"),
    ({"profile": 3}, "profile 3"),
    ({"min_agreement": 2.0}, "between 0 and 1"),
])
def test_validate_config_refuses_bad_fields(fields: dict, pattern: str) -> None:
    with pytest.raises(InvalidInputError, match=pattern) as info:
        ValidateConfig(**fields)
    assert info.value.hint


def test_validate_config_is_frozen_and_normalises_gates() -> None:
    config = ValidateConfig(min_sqnr=20, min_agreement=1)
    assert config.min_sqnr == 20.0 and isinstance(config.min_sqnr, float) and isinstance(config.min_agreement, float)
    with pytest.raises(AttributeError):
        config.metric = "iou"  # type: ignore[misc]
    with pytest.raises(InvalidInputError, match="config is a dict"):
        validate(shifted_sigmoid(0.0), None, {"profile": "generic-pot-int8"})  # type: ignore[arg-type]


# ------------------------------------------- quantized tiny nets through the CLI


def segmentation_net() -> onnx.ModelProto:
    """Conv-ReLU-Conv(1 channel)-Sigmoid on 1 x 8 x 8: a probability map."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c2"], ["prob"], name="sigmoid")]
    inits = {"w1": rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "b1": np.zeros(4, np.float32),
             "w2": rng.normal(0, 0.5, (1, 4, 3, 3)).astype(np.float32), "b2": np.zeros(1, np.float32)}
    return _model(nodes, inits, [1, 8, 8], "prob", [1, 8, 8])


def sequence_net() -> onnx.ModelProto:
    """Conv(4 x 1 kernel, 5 classes) on 1 x 4 x 6, Squeeze, Transpose, Softmax: N x 6 steps x 5 classes."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1"),
             helper.make_node("Squeeze", ["c1", "axes"], ["sq"], name="squeeze"),
             helper.make_node("Transpose", ["sq"], ["tr"], name="transpose", perm=[0, 2, 1]),
             helper.make_node("Softmax", ["tr"], ["probs"], name="softmax", axis=2)]
    inits = {"w1": rng.normal(0, 0.8, (5, 1, 4, 1)).astype(np.float32), "b1": np.zeros(5, np.float32),
             "axes": np.array([2], np.int64)}
    return _model(nodes, inits, [1, 4, 6], "probs", [6, 5])


@pytest.fixture(scope="module")
def nets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("metrics_cli")
    paths: dict[str, Path] = {}
    for name, model, shape in (("seg", segmentation_net(), (1, 8, 8)), ("seq", sequence_net(), (1, 4, 6))):
        x = np.random.default_rng(2).normal(size=(32, *shape)).astype(np.float32)
        result = quantize(load_model_proto(model, source=name), x[:16], QuantizeConfig(), progress=False)
        for suffix, proto in (("", model), ("_q", result.model)):
            paths[name + suffix] = folder / f"{name}{suffix}.onnx"
            onnx.save(proto, paths[name + suffix])
        paths[name + "_data"] = folder / f"{name}.npz"
        np.savez(paths[name + "_data"], images=x[16:])
    # The quantized map with conv2's int32 bias raised: the same structure, a map that marks more.
    bad = onnx.load(paths["seg_q"])
    bias = next(t for t in bad.graph.initializer if t.data_type == TensorProto.INT32)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 2**12, bias.name))
    paths["seg_bad"] = folder / "seg_bad.onnx"
    onnx.save(bad, paths["seg_bad"])
    return paths


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def _expected(kind: str, nets: dict[str, Path], name: str, threshold: float = 0.5) -> float:
    images = np.load(nets[name.split("_")[0] + "_data"])["images"]
    x = ort_run(onnx.load(nets[name.split("_")[0]]), images)[0]
    y = ort_run(onnx.load(nets[name]), images)[0]
    if kind == "iou":
        f, q = x > threshold, y > threshold
        return float((f & q).sum() / (f | q).sum())
    acc = SequenceAccumulator()
    acc.add(x, y)
    return acc.value


@pytest.mark.parametrize(("name", "metric"), [("seg", "iou"), ("seq", "sequence")])
def test_quantized_nets_pass_with_their_metric(nets: dict[str, Path], tmp_path: Path, name: str, metric: str) -> None:
    out = tmp_path / "report.json"
    code, stdout, stderr = run("validate", nets[name + "_q"], "--reference", nets[name], "--data", nets[name + "_data"],
                               "--min-agreement", 0.5, "--json", out)
    assert code == 0, stdout + stderr
    report = json.loads(out.read_text())
    assert report["schema"] == "onnxdgh-validation-report/3"
    (output,) = report["outputs"]
    assert output["metric"] == metric and output["top1_agreement"] is None
    assert output["agreement"] == pytest.approx(_expected(metric, nets, name + "_q"))
    # --min-agreement judges these outputs; the profile's SQNR floor does not (a task metric reads them).
    assert [(g["gate"], g.get("metric")) for g in report["gates"]] == [("min-agreement", metric)]
    assert metric in stdout and "AGREEMENT" in stdout


def test_a_worse_map_fails_its_iou_gate(nets: dict[str, Path]) -> None:
    expected = _expected("iou", nets, "seg_bad", 0.3)
    assert expected < 0.99  # the raised bias really moves the cut
    code, stdout, stderr = run("validate", nets["seg_bad"], "--reference", nets["seg"], "--data", nets["seg_data"],
                               "--iou-threshold", 0.3, "--min-sqnr", -100, "--min-agreement", 0.99, "--json", "-")
    assert code == 1
    report = json.loads(stdout)
    (gate,) = [g for g in report["gates"] if g["gate"] == "min-agreement"]
    assert gate["metric"] == "iou" and gate["passed"] is False and gate["value"] == pytest.approx(expected)
    assert "has IoU" in stderr and "below 99 %" in stderr


@pytest.mark.parametrize(("args", "pattern"), [
    (["--metric", "top1"], "--metric top1 reads N x K class scores"),
    (["--iou-threshold", "nan"], "--iou-threshold nan"),
    (["--metric", "f1"], "Invalid value for '--metric'"),
])
def test_bad_metric_options_exit_2(nets: dict[str, Path], args: list[str], pattern: str) -> None:
    code, _, stderr = run("validate", nets["seg_q"], "--reference", nets["seg"], "--data", nets["seg_data"], *args)
    assert code == 2 and pattern in stderr and "Traceback" not in stderr


def test_quantize_points_a_failed_task_metric_on_synthetic_images_to_real_inputs(tmp_path: Path) -> None:
    """A map judged on procedural images fails its gate with a hint to judge it on real inputs."""
    model = tmp_path / "seg.onnx"
    onnx.save(segmentation_net(), model)
    code, _, stderr = run("quantize", model, "-o", tmp_path / "q.onnx", "--preprocess", "unit", "--images", 8,
                          "--min-agreement", 1.0)
    assert code == 1 and "has IoU" in stderr and "held-out synthetic images (procedural)" in stderr
    assert "IoU on synthetic images is a weak verdict" in stderr and "--data IMAGES.npz" in stderr
