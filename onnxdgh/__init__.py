"""onnxdgh: fully quantized, hardware-friendly ONNX models from float ONNX models, without real data.

Pipeline: load -> convert -> generate (DGH) -> quantize (HPTQ) -> validate.
Public API: :func:`load_model`, :func:`inspect_model`, :func:`generate`, :func:`quantize`,
:func:`validate`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import OnnxDghError  # noqa: E402
from .load import LoadedModel, load_model, load_model_proto  # noqa: E402
from .inspection import InspectionReport, inspect_model  # noqa: E402
from .validate import ValidationReport, validate  # noqa: E402  (rebinds the name to the function)
from .generate import GenerateConfig, GenerationResult, generate  # noqa: E402  (rebinds the name to the function)
from .quantize import QuantizeConfig, QuantizeResult, quantize  # noqa: E402  (rebinds the name to the function)

__all__ = [
    "__version__",
    "OnnxDghError",
    "LoadedModel",
    "load_model",
    "load_model_proto",
    "InspectionReport",
    "inspect_model",
    "ValidationReport",
    "validate",
    "GenerateConfig",
    "GenerationResult",
    "generate",
    "QuantizeConfig",
    "QuantizeResult",
    "quantize",
]
