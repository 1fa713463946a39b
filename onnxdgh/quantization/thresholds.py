"""Power-of-two thresholds and the uniform symmetric grids they define (HPTQ).

Contract: pure numpy functions, no ONNX. Given values (weights) or calibration
statistics (activations) they return thresholds ``t`` that are exact powers of two, so
that every scale ``t / 2^(b-1)`` (signed) or ``t / 2^b`` (unsigned) is a power of two as
well and exactly representable in float32. Zero points are always 0.

Grids (ALGORITHMS.md §2; HPTQ, Habi et al. 2021, cited as [16] in the DGH paper):

* signed, ``b`` bits: integers ``[-2^(b-1), 2^(b-1) - 1]``, step ``t / 2^(b-1)``;
* unsigned, ``b`` bits: integers ``[0, 2^b - 1]``, step ``t / 2^b``.

Threshold rules (docs/QUANTIZE.md, "Grids and thresholds"):

* **no clipping**: ``t = 2^ceil(log2 M)``, ``M = max(-min, max * stretch)``: the largest
  positive grid value is one step short of ``t``, so (as MCT does) the positive maximum is
  stretched by ``levels / qmax`` first. Nothing observed is clipped.
* **MSE search** (HPTQ's error-minimising threshold): candidates ``t0 / 2^i``, ``i = 0..K``,
  ``t0 = 2 * t_noclip``, the lowest mean squared quantization error wins. Weights: per
  output channel over the exact values, ``K = 10``, ties to the smaller threshold (a weight
  has no unseen values). Activations: over a calibration histogram, ``K = 20``, ties to the
  larger threshold (less clipping of values the calibration set did not show).
* **Lp search** (activations only): the same candidates ranked by the count-weighted
  ``|error|^p`` (MCT's ``QuantizationErrorMethod.LP``); a larger ``p`` than 2 weighs the
  clipping of rare large values more, between MSE and no clipping (:data:`LP_POWER`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "WEIGHT_SEARCH_STEPS", "ACTIVATION_SEARCH_STEPS", "MIN_THRESHOLD", "MAX_THRESHOLD",
    "ZERO_RANGE_THRESHOLD",
    "BIAS_HEADROOM_BITS", "LP_POWER", "grid", "scale_for", "along", "pow2_ceil", "noclip_threshold",
    "fake_quantize", "quantize_to_int", "quantize_preserving_sums", "search_candidates",
    "weight_thresholds",
    "bias_fit_thresholds", "histogram_mse_threshold", "histogram_error",
]

WEIGHT_SEARCH_STEPS = 10
ACTIVATION_SEARCH_STEPS = 20

# Thresholds are kept inside a range where every scale derived from them (down to
# t / 2^8 and bias scales that multiply two of them) stays a normal float32.
MIN_THRESHOLD = 2.0**-40
MAX_THRESHOLD = 2.0**40

LP_POWER = 3.0
"""The ``p`` of the ``lp`` threshold rule. ddddocr's YOLOX-style detector, W8A8 calibrated on
26 rendered pages, float boxes kept on 80 other pages / 60 scikit-image photos: p = 2 (MSE)
85.7 / 73.8 %, 2.5: 89.9 / 78.7 %, 3: 90.5 / 77.0 %, 3.5: 89.0 / 83.6 %, no clipping
88.7 / 36.1 % (issue-15 report, branch nobn15; docs/BENCHMARKS.md 'bn-free-detector')."""

ZERO_RANGE_THRESHOLD = 1.0
"""Threshold for a tensor that was exactly zero on all calibration data: any power of two
represents it; 1 keeps later bias scales (input scale x weight scale) far from underflow."""


def grid(bits: int, signed: bool) -> tuple[int, int, int]:
    """``(qmin, qmax, levels_per_threshold)`` of the grid; step = threshold / levels."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    return 0, 2**bits - 1, 2**bits


