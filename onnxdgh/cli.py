"""The ``onnxdgh`` command line: a thin click layer over the Python API.

Contract: every subcommand shares ``--verbose/--quiet`` (on the group) and exit codes
0 = success, 1 = the model or result fails a check, 2 = bad input or usage. An
:class:`~onnxdgh.errors.OnnxDghError` becomes ``error: ...`` plus ``hint: ...`` on
stderr and its exit code; any other exception is a bug and shows its traceback.
Only this layer (and the ``commands`` modules it registers) prints.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import __version__
from .errors import OnnxDghError
from .progress import progress_default

__all__ = ["main", "run_command", "echo_err", "input_shape_option", "progress_enabled"]

F = TypeVar("F", bound=Callable[..., Any])


def echo_err(text: str) -> None:
    """Print a line on stderr."""
    click.echo(text, err=True)


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
            echo_err("error: interrupted")
            sys.exit(130)
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxdgh")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr (default: only when stderr is a terminal; never with -q).")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, progress: bool | None) -> None:
    """onnxdgh: fully quantized, hardware-friendly ONNX models without real data.

    \b
    Exit codes: 0 success, 1 the model or result fails a check, 2 bad input or usage.
    """
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("onnxdgh").setLevel(logging.INFO if verbose else level)
    ctx.ensure_object(dict)
    ctx.obj["quiet"] = quiet
    ctx.obj["verbose"] = verbose
    ctx.obj["progress"] = progress_default(quiet, progress)


def _register() -> None:
    from .commands.inspect import inspect_command

    main.add_command(inspect_command)
    for module_name, attr in (
        ("generate", "generate_command"),
        ("quantize", "quantize_command"),
        ("validate", "validate_command"),
    ):
        try:
            module = __import__(f"onnxdgh.commands.{module_name}", fromlist=[attr])
        except ModuleNotFoundError as exc:
            if exc.name != f"onnxdgh.commands.{module_name}":
                raise
            continue
        main.add_command(getattr(module, attr))


_register()

if __name__ == "__main__":  # pragma: no cover - exercised through python -m onnxdgh
    main()
