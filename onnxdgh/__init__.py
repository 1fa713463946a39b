"""onnxdgh: fully quantized, hardware-friendly ONNX models from float ONNX models, without real data.

Pipeline: load -> convert -> generate (DGH) -> quantize (HPTQ) -> validate.
Public API: :func:`load_model`, :func:`inspect_model`, :func:`generate`, :func:`quantize`,
:func:`validate`.

The names below are imported on first use (PEP 562): ``import onnxdgh`` stays cheap, so the
command line can load torch inside its own Ctrl-C handling. ``onnxdgh.generate``,
``onnxdgh.quantize`` and ``onnxdgh.validate`` are functions; the subpackages that define
them are ``onnxdgh.generation``, ``onnxdgh.quantization`` and ``onnxdgh.validation``, so no
name is shadowed and ``import onnxdgh.quantization.rounding`` works like any import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "OnnxDghError": "onnxdgh.errors",
    "LoadedModel": "onnxdgh.load",
    "load_model": "onnxdgh.load",
    "load_model_proto": "onnxdgh.load",
    "InspectionReport": "onnxdgh.inspection",
    "inspect_model": "onnxdgh.inspection",
    "ValidationReport": "onnxdgh.validation",
    "ValidateConfig": "onnxdgh.validation",
    "validate": "onnxdgh.validation",
    "GenerateConfig": "onnxdgh.generation",
    "GenerationResult": "onnxdgh.generation",
    "generate": "onnxdgh.generation",
    "QuantizeConfig": "onnxdgh.quantization",
    "QuantizeResult": "onnxdgh.quantization",
    "quantize": "onnxdgh.quantization",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .errors import OnnxDghError
    from .generation import GenerateConfig, GenerationResult, generate
    from .inspection import InspectionReport, inspect_model
    from .load import LoadedModel, load_model, load_model_proto
    from .quantization import QuantizeConfig, QuantizeResult, quantize
    from .validation import ValidateConfig, ValidationReport, validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxdgh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

