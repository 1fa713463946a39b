"""Task metrics: how often the quantized model gives the float model's *answer*, not just its numbers.

One agreement metric per output (``--metric``; the table and the evidence are in
docs/VALIDATE.md, "Agreement metrics"):

* ``top1``: N x K class scores (K > 1): share of images whose arg-max class is the float one.
* ``iou``: an N x 1 x H x W probability map: both maps cut at ``value > threshold``, pooled
  sum_i |F_i & Q_i| / sum_i |F_i | Q_i| (1.0 when both are empty everywhere).
* ``sequence``: N x T x C (C > 1) CTC step scores, greedy-decoded (arg-max per step, repeats
  collapsed, blank 0 dropped): 1 - sum_i edit(F_i, Q_i) / sum_i max(|F_i|, |Q_i|) (1.0 when
  every sequence is empty), and the share of identical decodings.

``auto`` picks by the float output's shape (and, for ``iou``, float values all in [0, 1]);
a metric named explicitly applies to every output of its shape, and no output of that
shape is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "TASK_METRICS",
    "DEFAULT_IOU_THRESHOLD",
    "fits",
    "ctc_greedy_decode",
    "edit_distance",
    "check_metric",
    "check_threshold",
    "IouAccumulator",
    "SequenceAccumulator",
]

METRICS = ("auto", "top1", "iou", "sequence")
"""The ``--metric`` choices."""
METRIC_NAMES = {"top1": "top-1 agreement", "iou": "IoU", "sequence": "sequence agreement"}
"""How each metric is named in messages."""
TASK_METRICS = frozenset({"iou", "sequence"})
"""Metrics of outputs that are read through them alone (a map cut at a threshold, arg-max
per step): on given images the validator's verdict on such an output is its agreement, not
its SQNR (:func:`onnxdgh.validation.validate`)."""
DEFAULT_IOU_THRESHOLD = 0.5
"""Where a probability map is cut for ``iou`` (``--iou-threshold``; DBNet detectors use 0.3)."""


def check_metric(metric: object) -> str:
    """``metric`` if it is one of :data:`METRICS`, else an :class:`InvalidInputError`."""
    if metric not in METRICS:
        raise InvalidInputError(f"--metric {metric!r} is not one of {', '.join(METRICS)}",
                                "use --metric auto (chosen per output), top1, iou or sequence")
    return str(metric)


def check_threshold(value: object) -> float:
    """``value`` as a finite float, else an :class:`InvalidInputError`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise InvalidInputError(f"--iou-threshold {value!r} is not a finite number",
                                "give the probability where a map is cut, e.g. --iou-threshold 0.5")
    return float(value)


def fits(metric: str, shape: Sequence[int]) -> bool:
    """Whether an output of ``shape`` (batch first) has the layout ``metric`` reads."""
    if metric == "top1":
        return len(shape) == 2 and shape[1] > 1
    if metric == "sequence":
        return len(shape) == 3 and shape[2] > 1
    if metric == "iou":
        return len(shape) == 4 and shape[1] == 1
    return False


def ctc_greedy_decode(scores: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of N x T x C scores: arg-max per step, repeats collapsed, ``blank`` dropped."""
    best = np.asarray(scores).argmax(axis=2)
    decoded = []
    for row in best:
        keep = np.ones(row.shape[0], dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        decoded.append(tuple(int(c) for c in row[keep & (row != blank)]))
    return decoded


def edit_distance(a: Sequence[object], b: Sequence[object]) -> int:
    """Levenshtein distance: fewest insertions, deletions and substitutions turning ``a`` into ``b``."""
    previous = list(range(len(b) + 1))
    for i, item in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (item != other)))
        previous = current
    return previous[-1]


@dataclass
class IouAccumulator:
    """Pooled IoU of thresholded maps, batch by batch; also tracks whether the float maps stay in [0, 1]."""

    threshold: float
    intersection: int = 0
    union: int = 0
    low: float = np.inf
    high: float = -np.inf

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Count one batch (float maps ``reference``, quantized ``candidate``, same shape)."""
        ref = np.asarray(reference) > self.threshold
        cand = np.asarray(candidate) > self.threshold
        self.intersection += int(np.count_nonzero(ref & cand))
        self.union += int(np.count_nonzero(ref | cand))
        if reference.size:
            self.low = min(self.low, float(np.min(reference)))
            self.high = max(self.high, float(np.max(reference)))

    @property
    def probability_map(self) -> bool:
        """Every float value seen lies in [0, 1] (what ``auto`` requires)."""
        return bool(0.0 <= self.low and self.high <= 1.0)

    @property
    def value(self) -> float:
        """Pooled IoU (1.0 when neither model marks any pixel)."""
        return self.intersection / self.union if self.union else 1.0


@dataclass
class SequenceAccumulator:
    """Greedy-CTC character agreement and exact-sequence share, batch by batch."""

    errors: int = 0
    length: int = 0
    exact: int = 0
    count: int = 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Count one batch of N x T x C scores (float ``reference``, quantized ``candidate``)."""
        for ref, cand in zip(ctc_greedy_decode(reference), ctc_greedy_decode(candidate)):
            self.errors += edit_distance(ref, cand)
            self.length += max(len(ref), len(cand))
            self.exact += ref == cand
            self.count += 1

    @property
    def value(self) -> float:
        """1 - edits / characters (1.0 when every decoded sequence is empty)."""
        return 1.0 - self.errors / self.length if self.length else 1.0

    @property
    def exact_share(self) -> float:
        """Share of images whose decoded sequences are identical."""
        return self.exact / self.count if self.count else float("nan")
