"""Less work for the same images: stopping on a whole-set BN-loss plateau (``plateau_stop``) and
optimising at a lower resolution first (``coarse_to_fine``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import torch
from torch import nn

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.generation import GenerateConfig, StepInfo, generate
from onnxdgh.generation.config import AUTO_SCHEDULE, generation_defaults, parse_schedule

from .conftest import export_onnx, settle_bn
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


@pytest.mark.parametrize("tool, key", [("bench_plateau_stop.py", "plateau-stop"),
                                       ("bench_generation_budget.py", "generation-budget"),
                                       ("bench_quantize_224.py", "quantize-224"),
                                       ("bench_depthwise_grad.py", "depthwise-grad")])
def test_bench_smoke(tmp_path: Path, tool: str, key: str) -> None:
    """The tool's --smoke writes its section (this checkout's onnxdgh, in-process)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, str(repo / "tools" / tool), "--smoke", "-q", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"<!-- bench:{key}:start -->" in (tmp_path / "BENCHMARKS.md").read_text()


# ------------------------------------------------------------------ coarse to fine

# 12 x 12 inputs: iterations 0-3 at 6 x 6, 4-7 at 12 x 12 (floor(0.5 * 8) = 4)
C2F = dict(images=12, batch_size=4, iterations=8, coarse_to_fine="0.5:0.5")


def test_coarse_to_fine_runs_small_then_full_size(tmp_path: Path) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    result = generate(model, GenerateConfig(**C2F), progress=False)
    stages = result.report["resolution_stages"]
    assert [(s["size"], s["iterations"]) for s in stages] == [([6, 6], [0, 4]), ([12, 12], [4, 8])]
    assert [s["crop_margin"] for s in stages] == [1, 2]  # auto margin 2 at 12 px, halved
    assert result.images.shape == (12, 3, 12, 12) and np.isfinite(result.images).all()
    assert result.report["final"]["bns_loss"] < result.report["final"]["bns_loss_initial"]
    assert result.report["settings"]["coarse_to_fine"] == [[0.5, 0.5]]
    # the same seed gives the same images; the schedule changes them
    again = generate(model, GenerateConfig(**C2F), progress=False)
    np.testing.assert_array_equal(result.images, again.images)
    full = generate(model, GenerateConfig(**{**C2F, "coarse_to_fine": None}), progress=False)
    assert "resolution_stages" in full.report and len(full.report["resolution_stages"]) == 1
    assert not np.array_equal(result.images, full.images)


def test_coarse_stage_optimises_canvases_of_the_smaller_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxdgh.generation import core

    seen: list[tuple[int, ...]] = []
    original = core._Run._moments

    def spy(self, view):
        seen.append(tuple(view.shape[2:]))
        return original(self, view)

    monkeypatch.setattr(core._Run, "_moments", spy)
    generate(consistent_model(tmp_path / "tiny.onnx"), GenerateConfig(**C2F), progress=False)
    # initial pass (3 batches) + 4 iterations x 3 at 6 px; the refill pass + 4 x 3 at 12 px
    assert seen == [(6, 6)] * 15 + [(12, 12)] * 15


@pytest.mark.parametrize("stop_at", [(2, 1), (5, 0)])
def test_coarse_to_fine_resume_gives_the_uninterrupted_images(tmp_path: Path, stop_at: tuple[int, int]) -> None:
    """Interrupted in the coarse stage and after the switch to full size: resumed, the same images."""
    model = consistent_model(tmp_path / "tiny.onnx")
    reference = generate(model, GenerateConfig(**C2F), progress=False)
    checkpoint = tmp_path / "run.ckpt"

    def stop(info: StepInfo) -> None:
        if (info.iteration, info.batch) == stop_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate(model, GenerateConfig(**C2F, checkpoint=str(checkpoint)), progress=False, callback=stop)
    assert torch.load(checkpoint, weights_only=True)["stage"] == (0 if stop_at[0] < 4 else 1)
    resumed = generate(model, GenerateConfig(**C2F, checkpoint=str(checkpoint), resume=True), progress=False)
    assert resumed.report["resumed_from"] == [stop_at[0], stop_at[1] + 1]
    np.testing.assert_array_equal(resumed.images, reference.images)


def test_plateau_stop_waits_for_the_full_size_stage(tmp_path: Path) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    config = GenerateConfig(**{**C2F, "iterations": 40, "coarse_to_fine": "0.5:0.75"}, lr=0.5, plateau_stop=1)
    result = generate(model, config, progress=False)
    # full size from iteration 30; the plateau window counts only from there
    assert result.report["iterations_run"] >= 30 + 2


def test_model_with_a_fixed_input_size_refuses_coarse_to_fine(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class FixedSize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.head = nn.Linear(4 * 12 * 12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(self.conv(x))).reshape(-1, 4 * 12 * 12))

    torch.manual_seed(0)
    model = export_onnx(settle_bn(FixedSize(), (3, 12, 12)), (3, 12, 12), tmp_path / "fixed.onnx")
    with pytest.raises(InvalidInputError, match="does not run at 6x6") as info:
        generate(model, GenerateConfig(**C2F), progress=False)
    assert "--coarse-to-fine" in (info.value.hint or "")
    # "auto" (what quantize's defaults ask for) falls back to full size, saying so
    with caplog.at_level(logging.WARNING, logger="onnxdgh.generation.core"):
        result = generate(model, GenerateConfig(**{**C2F, "coarse_to_fine": "auto"}), progress=False)
    assert [s["size"] for s in result.report["resolution_stages"]] == [[12, 12]]
    assert "coarse-to-fine schedule skipped" in caplog.text


