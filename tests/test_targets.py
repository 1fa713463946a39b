"""Targets with known quirks as options (issue 18): the ``ort-x86-avx2`` profile (7-bit
weights), the ``--weights-as-float`` flavour, and validate's onnxruntime drift check."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from onnxdgh import QuantizeConfig, ValidateConfig, load_model, quantize, validate
from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.fileio import save_images_npz
from onnxdgh.quantization.float_weights import (
    FLOAT_GRID,
    WEIGHT_FORMAT_KEY,
    WEIGHT_GRID_KEY,
    restore_quantized_weights,
    store_weights_as_float,
)
from onnxdgh.runtime import make_session

from .helpers_quantize import run


def _calibration(count: int = 24, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, 3, 12, 12)) * 1.5).astype(np.float32)


def _quantized(path: Path, **settings: object) -> onnx.ModelProto:
    return quantize(load_model(path), _calibration(), QuantizeConfig(**settings), progress=False).model  # type: ignore[arg-type]


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Integer weight initializers read by a DequantizeLinear feeding input 1 of a Conv/Gemm."""
    inits = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer}
    dq_inputs = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    return {
        dq_inputs[node.input[1]]: inits[dq_inputs[node.input[1]]]
        for node in model.graph.node
        if node.op_type in ("Conv", "Gemm") and node.input[1] in dq_inputs
    }


def _meta(model: onnx.ModelProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in model.metadata_props}


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# ------------------------------------------------------------------ ort-x86-avx2


def test_seven_bit_weights_fit_the_avx2_pair_sum(tiny_model_path: Path) -> None:
    model = _quantized(tiny_model_path, weight_bits=7)
    assert _meta(model)["onnxdgh.profile"] == "ort-x86-avx2"
    weights = _weights(model)
    assert len(weights) == 3
    for values in weights.values():
        assert values.dtype == np.int8
        assert values.min() >= -64 and values.max() <= 63
        # Two u8 x s8 products never leave int16 (vpmaddubsw's pair sum), so nothing saturates.
        assert 2 * 255 * max(-int(values.min()), int(values.max())) <= 32767
    # The grid really is 7 bits wide, not narrower: some weight uses the top step.
    assert max(max(-int(v.min()), int(v.max())) for v in weights.values()) >= 32
    report = validate(model, config=ValidateConfig(profile="ort-x86-avx2"))
    assert report.violations == () and report.passed


def test_avx2_profile_refuses_eight_bit_weights(tiny_model_path: Path) -> None:
    report = validate(_quantized(tiny_model_path), config=ValidateConfig(profile="ort-x86-avx2"))
    assert not report.passed
    assert set(report.violation_counts) == {"weight-bits"}
    assert "at most 7-bit weights" in report.violations[0].message


def test_seven_bit_weights_stay_on_nearest_rounding() -> None:
    # W7A8 costs at most 0.1 points with nearest rounding (docs/BENCHMARKS.md, "Runtimes"): no AdaRound by default.
    assert not QuantizeConfig(weight_bits=7).rounding_enabled
    assert QuantizeConfig(weight_bits=4).rounding_enabled
    with pytest.raises(InvalidInputError) as raised:
        QuantizeConfig(weight_bits=6)
    assert "8, 7, 4 or 2" in raised.value.hint


def test_profile_option_picks_its_weight_width(tiny_model_path: Path, tmp_path: Path) -> None:
    calib = save_images_npz(tmp_path / "calib.npz", _calibration(), {"source": "test"})
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib),
                     "--profile", "ort-x86-avx2")
    assert result.exit_code == 0, result.output
    assert "W7A8" in result.output and "passes ort-x86-avx2" in result.output
    assert _meta(onnx.load(str(out)))["onnxdgh.weight_bits"] == "7"

    refused = _invoke("quantize", str(tiny_model_path), "-o", str(tmp_path / "r.onnx"), "--calib-data", str(calib),
                      "--profile", "ort-x86-avx2", "--weight-bits", "8")
    assert refused.exit_code == 2
    assert "allows weight bits [7], not 8" in refused.output and "--weight-bits 7" in refused.output
    assert not (tmp_path / "r.onnx").exists()


# ------------------------------------------------------------- --weights-as-float


