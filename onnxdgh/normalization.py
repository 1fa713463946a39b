r"""Input normalisation: how pixels map to the model's input, from options, metadata or the model itself.

Convention (the whole project's): pixels ``p`` lie in [0, 1] and the model's input is
``x = (p - mean) / std`` per channel, so the valid input range is
``[(0 - mean) / std, (1 - mean) / std]``. A model fed raw 0-255 values is mean 0,
std 1/255; a model fed [-1, 1] is mean 0.5, std 0.5.

Contract: :func:`resolve_normalization` returns one :class:`Normalization` for a loaded
model, from the first of these that applies:

1. ``--mean`` / ``--std`` (source ``"options"``);
2. ``--preprocess NAME``, one of :data:`PRESETS` (source ``"preset"``);
3. the model's ``metadata_props`` under the first pair of :data:`METADATA_KEYS` present
   (source ``"metadata"``; JSON lists or single numbers; values above 1.5 are taken as a
   0-255 scale and divided by 255);
4. inference from the model's first BN-ed layer (source ``"inferred"``, below).

When none applies it raises :class:`~onnxdgh.errors.InvalidInputError` (exit 2) whose
hint names ``--preprocess`` and ``--mean/--std``. Metadata that cannot be used (wrong
channel count, non-positive std, not numbers) is logged and skipped, never guessed at.

Inference (ALGORITHMS.md section 4). Let the first BN-ed layer be ``y = W * x' + b``, a
2-D convolution over the input (or a BatchNormalization reading the input itself,
``W = I``), where ``x' = a x + c`` is the input after per-channel constant
Add/Sub/Mul/Div, and let the BN's running mean and variance be ``mu_c`` and ``var_c``.
If the training inputs have per-channel mean ``m_k``, an output position whose filter
taps fall inside the image on the mask ``P`` has mean ``b_c + sum_k S^P_ck m_k`` with
``S^P_ck`` the sum of ``W[c, k]`` over ``P``; BN averages over positions, so

    mu_c = sum_P f_P (b_c + sum_k S^P_ck (a_k m_k + c_k))            (1)

with ``f_P`` the share of output positions with mask ``P`` (borders and padding are exact,
not approximated). (1) is linear in ``m``: C_out equations, C_in unknowns, solved by
least squares with each equation weighted by ``1 / sqrt(var_c)`` (residuals in units of
the BN input's spread). The standard error of ``m_k`` (residual scale, floored at
:data:`MEAN_NOISE_FLOOR`, times ``sqrt(diag((A^T A)^-1))``) in units of ``s_k`` says how
well the mean is seen: zero-sum filters (edge detectors) make ``A`` singular and the mean
invisible to the network.

The spread: ``var_c = sum_P f_P (w_cP^T Sigma w_cP + (mu_cP - mu_c)^2)`` with ``w_cP`` the
masked filter (times ``a``) and ``Sigma`` the covariance of an input patch, modelled as
``Sigma[(k,u),(l,v)] = s_k s_l R_kl rho^|u - v|`` (per-channel std ``s_k``, channel
correlation ``R_kl = r`` off the diagonal, spatial correlation ``rho`` per pixel of
Euclidean distance between taps). For each ``(r, rho)`` on a grid, ``log s`` is fitted to
``log var_c`` by damped Gauss-Newton; the best grid point wins. Its RMS log residual and
the spread of ``s`` over the grid points that fit almost as well (``r`` and ``rho`` trade
off against ``s``) measure how well the spread is seen.

Choosing the normalisation from ``(m, s)``. The presets differ mainly in scale (natural
photos have mean ~0 under both ``imagenet`` and ``symmetric``; their stds differ 2.2x), so
the decision rests on the spread, and the per-channel ``s_k`` are not what to compare: the
BN variances pin down the overall scale of the input far better than how it splits over
channels (EfficientNet-Lite0's stem fitted on real photo crops gives ``s`` = 0.73, 0.51,
0.30 against the crops' true 0.51, 0.50, 0.55). So one std ``s`` shared by all channels is
also fitted (closed form per grid point: ``log s^2`` is the mean of ``log var_c - log
sum_kl R_kl G_ckl``), and the snap compares it with each preset's valid range ``[lo_k,
hi_k]`` through the *fill ratio* ``phi_k = s / sqrt((hi_k - m_k)(m_k - lo_k))``: a
variable confined to ``[lo, hi]`` with mean ``m`` has a std of at most ``sqrt((hi - m)(m -
lo))`` (Bhatia-Davis), and data sets use a typical share of that bound: ImageNet 0.46,
CIFAR-10 0.51, SVHN 0.40, CelebA 0.6, rendered text lines 0.47, Fashion-MNIST 0.78, MNIST
0.91 (their published pixel means and stds; the text lines are
``tools/bench_real_models.py``'s); geometric centre :data:`_FILL_CENTRE` = 0.56. The
preset with the least score ``mean_k (log2(phi_k / 0.56) / 0.65)^2`` is taken when that is
<= 1 (``phi`` within 0.36 .. 0.88: MNIST's 0.91 gets the fitted range, which is as good;
the band stays clear of the bound 1, where a too-narrow range puts the data); a preset
whose range does not contain the fitted mean is out. When the mean is not seen, ``m_k`` is
the mean natural photos (ImageNet's pixel statistics) would have under the preset.
Otherwise the valid range is derived from the moments as ``[m_k - 2 s_k, m_k + 2 s_k]`` (4
standard deviations wide: a uniform pixel distribution spans 3.5, natural photos 4-4.7,
Fashion-MNIST 2.8), i.e. ``mean = 0.5 - m / (4 s)``, ``std = 1 / (4 s)``; this needs the
mean to be seen. When the fits fail (no BN-ed first layer, non-finite values, a spread fit
off by more than a factor ``e`` in variance, or an unseen mean that no preset's range
explains) nothing is decided.

Evidence for the fill-ratio rule (the first rule compared the per-channel ``s_k`` with
ImageNet's pixel std pushed through each preset): on PaddleOCR's text-direction classifier
(true ``symmetric``) it scored ``symmetric`` 1.58 and ``imagenet`` 0.35 and snapped to
``imagenet``; its training text is higher in contrast than photos, which put the fit
midway between the two presets' photo predictions. With the shared std (0.67) and the fill
ratio it scores ``symmetric`` 0.16, ``imagenet`` 1.81. The other models keep their answer:
EfficientNet-Lite0 and PP-OCRv4's recogniser ``symmetric`` (true), the three Fashion-MNIST
samples ``fitted`` (their (0.286, 0.353) is no preset; the nearest, ``symmetric``, scores
1.63-1.73), and PP-OCRv4's detector (PaddleOCR's training configuration normalises with
ImageNet's mean and std; RapidOCR feeds it ``(x - 0.5) / 0.5``) moves from ``fitted`` to
``imagenet``. Printed by ``python3 tools/infer_normalization.py MODEL[=CxHxW] ...`` on the
models of ``tools/bench_real_models.py`` and the RapidOCR wheel's
``ch_PP-OCRv4_det_infer.onnx=3x320x320`` and ``ch_PP-OCRv4_rec_infer.onnx=3x48x320``.

The inferred range clamps the synthetic images (generation's projection), and through
the calibration images it sets the input quantizer.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import graph as g
from .errors import InvalidInputError

if TYPE_CHECKING:  # load.py imports this module: no import cycle at run time
    from .load import BatchNormInfo, LoadedModel

__all__ = [
    "PRESETS",
    "METADATA_KEYS",
    "MEAN_NOISE_FLOOR",
    "InputInference",
    "Normalization",
    "metadata_normalization",
    "preset_normalization",
    "infer_input_distribution",
    "resolve_normalization",
    "describe",
]

_LOG = logging.getLogger(__name__)

PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "unit": ((0.0,), (1.0,)),
    "symmetric": ((0.5,), (0.5,)),
    "raw255": ((0.0,), (1.0 / 255.0,)),
}
"""Named conventions ``--preprocess NAME``: (mean, std) of pixels in [0, 1], per channel or one for all."""

METADATA_KEYS: tuple[tuple[str, str], ...] = (("input_mean", "input_std"), ("mean", "std"), ("norm_mean", "norm_std"))
"""``metadata_props`` key pairs read, in this order (the first pair present is used)."""

_SCALE_255_ABOVE = 1.5
"""Metadata values above this are on the 0-255 scale (a 0-1 mean or std never exceeds 1)."""

_NATURAL_MEAN = np.array(PRESETS["imagenet"][0])
"""Pixel mean of natural photos (ImageNet's), pushed through a preset to predict its input mean."""

_FILL_CENTRE = 0.56
"""Typical fill ratio std / sqrt((hi - mean)(mean - lo)) of image data sets (module docstring)."""
_SNAP_LOG2_FILL = 0.65
"""Tolerance of the snap in log2 of the fill ratio: a preset is taken when the fit's ratio is within 2^0.65 = 1.57x of the centre."""
_RANGE_STDS = 2.0
"""Half-width of a derived valid range in fitted standard deviations (module docstring)."""

MEAN_NOISE_FLOOR = 0.02
"""Least residual scale (in BN-input standard deviations) assumed for the mean fit: running
statistics are noisy and inputs are not exactly stationary, so a perfect fit of C_out = C_in
equations is not taken as perfect knowledge."""

# How well a quantity must be seen for each use (uncertainties in fitted stds; log residuals).
_MEAN_SEEN = 0.75
_MEAN_HIGH = 0.25
_MEAN_RESIDUAL_HIGH = 0.15
_VAR_HIGH = 0.35
_VAR_MEDIUM = 0.7
_VAR_LIMIT = 1.0
_NEAR_OPTIMAL = (1.5, 0.01)
"""Grid points whose RMS log residual is at most 1.5 x the best + 0.01 count as 'fit almost as well'."""

_R_GRID = (0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.98)
_RHO_GRID = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98)
_GN_STEPS = 40

