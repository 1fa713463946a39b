"""Helpers for the generation tests: a tiny model whose BN statistics are exactly those of a known input distribution."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .conftest import TinyConvBnRelu, export_onnx

INPUT_SHAPE = (3, 12, 12)
DATA_MEAN, DATA_STD = 0.3, 1.5


def consistent_model(path: Path, *, seed: int = 0, keep_bn: bool = True) -> Path:
    """Export a TinyConvBnRelu whose BN running stats are the cumulative average over N(0.3, 1.5^2) inputs.

    ``momentum=None`` makes BatchNorm keep an exact running average, so the targets are
    reachable (real-like inputs score a BN loss near 0): a loss that fails to fall is the
    generator's fault, not the model's.
    """
    torch.manual_seed(seed)
    module = TinyConvBnRelu()
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            layer.momentum = None
    generator = torch.Generator().manual_seed(seed + 1)
    module.train()
    with torch.no_grad():
        for _ in range(20):
            module(torch.randn(16, *INPUT_SHAPE, generator=generator) * DATA_STD + DATA_MEAN)
    return export_onnx(module.eval(), INPUT_SHAPE, path, keep_bn=keep_bn)
