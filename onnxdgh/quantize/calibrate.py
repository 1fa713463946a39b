"""Activation statistics from the float model run on calibration images.

Contract: :func:`collect_statistics` runs the (BN-folded) float model in onnxruntime
with the requested tensors exposed as extra outputs, a chunk of images at a time, and
folds every chunk into per-tensor :class:`TensorStats` (count, min, max and a
histogram) before the next chunk runs. Memory is therefore bounded by the chunk size
and the histogram size, never by the number of images. Fixed-batch graphs are run at
their fixed batch size (``runtime.run_batched`` handles a short last batch).

The histogram (:class:`PowerOfTwoHistogram`) covers ``[-R, R)`` with ``R`` a power of
two and a fixed number of equal bins. When a later chunk holds a value beyond ``R``, the
range doubles (as often as needed) and neighbouring bins merge exactly, because the old
bin edges are a subset of the new ones. Each bin keeps its count and the sum of its
values, so the MSE search can stand for a bin by its mean.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from tqdm import tqdm

from ..runtime import make_session, run_batched, with_extra_outputs

__all__ = ["PowerOfTwoHistogram", "TensorStats", "collect_statistics", "DEFAULT_BINS"]

_LOG = logging.getLogger(__name__)

DEFAULT_BINS = 2048


@dataclass
class PowerOfTwoHistogram:
    """Count and sum of values per bin over ``[-radius, radius)``; the radius only grows."""

    bins: int = DEFAULT_BINS
    radius: float = 0.0
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)
    sums: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64), repr=False)

    def __post_init__(self) -> None:
        if self.bins < 4 or self.bins & (self.bins - 1):
            raise ValueError("histogram bins must be a power of two >= 4")
        if self.counts.size == 0:
            self.counts = np.zeros(self.bins, np.int64)
            self.sums = np.zeros(self.bins, np.float64)

    @property
    def edges(self) -> np.ndarray:
        """Bin edges (``bins + 1`` values)."""
        return np.linspace(-self.radius, self.radius, self.bins + 1)

    def _grow(self, radius: float) -> None:
        factor = int(round(radius / self.radius))
        old = np.arange(self.bins)
        half = self.bins // 2
        if factor >= self.bins:
            # The whole old range now sits in the two bins around zero.
            target = np.where(old < half, half - 1, half)
        else:
            # Old bin j starts at -R + j*w = -R' + (j + (f-1)*B/2) * w, and new bins are
            # f*w wide, so it lands wholly inside new bin (j + (f-1)*B/2) // f.
            target = (old + (factor - 1) * half) // factor
        self.counts = np.bincount(target, weights=self.counts, minlength=self.bins).astype(np.int64)
        self.sums = np.bincount(target, weights=self.sums, minlength=self.bins)
        self.radius = radius

    def add(self, values: np.ndarray) -> None:
        """Fold ``values`` (any shape, finite) into the histogram."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        if flat.size == 0:
            return
        peak = float(np.max(np.abs(flat)))
        needed = _pow2_at_least(peak)
        if self.radius == 0.0:
            self.radius = needed
        elif needed > self.radius:
            self._grow(needed)
        per_bin = self.bins / (2.0 * self.radius)  # a power of two: the product is exact
        index = np.floor((flat.astype(np.float64) + self.radius) * per_bin).astype(np.int64)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)
        self.sums += np.bincount(index, weights=flat, minlength=self.bins)


def _pow2_at_least(value: float) -> float:
    """Smallest power of two strictly above ``value`` (the histogram range is half-open)."""
    if value <= 0.0:
        return 2.0**-40
    radius = 2.0 ** np.ceil(np.log2(value))
    while radius <= value:
        radius *= 2.0
    while radius / 2.0 > value:
        radius /= 2.0
    return float(radius)


@dataclass
class TensorStats:
    """What threshold selection needs to know about one activation tensor."""

    name: str
    count: int = 0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    histogram: PowerOfTwoHistogram = field(default_factory=PowerOfTwoHistogram, repr=False)

    def add(self, values: np.ndarray) -> None:
        """Fold one chunk of the tensor's values into the statistics."""
        if values.size == 0:
            return
        self.count += int(values.size)
        self.minimum = min(self.minimum, float(np.min(values)))
        self.maximum = max(self.maximum, float(np.max(values)))
        self.histogram.add(values)

    @property
    def abs_max(self) -> float:
        """Largest magnitude seen."""
        return max(abs(self.minimum), abs(self.maximum)) if self.count else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready summary for the report."""
        return {"count": self.count, "min": self.minimum, "max": self.maximum}


def collect_statistics(
    model: onnx.ModelProto,
    images: np.ndarray,
    tensors: Sequence[str],
    *,
    input_name: str,
    batch_size: int = 32,
    fixed_batch: int | None = None,
    bins: int = DEFAULT_BINS,
    progress: bool = False,
) -> dict[str, TensorStats]:
    """Run ``model`` on ``images`` and return :class:`TensorStats` for each of ``tensors``.

    ``tensors`` may include the graph input (its statistics come from the images
    themselves) and graph outputs. Non-finite activations are reported as a
    ``ValueError`` naming the tensor (the caller turns it into a user-facing error).
    """
    stats = {name: TensorStats(name, histogram=PowerOfTwoHistogram(bins)) for name in tensors}
    fetched = [name for name in tensors if name != input_name]
    session = make_session(with_extra_outputs(model, fetched), optimize=True) if fetched else None
    chunk = max(batch_size, fixed_batch or 1)
    if fixed_batch:
        chunk = max(fixed_batch, (batch_size // fixed_batch) * fixed_batch)
    starts = range(0, images.shape[0], chunk)
    bar = tqdm(starts, desc="calibrating", unit="batch", disable=not progress, leave=False)
    for start in bar:
        part = images[start : start + chunk]
        if input_name in stats:
            stats[input_name].add(part)
        if session is None:
            continue
        outputs = run_batched(session, part, batch_size=chunk, outputs=fetched, fixed_batch=fixed_batch)
        for name, value in zip(fetched, outputs):
            if not np.all(np.isfinite(value)):
                raise ValueError(name)
            stats[name].add(value)
    _LOG.info("collected statistics of %d tensors on %d images", len(stats), images.shape[0])
    return stats