def test_weights_as_float_computes_what_the_qdq_model_does(tiny_model_path: Path) -> None:
    qdq = _quantized(tiny_model_path)
    flat = _quantized(tiny_model_path, weights_as_float=True)
    # No DequantizeLinear reads a constant any more; activations keep every Q/DQ pair.
    inits = {init.name for init in flat.graph.initializer}
    assert not [n for n in flat.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(flat, "QuantizeLinear") == count(qdq, "QuantizeLinear")
    assert count(flat, "DequantizeLinear") == count(qdq, "DequantizeLinear") - 6  # 3 weights, 3 biases
    meta = _meta(flat)
    assert meta[WEIGHT_FORMAT_KEY] == FLOAT_GRID and meta["onnxdgh.weights_as_float"] == "true"
    grid = json.loads(meta[WEIGHT_GRID_KEY])
    assert len(grid) == 6 and {record["type"] for record in grid.values()} == {"int8", "int32"}
    x = _calibration(8, seed=3)
    np.testing.assert_array_equal(run(flat, x)[0], run(qdq, x)[0])  # the exact simulation, bit for bit
    report = validate(flat, load_model(tiny_model_path), data=x)
    assert report.violations == () and report.passed
    assert report.quantization["weights_by_bits"] == validate(qdq).quantization["weights_by_bits"]
    # Restoring gives back the quantizer's own integers.
    restored, problems = restore_quantized_weights(flat)
    assert problems == []
    assert sorted(v.tobytes() for v in _weights(restored).values()) == sorted(v.tobytes() for v in _weights(qdq).values())


def test_weights_as_float_off_grid_and_unrecorded_weights_are_violations(tiny_model_path: Path) -> None:
    flat = _quantized(tiny_model_path, weights_as_float=True)
    grid = json.loads(_meta(flat)[WEIGHT_GRID_KEY])
    name = next(key for key, record in grid.items() if record["type"] == "int8")
    broken = onnx.ModelProto()
    broken.CopyFrom(flat)
    for init in broken.graph.initializer:
        if init.name == name:
            values = onnx.numpy_helper.to_array(init).copy()
            step = np.asarray(grid[name]["scale"], np.float32).reshape(-1)[0]
            values.reshape(-1)[0] += step / 2  # half a step: off the grid
            init.CopyFrom(onnx.numpy_helper.from_array(values, name))
    report = validate(broken)
    assert report.violation_counts == {"weight-off-grid": 1}
    assert report.violations[0].tensor == name and "not a whole number of steps" in report.violations[0].message

    # A float weight without a record is a float input, as in any QDQ model.
    unrecorded = onnx.ModelProto()
    unrecorded.CopyFrom(flat)
    del grid[name]
    onnx.helper.set_model_props(unrecorded, {**_meta(flat), WEIGHT_GRID_KEY: json.dumps(grid)})
    assert set(validate(unrecorded).violation_counts) == {"float-input-not-dequantized"}


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ({WEIGHT_FORMAT_KEY: "float16-grid"}, "this onnxdgh reads 'float-grid'"),
        ({WEIGHT_GRID_KEY: "{not json"}, "is not valid JSON"),
        ({WEIGHT_GRID_KEY: "[1, 2]"}, "not a JSON object"),
        ({WEIGHT_GRID_KEY: json.dumps({"missing": {"type": "int8", "scale": 1.0, "axis": None}})},
         "is not a float32 initializer"),
    ],
)
def test_unreadable_grid_records_are_violations(tiny_model_path: Path, entries: dict[str, str], expected: str) -> None:
    flat = _quantized(tiny_model_path, weights_as_float=True)
    onnx.helper.set_model_props(flat, {**_meta(flat), **entries})
    report = validate(flat)
    assert not report.passed
    assert any(v.rule == "weight-off-grid" and expected in v.message for v in report.violations)


def test_bad_grid_record_fields_are_named(tiny_model_path: Path) -> None:
    flat = _quantized(tiny_model_path, weights_as_float=True)
    grid = json.loads(_meta(flat)[WEIGHT_GRID_KEY])
    first, second, third = sorted(grid)[:3]
    grid[first]["type"] = "int7"
    grid[second]["scale"] = -1.0
    grid[third]["axis"] = 5
    onnx.helper.set_model_props(flat, {**_meta(flat), WEIGHT_GRID_KEY: json.dumps(grid)})
    _restored, problems = restore_quantized_weights(flat)
    messages = {problem.tensor: problem.message for problem in problems}
    assert "integer type 'int7'" in messages[first]
    assert "scales are positive numbers" in messages[second]
    assert "do not fit axis 5" in messages[third] or "axis" in messages[third]


