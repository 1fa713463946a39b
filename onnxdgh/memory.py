"""Up-front memory estimates: refuse a run the machine cannot hold before allocating it.

Contract:
* :func:`machine_memory_bytes` is the memory this process may use: the physical memory,
  lowered by a cgroup limit when one is set.
* :func:`estimate_run_memory` is a *floor* for running ``images`` images through the model
  in batches of ``batch_size``: the image set (float32) plus one batch's input and every
  intermediate tensor of the shape-inferred graph. Generation also keeps gradients and
  optimiser moments, so real use is higher; refusing only when the floor does not fit never
  refuses a run that would have worked, while an input of 3 x 100000 x 100000 is refused
  with its figure instead of dying in an allocation.
* :func:`check_run_memory` raises :class:`~onnxdgh.errors.ResourceError` (exit 2) with
  the figure and what to change; ``onnxdgh inspect`` reports the same figure for the
  default settings.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from .errors import ResourceError

if TYPE_CHECKING:
    from .load import LoadedModel

__all__ = [
    "MemoryEstimate",
    "activation_bytes_per_image",
    "check_run_memory",
    "estimate_run_memory",
    "format_bytes",
    "machine_memory_bytes",
    "memory_advice",
]

_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def format_bytes(count: int | float) -> str:
    """``count`` bytes as a short figure: ``292.1 GiB``, ``12.0 KiB``, ``512 bytes``."""
    value = float(count)
    if value < 1024:
        return f"{int(value)} bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024:
            return f"{value:,.1f} {unit}"
    return f"{value / 1024:,.1f} PiB"


@functools.lru_cache(maxsize=1)
def machine_memory_bytes() -> int:
    """Physical memory, or the cgroup memory limit when lower (``sys.maxsize`` if unknown)."""
    try:
        total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        total = 0
    limits = [total] if total > 0 else []
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < (1 << 60):  # "max" or a huge number: no limit
            limits.append(int(text))
    return min(limits) if limits else 2**63 - 1


def activation_bytes_per_image(model: onnx.ModelProto) -> int:
    """Bytes of every intermediate and output tensor for one image (known shapes only)."""
    graph = model.graph
    seen = {init.name for init in graph.initializer} | {value.name for value in graph.input}
    total = 0
    for value in [*graph.value_info, *graph.output]:
        if value.name in seen:
            continue
        seen.add(value.name)
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
            continue
        dims = list(tensor_type.shape.dim)[1:]  # the batch dimension is counted by the caller
        if not all(dim.HasField("dim_value") and dim.dim_value > 0 for dim in dims):
            continue
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 4
        total += math.prod(int(dim.dim_value) for dim in dims) * itemsize
    return total


@dataclass(frozen=True)
class MemoryEstimate:
    """A floor for the memory of one run (module docstring) against what the machine has."""

    images: int
    batch_size: int
    images_bytes: int
    batch_bytes: int
    available_bytes: int

    @property
    def needed_bytes(self) -> int:
        """The image set plus one batch's tensors."""
        return self.images_bytes + self.batch_bytes

    @property
    def fits(self) -> bool:
        """Whether the floor fits in the machine's memory."""
        return self.needed_bytes <= self.available_bytes

    def describe(self) -> str:
        """``"256 images in batches of 64 need at least 57.2 TiB of memory (...); this machine has 23.4 GiB"``."""
        return (
            f"{self.images} image{'s' if self.images != 1 else ''} in batches of {self.batch_size} need at least "
            f"{format_bytes(self.needed_bytes)} of memory ({format_bytes(self.images_bytes)} for the images, "
            f"{format_bytes(self.batch_bytes)} for one batch through the model); "
            f"this machine has {format_bytes(self.available_bytes)}"
        )


def estimate_run_memory(loaded: LoadedModel, *, images: int, batch_size: int) -> MemoryEstimate:
    """The memory floor for ``images`` images of ``loaded``'s input size in batches of ``batch_size``."""
    image_bytes = math.prod(loaded.input_shape) * 4
    batch = max(1, min(batch_size, images))
    return MemoryEstimate(
        images=images,
        batch_size=batch,
        images_bytes=images * image_bytes,
        batch_bytes=batch * (image_bytes + activation_bytes_per_image(loaded.model)),
        available_bytes=machine_memory_bytes(),
    )


def memory_advice(loaded: LoadedModel, estimate: MemoryEstimate) -> str:
    """What to change so that a run fits: fewer images and a smaller batch, or a smaller input."""
    single = estimate_run_memory(loaded, images=1, batch_size=1)
    if single.fits:
        return (f"use fewer --images and a smaller --batch-size (one image in a batch of one needs "
                f"{format_bytes(single.needed_bytes)})")
    return (
        f"one image of {'x'.join(map(str, loaded.input_shape))} alone needs {format_bytes(single.needed_bytes)}: "
        "give a smaller input with --input-shape CxHxW (symbolic dimensions) or re-export the model at a smaller size"
    )


def check_run_memory(loaded: LoadedModel, *, images: int, batch_size: int) -> MemoryEstimate:
    """Refuse a run whose memory floor exceeds the machine's memory; return the estimate.

    Raises:
        ResourceError: the figure, the machine's memory and what to change.
    """
    estimate = estimate_run_memory(loaded, images=images, batch_size=batch_size)
    if not estimate.fits:
        advice = memory_advice(loaded, estimate)
        raise ResourceError(f"{loaded.source}: {estimate.describe()}", advice)
    return estimate
