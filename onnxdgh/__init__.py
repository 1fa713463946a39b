"""onnxdgh: fully quantized, hardware-friendly ONNX models from float ONNX models, without real data.

Pipeline: load -> convert -> generate (DGH) -> quantize (HPTQ) -> validate.
Public API: :func:`load_model`, :func:`inspect_model`, :func:`generate`, :func:`quantize`,
:func:`validate`.

The names below are imported on first use (PEP 562): ``import onnxdgh`` stays cheap, so the
command line can load torch inside its own Ctrl-C handling. ``onnxdgh.generate``,
``onnxdgh.quantize`` and ``onnxdgh.validate`` are the functions, as they always were, even
after their subpackages of the same name are imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "OnnxDghError": "onnxdgh.errors",
    "LoadedModel": "onnxdgh.load",
    "load_model": "onnxdgh.load",
    "load_model_proto": "onnxdgh.load",
    "InspectionReport": "onnxdgh.inspection",
    "inspect_model": "onnxdgh.inspection",
    "ValidationReport": "onnxdgh.validate",
    "validate": "onnxdgh.validate",
    "GenerateConfig": "onnxdgh.generate",
    "GenerationResult": "onnxdgh.generate",
    "generate": "onnxdgh.generate",
    "QuantizeConfig": "onnxdgh.quantize",
    "QuantizeResult": "onnxdgh.quantize",
    "quantize": "onnxdgh.quantize",
}
_SHADOWING = frozenset({"generate", "quantize", "validate"})
"""Functions named like the subpackage that defines them."""

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from .errors import OnnxDghError
    from .generate import GenerateConfig, GenerationResult, generate
    from .inspection import InspectionReport, inspect_model
    from .load import LoadedModel, load_model, load_model_proto
    from .quantize import QuantizeConfig, QuantizeResult, quantize
    from .validate import ValidationReport, validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxdgh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package module: importing ``onnxdgh.generate`` does not rebind the function's name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWING and isinstance(value, types.ModuleType):
            # The import system binds each loaded subpackage onto its parent; the public
            # name is the function (resolved by __getattr__ on first use).
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