def test_auto_schedule_on_a_convolutional_model(tmp_path: Path) -> None:
    result = generate(consistent_model(tmp_path / "tiny.onnx"), GenerateConfig(**{**C2F, "coarse_to_fine": "auto"}),
                      progress=False)
    stages = result.report["resolution_stages"]
    assert [(s["scale"], s["iterations"]) for s in stages] == [(AUTO_SCHEDULE[0][0], [0, 6]), (1.0, [6, 8])]
    assert result.report["settings"]["coarse_to_fine"] == "auto"


@pytest.mark.parametrize("text, expected", [
    ("0.5:0.75", ((0.5, 0.75),)), ("0.25:0.3, 0.5:0.6", ((0.25, 0.3), (0.5, 0.6))), ("off", None), ("", None), ("auto", "auto"),
    (None, None), ((), None), ([(0.5, 0.5)], ((0.5, 0.5),)),
])
def test_schedule_parsing(text: object, expected: object) -> None:
    assert parse_schedule(text) == expected


@pytest.mark.parametrize("bad", ["0.5", "half:0.5", "1.0:0.5", "0.5:1.0", "0:0.5", "0.5:0.3,0.25:0.6",
                                 "0.25:0.6,0.5:0.3", "nan:0.5", [(0.5,)], 3])
def test_bad_schedules_are_refused(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="--coarse-to-fine") as info:
        GenerateConfig(coarse_to_fine=bad)  # type: ignore[arg-type]
    assert "0.5:0.75" in (info.value.hint or "")


def test_coarse_to_fine_with_a_method_that_optimises_nothing_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="--coarse-to-fine has no effect with --method noise"):
        GenerateConfig(method="noise", coarse_to_fine="0.5:0.5")


def test_cli_coarse_to_fine(tmp_path: Path) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    out = tmp_path / "x.npz"
    ok = CliRunner().invoke(main, ["generate", str(model), "-o", str(out), "--images", "4", "--batch-size", "4",
                                   "--iterations", "4", "--coarse-to-fine", "0.5:0.5", "--json", str(tmp_path / "r.json")])
    assert ok.exit_code == 0, ok.output
    assert "coarse to fine: 2 iterations at 6x6, then 2 iterations at 12x12" in ok.output
    assert np.load(out)["images"].shape == (4, 3, 12, 12)
    bad = CliRunner().invoke(main, ["generate", str(model), "-o", str(tmp_path / "y.npz"), "--coarse-to-fine", "2:0.5"])
    assert bad.exit_code == 2 and "--coarse-to-fine" in bad.output and "hint:" in bad.output
    assert not (tmp_path / "y.npz").exists()


# ------------------------------------------------------------- budgets by bit width


def test_generation_defaults_by_bit_width() -> None:
    w8a8 = generation_defaults(8, 8)
    assert w8a8 == {"images": 64, "iterations": 50}
    assert GenerateConfig(**w8a8).images == 64  # valid settings
    for bits in [(4, 8), (7, 8), (8, 4), (4, 4), (2, 4)]:
        assert generation_defaults(*bits) == {}, bits  # generate's defaults (256 x 200, full size)
    w8a8["images"] = 1
    assert generation_defaults(8, 8)["images"] == 64  # a copy: callers cannot change the table


@pytest.mark.parametrize("extra, images, iterations, schedule", [
    ([], 64, 50, None),                                          # the W8A8 budget
    (["--images", "8", "--iterations", "3"], 8, 3, None),        # explicit counts win
    (["--images", "8", "--coarse-to-fine", "auto"], 8, 50, "auto"),
])
def test_quantize_w8a8_generates_the_budget_unless_told(tmp_path: Path, extra: list[str], images: int, iterations: int,
                                                        schedule: object) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    report = tmp_path / "q.json"
    result = CliRunner().invoke(main, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--json", str(report),
                                       "--no-validate", *extra])
    assert result.exit_code == 0, result.output
    generation = json.loads(report.read_text())["calibration"]["generation"]
    assert (generation["images"], generation["iterations"], generation["coarse_to_fine"]) == (images, iterations, schedule)


def test_quantize_below_8_bits_keeps_the_generate_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxdgh.generation import core

    seen: list[GenerateConfig] = []

    def fake(model, config, **kwargs):
        seen.append(config)
        raise InvalidInputError("stop here", "test")

    monkeypatch.setattr(core, "generate", fake)
    monkeypatch.setattr("onnxdgh.generation.generate", fake)
    result = CliRunner().invoke(main, ["quantize", str(consistent_model(tmp_path / "tiny.onnx")), "-o",
                                       str(tmp_path / "q.onnx"), "--weight-bits", "4", "--no-validate"])
    assert result.exit_code == 2 and "stop here" in result.output
    assert (seen[0].images, seen[0].iterations, seen[0].coarse_to_fine) == (256, 200, None)
