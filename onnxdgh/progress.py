"""One progress-bar policy for every long loop of the package.

Contract: library functions take ``progress: bool`` and call :func:`progress_bar`; they
never decide on their own whether a terminal is attached. The CLI decides once
(``--progress/--no-progress``; by default bars only when stderr is a terminal, and never
with ``-q``), so a CI log of any command holds no carriage-return progress lines.
Bars go to stderr and disappear when done (``leave=False``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

__all__ = ["progress_bar", "progress_default"]


def progress_default(quiet: bool, requested: bool | None, stream: Any = None) -> bool:
    """Whether to show progress: ``-q`` wins, then an explicit choice, then "is stderr a TTY"."""
    if quiet:
        return False
    if requested is not None:
        return requested
    isatty = getattr(sys.stderr if stream is None else stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool, desc: str, unit: str,
                 total: int | None = None, initial: int = 0) -> Any:
    """A tqdm bar on stderr with the package's settings; a no-op object when not ``enabled``."""
    from tqdm import tqdm  # imported here: the CLI's --help must not pay for it

    return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                file=sys.stderr, dynamic_ncols=True, leave=False, mininterval=0.5)
