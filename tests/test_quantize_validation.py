"""`onnxdgh quantize` validates its result and writes the report beside the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from onnxdgh.cli import main


def _calib(tmp_path: Path) -> Path:
    path = tmp_path / "cal.npz"
    np.savez(path, images=np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32))
    return path


def test_quantize_writes_passing_validation_report(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out),
                                       "--calib-data", str(_calib(tmp_path))])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.validation.json").read_text())
    assert report["passed"] is True and report["violations"] == []
    assert report["profile"]["name"] == "generic-pot-int8"
    assert report["outputs"][0]["sqnr_db"] is None or report["outputs"][0]["sqnr_db"] > 25


def test_failed_gate_exits_1_and_keeps_model(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out),
                                       "--calib-data", str(_calib(tmp_path)), "--min-sqnr", "200",
                                       "--validation-report", str(report)])
    assert result.exit_code == 1
    assert "fails validation" in result.output and "hint:" in result.output
    assert out.exists() and json.loads(report.read_text())["passed"] is False


def test_validation_options_without_validation_are_refused(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(tiny_model_path), "-o", str(out),
                                       "--calib-data", str(_calib(tmp_path)), "--no-validate", "--min-sqnr", "3"])
    assert result.exit_code == 2 and "--no-validate" in result.output
    assert not out.exists()


def test_no_validate_writes_no_report(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out),
                                       "--calib-data", str(_calib(tmp_path)), "--no-validate"])
    assert result.exit_code == 0, result.output
    assert out.exists() and not (tmp_path / "q.validation.json").exists()