_PASS_THROUGH = frozenset({"Identity", "Dropout", "Cast"})
_AFFINE_OPS = frozenset({"Add", "Sub", "Mul", "Div"})


# ------------------------------------------------------------------------- results


@dataclass(frozen=True)
class InputInference:
    """What the first BN-ed layer says about the training inputs (module docstring).

    Attributes:
        layers: the BN node names whose statistics were used.
        equations: number of BN channels (equations) used.
        mean, std: fitted per-channel mean ``m_k`` and std ``s_k`` of the model input.
        mean_uncertainty: standard error of ``m_k`` in units of ``s_k`` (inf: not seen).
        mean_residual: RMS residual of the mean fit, in BN-input standard deviations.
        variance_residual: RMS log residual of the variance fit (0.1 ~ 10 % in variance).
        std_spread: largest ``|log s_k|`` difference among near-optimal (r, rho) fits.
        channel_correlation, spatial_correlation: the fitted ``r`` and ``rho``.
        filter_sum_condition: condition number of the weighted filter-sum matrix.
        convention: the preset snapped to, or ``"fitted"`` (range from the moments), or
            None when nothing could be decided.
        confidence: ``"high"``, ``"medium"`` or ``"low"``.
        problem: why nothing was decided (only when ``convention`` is None).
        scale: the std shared by all channels (the snap compares it with each preset).
        preset_scores: each preset's snap score (<= 1 snaps; inf: its range misses the mean).
    """

    layers: tuple[str, ...]
    equations: int
    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    mean_uncertainty: np.ndarray = field(repr=False)
    mean_residual: float
    variance_residual: float
    std_spread: float
    channel_correlation: float
    spatial_correlation: float
    filter_sum_condition: float
    convention: str | None
    confidence: str
    problem: str | None = None
    scale: float = float("nan")
    preset_scores: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view."""
        return {
            "layers": list(self.layers),
            "equations": self.equations,
            "input_mean": _floats(self.mean),
            "input_std": _floats(self.std),
            "mean_uncertainty_std": _floats(self.mean_uncertainty),
            "mean_residual": _round(self.mean_residual),
            "variance_residual": _round(self.variance_residual),
            "std_spread": _round(self.std_spread),
            "channel_correlation": self.channel_correlation,
            "spatial_correlation": self.spatial_correlation,
            "filter_sum_condition": _round(self.filter_sum_condition),
            "convention": self.convention,
            "confidence": self.confidence,
            "problem": self.problem,
            "input_std_shared": _round(self.scale),
            "preset_scores": {name: _round(value) for name, value in self.preset_scores.items()},
        }


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean``/``std`` (pixels in [0, 1] -> input ``(p - mean) / std``) and where they came from.

    ``source`` is ``"options"``, ``"preset"``, ``"metadata"`` or ``"inferred"``; ``detail``
    names the preset, the metadata keys, or the inferred convention.
    """

    mean: np.ndarray = field(repr=False)
    std: np.ndarray = field(repr=False)
    source: str
    detail: str
    inference: InputInference | None = None

    @property
    def low(self) -> np.ndarray:
        """Smallest valid input value per channel (pixel 0)."""
        return ((0.0 - self.mean) / self.std).astype(np.float32)

    @property
    def high(self) -> np.ndarray:
        """Largest valid input value per channel (pixel 1)."""
        return ((1.0 - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The report entry (``normalization`` of a generation report)."""
        data: dict[str, Any] = {
            "source": self.source,
            "detail": self.detail,
            "clamped": True,
            "mean": _floats(self.mean),
            "std": _floats(self.std),
            "low": _floats(self.low),
            "high": _floats(self.high),
        }
        if self.inference is not None:
            data["inference"] = self.inference.to_dict()
            data["summary"] = describe(self)
        return data


def _floats(values: np.ndarray) -> list[float]:
    return [float(v) if math.isfinite(float(v)) else float("inf") for v in np.asarray(values).reshape(-1)]


def _round(value: float) -> float:
    return round(float(value), 6) if math.isfinite(float(value)) else float("inf")


# ------------------------------------------------------------------ given values


def _per_channel(values: tuple[float, ...] | list[float], channels: int) -> np.ndarray | None:
    """1 or ``channels`` values as a float64 vector, else None."""
    if len(values) not in (1, channels):
        return None
    return np.broadcast_to(np.asarray(values, np.float64), (channels,)).copy()


def _parse_json_floats(text: str | None) -> list[float] | None:
    try:
        value = json.loads(text)  # type: ignore[arg-type]
    except (json.JSONDecodeError, TypeError):  # TypeError: None (the key is absent)
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [float(v) for v in value]
    return None


def metadata_normalization(metadata: Mapping[str, str], channels: int) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Per-channel ``(mean, std, keys)`` from ``metadata_props``, or None when no usable pair is present.

    Reads the first pair of :data:`METADATA_KEYS` present; values on the 0-255 scale (any
    above 1.5) are divided by 255 and ``keys`` says so. A pair that is present but unusable
    is logged and the next pair is tried.
    """
    for mean_key, std_key in METADATA_KEYS:
        if mean_key not in metadata and std_key not in metadata:
            continue
        keys = f"{mean_key}/{std_key}"
        mean_list = _parse_json_floats(metadata.get(mean_key))
        std_list = _parse_json_floats(metadata.get(std_key))
        if mean_list is None or std_list is None:
            _LOG.warning("metadata %s is not a pair of numbers or JSON number lists: ignored", keys)
            continue
        mean = _per_channel(mean_list, channels)
        std = _per_channel(std_list, channels)
        if mean is None or std is None:
            _LOG.warning("metadata %s has %d/%d values for a %d-channel input: ignored",
                         keys, len(mean_list), len(std_list), channels)
            continue
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            _LOG.warning("metadata %s holds a non-finite value or a std <= 0: ignored", keys)
            continue
        if max(float(np.abs(mean).max()), float(std.max())) > _SCALE_255_ABOVE:
            return mean / 255.0, std / 255.0, f"{keys} (0-255 scale)"
        return mean, std, keys
    return None


def preset_normalization(name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of the preset ``name``.

    Raises:
        InvalidInputError: unknown name, or a per-channel preset for another channel count.
    """
    if name not in PRESETS:
        raise InvalidInputError(f"--preprocess {name!r} is not one of {', '.join(PRESETS)}", f"use one of: {', '.join(PRESETS)}")
    mean_t, std_t = PRESETS[name]
    mean, std = _per_channel(mean_t, channels), _per_channel(std_t, channels)
    if mean is None or std is None:
        raise InvalidInputError(
            f"--preprocess {name} has {len(mean_t)} channels but the model input has {channels}",
            "use --preprocess unit, symmetric or raw255, or give --mean/--std per channel",
        )
    return mean, std


# ---------------------------------------------------------------------- inference


@dataclass(frozen=True)
class _Layer:
    """One BN-ed linear layer on the input, with its border patterns."""

    bn: BatchNormInfo
    # per pattern: share of output positions, masked filter times a (Cout, Cin, T), bias (Cout,)
    shares: np.ndarray
    filters: list[np.ndarray]
    biases: list[np.ndarray]
    taps: np.ndarray  # (T, 2) tap coordinates in input pixels
    mean: np.ndarray  # the BN running mean and variance of the channels kept (below)
    var: np.ndarray


DEAD_VARIANCE = 1e-6
"""A BN channel whose running variance is below this share of the layer's median is dead."""


def _axis_patterns(size: int, kernel: int, stride: int, begin: int, end: int, dilation: int) -> list[tuple[np.ndarray, int]]:
    """Valid-tap masks along one axis and how many output positions have each."""
    outputs = (size + begin + end - dilation * (kernel - 1) - 1) // stride + 1
    starts = [out * stride - begin for out in range(max(0, outputs))]
    taps = [t * dilation for t in range(kernel)]
    counts = Counter(tuple(0 <= start + tap < size for tap in taps) for start in starts)
    return [(np.array(mask), count) for mask, count in counts.items()]


def _conv_pads(node: Any, size: tuple[int, int], kernel: tuple[int, int], strides: tuple[int, int],
               dilations: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) padding of a Conv ``node``, resolving ``auto_pad``."""
    auto = g.attribute(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        pads = list(g.attribute(node, "pads", [0, 0, 0, 0]))  # type: ignore[call-overload]
        return (pads[0], pads[1], pads[2], pads[3]) if len(pads) == 4 else None
    if auto == "VALID":
        return (0, 0, 0, 0)
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return (begins[0], begins[1], ends[0], ends[1])


def _make_layer(bn: BatchNormInfo, weight: np.ndarray, bias: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                size: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                dilations: tuple[int, int]) -> _Layer:
    """Border patterns of a conv ``weight`` (Cout, Cin, kh, kw) reading ``scale * x + shift``."""
    c_out, c_in, kh, kw = weight.shape
    rows = _axis_patterns(size[0], kh, strides[0], pads[0], pads[2], dilations[0])
    cols = _axis_patterns(size[1], kw, strides[1], pads[1], pads[3], dilations[1])
    total = sum(c for _, c in rows) * sum(c for _, c in cols)
    shares, filters, biases = [], [], []
    for (row_mask, row_count), (col_mask, col_count) in itertools.product(rows, cols):
        mask = np.outer(row_mask, col_mask).astype(np.float64)
        masked = weight * mask  # zero padding: a tap outside the image reads 0 (after the affine ops)
        sums = masked.sum(axis=(2, 3))
        shares.append(row_count * col_count / total)
        filters.append((masked * scale.reshape(1, -1, 1, 1)).reshape(c_out, c_in, kh * kw))
        biases.append(bias + sums @ shift)
    taps = np.array([(i * dilations[0], j * dilations[1]) for i in range(kh) for j in range(kw)], np.float64)
    # Dead channels (a running variance ~0, as EfficientNet-Lite0's stem has 4 of 32) carry
    # no information about the input and would dominate both fits through log(var) and
    # 1/sqrt(var): leave them out.
    var = bn.var.astype(np.float64)
    keep = var > DEAD_VARIANCE * max(float(np.median(var)), 1e-30)
    return _Layer(bn, np.array(shares), [f[keep] for f in filters], [b[keep] for b in biases], taps,
                  bn.mean.astype(np.float64)[keep], var[keep])


def _first_layers(loaded: LoadedModel) -> list[_Layer]:
    """Every usable BN fed by a Conv (or directly) from the input through value-preserving or per-channel affine ops."""
    graph = loaded.model.graph
    inits = g.initializer_map(graph)
    consumers = g.consumer_map(graph)
    bn_of_input = {bn.input_name: bn for bn in loaded.usable_bn_nodes}
    channels, height, width = loaded.input_shape
    layers: list[_Layer] = []
    frontier = [(loaded.input_name, np.ones(channels), np.zeros(channels))]
    seen: set[str] = set()
    while frontier:
        name, scale, shift = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in bn_of_input:
            eye = np.eye(channels).reshape(channels, channels, 1, 1)
            layers.append(_make_layer(bn_of_input[name], eye, np.zeros(channels), scale, shift, (height, width),
                                      (1, 1), (0, 0, 0, 0), (1, 1)))
        for node in consumers.get(name, []):
            if node.op_type in _PASS_THROUGH and node.input[0] == name:
                frontier.append((node.output[0], scale, shift))
            elif node.op_type in _AFFINE_OPS:
                step = _affine_step(node, name, inits, channels, scale, shift)
                if step is not None:
                    frontier.append((node.output[0], *step))
            elif node.op_type == "Conv" and node.input[0] == name:
                layer = _conv_layer(node, inits, bn_of_input, scale, shift, (height, width))
                if layer is not None:
                    layers.append(layer)
            elif node.op_type == "Pad" and node.input[0] == name:
                # An explicit zero Pad before the first Conv (EfficientNet's "static same
                # padding") is that Conv's own zero padding, moved: add it to the Conv's pads.
                extra = _zero_pad(node, inits)
                for conv in consumers.get(node.output[0], []) if extra is not None else []:
                    if conv.op_type == "Conv" and conv.input[0] == node.output[0]:
                        layer = _conv_layer(conv, inits, bn_of_input, scale, shift, (height, width), extra)
                        if layer is not None:
                            layers.append(layer)
    return layers


def _zero_pad(node: Any, inits: Mapping[str, Any]) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a constant-zero Pad over H and W only, else None."""
    if g.attribute(node, "mode", "constant") != "constant":
        return None
    if len(node.input) > 1:  # opset >= 11: pads, constant_value, axes as inputs
        if node.input[1] not in inits or (len(node.input) > 3 and node.input[3]):
            return None
        pads = [int(v) for v in g.to_array(inits[node.input[1]]).reshape(-1)]
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits or np.any(g.to_array(inits[node.input[2]]) != 0):
                return None
    else:
        pads = [int(v) for v in g.attribute(node, "pads", [])]  # type: ignore[attr-defined]
        if g.attribute(node, "value", 0.0) != 0.0:
            return None
    if len(pads) != 8 or any(v < 0 for v in pads) or any(pads[i] for i in (0, 1, 4, 5)):
        return None
    return (pads[2], pads[3], pads[6], pads[7])


def _affine_step(node: Any, name: str, inits: Mapping[str, Any], channels: int, scale: np.ndarray,
                 shift: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The (scale, shift) after a per-channel constant Add/Sub/Mul/Div, else None."""
    if len(node.input) != 2:
        return None
    other = node.input[1] if node.input[0] == name else node.input[0]
    if other not in inits or other == name:
        return None
    try:
        value = np.broadcast_to(g.to_array(inits[other]).astype(np.float64), (1, channels, 1, 1)).reshape(channels)
    except ValueError:
        return None  # not per-channel (spatial constants, or a rank change)
    first = node.input[0] == name
    if node.op_type == "Add":
        return scale, shift + value
    if node.op_type == "Sub":
        return (scale, shift - value) if first else (-scale, value - shift)
    if node.op_type == "Mul":
        return scale * value, shift * value
    if first and np.all(value != 0):  # x / v; v / x is not affine
        return scale / value, shift / value
    return None


def _conv_layer(node: Any, inits: Mapping[str, Any], bn_of_input: Mapping[str, BatchNormInfo], scale: np.ndarray,
                shift: np.ndarray, size: tuple[int, int],
                extra: tuple[int, int, int, int] = (0, 0, 0, 0)) -> _Layer | None:
    """The conv ``node`` as a first layer, ``extra`` zero padding (a Pad node before it) included."""
    bn = bn_of_input.get(node.output[0])
    if bn is None or node.input[1] not in inits:
        return None
    weight = g.to_array(inits[node.input[1]]).astype(np.float64)
    if weight.ndim != 4:
        return None
    group: int = g.attribute(node, "group", 1)  # type: ignore[assignment]
    c_out, per_group, kh, kw = weight.shape
    c_in = per_group * group
    if c_in != scale.shape[0] or c_out % group:
        return None
    # the dense (c_out, c_in) weight: zero where an output and an input are in different groups
    out_group, in_group = np.arange(c_out) // (c_out // group), np.arange(c_in) // per_group
    same_group = out_group[:, None] == in_group[None, :]
    full = np.where(same_group[:, :, None, None], np.tile(weight, (1, group, 1, 1)), 0.0)
    bias = np.zeros(c_out)
    if len(node.input) > 2 and node.input[2]:
        if node.input[2] not in inits:
            return None
        bias = g.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1)
    strides = tuple(g.attribute(node, "strides", [1, 1]))  # type: ignore[call-overload]
    dilations = tuple(g.attribute(node, "dilations", [1, 1]))  # type: ignore[call-overload]
    if len(strides) != 2 or len(dilations) != 2:
        return None
    padded = (size[0] + extra[0] + extra[2], size[1] + extra[1] + extra[3])
    own = _conv_pads(node, padded, (kh, kw), strides, dilations)  # type: ignore[arg-type]
    if own is None:
        return None
    pads = tuple(a + b for a, b in zip(own, extra))
    return _make_layer(bn, full, bias, scale, shift, size, strides, pads, dilations)  # type: ignore[arg-type]


def _correlations(taps: np.ndarray, rho: float) -> np.ndarray:
    distance = np.sqrt(((taps[:, None, :] - taps[None, :, :]) ** 2).sum(-1))
    return np.power(rho, distance) if rho > 0 else (distance == 0).astype(np.float64)


def _fit_mean(layers: list[_Layer]) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Weighted least squares on (1): (m, standard error of m, RMS residual, condition number)."""
    rows, targets = [], []
    for layer in layers:
        spread = np.sqrt(np.maximum(layer.var, 1e-12))
        sums = sum(f * filt.sum(axis=2) for f, filt in zip(layer.shares, layer.filters))
        bias = sum(f * b for f, b in zip(layer.shares, layer.biases))
        rows.append(sums / spread[:, None])
        targets.append((layer.mean - bias) / spread)
    matrix, target = np.concatenate(rows), np.concatenate(targets)
    u, singular, vt = np.linalg.svd(matrix, full_matrices=False)
    keep = singular > 1e-9 * max(float(singular.max(initial=0.0)), 1e-300)
    inverse = np.where(keep, 1.0 / np.where(keep, singular, 1.0), 0.0)
    mean = vt.T @ (inverse * (u.T @ target))
    residual = matrix @ mean - target
    dof = max(1, matrix.shape[0] - int(keep.sum()))
    noise = max(float(np.sqrt((residual**2).sum() / dof)), MEAN_NOISE_FLOOR)
    error = noise * np.sqrt(((vt.T * inverse) ** 2).sum(axis=1))
    unseen = np.abs(vt[~keep]).max(axis=0) > 1e-6 if (~keep).any() else np.zeros(matrix.shape[1], bool)
    error = np.where(unseen | (matrix.shape[0] < matrix.shape[1]), np.inf, error)
    condition = float(singular.max() / singular.min()) if singular.size and singular.min() > 0 else float("inf")
    return mean, error, float(np.sqrt(np.mean(residual**2))), condition


def _variance_terms(layers: list[_Layer], mean: np.ndarray, rho: float) -> tuple[np.ndarray, np.ndarray]:
    """Per BN channel: G[c, k, l] = sum_P f_P w_ckP^T C(rho) w_clP, and the target variance left for Sigma."""
    grams, targets = [], []
    for layer in layers:
        corr = _correlations(layer.taps, rho)
        gram = sum(f * np.matmul(filt @ corr, filt.transpose(0, 2, 1)) for f, filt in zip(layer.shares, layer.filters))
        means = np.stack([b + filt.sum(axis=2) @ mean for b, filt in zip(layer.biases, layer.filters)])
        overall = layer.shares @ means
        between = layer.shares @ (means - overall) ** 2  # border positions have other means
        grams.append(gram)
        targets.append(np.maximum(layer.var - between, 1e-6 * layer.var + 1e-30))
    return np.concatenate(grams), np.concatenate(targets)


def _fit_std(coupling: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """Damped Gauss-Newton on log s for var_c = s^T (R o G_c) s; returns (s, RMS log residual)."""
    channels = coupling.shape[1]
    total = coupling.sum(axis=(1, 2))
    good = total > 0
    if not good.any():
        return np.full(channels, np.nan), float("inf")
    log_s = np.full(channels, 0.5 * float(np.median(np.log(target[good] / total[good]))))
    log_t = np.log(target)
    damping = 1e-3
    best = float("inf")
    for _ in range(_GN_STEPS):
        s = np.exp(log_s)
        half = coupling @ s
        model = np.maximum(half @ s, 1e-300)
        residual = np.log(model) - log_t
        cost = float(residual @ residual)
        if cost > best:
            damping *= 10.0
        else:
            converged = best - cost <= 1e-12 * (1.0 + cost)
            best = cost
            damping = max(damping / 3.0, 1e-9)
            if converged:
                break
        jac = 2.0 * half * s / model[:, None]
        step = np.linalg.solve(jac.T @ jac + damping * np.eye(channels), -jac.T @ residual)
        log_s = log_s + np.clip(step, -2.0, 2.0)
    s = np.exp(log_s)
    model = np.maximum((coupling @ s) @ s, 1e-300)
    return s, float(np.sqrt(np.mean((np.log(model) - log_t) ** 2)))


def _snap(mean: np.ndarray, scale: float, mean_seen: bool) -> tuple[str | None, dict[str, float]]:
    """The preset whose range the fitted ``(m, s)`` fills most typically, and every preset's score.

    ``scale`` is the std shared by all channels; the score is
    ``mean_k (log2(phi_k / _FILL_CENTRE) / _SNAP_LOG2_FILL)^2`` with ``phi_k`` the fill
    ratio (module docstring), inf for a preset whose range does not contain the mean.
    Returns (the best preset, or None when no score is <= 1; the scores by preset).
    """
    scores: dict[str, float] = {}
    channels = mean.shape[0]
    natural = _NATURAL_MEAN if channels == 3 else np.full(channels, _NATURAL_MEAN.mean())
    for name, (given_mean, given_std) in PRESETS.items():
        if _per_channel(given_mean, channels) is None or _per_channel(given_std, channels) is None:
            continue  # a per-channel preset for another channel count
        preset_mean, preset_std = preset_normalization(name, channels)
        low, high = -preset_mean / preset_std, (1.0 - preset_mean) / preset_std
        centre = mean if mean_seen else (natural - preset_mean) / preset_std
        room = (high - centre) * (centre - low)
        if not np.all(room > 0):
            scores[name] = float("inf")
            continue
        fill = scale / np.sqrt(room)
        scores[name] = float(np.mean((np.log2(fill / _FILL_CENTRE) / _SNAP_LOG2_FILL) ** 2))
    best = min(scores, key=scores.__getitem__, default=None)
    return (best if best is not None and scores[best] <= 1.0 else None), scores


def _fit_scale(coupling: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """One std for every channel: var_c = s^2 sum_kl R_kl G_ckl, least squares in log; (s, RMS log residual)."""
    total = coupling.sum(axis=(1, 2))
    if not np.all(total > 0):
        return float("nan"), float("inf")
    log_ratio = np.log(target) - np.log(total)
    log_s2 = float(log_ratio.mean())
    return math.exp(0.5 * log_s2), float(np.sqrt(np.mean((log_ratio - log_s2) ** 2)))


def infer_input_distribution(loaded: LoadedModel) -> InputInference | None:
    """Fit the training inputs' per-channel mean and std from the first BN-ed layer(s).

    Returns None when the model has no BN-ed layer on its input (see the module docstring
    for which graphs are followed); otherwise an :class:`InputInference` whose
    ``convention`` is None (with ``problem``) when the fits cannot decide.
    """
    layers = _first_layers(loaded)
    if not layers:
        return None
    names = tuple(dict.fromkeys(layer.bn.node_name for layer in layers))
    equations = sum(layer.var.shape[0] for layer in layers)
    channels = loaded.input_shape[0]
    mean, error, mean_residual, condition = _fit_mean(layers)
    fits, shared = [], []
    for rho in _RHO_GRID:
        gram, target = _variance_terms(layers, mean, rho)
        for r in _R_GRID if channels > 1 else (0.0,):
            coupling = gram * (r + (1.0 - r) * np.eye(gram.shape[1]))  # R o G_c
            std, residual = _fit_std(coupling, target)
            if np.all(np.isfinite(std)) and math.isfinite(residual):
                fits.append((residual, r, rho, std))
            scale, scale_residual = _fit_scale(coupling, target)
            if math.isfinite(scale) and math.isfinite(scale_residual):
                shared.append((scale_residual, scale))
    nan = np.full(channels, np.nan)
    if not fits or not shared or not np.all(np.isfinite(mean)):
        return InputInference(names, equations, mean, nan, error, mean_residual, float("inf"), float("inf"), 0.0, 0.0,
                              condition, None, "low", "the fits gave no finite values")
    fits.sort(key=lambda fit: fit[0])
    variance_residual, r, rho, std = fits[0]
    near = variance_residual * _NEAR_OPTIMAL[0] + _NEAR_OPTIMAL[1]
    spread = max(float(np.abs(np.log(fit[3] / std)).max()) for fit in fits if fit[0] <= near)
    uncertainty = error / std
    worst = float(uncertainty.max())
    scale = min(shared)[1]
    scores: dict[str, float] = {}
    if worst <= _MEAN_HIGH and mean_residual <= _MEAN_RESIDUAL_HIGH and variance_residual <= _VAR_HIGH and spread <= _VAR_HIGH:
        confidence = "high"
    elif worst <= _MEAN_SEEN and variance_residual <= _VAR_MEDIUM:
        confidence = "medium"
    else:
        confidence = "low"
    convention: str | None = None
    problem = None
    if variance_residual > _VAR_LIMIT:
        problem = f"the spread model fits the BN variances badly (RMS log residual {variance_residual:.2f})"
    else:
        convention, scores = _snap(mean, scale, worst <= _MEAN_SEEN)
        if convention is None:
            if worst <= _MEAN_SEEN:
                convention = "fitted"
            else:
                problem = "the first layer's filters hide the input mean and its spread matches no known convention"
    _LOG.debug("preset scores (<= 1 snaps): %s", ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
    return InputInference(names, equations, mean, std, uncertainty, mean_residual, variance_residual, spread, r, rho,
                          condition, convention, confidence, problem, scale, scores)


# ----------------------------------------------------------------------- resolve

_UNDECIDED_HINT = (
    "give the model's input normalisation: --preprocess imagenet|unit|symmetric|raw255, "
    "or --mean/--std (pixels in [0, 1], e.g. --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225)"
)


def resolve_normalization(
    loaded: LoadedModel,
    *,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    preprocess: str | None = None,
) -> Normalization:
    """The model's input normalisation: options, else preset, else metadata, else inferred (module docstring).

    Raises:
        InvalidInputError: --mean/--std without 1 or C values each, a preset for another
            channel count, or nothing decided (the hint names --preprocess and --mean/--std).
    """
    channels = loaded.input_shape[0]
    if mean is not None and std is not None:
        values = []
        for option, given in (("--mean", mean), ("--std", std)):
            vector = _per_channel(tuple(given), channels)
            if vector is None:
                raise InvalidInputError(
                    f"{option} has {len(given)} values but the model input has {channels} "
                    f"channel{'s' if channels != 1 else ''}",
                    f"give {option} one value" if channels == 1
                    else f"give {option} one value (for every channel) or {channels} comma-separated values",
                )
            values.append(vector)
        return Normalization(values[0], values[1], "options", "--mean/--std")
    if preprocess is not None:
        preset_mean, preset_std = preset_normalization(preprocess, channels)
        return Normalization(preset_mean, preset_std, "preset", preprocess)
    found = metadata_normalization(loaded.metadata, channels)
    if found is not None:
        return Normalization(found[0], found[1], "metadata", found[2])
    inference = infer_input_distribution(loaded)
    if inference is None:
        raise InvalidInputError(
            f"the input normalisation of {loaded.source} is unknown: no normalisation metadata "
            f"({', '.join('/'.join(pair) for pair in METADATA_KEYS)}) and no BatchNormalization layer on the input "
            "to infer it from",
            _UNDECIDED_HINT,
        )
    if inference.convention is None:
        raise InvalidInputError(
            f"the input normalisation of {loaded.source} cannot be inferred: {inference.problem}", _UNDECIDED_HINT
        )
    if inference.convention in PRESETS:
        chosen_mean, chosen_std = preset_normalization(inference.convention, channels)
    else:
        width = 2.0 * _RANGE_STDS * inference.std
        chosen_std = 1.0 / width
        chosen_mean = 0.5 - inference.mean / width
    return Normalization(chosen_mean, chosen_std, "inferred", inference.convention, inference)


def describe(norm: Normalization) -> str:
    """One line saying what normalisation was inferred and how confident the inference is."""
    if norm.inference is None:
        return f"input normalisation from {norm.source} ({norm.detail}): mean {_fmt(norm.mean)}, std {_fmt(norm.std)}"
    inf = norm.inference
    if inf.convention in PRESETS:
        chosen = f"--preprocess {inf.convention}"
    else:
        chosen = f"fitted range {_fmt(norm.low)} .. {_fmt(norm.high)}"
    mean_note = "mean not seen" if not np.all(np.isfinite(inf.mean_uncertainty)) else f"mean +-{float(inf.mean_uncertainty.max()):.2f} sd"
    shared = f" (shared {inf.scale:.3g})" if inf.std.shape[0] > 1 and math.isfinite(inf.scale) else ""
    return (
        f"input normalisation inferred from {inf.layers[0]}: input mean {_fmt(inf.mean)}, std {_fmt(inf.std)}{shared} "
        f"-> {chosen} (mean {_fmt(norm.mean)}, std {_fmt(norm.std)}); confidence {inf.confidence} "
        f"({mean_note}, variance fit {inf.variance_residual:.2f}); override with --preprocess or --mean/--std"
    )


def _fmt(values: np.ndarray) -> str:
    flat = [float(v) for v in np.asarray(values).reshape(-1)]
    if all(abs(v - flat[0]) < 1e-12 for v in flat):
        return f"{flat[0]:.3g}"
    return "(" + ", ".join(f"{v:.3g}" for v in flat) + ")"
