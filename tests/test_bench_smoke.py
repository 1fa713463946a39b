"""Smoke runs of every benchmark in tools/ so the harness cannot rot.

Each benchmark's ``--smoke`` mode builds a tiny model in-process, runs a few images and
iterations and writes its section into a BENCHMARKS.md under ``tmp_path`` (never into
docs/). Parts that need an optional package (MCT, matplotlib, scikit-image) are skipped
with the reason where it is missing; parts that need an onnxdgh command that does not
exist in this checkout are skipped naming the command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
VENV_PYTHON = REPO / "bench-work" / "venv" / "bin" / "python"

sys.path.insert(0, str(TOOLS))

import benchlib  # noqa: E402


def _has_generator() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("onnxdgh.generation.core") is not None
    except ModuleNotFoundError:
        return False


def _has_command(name: str) -> bool:
    import click

    from onnxdgh.cli import main

    return name in main.list_commands(click.Context(main))  # the commands are imported on first use


def _bench_docs() -> dict[str, int]:
    """Modification times of the files the benchmarks own in docs/ (others edit docs/ concurrently)."""
    docs = REPO / "docs"
    owned = [docs / "BENCHMARKS.md", *docs.glob("bench_*.png")] if docs.exists() else []
    return {p.name: p.stat().st_mtime_ns for p in owned if p.exists()}


def _smoke(script: str, out: Path, python: str = sys.executable, extra: tuple[str, ...] = ()) -> str:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    docs_before = _bench_docs()
    proc = subprocess.run([python, str(TOOLS / script), "--smoke", "-q", "--out", str(out), *extra],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, f"{script} --smoke failed:\n{proc.stderr[-3000:]}"
    docs_after = _bench_docs()
    assert docs_after == docs_before, "a --smoke run must not write into docs/"
    doc = out / "BENCHMARKS.md"
    assert doc.exists()
    return doc.read_text()


def _section(text: str, key: str) -> str:
    start, end = f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"
    assert start in text and end in text, f"section {key} missing"
    return text[text.index(start):text.index(end)]


# ----------------------------------------------------------------- library pieces


def test_write_section_replaces_in_place_and_keeps_other_sections(tmp_path: Path) -> None:
    doc = tmp_path / "B.md"
    info = {"date": "d", "cpu": "c", "cores": 2, "torch_threads": 2, "git": "g", "python": "p", "torch": "t",
            "onnxruntime": "o", "onnx": "x", "numpy": "n", "onnxdgh": "v"}
    benchlib.write_section("one", "One", "first body", info=info, command="cmd 1", load_before=0.1, load_after=0.2, doc=doc)
    benchlib.write_section("two", "Two", "second body", info=info, command="cmd 2", load_before=0.1, load_after=0.2, doc=doc)
    benchlib.write_section("one", "One", "new body", info=info, command="cmd 3", load_before=1.5, load_after=2.5, doc=doc)
    text = doc.read_text()
    assert text.count("<!-- bench:one:start -->") == 1
    assert "first body" not in text and "new body" in text and "cmd 3" in text
    assert "second body" in text and "cmd 2" in text
    assert text.index("<!-- bench:one:start -->") < text.index("<!-- bench:two:start -->"), "replaced in place, not appended"
    assert "load average (1 min) 1.50 before, 2.50 after" in text


def test_write_section_refuses_a_bad_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        benchlib.write_section("Bad Key", "t", "b", info={}, command="c", load_before=0, load_after=0, doc=tmp_path / "x.md")


def test_run_measured_reports_peak_memory_of_the_child() -> None:
    small = benchlib.run_measured([sys.executable, "-c", "pass"])
    big = benchlib.run_measured([sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096])"])
    assert small.returncode == 0 and big.returncode == 0
    assert big.max_rss_bytes > small.max_rss_bytes + 150 * 2**20


def test_text_lines_found_on_a_synthetic_page() -> None:
    import bench_third_party as tp

    page = tp.synthetic_page(0)
    lines = tp.text_lines(page)
    assert len(lines) == 4
    crops = tp.make_crops(page)
    assert crops.images.shape[1:] == (3, 48, 192)
    assert set(crops.labels.tolist()) == {0, 1}
    # the rotated crop is the upright one turned by 180 degrees before resizing
    assert np.count_nonzero(crops.labels == 0) == np.count_nonzero(crops.labels == 1)
    assert -1.0 <= crops.images.min() and crops.images.max() <= 1.0


# ----------------------------------------------------------------- smoke runs


def test_generation_speed_smoke(tmp_path: Path) -> None:
    """Runs in the benchmark venv when it exists, so the MCT baseline is exercised too; else onnxdgh alone."""
    if not _has_generator():
        pytest.skip("onnxdgh.generation.core is not in this checkout")
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    text = _section(_smoke("bench_generation_speed.py", tmp_path, python=python), "generation-speed")
    row = next(line for line in text.splitlines() if line.startswith("| tiny |"))
    assert "image-it/s" in text
    if "MCT: not installed" in text or "not importable" in text:
        assert "| — |" in row or "—" in row
    else:
        assert "x**" in row, "the MCT ratio must be filled in when MCT is installed"


def test_accuracy_smoke(tmp_path: Path) -> None:
    for command in ("generate", "quantize"):
        if not _has_command(command):
            pytest.skip(f"onnxdgh {command} is not in this checkout")
    text = _smoke("bench_accuracy.py", tmp_path)
    main = _section(text, "accuracy-tiny")
    assert "| DGH |" in main and "| real 512 |" in main and "W8A8" in main
    assert "W8A8 mse | W8A8 noclip" in main, "the threshold table is part of the model's section"
    ablation = _section(text, "accuracy-ablation-tiny")
    assert ablation.count("\n|") >= 4  # header, rule, all-off and all-on rows


def test_end_to_end_smoke(tmp_path: Path) -> None:
    for command in ("generate", "quantize"):
        if not _has_command(command):
            pytest.skip(f"onnxdgh {command} is not in this checkout")
    text = _section(_smoke("bench_end_to_end.py", tmp_path), "end-to-end")
    assert "MiB" in text and "| tiny |" in text


def test_third_party_smoke(tmp_path: Path) -> None:
    for command in ("generate", "quantize"):
        if not _has_command(command):
            pytest.skip(f"onnxdgh {command} is not in this checkout")
    text = _section(_smoke("bench_third_party.py", tmp_path), "third-party")
    assert "Float model accuracy" in text and "W8A8" in text


def test_real_models_smoke(tmp_path: Path) -> None:
    if not _has_command("quantize"):
        pytest.skip("onnxdgh quantize is not in this checkout")
    text = _section(_smoke("bench_real_models.py", tmp_path), "real-models")
    row = next(line for line in text.splitlines() if line.startswith("| tiny | accuracy |"))
    assert "W8A8 no flags" in text and "W8A8 true --mean/--std" in text and "W8A8 real calibration" in text
    assert row.count("exit ") == 3, "every run states the exit code of onnxdgh quantize"
    assert "mean 0.3, std 0.35" in row, "the true normalisation is shown next to what the tool used"
    # every run's own (held-out) figure stands next to the real-data figure and the floor
    verdicts = [line for line in text.splitlines() if line.startswith("| tiny | ") and "held-out" in line]
    assert len(verdicts) == 3 and all("| 15 |" in line for line in verdicts if "| 0 |" in line)
    assert "Runs that exit 0 with a real-data SQNR below the floor: **" in text
    results = __import__("json").loads((tmp_path / "work" / "real_models.json").read_text())["results"]
    assert [run["label"].split(" (")[0] for run in results[0]["runs"]][-1] == "real calibration"
    assert all(run["measured"]["agreement"] is not None for run in results[0]["runs"] if run["exit_code"] in (0, 1))
    # --render rewrites the same section from the saved JSON without running a model
    again = tmp_path / "again"
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_real_models.py"), "--render", str(tmp_path / "work" / "real_models.json"),
                           "--out", str(again), "--note", "Rerun after the merge."], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rendered = _section((again / "BENCHMARKS.md").read_text(), "real-models")
    assert "Rerun after the merge." in rendered and row in rendered


def test_real_models_strip_normalisation_keeps_other_metadata(tmp_path: Path) -> None:
    import onnx

    import bench_real_models as rm

    original = benchlib.tiny_classifier(tmp_path / "m.onnx", mean=0.3, std=0.35)
    model = onnx.load(str(original))
    for key, value in (("norm_mean", "[0.3]"), ("mean", "[0.3]"), ("arch", "tiny")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(original))
    before = original.read_bytes()
    removed = rm.strip_normalisation(original, tmp_path / "stripped.onnx")
    assert set(removed) == {"input_mean", "input_std", "norm_mean", "mean"}
    kept = {p.key: p.value for p in onnx.load(str(tmp_path / "stripped.onnx")).metadata_props}
    assert kept == {"arch": "tiny"}
    assert original.read_bytes() == before, "the input file is never modified"


def test_real_models_report_parsing() -> None:
    import bench_real_models as rm

    assert rm.normalisation_used(None) is None and rm.normalisation_used({"calibration": {}}) is None
    unknown = {"generation": {"normalization": {"source": None, "clamped": False, "note": "unknown"}}}
    assert rm.describe_normalisation(rm.normalisation_used(unknown)).startswith("none")
    inferred = {"generation": {"normalization": {"source": "inferred", "clamped": True, "mean": [0.5, 0.5, 0.5],
                                                 "std": [0.5, 0.5, 0.5], "confidence": 0.8125, "low": [-1.0]}}}
    assert rm.describe_normalisation(rm.normalisation_used(inferred)) == "inferred: mean 0.5, std 0.5 (confidence 0.812)"
    report = {"tensors": {"activations": [{"tensor": "x", "threshold": 8.0}, {"tensor": "y", "threshold": 2.0}]}}
    assert rm.input_threshold(report, "x") == 8.0 and rm.input_threshold(report, "z") is None
    assert rm.verdict(0, None, "") == "passes"
    failing = {"violations": [{"rule": "r"}], "gates": [{"gate": "min_sqnr", "value": 3.5, "threshold": 10.0, "passed": False}]}
    assert rm.verdict(1, failing, "error: x") == "fails (1 violations; min_sqnr 3.5 < 10.0)"
    assert rm.verdict(2, None, "log line\nerror: cannot decide the input range\nhint: give --mean") == \
        "exit 2: error: cannot decide the input range"


def test_real_models_inputs_are_disjoint_and_in_range() -> None:
    import bench_real_models as rm

    fonts = sorted(rm.FONT_DIR.glob("DejaVu*.ttf"))
    if len(fonts) < 2:
        pytest.skip(f"no DejaVu fonts in {rm.FONT_DIR}")
    crops = rm.render_text_lines(3, fonts[:1], seed=0)
    images, labels = rm.text_inputs(crops)
    assert images.shape == (6, 3, 48, 192) and labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert -1.0 <= images.min() and images.max() <= 1.0
    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8), rng.integers(0, 256, size=(90, 50, 3), dtype=np.uint8)]
    out = rm.photo_crops(photos, 4, 32, seed=0)
    assert out.shape == (4, 32, 32, 3) and out.dtype == np.uint8
    x = rm.normalise_rgb(out, (0.5,) * 3, (0.5,) * 3)
    assert x.shape == (4, 3, 32, 32) and -1.0 <= x.min() and x.max() <= 1.0


def test_bn_free_smoke(tmp_path: Path) -> None:
    text = _section(_smoke("bench_bn_free.py", tmp_path), "bn-free")
    for row in ("| noise |", "| procedural (no flags) |", "| dgh, no BN |", "| stretch + balance, from noise |",
                "| actreg, from noise |", "| actreg (procedural start) |", "| real |"):
        assert row in text
    assert "W8A8" in text and "W4A8" in text


def test_depthwise_smoke(tmp_path: Path) -> None:
    extra = ("--variants", "nearest", "ksr", "gptq", "cle", "ksr+bc",
             "--mobilenet-calib-source", "real", "dgh", "--mobilenet-variants", "gptq", "ksr")
    text = _section(_smoke("bench_depthwise.py", tmp_path, extra=extra), "depthwise")
    assert "| ksr |" in text and "--kernel-sum-rounding" in text and "logit SQNR dB" in text
    assert "only the weights" in text and "| tiny1 | W8A8 |" in text and "| GPTQ (" in text
    assert "| real 128 | gptq |" in text and "--gptq-rounding" in text
    assert "quantize_static`, MinMax" in text and "MobileNetV2 (torchvision" in text and "| real 512 | gptq |" in text
    assert "| DGH | ksr |" in text


def test_ocr_smoke(tmp_path: Path) -> None:
    # Tiny in-process map and CTC nets: no rapidocr files needed (the real run names them when absent).
    text = _section(_smoke("bench_ocr.py", tmp_path), "ocr")
    assert "**Recogniser** (3 x 16 x 64)" in text and "**Detector** (3 x 32 x 32)" in text
    assert text.count("| exit 0 |") == 4 and "--preprocess symmetric" in text and "| validate: IoU |" in text


def test_ocr_metrics_and_rendering() -> None:
    import bench_ocr

    assert bench_ocr.char_agreement(["ab c", ""], ["abc", ""], strip_spaces=True) == 1.0
    assert bench_ocr.char_agreement(["abcd"], ["abxd"]) == 0.75
    chars = ["blank", "a", "b", " "]
    assert bench_ocr.decode(np.eye(4)[[[1, 1, 0, 1, 3, 2, 2]]], chars) == ["aa b"]
    iou, share = bench_ocr.map_iou(np.array([[0.9, 0.9, 0.1]]), np.array([[0.9, 0.2, 0.4]]))
    assert iou == 1 / 3 and share == 2 / 3  # cut at 0.3: {0, 1} vs {0, 2}
    fonts = bench_ocr.fonts()
    lines, texts = bench_ocr.render_lines(3, 0, "abc123.,", fonts, width=320, height=48)
    assert lines.shape == (3, 3, 48, 320) and len(texts) == 3 and -1.0 <= lines.min() and lines.max() <= 1.0
    pages = bench_ocr.render_pages(2, 0, 64, "abc123", fonts)
    assert pages.shape == (2, 3, 64, 64) and pages.min() >= -1.0 and pages.max() <= 1.0


def test_ocr_needs_the_models(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(TOOLS / "bench_ocr.py"), "--models", str(tmp_path), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "ch_PP-OCRv4_det_infer.onnx not found" in proc.stderr
    assert "Traceback" not in proc.stderr
