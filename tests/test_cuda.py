"""DGH generation on a CUDA device: the same algorithm as on the CPU.

Skipped where torch sees no CUDA device (CI). Run on a GPU machine with
``python3 -m pytest -q tests/test_cuda.py``. GPU kernels sum in another order, so the
checks compare with tolerances, never bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from onnxdgh.cli import main
from onnxdgh.convert import fold_bn_taps, to_torch
from onnxdgh.fileio import load_images_npz
from onnxdgh.generation import GenerateConfig, evaluate_images, generate
from onnxdgh.generation.losses import batch_moments
from onnxdgh.generation.prep import Preprocessor
from onnxdgh.load import load_model

from .test_generate import _stop_at

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

QUICK = dict(images=12, batch_size=4, iterations=6)


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_moments_on_cuda_equal_the_cpu(channels_last: bool) -> None:
    x = torch.randn(16, 8, 12, 12, dtype=torch.float32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    cpu_mean, cpu_var = batch_moments(x)
    gpu = x.cuda()
    if channels_last:
        gpu = gpu.contiguous(memory_format=torch.channels_last)
    gpu_mean, gpu_var = batch_moments(gpu)
    torch.testing.assert_close(gpu_mean.cpu(), cpu_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu_var.cpu(), cpu_var, rtol=1e-4, atol=1e-5)
    # The gradient too (the one-pass affine backward).
    for device in ("cpu", "cuda"):
        leaf = x.clone().to(device).requires_grad_(True)
        mean, var = batch_moments(leaf)
        (mean.square().sum() + var.sum()).backward()
        if device == "cpu":
            expected = leaf.grad.clone()
        else:
            torch.testing.assert_close(leaf.grad.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_smoothing_on_cuda_equals_the_cpu() -> None:
    for channels in (1, 3):  # 3 channels take the NHWC depthwise path
        settings = dict(margin=4, sigma=1.0, enabled=True, low=None, high=None)
        cpu, gpu = (Preprocessor(channels, 16, 16, **settings, device=d) for d in ("cpu", "cuda"))
        canvas = torch.randn(5, *cpu.canvas_shape, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(gpu.smooth(canvas.cuda()).cpu(), cpu.smooth(canvas), rtol=1e-5, atol=1e-6)


def test_folded_taps_and_outputs_on_cuda_match_the_cpu(tiny_model_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    images = np.random.default_rng(0).standard_normal((6, 3, 12, 12)).astype(np.float32)
    cpu = evaluate_images(to_torch(loaded, device="cpu"), images, batch_size=3)
    gpu = evaluate_images(to_torch(loaded, device="cuda"), images, batch_size=3)
    assert gpu["bns_loss"] == pytest.approx(cpu["bns_loss"], rel=1e-4)
    folded = fold_bn_taps(to_torch(loaded, device="cuda"))
    assert all(t is None or (t[0].is_cuda and t[1].is_cuda) for t in folded.bn_taps)


def test_generate_on_cuda_follows_the_cpu_run(tiny_model_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    cpu = generate(loaded, GenerateConfig(**QUICK, seed=3), progress=False)
    gpu = generate(loaded, GenerateConfig(**QUICK, seed=3, device="cuda"), progress=False)
    assert gpu.images.shape == cpu.images.shape and np.isfinite(gpu.images).all()
    first_cpu, first_gpu = cpu.report["final"]["bns_loss_initial"], gpu.report["final"]["bns_loss_initial"]
    assert first_gpu == pytest.approx(first_cpu, rel=1e-4)  # same noise, same model, same loss
    final_cpu, final_gpu = cpu.report["final"]["bns_loss"], gpu.report["final"]["bns_loss"]
    assert final_gpu == pytest.approx(final_cpu, rel=0.05)
    assert final_gpu < first_gpu
    corr = np.corrcoef(gpu.images.reshape(-1), cpu.images.reshape(-1))[0, 1]
    assert corr > 0.99


def test_resume_on_cuda(tiny_model_path: Path, tmp_path: Path) -> None:
    """Ctrl-C on the GPU, resume on the GPU: the run finishes from the checkpoint."""
    loaded = load_model(tiny_model_path)
    checkpoint = tmp_path / "run.ckpt"
    config = GenerateConfig(**QUICK, device="cuda", checkpoint=str(checkpoint), checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        generate(loaded, config, progress=False, callback=_stop_at(8, KeyboardInterrupt))
    assert checkpoint.exists()
    resumed = generate(loaded, replace(config, resume=True), progress=False)
    assert resumed.report["resumed_from"] is not None
    assert resumed.images.shape == (12, 3, 12, 12) and np.isfinite(resumed.images).all()


def test_cli_generate_on_cuda(tiny_model_path: Path, tmp_path: Path) -> None:
    out, report = tmp_path / "gpu.npz", tmp_path / "gpu.json"
    result = CliRunner().invoke(main, ["-q", "generate", str(tiny_model_path), "-o", str(out), "--device", "cuda",
                                       "--images", "8", "--batch-size", "4", "--iterations", "3", "--json", str(report)])
    assert result.exit_code == 0, result.output
    images, _meta = load_images_npz(out)
    assert images.shape == (8, 3, 12, 12)
    assert json.loads(report.read_text())["settings"]["device"] == "cuda"


def test_cli_quantize_generates_on_cuda(tiny_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["-q", "quantize", str(tiny_model_path), "-o", str(out), "--device", "cuda",
                                       "--images", "8", "--batch-size", "4", "--iterations", "3", "--json", "-"])
    assert result.exit_code == 0, result.output
    assert out.exists()
    report = json.loads(result.stdout)
    assert report["generation"]["settings"]["device"] == "cuda"
