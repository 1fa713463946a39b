"""Atomic, pickle-free checkpoints of an image-generation run.

Contract: :func:`save_checkpoint` writes tensors, lists, dicts and plain numbers with
``torch.save`` through :func:`~onnxdgh.fileio.atomic_write_bytes` (a crash never leaves a
half-written file); :func:`load_checkpoint` reads them back with
``torch.load(weights_only=True)``, which refuses arbitrary pickled objects, and checks that
the checkpoint belongs to the same model and settings.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..fileio import atomic_write_bytes

__all__ = ["FORMAT", "rank_path", "save_checkpoint", "load_checkpoint"]

# /2: one file per rank of a data-parallel run (rank, world), no generator state (the
# random draws are keyed by image index and view number, see prep.py).
FORMAT = "onnxdgh-generate-checkpoint/2"
_OLDER = ("onnxdgh-generate-checkpoint/1",)


def rank_path(path: str | os.PathLike[str], rank: int, world: int) -> str:
    """The checkpoint file of ``rank`` of ``world`` processes: ``path`` itself in one process, else ``path.rankN``."""
    return str(path) if world == 1 else f"{path}.rank{rank}"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (plus the format tag) to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **state}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str], *, model_sha256: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Read a checkpoint made for the same model and settings.

    Raises:
        InvalidInputError: unreadable, not an onnxdgh checkpoint, or made for another
            model or other settings (the differing settings are named).
    """
    src = Path(path)
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InvalidInputError(
            f"checkpoint {src} cannot be read as an onnxdgh checkpoint ({type(exc).__name__})",
            "delete it and start again without --resume",
        ) from exc
    if isinstance(state, dict) and state.get("format") in _OLDER:
        raise InvalidInputError(
            f"checkpoint {src} was written by an older onnxdgh (format {state['format']}) and cannot be resumed",
            "delete it and start again without --resume",
        )
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise InvalidInputError(f"{src} is not an onnxdgh generate checkpoint", "give the file written by --checkpoint")
    if state.get("model_sha256") != model_sha256:
        raise InvalidInputError(
            f"checkpoint {src} was made for another model",
            "resume with the same model file, or delete the checkpoint and start again",
        )
    saved = json.loads(state.get("settings", "{}"))
    differing = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
    if differing:
        detail = ", ".join(f"{key}: {saved.get(key)!r} then, {settings.get(key)!r} now" for key in differing)
        raise InvalidInputError(
            f"checkpoint {src} was made with other settings ({detail})",
            "resume with the same options as the interrupted run, or delete the checkpoint",
        )
    return state
