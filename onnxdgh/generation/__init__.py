"""Synthetic calibration images from a model's BatchNorm statistics (DGH): stage 3.

Public API: :func:`generate` (images + report), :class:`GenerateConfig` (validated
settings), :class:`GenerationResult`, :func:`evaluate_images` (BN loss and output ranges
of any image set, e.g. real data, for comparison).
"""

from __future__ import annotations

from .config import GenerateConfig
from .core import GenerationResult, StepInfo, evaluate_images, generate, resolve_normalization

__all__ = ["GenerateConfig", "GenerationResult", "StepInfo", "evaluate_images", "generate", "resolve_normalization"]
