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
        return importlib.util.find_spec("onnxdgh.generate.core") is not None
    except ModuleNotFoundError:
        return False


def _has_command(name: str) -> bool:
    from onnxdgh.cli import main

    return name in main.commands


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
        pytest.skip("onnxdgh.generate.core is not in this checkout")
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


def test_depthwise_smoke(tmp_path: Path) -> None:
    text = _section(_smoke("bench_depthwise.py", tmp_path, extra=("--variants", "nearest", "ksr", "cle", "ksr+bc")),
                    "depthwise")
    assert "| ksr |" in text and "--kernel-sum-rounding" in text and "logit SQNR dB" in text
    assert "only the weights" in text and "| tiny1 | W8A8 |" in text
