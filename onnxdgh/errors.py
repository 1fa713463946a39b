"""The onnxdgh exception hierarchy.

Contract: every failure the user can do something about is raised as a subclass of
:class:`OnnxDghError`, whose message names the model part (file, node, tensor, option)
and whose ``hint`` says what to do. The CLI prints ``error: <message>`` and
``hint: <hint>`` on stderr and exits with ``exit_code``:

* 2 -- bad input or usage (the file, the options, the data),
* 1 -- the model or the result fails a check (not ready, constraint violations, gate).

The CLI adds 130: interrupted (Ctrl-C, at any moment including start-up), printed as
``error: interrupted`` without a hint. Any other exception escaping the library is a bug.
"""

from __future__ import annotations

__all__ = [
    "OnnxDghError",
    "InvalidInputError",
    "ModelLoadError",
    "UnsupportedModelError",
    "SymbolicShapeError",
    "ConversionError",
    "CalibrationDataError",
    "ProfileError",
    "OutputPathError",
    "QuantizationError",
    "ResourceError",
    "CheckFailedError",
    "GenerationDivergedError",
    "exception_line",
    "EXIT_OK",
    "EXIT_CHECK_FAILED",
    "EXIT_BAD_INPUT",
    "EXIT_INTERRUPTED",
]

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
"""The shell's code for a process ended by SIGINT (128 + 2)."""


class OnnxDghError(Exception):
    """Base of every error onnxdgh reports to a user.

    Args:
        message: one line naming the problem and the thing it concerns.
        hint: one line saying what the user can do about it.
    """

    exit_code: int = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInputError(OnnxDghError):
    """A file, option or value given by the user cannot be used."""


class ModelLoadError(InvalidInputError):
    """The model file is missing, unreadable, not ONNX, or fails the ONNX checker."""


class UnsupportedModelError(InvalidInputError):
    """The model is valid ONNX but outside what onnxdgh handles (opset, inputs, ops)."""


class SymbolicShapeError(UnsupportedModelError):
    """The image input's channels, height or width is symbolic and ``--input-shape`` did not pin it."""


class ConversionError(InvalidInputError):
    """onnx2torch cannot convert the model, or the torch module disagrees with onnxruntime."""


class CalibrationDataError(InvalidInputError):
    """Calibration images are missing, unsafe, or do not fit the model's input."""


class ProfileError(InvalidInputError):
    """A constraint profile is unknown, unreadable or does not follow the schema."""


class OutputPathError(InvalidInputError):
    """An output path cannot be written (or would overwrite the input)."""


class QuantizationError(InvalidInputError):
    """The model holds something the quantizer cannot quantize (an op, a pattern)."""


class ResourceError(InvalidInputError):
    """The run would need more memory than this machine has (the message gives the figure)."""


class CheckFailedError(OnnxDghError):
    """The model or the result was examined and fails a check (exit code 1)."""

    exit_code = EXIT_CHECK_FAILED


class GenerationDivergedError(CheckFailedError):
    """Synthetic image generation diverged (non-finite or rising BN loss); no images are written."""


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party exception's message for an error line: its lines joined (the ONNX checker
    spreads one node over several), cut at ``limit`` characters; its type name when empty."""
    line = " ".join(str(exc).split()) or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
