"""Stage 5: validation of a quantized QDQ model against a constraint profile and its float reference.

``checks`` holds the structural rules, ``report`` the numerical comparison, ``metrics`` the
per-output agreement metrics (top-1, IoU, CTC sequence), ``api`` the :func:`validate` entry
point and its :class:`ValidateConfig`, which combine them into a :class:`ValidationReport`.
"""

from __future__ import annotations

from .api import REPORT_SCHEMA, DataInfo, GateResult, ValidateConfig, ValidationReport, validate
from .checks import RULES, Violation, check_model
from .report import LayerMetrics, OutputMetrics

__all__ = [
    "REPORT_SCHEMA",
    "RULES",
    "DataInfo",
    "GateResult",
    "LayerMetrics",
    "OutputMetrics",
    "ValidateConfig",
    "ValidationReport",
    "Violation",
    "check_model",
    "validate",
]
