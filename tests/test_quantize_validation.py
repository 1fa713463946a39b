"""`onnxdgh quantize` validates its result and writes the report beside the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
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


def test_validation_judges_held_out_images_and_records_the_files(tiny_model_path: Path, tmp_path: Path) -> None:
    import hashlib

    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(tiny_model_path), "-o", str(out),
                                       "--calib-data", str(_calib(tmp_path)), "--json", str(tmp_path / "q.json")])
    assert result.exit_code == 0, result.output
    assert "5 more held back for validation" in result.output
    assert "on held-out images of" in result.output and "n=5 of 24" in result.output
    report = json.loads((tmp_path / "q.validation.json").read_text())
    assert report["data"]["count"] == 5 and "held-out" in report["data"]["description"]
    assert report["model_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert report["reference_sha256"] == hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert all(gate["origin"] == "profile" and gate["passed"] for gate in report["gates"])
    quantized = json.loads((tmp_path / "q.json").read_text())
    assert quantized["calibration"]["images"] == 19 and quantized["holdout"]["images"] == 5
    meta = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert meta["onnxdgh.calibration_images"] == "19" and meta["onnxdgh.holdout_images"] == "5"


def test_held_out_images_choose_nothing(tiny_model_path: Path) -> None:
    from onnxdgh.load import load_model
    from onnxdgh.quantization import QuantizeConfig, quantize
    from onnxdgh.quantization.api import holdout_size

    loaded = load_model(tiny_model_path)
    images = np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32)
    first = quantize(loaded, images, QuantizeConfig(), progress=False, holdout=holdout_size(24))
    held = first.report["holdout"]["indices"]
    assert len(held) == 5 and first.holdout is not None
    np.testing.assert_array_equal(first.holdout, images[held])
    # Blow the held-out images up 100x: if any threshold were chosen on them, it would move.
    changed = images.copy()
    changed[held] *= 100.0
    second = quantize(loaded, changed, QuantizeConfig(), progress=False, holdout=holdout_size(24))
    assert second.report["holdout"]["indices"] == held
    assert second.report["tensors"] == first.report["tensors"]
    everything = quantize(loaded, changed, QuantizeConfig(), progress=False)
    assert everything.report["tensors"] != first.report["tensors"] and everything.holdout is None


def test_holdout_size() -> None:
    from onnxdgh.errors import CalibrationDataError
    from onnxdgh.quantization.api import holdout_size

    assert [holdout_size(n) for n in (8, 24, 256)] == [4, 5, 51]
    with pytest.raises(CalibrationDataError, match="7 images are too few") as info:
        holdout_size(7)
    assert "--no-validate" in info.value.hint


def test_too_few_images_to_hold_back_is_bad_input(tiny_model_path: Path, tmp_path: Path) -> None:
    few = tmp_path / "few.npz"
    np.savez(few, images=np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(few)])
    assert result.exit_code == 2 and "too few to hold 4 back" in result.stderr and not out.exists()
    result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(few),
                                       "--no-validate"])
    assert result.exit_code == 0 and out.exists()


def test_below_the_profile_floor_exits_1_with_output_value_floor_layers_and_hint(
    tiny_model_path: Path, tmp_path: Path
) -> None:
    from onnxdgh.profile import load_profile

    data = load_profile("generic-pot-int8").to_dict()
    data.update(name="demanding", min_output_sqnr_db=200.0)
    profile = tmp_path / "demanding.json"
    profile.write_text(json.dumps(data))
    out = tmp_path / "q.onnx"
    args = ["-q", "quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(_calib(tmp_path)),
            "--profile", str(profile)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and out.exists()
    line = next(text for text in result.stderr.splitlines() if "output 'logits'" in text)
    assert "below 200 dB (the floor of profile demanding)" in line and "held-out" in line
    assert len(line.split("worst layers: ")[1].split(", ")) == 3
    hint = next(text for text in result.stderr.splitlines() if text.startswith("hint:"))
    assert "--min-sqnr" in hint and "--weight-bits" in hint
    report = json.loads((tmp_path / "q.validation.json").read_text())
    assert report["passed"] is False and report["gates"][0]["origin"] == "profile"
    # The user's gate replaces the floor.
    assert CliRunner().invoke(main, args + ["--min-sqnr", "10"]).exit_code == 0


def test_no_exit_0_below_the_floor(tiny_model_path: Path, tmp_path: Path) -> None:
    """Whatever the bits, a run that exits 0 has every output at or above its profile's floor."""
    from onnxdgh.profile import load_profile

    for bits in (("8", "8"), ("4", "4")):
        out = tmp_path / f"q{bits[0]}{bits[1]}.onnx"
        result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out), "--calib-data",
                                           str(_calib(tmp_path)), "--weight-bits", bits[0], "--act-bits", bits[1],
                                           "--rounding-iterations", "5"])
        report = json.loads(out.with_suffix(".validation.json").read_text())
        floor = load_profile(report["profile"]["name"]).min_output_sqnr_db
        below = [o for o in report["outputs"] if o["sqnr_db"] is not None and o["sqnr_db"] < floor]
        assert (result.exit_code == 0) == (report["passed"] is True)
        assert not (result.exit_code == 0 and below)
