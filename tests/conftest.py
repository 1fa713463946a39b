"""Shared test helpers: tiny random-weight Conv-BN-ReLU models built in the test, no files needed."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
torch.set_num_threads(1)


class TinyConvBnRelu(nn.Module):
    """Conv-BN-ReLU x2, global pool, linear: the smallest model with real BN statistics."""

    def __init__(self, channels: int = 3, classes: int = 4, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def settle_bn(module: nn.Module, shape: tuple[int, ...], seed: int = 0, steps: int = 5) -> nn.Module:
    """Give BN layers non-trivial running statistics by a few train-mode passes on shifted noise."""
    generator = torch.Generator().manual_seed(seed)
    module.train()
    with torch.no_grad():
        for _ in range(steps):
            module(torch.randn(16, *shape, generator=generator) * 1.5 + 0.3)
    return module.eval()


def export_onnx(
    module: nn.Module,
    shape: tuple[int, int, int],
    path: Path,
    *,
    keep_bn: bool = True,
    dynamic_batch: bool = True,
    opset: int = 17,
) -> Path:
    """Export ``module`` to ONNX; ``keep_bn`` uses the TorchScript recipe that keeps BatchNormalization."""
    kwargs: dict[str, object] = {"dynamo": False, "opset_version": opset, "input_names": ["input"], "output_names": ["logits"]}
    if keep_bn:
        kwargs.update(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), torch.randn(1, *shape), str(path), **kwargs)
    return path


@pytest.fixture
def tiny_model_path(tmp_path: Path) -> Path:
    """A Conv-BN-ReLU classifier exported with BN kept (3 x 12 x 12 input, dynamic batch)."""
    torch.manual_seed(0)
    module = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    return export_onnx(module, (3, 12, 12), tmp_path / "tiny.onnx")


def ort_run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    """Run ``model`` in onnxruntime (CPU) on one input array."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})
