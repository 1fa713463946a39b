"""What the ``onnxdgh`` commands share: error handling, progress, shared options, preflight.

Contract: every command body is wrapped in :func:`run_command` (an
:class:`~onnxdgh.errors.OnnxDghError` becomes ``error:``/``hint:`` lines and its exit code, a
Ctrl-C exit 130); options offered by several commands are defined once here. This module
imports nothing heavy (no torch): ``onnxdgh --help`` loads it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import EXIT_INTERRUPTED, InvalidInputError, OnnxDghError

__all__ = [
    "bn_targets",
    "echo_err",
    "exit_interrupted",
    "float_list",
    "input_shape_option",
    "preflight",
    "preprocess_option",
    "progress_enabled",
    "run_command",
]

F = TypeVar("F", bound=Callable[..., Any])


def echo_err(text: str) -> None:
    """Print a line on stderr."""
    click.echo(text, err=True)


def exit_interrupted() -> None:
    """End the process as interrupted: ``error: interrupted`` (no hint) and exit 130."""
    echo_err("error: interrupted")
    sys.exit(EXIT_INTERRUPTED)


def run_command(func: F) -> F:
    """Decorate a click command body: turn :class:`OnnxDghError` into a clean exit.

    The body returns an exit code (or None for 0).
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            code = func(*args, **kwargs)
        except OnnxDghError as exc:
            echo_err(f"error: {exc.message}")
            if exc.hint:
                echo_err(f"hint: {exc.hint}")
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            exit_interrupted()
        sys.exit(int(code or 0))

    return wrapper  # type: ignore[return-value]


def progress_enabled(ctx: click.Context) -> bool:
    """Whether this invocation shows progress bars (decided once by the group's options)."""
    return bool((ctx.obj or {}).get("progress"))


def _parse_shape(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace(",", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or any(v <= 0 for v in shape):
        raise click.BadParameter(f"{value!r} is not C x H x W, e.g. 3x48x192", ctx=ctx, param=param)
    return shape  # type: ignore[return-value]


input_shape_option = click.option(
    "--input-shape",
    callback=_parse_shape,
    default=None,
    metavar="CxHxW",
    help="Pin symbolic input dimensions, e.g. 3x48x192 (for exports with open height/width).",
)
"""Shared ``--input-shape`` option: every command that loads a model offers it."""


preprocess_option = click.option(
    "--preprocess", default=None, metavar="imagenet|unit|symmetric|raw255",
    help="Input normalisation by name (pixels in [0,1] -> (p - mean) / std): imagenet mean/std, unit (the pixels), "
         "symmetric ([-1, 1]) or raw255 (0-255); excludes --mean/--std. Default: the model's metadata, "
         "else inferred from its first BN-ed layer.",
)
"""Shared ``--preprocess`` option of ``generate`` and ``quantize`` (one field: ``GenerateConfig.preprocess``)."""


def preflight(loaded: Any, config: Any, quiet: bool) -> None:
    """The checks a generation run makes before its long work, in the order a user fixes them.

    First the memory the run needs (a model too large for the machine is refused with the
    figure, whatever its normalisation), then the input normalisation: one stderr line when
    it was inferred, and the resolver's error (exit 2, hint naming --preprocess and
    --mean/--std) when nothing can be decided.
    """
    from ..generation.core import resolve_normalization
    from ..memory import check_run_memory
    from ..normalization import describe

    check_run_memory(loaded, images=config.images, batch_size=config.batch_size)

    norm = resolve_normalization(loaded, config)
    if norm.inference is not None and not quiet:
        echo_err(describe(norm))


def float_list(option: str, text: str | None) -> tuple[float, ...] | None:
    """``--mean 0.5`` / ``--std 0.229,0.224,0.225`` as floats (None when the option is absent)."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        values = ()
    if not values:
        raise InvalidInputError(f"{option} {text!r} is not a comma-separated list of numbers", f"give e.g. {option} 0.5 or 0.485,0.456,0.406")
    return values


def bn_targets(report: dict[str, Any]) -> str:
    """'; DGH matched N BN layer(s)' for a generation report that matched BN statistics; for
    `auto` that chose procedural images on a model with a few BN layers, how few; else ''."""
    count = report.get("bn_layers")
    if count:
        return f"; DGH matched {count} BN layer(s)"
    available = report.get("bn_available")
    if (available and report.get("method") == "procedural"
            and report.get("method_requested") == "auto"):
        share = 100 * report.get("bn_coverage", 0.0)
        return (f"; {available} BN layer(s) on {share:.0f} % of the convolutions, too few to "
                "steer DGH")
    return ""
