"""Activation statistics from the float model run on calibration images.

Contract: :func:`collect_statistics` runs the (BN-folded) float model in onnxruntime
with the requested tensors exposed as extra outputs, a chunk of images at a time, and
folds every chunk into per-tensor :class:`TensorStats` (count, min, max and a
histogram) before the next chunk runs. Memory is therefore bounded by the chunk size
and the histogram size, never by the number of images. Fixed-batch graphs are run at
their fixed batch size (``runtime.run_batched`` handles a short last batch).

Minimum and maximum are exact over every value. The histogram, which only has to rank
threshold candidates by mean squared error, is filled with a deterministic strided
sample of at most :data:`SAMPLE_PER_CHUNK` values per tensor and chunk (a prime stride,
so the sample does not lock onto one spatial position); this keeps calibration as cheap
as a min/max pass while a 512-image set still gives each tensor ~10^5 samples.

The histogram (:class:`PowerOfTwoHistogram`) covers ``[-R, R)`` with ``R`` a power of
two and a fixed number of equal bins. When a later chunk holds a value beyond ``R``, the
range doubles (as often as needed) and neighbouring bins merge exactly, because the old
bin edges are a subset of the new ones. Each bin keeps its count and the sum of its
values, so the MSE search can stand for a bin by its mean.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from ..progress import progress_bar
from ..runtime import make_session, run_batched, with_extra_outputs

__all__ = ["PowerOfTwoHistogram", "TensorStats", "collect_statistics", "DEFAULT_BINS", "SAMPLE_PER_CHUNK"]

_LOG = logging.getLogger(__name__)

DEFAULT_BINS = 2048
SAMPLE_PER_CHUNK = 2**15


def _prime_at_least(value: int) -> int:
    candidate = max(2, value)
    while any(candidate % d == 0 for d in range(2, int(candidate**0.5) + 1)):
        candidate += 1
    return candidate


def _sample(values: np.ndarray, limit: int) -> np.ndarray:
    """A strided view of at most about ``limit`` values (all of them when few)."""
    flat = values.reshape(-1)
    if flat.size <= limit:
        return flat
    stride = _prime_at_least(-(-flat.size // limit))
    return flat[stride // 2 :: stride]


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
        peak = float(max(-np.min(flat), np.max(flat)))
        needed = _pow2_above(peak)
        if self.radius == 0.0:
            self.radius = needed
        elif needed > self.radius:
            self._grow(needed)
        per_bin = np.float32(self.bins / (2.0 * self.radius))  # a power of two: exact scaling
        # Truncation equals floor for the non-negative offsets; float32 rounding can only
        # move a value sitting on a bin edge into its neighbour.
        index = ((flat + np.float32(self.radius)) * per_bin).astype(np.intp)
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)
        self.sums += np.bincount(index, weights=flat, minlength=self.bins)


def _pow2_above(value: float) -> float:
    """Smallest power of two strictly above ``value`` (the histogram range is half-open)."""
    # value = m 2^e with m in [0.5, 1), exactly, so 2^e is the next power of two above it.
    return float(np.ldexp(1.0, np.frexp(value)[1])) if value > 0.0 else 2.0**-40


@dataclass
class TensorStats:
    """What threshold selection needs to know about one activation tensor."""

    name: str
    count: int = 0
    minimum: float = float("inf")
    maximum: float = float("-inf")
    histogram: PowerOfTwoHistogram = field(default_factory=PowerOfTwoHistogram, repr=False)

    def add(self, values: np.ndarray, sample: int | None = None) -> None:
        """Fold one chunk of the tensor's values into the statistics.

        ``sample`` caps how many of them go into the histogram (min/max see all).

        Raises:
            ValueError: the chunk holds NaN or infinity (message: the tensor name).
        """
        if values.size == 0:
            return
        low, high = float(np.min(values)), float(np.max(values))
        if not (np.isfinite(low) and np.isfinite(high)):  # NaN propagates through min/max
            raise ValueError(self.name)
        self.count += int(values.size)
        self.minimum = min(self.minimum, low)
        self.maximum = max(self.maximum, high)
        self.histogram.add(values if sample is None else _sample(values, sample))

    def shifted(self, offset: float, name: str | None = None) -> TensorStats:
        """The statistics of the same values plus ``offset`` (named ``name``, default this name).

        Count, minimum, maximum and each bin's sum move exactly; each value stays in the
        bin of its unshifted value, which is all the MSE search reads (bin means and counts).
        """
        counts, sums = self.histogram.counts, self.histogram.sums
        histogram = replace(self.histogram, counts=counts.copy(), sums=sums + offset * counts)
        return replace(self, name=name or self.name, minimum=self.minimum + offset,
                       maximum=self.maximum + offset, histogram=histogram)

    @property
    def abs_max(self) -> float:
        """Largest magnitude seen."""
        return max(abs(self.minimum), abs(self.maximum)) if self.count else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready summary for the report."""
        return {"count": self.count, "min": self.minimum, "max": self.maximum}


def collect_statistics(
    model: onnx.ModelProto, images: np.ndarray, tensors: Sequence[str], *, input_name: str,
    batch_size: int = 32, fixed_batch: int | None = None, bins: int = DEFAULT_BINS,
    sample: int | None = SAMPLE_PER_CHUNK, progress: bool = False,
) -> dict[str, TensorStats]:
    """Run ``model`` on ``images`` and return :class:`TensorStats` for each of ``tensors``.

    ``tensors`` may include the graph input (its statistics come from the images
    themselves) and graph outputs. Non-finite activations are reported as a
    ``ValueError`` naming the tensor (the caller turns it into a user-facing error).
    """
    stats = {name: TensorStats(name, histogram=PowerOfTwoHistogram(bins)) for name in tensors}
    fetched = [name for name in tensors if name != input_name]
    session = make_session(with_extra_outputs(model, fetched), optimize=True) if fetched else None
    # A fixed-batch graph runs whole multiples of its batch.
    chunk = max(batch_size, 1)
    if fixed_batch:
        chunk = max(fixed_batch, batch_size // fixed_batch * fixed_batch)
    starts = range(0, images.shape[0], chunk)
    for start in progress_bar(starts, enabled=progress, desc="calibrating", unit="batch"):
        part = images[start : start + chunk]
        if input_name in stats:
            stats[input_name].add(part, sample)
        if session is None:
            continue
        if fixed_batch:
            outputs = run_batched(session, part, batch_size=chunk, outputs=fetched, fixed_batch=fixed_batch)
        else:
            outputs = session.run(fetched, {input_name: part})
        for name, value in zip(fetched, outputs):
            stats[name].add(value, sample)
    _LOG.info("collected statistics of %d tensors on %d images", len(stats), images.shape[0])
    return stats
