"""The ``onnxdgh`` command line: a thin click layer over the Python API.

Contract: every subcommand shares ``--verbose/--quiet`` (on the group) and exit codes
0 = success, 1 = the model or result fails a check, 2 = bad input or usage,
130 = interrupted. An :class:`~onnxdgh.errors.OnnxDghError` becomes ``error: ...`` plus
``hint: ...`` on stderr and its exit code; a Ctrl-C at any moment -- while the command
modules (and torch) import, while options are parsed, while a command runs -- becomes
``error: interrupted`` and exit 130 (the command modules are imported on first use, inside
the group's parsing and invocation, so that start-up is covered too); any other exception is a bug and
shows its traceback. Only this layer (and the ``commands`` modules it registers) prints.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from . import __version__
from .commands.common import exit_interrupted
from .progress import progress_default

__all__ = ["main"]


_COMMANDS = ("inspect", "generate", "quantize", "validate")
"""Subcommands: ``onnxdgh.commands.NAME`` holds ``NAME_command``, imported on first use."""


class _Cli(click.Group):
    """The command group: subcommands imported lazily, Ctrl-C anywhere inside ``main`` exits 130."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module = importlib.import_module(f"onnxdgh.commands.{cmd_name}")
        return getattr(module, f"{cmd_name}_command")  # type: ignore[no-any-return]

    # click turns a KeyboardInterrupt into "Aborted!" and exit 1; this layer promises 130.
    # make_context (parsing; --help imports the commands) and invoke (the command's own
    # imports and its work) are where an interrupt can land once this module is loaded.
    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except KeyboardInterrupt:
            exit_interrupted()
            raise  # unreachable (exit_interrupted exits); keeps the return type honest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            exit_interrupted()


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxdgh")
@click.option("-v", "--verbose", is_flag=True, help="Log what each stage does.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors; no progress bars.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bars on stderr (default: only when stderr is a terminal; never with -q).")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, progress: bool | None) -> None:
    """onnxdgh: fully quantized, hardware-friendly ONNX models without real data.

    \b
    Exit codes: 0 success, 1 the model or result fails a check, 2 bad input or usage,
    130 interrupted.
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


if __name__ == "__main__":  # pragma: no cover - exercised through python -m onnxdgh
    main()
