r"""Cross-layer equalization (CLE) of consecutive convolutions, before quantization.

Contract: :func:`equalize` returns a new float model computing the same function as its
input (up to float rounding; exactly, not approximately, in real arithmetic) in which,
for every *pair* of convolutions ``L1 -> a -> L2`` found below, output channel ``i`` of
``L1`` (weights and bias) is divided by ``s_i > 0`` and input channel ``i`` of ``L2`` is
multiplied by ``s_i``. Nagel et al., "Data-Free Quantization through Weight Equalization
and Bias Correction" (ICCV 2019), section 4.1: with per-channel weight ranges
``r1_i = max |W1[i, ...]|`` and ``r2_i = max |W2[:, i, ...]|`` the choice

.. math::
    s_i = \frac{\sqrt{r1_i\, r2_i}}{r2_i} = \sqrt{r1_i / r2_i}

makes both ranges ``\sqrt{r1_i r2_i}``: channel ``i`` of the tensor between the layers
(quantized per tensor) no longer hides at the bottom of the grid when its weights are
small, and the input columns of ``L2`` (quantized per output row) become alike. Pairs
are swept a few times (a layer between two pairs is pulled from both sides), pairs whose
first layer is depthwise first in each sweep. The input model is not modified.

Why the function is unchanged. ``a`` is a chain of ops with ``a(D x) = D a(x)`` for a
positive diagonal ``D`` acting on channels: Relu, LeakyRelu, MaxPool, AveragePool and
Pad with value 0 are positively homogeneous per channel, so
``L2(a(L1(x) / s)) = L2(a(L1(x)) / s) = L2(a(L1(x)))`` after ``W2[:, i] *= s_i``.

Clip (ReLU6). ``Clip(x, 0, M)`` is homogeneous only if its bound scales too:
``Clip(x, 0, M) / s_i = Clip(x / s_i, 0, M / s_i)``, a bound per channel that ONNX Clip
(one scalar) cannot hold, and the profiles allow no per-channel ``Min``. The rule here
keeps the Clip as it is (bound ``M``, still ReLU6) and scales only channels on which it
provably never clips, before or after: with ``U_i`` an upper bound of ``L1``'s output
channel ``i`` over *all* inputs (interval arithmetic from the model input's range, which
is bounded behind every earlier Clip or by the given ``input_bounds``), a channel with
``U_i <= 0`` takes any ``s_i``; one with ``0 < U_i <= M`` takes ``s_i >= U_i / M`` (its
new bound ``U_i / s_i`` stays within ``M``: Clip is the identity on it both times); one
with ``U_i > M`` keeps ``s_i = 1``. The report counts channels held back by this rule
(``limited``). A Clip whose lower bound is neither 0 nor absent is not homogeneous: that
pair is skipped.

Skipped, with the reason in the report (docs/QUANTIZE.md lists them): a tensor between the
layers with another reader or that is a graph output, any other op between them, a shared
weight or bias, a second layer that is not a Conv with a constant weight.

Power-of-two scales (``power_of_two=True``): ``s_i`` is rounded to the nearest power of
two (upwards where the Clip rule sets a lower limit). A power-of-two weight scale per
channel then quantizes ``W1[i] / s_i`` and a depthwise ``W2[i] * s_i`` exactly as before
(the integers are the same, only the exponent moves); what changes is the grid of the
tensor between the layers and the columns of a dense ``L2``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx

from .. import graph as g
from ..ops import ops_where, output_bounds

__all__ = ["EqualizeReport", "equalize", "DEFAULT_SWEEPS", "input_bounds_from_normalization"]

_LOG = logging.getLogger(__name__)

DEFAULT_SWEEPS = 8
"""Sweeps over all pairs (the scales of a chain converge within a few)."""
_HOMOGENEOUS = ops_where(lambda record: record.homogeneous)
_CONVERGED = 1e-3
"""Largest ``|log2 s|`` of a sweep below which the sweeps stop."""

Interval = tuple[np.ndarray, np.ndarray]


@dataclass
class EqualizeReport:
    """What :func:`equalize` changed."""

    pairs: list[dict[str, Any]] = field(default_factory=list)
    """One row per equalized pair: ``first``, ``second``, ``via`` (op types between them),
    ``channels``, ``clip_bound`` (the Clip's M or None), ``limited`` (channels held back by
    the Clip rule), ``scale_min`` / ``scale_max`` (the product of all sweeps' ``s``)."""
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Conv nodes not equalized with the one after them: ``node`` and ``reason``."""
    sweeps: int = 0
    power_of_two: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass
class _Pair:
    first: onnx.NodeProto
    second: onnx.NodeProto
    via: list[onnx.NodeProto]
    clip_bound: float | None
    scales: np.ndarray  # the product of all sweeps' s
    limited: int = 0


def input_bounds_from_normalization(mean: np.ndarray, std: np.ndarray) -> Interval:
    """Per-channel range of a model input ``(pixel - mean) / std`` with pixels in [0, 1]."""
    low, high = (0.0 - mean) / std, (1.0 - mean) / std
    return np.minimum(low, high).astype(np.float64), np.maximum(low, high).astype(np.float64)


# ------------------------------------------------------------------------ attributes


def _zero_pad(node: onnx.NodeProto, view: g.GraphView) -> bool:
    """A constant-mode Pad with value 0 (absent or a zero constant)."""
    if g.attribute(node, "mode", "constant") != "constant":
        return False
    if len(node.input) > 2 and node.input[2]:
        fill = view.constant(node.input[2])
        return fill is not None and bool(np.all(fill == 0))
    return g.attribute(node, "value", 0.0) == 0.0


def _conv_pads(node: onnx.NodeProto) -> bool:
    """Whether the Conv reads padding (zeros) besides its input."""
    if g.attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return True
    return any(int(p) != 0 for p in g.attribute(node, "pads", []))  # type: ignore[union-attr]


# ------------------------------------------------------------------------ intervals


def _times(weight: np.ndarray, value: np.ndarray) -> np.ndarray:
    """``weight * value`` with ``0 * inf = 0`` (a zero weight ignores an unbounded input)."""
    with np.errstate(invalid="ignore"):
        return np.where(weight == 0, 0.0, weight * value)


def _conv_interval(weight: np.ndarray, bias: np.ndarray | None, group: int, inp: Interval, padded: bool) -> Interval:
    """Per-output-channel range of a Conv whose input channel ``c`` lies in ``[lo_c, hi_c]``."""
    lo, hi = inp
    if padded:  # padding reads zeros
        lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    out_ch, in_per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(group, out_ch // group, in_per_group, -1).astype(np.float64)
    lo_v = lo.reshape(group, 1, in_per_group, 1)
    hi_v = hi.reshape(group, 1, in_per_group, 1)
    pos, neg = np.maximum(w, 0.0), np.minimum(w, 0.0)
    upper = (_times(pos, hi_v) + _times(neg, lo_v)).sum(axis=(2, 3)).reshape(-1)
    lower = (_times(pos, lo_v) + _times(neg, hi_v)).sum(axis=(2, 3)).reshape(-1)
    b = np.zeros(out_ch) if bias is None else bias.astype(np.float64).reshape(-1)
    return lower + b, upper + b


def _intervals(graph: onnx.GraphProto, input_bounds: Interval | None) -> dict[str, Interval]:
    """A per-channel range for every tensor one can be proven for (others are unbounded).

    Covers Conv (constant weights), Relu, LeakyRelu, Clip, zero Pad, Max/AveragePool and
    Add of two bounded tensors; the model input is bounded by ``input_bounds`` only.
    """
    view = g.GraphView(graph)
    inits = view.initializers
    known: dict[str, Interval] = {}
    inputs = g.graph_input_names(graph)
    if input_bounds is not None and inputs:
        known[inputs[0]] = input_bounds
    for node in graph.node:
        op = node.op_type
        if not node.output or not node.input:
            continue
        source = known.get(node.input[0])
        result: Interval | None = None
        if op == "Conv" and len(node.input) > 1 and node.input[1] in inits:
            weight = g.to_array(inits[node.input[1]])
            has_bias = len(node.input) > 2 and bool(node.input[2])
            if has_bias and node.input[2] not in inits:
                continue
            bias = g.to_array(inits[node.input[2]]) if has_bias else None
            group = int(g.attribute(node, "group", 1))  # type: ignore[call-overload]
            channels = weight.shape[1] * group
            if source is None:
                source = (np.full(channels, -np.inf), np.full(channels, np.inf))
            if source[0].shape[0] != channels:
                continue
            result = _conv_interval(weight, bias, group, source, _conv_pads(node))
        elif source is None:
            continue
        elif op == "LeakyRelu":
            alpha = g.attribute(node, "alpha", 0.01)
            low = np.where(source[0] < 0, alpha * source[0], source[0])
            high = np.where(source[1] < 0, alpha * source[1], source[1])
            result = (np.minimum(low, high), np.maximum(low, high))
        elif op in ("Relu", "Clip"):  # clamps: the interval clamps too
            bounds = output_bounds(op, g.node_attributes(node), node.input, view.constant)
            if bounds is not None:
                result = (np.clip(source[0], *bounds), np.clip(source[1], *bounds))
        elif op == "Pad" and _zero_pad(node, view):
            result = (np.minimum(source[0], 0.0), np.maximum(source[1], 0.0))
        elif op in ("MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"):
            result = (np.minimum(source[0], 0.0), np.maximum(source[1], 0.0)) if op == "AveragePool" else source
        elif op == "Add" and len(node.input) == 2 and node.input[1] in known:
            other = known[node.input[1]]
            if other[0].shape == source[0].shape:
                result = (source[0] + other[0], source[1] + other[1])
        if result is not None:
            known[node.output[0]] = result
    return known


# ------------------------------------------------------------------------ pairs


def _find_pairs(view: g.GraphView) -> tuple[list[_Pair], list[dict[str, str]]]:
    inits, outputs, _label = view.initializers, view.output_set, view.label
    readers = Counter(name for node in view.graph.node for name in node.input)
    pairs: list[_Pair] = []
    skipped: list[dict[str, str]] = []

    def own_constant(node: onnx.NodeProto, index: int) -> bool:
        name = node.input[index] if len(node.input) > index else ""
        return not name or (name in inits and readers[name] == 1)

    for first in view.graph.node:
        if first.op_type != "Conv" or len(first.input) < 2 or first.input[1] not in inits:
            continue
        label = _label(first)
        if not own_constant(first, 1) or not own_constant(first, 2):
            skipped.append({"node": label, "reason": "its weight or bias is shared with another node"})
            continue
        tensor, via, bound, reason = first.output[0], [], None, ""
        second: onnx.NodeProto | None = None
        while True:
            users = view.readers(tensor)
            if tensor in outputs or len(users) != 1:
                reason = f"{tensor!r} is read by {len(users)} nodes" + (" and is a graph output" if tensor in outputs else "")
                break
            user = users[0]
            if user.op_type == "Conv" and user.input[0] == tensor and len(user.input) > 1 and user.input[1] in inits:
                if not own_constant(user, 1):
                    reason = f"the weight of {_label(user)} is shared with another node"
                    break
                second = user
                break
            if user.op_type not in _HOMOGENEOUS or user.input[0] != tensor:
                reason = f"{user.op_type} {_label(user)} follows: not a Conv and not positively homogeneous"
                break
            if user.op_type == "Clip":
                clip = output_bounds("Clip", g.node_attributes(user), user.input, view.constant)
                if clip is None or clip[0] not in (0.0, -np.inf):
                    reason = f"Clip {_label(user)} has a lower bound other than 0: not positively homogeneous"
                    break
                if np.isfinite(clip[1]):
                    bound = clip[1] if bound is None else min(bound, clip[1])
            if user.op_type == "Pad" and not _zero_pad(user, view):
                reason = f"Pad {_label(user)} pads with a value other than 0"
                break
            via.append(user)
            tensor = user.output[0]
        if second is None:
            skipped.append({"node": label, "reason": reason})
            continue
        out_ch = g.to_array(inits[first.input[1]]).shape[0]
        w2 = g.to_array(inits[second.input[1]])
        group2 = int(g.attribute(second, "group", 1))  # type: ignore[call-overload]
        if w2.shape[1] * group2 != out_ch or w2.shape[0] % group2:
            skipped.append({"node": label, "reason": f"{_label(second)} does not read its {out_ch} channels"})
            continue
        pairs.append(_Pair(first, second, via, bound, np.ones(out_ch)))
    return pairs, skipped


def _input_view(weight: np.ndarray, group: int) -> np.ndarray:
    """``weight`` (O, C/g, k...) viewed as (g, O/g, C/g, K): input channel ``c`` is ``[c // (C/g), :, c % (C/g)]``."""
    return weight.reshape(group, weight.shape[0] // group, weight.shape[1], -1)


def _scales(pair: _Pair, w1: np.ndarray, w2: np.ndarray, group2: int, upper: np.ndarray | None, power_of_two: bool) -> tuple[np.ndarray, int]:
    """This sweep's ``s`` for ``pair`` and how many channels the Clip rule held back."""
    r1 = np.abs(w1.reshape(w1.shape[0], -1)).max(axis=1).astype(np.float64)
    r2 = np.abs(_input_view(w2, group2)).max(axis=(1, 3)).reshape(-1).astype(np.float64)
    wanted = np.ones_like(r1)
    alive = (r1 > 0) & (r2 > 0)
    wanted[alive] = np.sqrt(r1[alive] / r2[alive])
    if power_of_two:
        wanted = np.exp2(np.round(np.log2(wanted)))
    if pair.clip_bound is None:
        return wanted, 0
    bound = pair.clip_bound
    high = np.full_like(r1, np.inf) if upper is None else upper
    # Channel never reaching the bound: s >= U / M keeps it below the bound afterwards.
    floor = np.where(high > 0, high / bound, 0.0)
    if power_of_two:
        with np.errstate(divide="ignore"):
            floor = np.where(floor > 0, np.exp2(np.ceil(np.log2(np.maximum(floor, 1e-300)))), 0.0)
    scales = np.where(high <= bound, np.maximum(wanted, floor), 1.0)
    limited = int(np.sum(~np.isclose(scales, wanted)))
    return scales, limited


def equalize(
    model: onnx.ModelProto,
    *,
    sweeps: int = DEFAULT_SWEEPS,
    power_of_two: bool = True,
    input_bounds: Interval | None = None,
) -> tuple[onnx.ModelProto, EqualizeReport]:
    """Cross-layer equalization of every eligible Conv pair of ``model`` (see the module docstring).

    Args:
        model: a float model, BatchNormalization already folded (``fold.prepare``).
        sweeps: most passes over all pairs (stops early once no scale moves).
        power_of_two: round each ``s_i`` to a power of two.
        input_bounds: per-channel ``(low, high)`` of the model input (e.g. from its
            normalisation, :func:`input_bounds_from_normalization`); only used to prove
            that a Clip after the first layers never clips.

    Returns:
        The equalized copy and a report of the pairs and the skipped layers.
    """
    report = EqualizeReport(power_of_two=power_of_two)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    view = g.GraphView(graph)
    pairs, report.skipped = _find_pairs(view)
    if not pairs:
        return out, report
    inits = g.initializer_map(graph)
    # W1, b1 (if any) and W2 of every pair, as float64 while the sweeps rescale them.
    names = [name for p in pairs for name in (*p.first.input[1:3], p.second.input[1]) if name]
    arrays = {name: g.to_array(inits[name]).astype(np.float64) for name in names}
    # Depthwise -> pointwise pairs first (the paper's motivating case).
    pairs.sort(key=lambda p: 0 if int(g.attribute(p.first, "group", 1)) > 1 else 1)  # type: ignore[call-overload]
    needs_bounds = any(pair.clip_bound is not None for pair in pairs)
    for sweep in range(sweeps):
        report.sweeps = sweep + 1
        moved = 0.0
        if needs_bounds:
            for name, value in arrays.items():  # the bounds see the scales of the last sweep
                g.set_initializer_value(graph, name, value.astype(np.float32))
            bounds = _intervals(graph, input_bounds)
        for pair in pairs:
            w1_name, w2_name = pair.first.input[1], pair.second.input[1]
            b1_name = pair.first.input[2] if len(pair.first.input) > 2 and pair.first.input[2] else None
            group2 = int(g.attribute(pair.second, "group", 1))  # type: ignore[call-overload]
            mid = pair.first.output[0]
            upper = bounds[mid][1] if pair.clip_bound is not None and mid in bounds else None
            w1, w2 = arrays[w1_name], arrays[w2_name]
            s, pair.limited = _scales(pair, w1, w2, group2, upper, power_of_two)
            arrays[w1_name] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if b1_name is not None:
                arrays[b1_name] = arrays[b1_name] / s.reshape(arrays[b1_name].shape)
            columns = _input_view(w2, group2) * s.reshape(group2, 1, -1, 1)
            arrays[w2_name] = columns.reshape(w2.shape)
            if upper is not None:
                bounds[mid] = (bounds[mid][0] / s, upper / s)
            pair.scales = pair.scales * s
            moved = max(moved, float(np.max(np.abs(np.log2(s)))))
        if moved < _CONVERGED:
            break
    for name, value in arrays.items():
        g.set_initializer_value(graph, name, value.astype(np.float32))
    for pair in pairs:
        report.pairs.append({
            "first": view.label(pair.first),
            "second": view.label(pair.second),
            "via": [node.op_type for node in pair.via],
            "channels": int(pair.scales.shape[0]),
            "clip_bound": pair.clip_bound,
            "limited": pair.limited,
            "scale_min": float(pair.scales.min()),
            "scale_max": float(pair.scales.max()),
        })
    _LOG.info("cross-layer equalization: %d pair(s) in %d sweep(s), %d layer(s) skipped",
              len(report.pairs), report.sweeps, len(report.skipped))
    return out, report
