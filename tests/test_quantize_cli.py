"""`onnxdgh quantize` end to end on a tiny model, and every error path (exit code, message, nothing written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from onnxdgh.cli import main
from onnxdgh.fileio import save_images_npz

from .helpers_quantize import conv_weight, make_model, run, structure_problems


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    images = (np.random.default_rng(0).standard_normal((24, 3, 12, 12)) * 1.5).astype(np.float32)
    return save_images_npz(tmp_path / "calib.npz", images, {"source": "test"})


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_quantize_end_to_end(tiny_model_path: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    report_path = tmp_path / "report.json"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib),
                     "--json", str(report_path))
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "W8A8" in result.output
    model = onnx.load(str(out))
    assert structure_problems(model, {("Conv", "Relu")}) == []
    report = json.loads(report_path.read_text())
    # A seeded 20 % (5 of 24) is held back for validation; the thresholds come from the rest.
    assert report["calibration"] == {"source": f"file:{calib}", "images": 19}
    assert report["holdout"]["images"] == 5 and len(set(report["holdout"]["indices"])) == 5
    assert report["counts"]["weights"] == 3 and report["counts"]["biases"] == 3
    assert all(entry["bits"] == 8 for entry in report["tensors"]["activations"])
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert meta["onnxdgh.calibration_source"] == f"file:{calib}"
    x = np.random.default_rng(1).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert run(model, x)[0].shape == (2, 4)


def test_quantize_options_and_json_stdout(tiny_model_path: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "q4.onnx"
    result = _invoke("-q", "quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib),
                     "--weight-bits", "4", "--act-bits", "4", "--threshold", "noclip", "--per-tensor-weights",
                     "--no-optimize-rounding", "--bias-correction", "--json", "-",
                     # The random tiny model's 4 scores are near ties: top-1 agreement on 5 held-out
                     # images says nothing, so this options test gates on SQNR only.
                     "--min-agreement", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["weight_bits"] == 4 and report["config"]["threshold"] == "noclip"
    assert report["profile"] == "pot-lowbit" and report["config"]["per_channel"] is False
    assert report["config"]["optimize_rounding"] is False and report["config"]["bias_correction"] is True
    assert "rounding" in report
    assert any(node.op_type == "Clip" for node in onnx.load(str(out)).graph.node)


def test_quantize_generates_when_no_calibration_file(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _invoke("-q", "quantize", str(tiny_model_path), "-o", str(out), "--images", "8", "--iterations", "2",
                     "--batch-size", "8", "--seed", "5", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["calibration"]["source"] == "dgh:dgh" and report["calibration"]["images"] == 4
    assert report["holdout"]["images"] == 4  # 8 generated: 4 calibrate, 4 judge
    assert report["calibration"]["generation"]["seed"] == 5


def test_quantize_passes_normalisation_to_the_generation(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _invoke("-q", "quantize", str(tiny_model_path), "-o", str(out), "--images", "8", "--iterations", "2",
                     "--batch-size", "8", "--mean", "0.5", "--std", "0.25", "--json", "-")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    settings = report["calibration"]["generation"]
    assert settings["mean"] == [0.5] and settings["std"] == [0.25]
    norm = report["generation"]["normalization"]
    assert norm["source"] == "options" and norm["clamped"] is True
    # Pixels in [0, 1] map to [(0 - 0.5) / 0.25, (1 - 0.5) / 0.25] = [-2, 2]: the images stay inside.
    stats = report["statistics"]["input"]
    assert -2.0 - 1e-5 <= stats["min"] and stats["max"] <= 2.0 + 1e-5
    meta = {prop.key: prop.value for prop in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["onnxdgh.generation"])["mean"] == [0.5]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--mean", "0.5,x", "--std", "0.5"], ["--mean '0.5,x' is not a comma-separated list of numbers", "hint:"]),
        (["--mean", "0.5", "--std", "0"], ["--std", "must be positive numbers"]),
        (["--mean", "0.5", "--std", "-1,1,1"], ["must be positive numbers"]),
        (["--mean", "nan", "--std", "0.5"], ["must be finite numbers"]),
        (["--mean", "0.5"], ["--mean and --std must be given together"]),
        (["--mean", "0.1,0.2", "--std", "0.5"], ["--mean has 2 values but the model input has 3 channels"]),
    ],
)
def test_bad_normalisation_exits_2_and_writes_nothing(
    tiny_model_path: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--images", "8", "--iterations", "2", *args)
    _assert_error(result, 2, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(("device", "fragment"), [("tpu", "--device"), ("cuda", "CUDA")])
def test_generation_device_is_checked_before_work(tiny_model_path: Path, tmp_path: Path, device: str, fragment: str) -> None:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (tests/test_cuda.py covers the GPU)")
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--images", "8", "--iterations", "2",
                     "--device", device)
    _assert_error(result, 2, fragment)
    assert not out.exists()


def _assert_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--weight-bits", "3"], ["--weight-bits 3", "hint:"]),
        (["--act-bits", "16"], ["--act-bits 16"]),
        (["--threshold", "kl"], ["--threshold 'kl'"]),
        (["--rounding-iterations", "0"], ["--rounding-iterations 0"]),
        (["--profile", "nope"], ["unknown profile 'nope'"]),
        (["--weight-bits", "4", "--profile", "generic-pot-int8"], ["allows weight bits [8]"]),
        (["--images", "4"], ["--images apply only when images are generated"]),
        (["--mean", "0.5", "--std", "0.5"], ["--mean, --std apply only when images are generated"]),
        (["--device", "cuda"], ["--device apply only when images are generated"]),
    ],
)
def test_bad_options_exit_2_and_write_nothing(
    tiny_model_path: Path, calib: Path, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib), *args)
    _assert_error(result, 2, *fragments)
    assert not out.exists()


def test_output_equal_to_input_is_refused(tiny_model_path: Path, calib: Path) -> None:
    before = tiny_model_path.read_bytes()
    result = _invoke("quantize", str(tiny_model_path), "-o", str(tiny_model_path), "--calib-data", str(calib))
    _assert_error(result, 2, "never overwrites its input")
    assert tiny_model_path.read_bytes() == before


def test_unwritable_output(tiny_model_path: Path, calib: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "q.onnx"
    _assert_error(_invoke("quantize", str(tiny_model_path), "-o", str(missing), "--calib-data", str(calib)),
                  2, "does not exist")
    if os.geteuid() != 0:  # root writes anywhere: the read-only case only means something for users
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            _assert_error(_invoke("quantize", str(tiny_model_path), "-o", str(locked / "q.onnx"),
                                  "--calib-data", str(calib)), 2, "not writable")
        finally:
            locked.chmod(0o700)


def test_report_path_equal_to_model_path_is_refused(tiny_model_path: Path, calib: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(calib), "--json", str(out))
    _assert_error(result, 2, "--json")
    assert not out.exists()


def test_unsupported_op_exit_2(tmp_path: Path, calib: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Sin", ["c"], ["y"], name="sin_node")]
    model = make_model(nodes, {"w": conv_weight(2, 3, 1)}, input_shape=("batch", 3, 12, 12))
    path = tmp_path / "sin.onnx"
    onnx.save(model, str(path))
    out = tmp_path / "q.onnx"
    result = _invoke("quantize", str(path), "-o", str(out), "--calib-data", str(calib))
    _assert_error(result, 2, "Sin", "sin_node")
    assert not out.exists()


def test_calibration_file_of_the_wrong_size(tiny_model_path: Path, tmp_path: Path) -> None:
    wrong = save_images_npz(tmp_path / "wrong.npz", np.zeros((4, 1, 28, 28), np.float32))
    out = tmp_path / "q.onnx"
    _assert_error(_invoke("quantize", str(tiny_model_path), "-o", str(out), "--calib-data", str(wrong)),
                  2, "N x 3 x 12 x 12")
    assert not out.exists()


def test_report_says_how_many_bn_layers_dgh_matched(tiny_model_path: Path, tmp_path: Path) -> None:
    from onnxdgh.commands.generate import bn_targets

    assert bn_targets({"bn_layers": 6}) == "; DGH matched 6 BN layer(s)"
    assert bn_targets({}) == bn_targets({"bn_layers": 0}) == ""  # procedural/noise images match none
    result = _invoke("quantize", str(tiny_model_path), "-o", str(tmp_path / "q.onnx"), "--images", "8",
                     "--iterations", "2", "--batch-size", "8", "--preprocess", "imagenet", "--no-validate")
    assert result.exit_code == 0, result.output
    assert "DGH matched 2 BN layer(s)" in result.stdout
