"""Less work for the same images: stopping on a whole-set BN-loss plateau (``plateau_stop``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.generation import GenerateConfig, generate

from .helpers_generate import consistent_model

# patience max(1, iterations // 50) = 1 for any run below 100 iterations: a run cut short
# and a run of exactly the iterations it made share their learning-rate schedule
SETTINGS = dict(images=12, batch_size=4, lr=0.5)


def test_plateau_stop_ends_early_with_the_images_of_a_shorter_run(tmp_path: Path) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    stopped = generate(model, GenerateConfig(**SETTINGS, iterations=60, plateau_stop=3), progress=False)
    ran = stopped.report["iterations_run"]
    assert stopped.report["stopped_on_plateau"] and 3 < ran < 60
    shorter = generate(model, GenerateConfig(**SETTINGS, iterations=ran), progress=False)
    assert not shorter.report["stopped_on_plateau"] and shorter.report["iterations_run"] == ran
    np.testing.assert_array_equal(stopped.images, shorter.images)


def test_plateau_stop_must_be_positive() -> None:
    with pytest.raises(InvalidInputError, match="--plateau-stop"):
        GenerateConfig(plateau_stop=0)


def test_cli_plateau_stop_bad_value_exit_2(tiny_model_path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["generate", str(tiny_model_path), "-o", str(tmp_path / "x.npz"), "--plateau-stop", "-1"])
    assert result.exit_code == 2 and "--plateau-stop" in result.output and "hint:" in result.output


def test_bench_plateau_stop_smoke(tmp_path: Path) -> None:
    """tools/bench_plateau_stop.py --smoke writes its section (this checkout's onnxdgh, in-process)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, str(repo / "tools" / "bench_plateau_stop.py"), "--smoke", "-q", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "<!-- bench:plateau-stop:start -->" in (tmp_path / "BENCHMARKS.md").read_text()