def test_restore_leaves_a_plain_qdq_model_alone(tiny_model_path: Path) -> None:
    qdq = _quantized(tiny_model_path)
    restored, problems = restore_quantized_weights(qdq)
    assert restored is qdq and problems == []
    # Storing twice finds nothing more to store.
    once = store_weights_as_float(qdq)
    assert len(json.loads(_meta(store_weights_as_float(once))[WEIGHT_GRID_KEY])) == 0


def test_weights_as_float_from_the_command_line(tiny_model_path: Path, tmp_path: Path) -> None:
    calib = save_images_npz(tmp_path / "calib.npz", _calibration(), {"source": "test"})
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib), "--weights-as-float")
    assert result.exit_code == 0, result.output
    assert "weights stored as float on their grid" in result.output and "passes generic-pot-int8" in result.output
    checked = _invoke("validate", str(out))
    assert checked.exit_code == 0, checked.output


# ----------------------------------------------------------------- runtime drift


def test_runtime_checks_pass_when_the_shipping_path_is_the_simulation(tiny_model_path: Path) -> None:
    report = validate(_quantized(tiny_model_path), load_model(tiny_model_path), data=_calibration(16, seed=5))
    assert {gate.origin for gate in report.gates} == {"profile"}  # only the floors; the runtime checks are apart
    runtime = {check.gate: check for check in report.runtime_checks}
    assert set(runtime) == {"runtime-agreement", "runtime-sqnr"}
    assert all(gate.passed for gate in runtime.values()) and report.passed
    assert report.outputs[0].runtime_top1_agreement == runtime["runtime-agreement"].value


def _drifting_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make validate's optimised session run a model whose first weight lost its sign: a shipping path
    that departs from the exact simulation, as AVX2's saturating kernels do."""

    def fake(model: onnx.ModelProto, *, optimize: bool = True, threads: int | None = None):
        if not optimize:
            return make_session(model, optimize=False)
        drifted = onnx.ModelProto()
        drifted.CopyFrom(model)
        for init in drifted.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 4:
                values = onnx.numpy_helper.to_array(init)
                init.CopyFrom(onnx.numpy_helper.from_array((-values.astype(np.int16)).clip(-128, 127).astype(np.int8),
                                                           init.name))
                break
        return make_session(drifted, optimize=True)

    monkeypatch.setattr(sys.modules["onnxdgh.validation.report"], "make_session", fake)


def test_runtime_drift_fails_validation_with_the_x86_hint(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _quantized(tiny_model_path)
    _drifting_sessions(monkeypatch)
    report = validate(model, load_model(tiny_model_path), data=_calibration(32, seed=5))
    failed = {check.gate for check in report.failed_runtime_checks}
    assert "runtime-sqnr" in failed and not report.passed and report.violations == () and report.failed_gates == ()
    assert all("--profile ort-x86-avx2" in (check.hint or "") for check in report.failed_runtime_checks)
    assert report.to_dict()["runtime_checks"][0]["hint"] == report.runtime_checks[0].hint

    path = tmp_path / "q.onnx"
    onnx.save(model, str(path))
    result = _invoke("validate", str(path), "--reference", str(tiny_model_path))
    assert result.exit_code == 1
    assert "Runtime (onnxruntime optimised vs exact QDQ simulation)" in result.output
    assert "FAIL  SQNR of logits" in result.output and "runtime check(s) failed" in result.output
    assert "hint: onnxruntime's optimised (shipping) path departs" in result.output
    assert "verdict     FAIL" in result.output


def test_quantize_names_the_x86_option_when_the_shipping_path_drifts(
    tiny_model_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calib = save_images_npz(tmp_path / "calib.npz", _calibration(), {"source": "test"})
    _drifting_sessions(monkeypatch)
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib))
    assert result.exit_code == 1
    assert out.exists()  # written, then found to drift
    assert "hint: onnxruntime's optimised (shipping) path departs" in result.output
    assert "--profile ort-x86-avx2" in result.output


def test_float_grid_models_skip_the_runtime_checks(tiny_model_path: Path) -> None:
    flat = _quantized(tiny_model_path, weights_as_float=True)
    report = validate(flat, load_model(tiny_model_path), data=_calibration(8, seed=5))
    assert report.runtime_checks == ()
    assert report.outputs[0].runtime_top1_agreement is not None  # still measured and reported