def scale_for(threshold: float | np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """The quantization step (scale) of ``threshold`` on the given grid, float32 and exact."""
    return (np.asarray(threshold, dtype=np.float64) / grid(bits, signed)[2]).astype(np.float32)


def along(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    """``values`` (one per slice along ``axis``) shaped to broadcast against an ``ndim``-d array;
    a scalar when there is one value or no axis."""
    values = np.asarray(values)
    if values.size == 1 or axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def pow2_ceil(value: float | np.ndarray) -> np.ndarray:
    """Smallest power of two >= ``value`` (elementwise), clamped to the threshold range.

    ``value <= 0`` maps to :data:`ZERO_RANGE_THRESHOLD`.
    """
    arr = np.asarray(value, dtype=np.float64)
    # value = m 2^e with m in [0.5, 1): exact, unlike ceil(log2(value)) near a power of two.
    mantissa, exponent = np.frexp(np.where(arr > 0, arr, 1.0))
    out = np.clip(np.ldexp(1.0, exponent - (mantissa == 0.5)), MIN_THRESHOLD, MAX_THRESHOLD)
    return np.where(arr > 0, out, ZERO_RANGE_THRESHOLD)


def noclip_threshold(
    minimum: float | np.ndarray, maximum: float | np.ndarray, bits: int, signed: bool
) -> np.ndarray:
    """No-clipping power-of-two threshold covering ``[minimum, maximum]`` (elementwise).

    For an unsigned grid the minimum is ignored (it must be >= 0; the caller decides).
    """
    _, qmax, levels = grid(bits, signed)
    # The positive maximum grows by levels / qmax so the grid's last step does not clip it.
    stretched = np.maximum(np.asarray(maximum, np.float64), 0.0) * (levels / qmax)
    low = np.asarray(minimum, dtype=np.float64)
    return pow2_ceil(np.maximum(-np.minimum(low, 0.0), stretched) if signed else stretched)


def quantize_to_int(values: np.ndarray, scale: np.ndarray | float, bits: int, signed: bool) -> np.ndarray:
    """Integers ``clip(round_half_even(values / scale), qmin, qmax)`` as int64.

    This is QuantizeLinear's rounding (round half to even), so the quantizer and
    onnxruntime agree bit for bit.
    """
    qmin, qmax, _ = grid(bits, signed)
    return np.clip(np.rint(np.asarray(values, np.float64) / np.asarray(scale, np.float64)), qmin, qmax).astype(np.int64)


def quantize_preserving_sums(values: np.ndarray, scale: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Signed integers like :func:`quantize_to_int`, except that in every slice along ``axis``
    (one output channel) the integers sum to the nearest integer of ``sum(values / scale)``.

    Kernel-sum-preserving rounding (why: docs/QUANTIZE.md, "Kernel-sum-preserving
    rounding"): the ``|n|`` entries with the largest residual ``v - round(v)``, ``n =
    rint(sum(v - round(v)))``, are rounded the other way, so no integer moves by more than
    one step and none past ``qmin``/``qmax``. ``scale`` broadcasts against ``values``.
    """
    qmin, qmax, _ = grid(bits, True)
    ratio = np.asarray(values, np.float64) / np.asarray(scale, np.float64)
    ints = np.clip(np.rint(ratio), qmin, qmax)
    moved = np.moveaxis(ints, axis, 0).reshape(ints.shape[axis], -1).copy()
    residual = np.moveaxis(ratio, axis, 0).reshape(moved.shape) - moved
    need = np.rint(residual.sum(axis=1))
    direction = np.sign(need)[:, None]
    # Candidates: entries whose residual points the needed way and that can move on the grid.
    room = np.where(direction > 0, moved < qmax, moved > qmin)
    score = np.where(room & (residual * direction > 0), residual * direction, -np.inf)
    rank = np.argsort(np.argsort(-score, axis=1, kind="stable"), axis=1, kind="stable")
    flip = (rank < np.abs(need)[:, None]) & np.isfinite(score)
    moved += flip * direction
    shape = list(np.moveaxis(ints, axis, 0).shape)
    return np.moveaxis(moved.reshape(shape), 0, axis).astype(np.int64)


def fake_quantize(values: np.ndarray, threshold: np.ndarray | float, bits: int, signed: bool) -> np.ndarray:
    """Quantize-dequantize ``values`` with ``threshold`` (broadcast), in float64."""
    qmin, qmax, levels = grid(bits, signed)
    scale = np.asarray(threshold, dtype=np.float64) / levels
    return np.clip(np.rint(np.asarray(values, np.float64) / scale), qmin, qmax) * scale


def search_candidates(noclip: np.ndarray | float, steps: int) -> np.ndarray:
    """Candidates ``t0 / 2^i``, ``i = 0..steps``, ``t0 = 2 * noclip``; shape ``(steps + 1, *noclip.shape)``."""
    base = np.asarray(noclip, dtype=np.float64) * 2.0
    factors = np.exp2(-np.arange(steps + 1, dtype=np.float64)).reshape((-1,) + (1,) * base.ndim)
    return np.clip(base[None, ...] * factors, MIN_THRESHOLD, MAX_THRESHOLD)


def weight_thresholds(
    weights: np.ndarray, axis: int | None, bits: int, method: str, *,
    steps: int = WEIGHT_SEARCH_STEPS,
) -> np.ndarray:
    """Signed power-of-two thresholds for ``weights``: float64, one per slice along ``axis``
    (shape ``(C,)``), or one (shape ``()``).

    ``method`` is ``"noclip"``, ``"mse"`` or ``"lp"`` (weights take the MSE search under the
    ``lp`` rule: every weight value is known, so there is no unseen outlier for a higher
    power to protect). An all-zero channel, exact at any scale, gets the largest threshold
    of its layer so that the bias scale derived from it stays as large as the layer allows.
    """
    w = np.asarray(weights, dtype=np.float64)
    rows = w.reshape(1, -1) if axis is None else np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    thresholds = noclip_threshold(rows.min(axis=1), rows.max(axis=1), bits, signed=True)
    if method in ("mse", "lp"):
        candidates = search_candidates(thresholds, steps)  # (K+1, C)
        errors = np.empty(candidates.shape, dtype=np.float64)
        for index in range(candidates.shape[0]):
            deq = fake_quantize(rows, candidates[index][:, None], bits, signed=True)
            errors[index] = np.mean((rows - deq) ** 2, axis=1)
        # Candidates run from large to small; argmin over the reversed list takes the
        # smallest threshold among equal errors.
        last = candidates.shape[0] - 1
        best = last - np.argmin(errors[::-1], axis=0)
        thresholds = candidates[best, np.arange(rows.shape[0])]
    elif method != "noclip":
        raise ValueError(f"unknown threshold method {method!r}")
    zero = np.all(rows == 0, axis=1)
    if zero.any():
        fill = thresholds[~zero].max() if (~zero).any() else ZERO_RANGE_THRESHOLD
        thresholds = np.where(zero, fill, thresholds)
    return thresholds.reshape(()) if axis is None else thresholds


BIAS_HEADROOM_BITS = 1
"""Bits of the int32 bias range kept free when a weight scale is raised for its bias: the
shift negative correction (``b - c * sum(W_q)``) and the rounding optimisation's learned
biases move the stored bias a little after the scale is fixed."""


def bias_fit_thresholds(
    bias: np.ndarray, input_scale: float, weight_bits: int, bias_bits: int, slots: int
) -> np.ndarray:
    """Smallest power-of-two weight thresholds at which every bias fits its integer grid.

    A bias is stored as ``round(b / (s_in * s_w))`` in ``bias_bits`` signed bits, with the
    weight scale ``s_w = t / 2^(weight_bits - 1)``. It fits, with
    :data:`BIAS_HEADROOM_BITS` to spare, when ``|b| <= 2^(bias_bits - 1 - headroom) s_in
    s_w``, i.e. ``t >= |b| 2^(weight_bits - 1) / (s_in 2^(bias_bits - 1 - headroom))``.
    This raises only dead channels' tiny MSE thresholds (docs/QUANTIZE.md, output graph,
    "Weights"): at the raised scale a weight's rounding error moves the output by at most
    ``2^-24 |b|`` per tap, far below the step of any output grid that holds the bias.

    ``slots``: number of weight scales (1 per tensor, or ``C / r`` when the weight scales
    repeat ``r`` times over the output channels, as in grouped ConvTranspose); output
    channel ``o`` uses slot ``o % slots``. Returns float64 thresholds of shape
    ``(slots,)``, 0 where any threshold will do (zero bias).
    """
    magnitude = np.abs(np.asarray(bias, np.float64)).reshape(-1)
    limit = 2.0 ** (bias_bits - 1 - BIAS_HEADROOM_BITS)
    needed = magnitude * grid(weight_bits, True)[2] / (np.float64(input_scale) * limit)
    needed = needed.reshape(-1, slots).max(axis=0) if slots > 1 else needed.max(initial=0.0).reshape(1)
    return np.where(needed > 0, pow2_ceil(needed), 0.0)


def histogram_mse_threshold(
    counts: np.ndarray, sums: np.ndarray, minimum: float, maximum: float, bits: int, signed: bool,
    *, steps: int = ACTIVATION_SEARCH_STEPS, power: float = 2.0,
) -> float:
    """HPTQ's MSE threshold search for an activation, from a calibration histogram.

    Each non-empty bin stands for its values by their mean (``sums / counts``) with weight
    ``counts``; the error of a candidate is the count-weighted squared difference between
    those means and their quantize-dequantize image. Within-bin spread adds the same
    amount to every candidate whose step is wider than a bin, so the ranking holds.
    ``power``: the exponent of that difference (2: MSE; :data:`LP_POWER`: the ``lp`` rule).
    """
    noclip = float(noclip_threshold(minimum, maximum, bits, signed))
    if maximum == 0.0 and minimum == 0.0:
        return noclip
    candidates = search_candidates(noclip, steps)
    errors = _histogram_errors(counts, sums, candidates, bits, signed, power)
    return float(candidates[int(np.argmin(errors))])


def histogram_error(counts: np.ndarray, sums: np.ndarray, threshold: float, bits: int, signed: bool) -> float:
    """Count-weighted squared quantization error of a histogram's bin means at ``threshold``.

    The quantity :func:`histogram_mse_threshold` minimises, for comparing two grids
    (e.g. signed against shifted unsigned) on the same calibration values.
    """
    return _histogram_errors(counts, sums, np.asarray([threshold]), bits, signed)[0]


def _histogram_errors(
    counts: np.ndarray, sums: np.ndarray, candidates: np.ndarray, bits: int, signed: bool,
    power: float = 2.0
) -> list[float]:
    """Count-weighted ``|error|^power`` of the non-empty bins' means at each candidate threshold."""
    nonempty = counts > 0
    weights = counts[nonempty].astype(np.float64)
    centres = sums[nonempty] / weights
    return [
        float(np.dot(weights, np.abs(centres - fake_quantize(centres, t, bits, signed)) ** power))
        for t in candidates
    ]

