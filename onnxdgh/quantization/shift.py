"""Shift negative correction: activations with a small negative tail on the unsigned grid.

Contract: three steps around threshold selection, each a pure function of its inputs.

1. :func:`choose_shifts` reads the BN-folded float model, its :class:`~.plan.QuantPlan`
   and the calibration statistics, and returns one :class:`Shift` per activation that
   gains from the correction, plus a reason for every candidate left alone;
2. :func:`apply_shifts` returns a float model in which each chosen activation ``T`` is
   followed by ``Add(T, c)`` and its consumers are compensated; it computes the same
   function as its input (``tests/test_shift_negative.py`` checks it numerically);
3. :func:`compensate` makes each compensated int32 bias exact for the *quantized*
   weights, after :func:`~.plan.resolve`.

Why (HPTQ, Habi et al. 2021; MCT's "shift negative activation correction"): SiLU
(``x * sigmoid(x) >= -0.2785``), HardSwish (``>= -0.375``), LeakyRelu/PRelu with small
slopes are mostly positive with a thin negative tail. A signed symmetric grid spends
half of its ``2^b`` levels below zero on that tail. Adding a constant ``c >= -min``
makes the tensor non-negative, and the unsigned grid with the same power-of-two
threshold ``t`` has step ``t / 2^b`` instead of ``t / 2^(b-1)``: twice the resolution,
zero point still 0.

Compensation. For a Conv with weight ``W`` (any group count) reading ``x + c`` where
every input position, the padded border included, carries the extra ``c``:

    Conv(x + c)[o] = sum_{i,k} W[o,i,k] (x + c)[...] + b[o] = Conv(x)[o] + c * sum_{i,k} W[o,i,k]

so the bias becomes ``b'[o] = b[o] - c * sum(W[o])``, and the Conv's zero padding
becomes an explicit ``Pad`` with value ``c`` in front of it (the Conv then pads
nothing). For ``Gemm(A, B, C) = alpha * A B + beta * C`` the same holds with the sum
over B's reduction axis: ``C' = C - alpha * c * sum_k B[k, :] / beta``. ConvTranspose
(the border receives fewer taps, so the correction is not per channel) and MatMul (no
bias input) are not supported consumers. Two more readers keep the function exact:

* pass-through ops with ``f(x + c) = f(x) + c`` (GlobalAveragePool, Flatten, Reshape,
  Squeeze, Unsqueeze) hand the shift on; their outputs carry ``+c`` (their statistics
  move with it) and their readers must again absorb it, as unpadded Conv or Gemm;
* a residual ``Add(T, z)`` where ``z`` is a Conv/Gemm output read only by that Add: the
  producer's bias takes ``-c``, so ``Add(T + c, z - c)`` is the old sum. This is the
  identity shortcut of a residual block (``SiLU(x) + body(SiLU(x))``).

Any other reader leaves the activation as it is.

Grid. ``c`` is a whole number of the shifted tensor's steps, ``c = ceil(-min / s) * s``
with ``s`` the step of the threshold chosen on the *shifted* statistics (iterated until
the two agree), so ``c`` and the Pad value are exactly on the grid and the shifted
minimum is >= 0.

Criterion (docs/QUANTIZE.md lists each case). An activation is shifted when (a) its
producer is HardSwish, LeakyRelu, PRelu, Elu, Selu or a gated ``Mul(x, Sigmoid(x))`` /
``Mul(x, HardSigmoid(x))`` that the profile fuses with a following ``Add`` (the hardware
adds ``c`` before the output quantizer, as MCT fuses it) and the profile allows unsigned
activations; (b) its observed minimum is negative; (c) every reader absorbs the shift as
above; and (d) the shifted unsigned grid quantizes the calibration histogram with a lower
squared error than the signed grid, each with its own HPTQ threshold (a large negative
part makes the shift cost range).

Exactness after quantization. :func:`apply_shifts` corrects the bias with the float
weights; the quantized layer computes with the dequantized weights ``W_q``, so
:func:`compensate` rewrites the int32 bias as ``round((b - c * sum(W_q[o])) / s_b)``:
the shifted layer then equals the unshifted one on the same input integers, up to the
bias's own rounding. The rounding optimisation runs on the emitted graph (Add, Pad and
corrected bias in place) against the shifted float model, so whatever integers it
learns are fitted to the shifted input, and its learned biases absorb any change of
``c * sum(W_q)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from .. import graph as g
from ..errors import QuantizationError
from ..ops import is_gate_partner, ops_where
from ..profile import Profile
from . import thresholds as th
from .calibrate import TensorStats
from .plan import ParamQuant, QuantPlan, ResolvedPlan, activation_threshold, round_bias

__all__ = [
    "SHIFTABLE_OPS",
    "Shift",
    "supports_shift",
    "choose_shifts",
    "apply_shifts",
    "shifted_statistics",
    "compensate",
]

_LOG = logging.getLogger(__name__)

SHIFTABLE_OPS: frozenset[str] = ops_where(lambda record: record.shiftable)
"""Activation ops whose output may carry a small negative tail (besides gated Mul)."""

_CONSUMERS = ops_where(lambda record: record.sums_weights and record.bias is not None)
"""Layers whose bias absorbs a shift of their input: every output channel sums all its weights."""
_PASS_THROUGH = ops_where(lambda record: record.passes_shift)
_MAX_ROUNDS = 8


@dataclass(frozen=True)
class Shift:
    """One activation moved onto the unsigned grid by ``Add(tensor, shift)``.

    ``consumers`` are the node labels whose bias (and padding) absorb the shift;
    ``threshold``/``scale`` the unsigned grid chosen on the shifted statistics;
    ``error_signed``/``error_shifted`` the histogram errors that decided it.
    """

    tensor: str
    node: str
    activation: str
    shift: float
    threshold: float
    scale: float
    minimum: float
    maximum: float
    error_signed: float
    error_shifted: float
    consumers: tuple[str, ...]
    shifted_tensor: str
    """The Add's output: the tensor quantized on the unsigned grid."""
    add_node: str
    """The name of the Add node that applies the shift."""
    passed: tuple[str, ...] = ()
    """Tensors downstream of pass-through ops (GlobalAveragePool, Flatten, ...) that carry ``+c`` too."""
    counters: tuple[str, ...] = ()
    """Labels of the Conv/Gemm nodes whose bias takes ``-c`` so that a residual ``Add`` of
    the shifted tensor is unchanged."""
    countered: tuple[str, ...] = ()
    """The outputs of ``counters`` (they carry ``-c``)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary for the report."""
        return {
            "tensor": self.tensor,
            "node": self.node,
            "activation": self.activation,
            "shift": self.shift,
            "threshold": self.threshold,
            "scale": self.scale,
            "min": self.minimum,
            "max": self.maximum,
            "error_signed": self.error_signed,
            "error_shifted": self.error_shifted,
            "consumers": list(self.consumers),
            "passed_through": list(self.passed),
            "residual_counters": list(self.counters),
            "shifted_tensor": self.shifted_tensor,
        }


def _activation_kind(node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto]) -> str | None:
    """``node``'s activation name when its output may have a small negative tail, else None."""
    if node.op_type in SHIFTABLE_OPS:
        return node.op_type
    if node.op_type == "Mul":
        for name in node.input:
            gate = producers.get(name)
            if gate is not None and is_gate_partner(gate, node):
                return "SiLU" if gate.op_type == "Sigmoid" else "x*HardSigmoid(x)"
    return None


def supports_shift(profile: Profile) -> bool:
    """Whether ``profile`` can run a shifted activation: unsigned activations and an
    activation op (HardSwish, LeakyRelu, ..., or Mul for gated ones) fused with ``Add``."""
    if "unsigned" not in profile.activation_signedness:
        return False
    return any(profile.is_fused(op, "Add") for op in SHIFTABLE_OPS | {"Mul"})


def _shift_for(stats: TensorStats, bits: int, method: str) -> tuple[float, float] | None:
    """``(c, threshold)`` with ``c`` a whole number of the shifted grid's steps, or None."""
    need = -stats.minimum
    offset = need
    for _ in range(_MAX_ROUNDS):
        threshold = activation_threshold(stats.shifted(offset), bits, False, method)
        scale = float(th.scale_for(threshold, bits, False))
        steps = math.ceil(need / scale)
        if steps >= 2**bits - 1:
            return None  # the shift would eat the grid
        candidate = steps * scale
        if candidate == offset:
            return offset, threshold
        offset = candidate
    return None


def _consumer_problem(
    node: onnx.NodeProto, tensor: str, inits: Mapping[str, onnx.TensorProto], *, through: bool = False
) -> str | None:
    """Why ``node`` cannot absorb a shift of its input ``tensor`` (None: it can).

    ``through``: ``tensor`` is downstream of a pass-through op, whose own grid need not
    hold ``c``, so a Conv there must not pad (the padding would need ``c`` on that grid).
    """
    if node.op_type not in _CONSUMERS:
        return f"{node.op_type} reads it (only {' and '.join(sorted(_CONSUMERS))} absorb a shift in their bias)"
    if node.input[0] != tensor or list(node.input).count(tensor) != 1:
        return f"{node.op_type} reads it as more than its data input"
    if len(node.input) < 2 or node.input[1] not in inits:
        return f"the weight of {node.op_type} is not a constant"
    if len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
        return f"the bias of {node.op_type} is computed"
    if node.op_type == "Conv":
        if g.attribute(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            return "Conv with auto_pad SAME_* (its padding depends on the input size)"
        if through and any(int(v) for v in g.attribute(node, "pads", [])):  # type: ignore[attr-defined]
            return f"a padded Conv reads it through {tensor!r}"
    elif g.attribute(node, "beta", 1.0) == 0.0:
        return "Gemm with beta = 0 (its bias is ignored)"
    return None


@dataclass
class _Absorbers:
    """Where a shift of one tensor goes: see :func:`_absorbers`."""

    consumers: list[onnx.NodeProto]
    passed: list[str]
    counters: list[onnx.NodeProto]
    problem: str | None = None


def _counter_problem(
    add: onnx.NodeProto,
    tensor: str,
    producers: Mapping[str, onnx.NodeProto],
    consumers: Mapping[str, list[onnx.NodeProto]],
    inits: Mapping[str, onnx.TensorProto],
    outputs: set[str],
) -> tuple[onnx.NodeProto | None, str | None]:
    """The Conv/Gemm whose bias can take ``-c`` for ``Add(tensor + c, other)``, or why not."""
    if len(add.input) != 2 or list(add.input).count(tensor) != 1:
        return None, "an Add reads it twice"
    other = add.input[1] if add.input[0] == tensor else add.input[0]
    producer = producers.get(other)
    if other in inits or producer is None or producer.op_type not in _CONSUMERS:
        return None, "an Add reads it beside a tensor no Conv or Gemm bias produces"
    if other in outputs or [id(n) for n in consumers.get(other, [])] != [id(add)]:
        return None, "an Add reads it beside a Conv/Gemm output that is read elsewhere too"
    if len(producer.input) < 3 or not producer.input[2] or producer.input[2] not in inits:
        return None, "an Add reads it beside a Conv/Gemm without a constant bias"
    if producer.op_type == "Gemm" and g.attribute(producer, "beta", 1.0) == 0.0:
        return None, "an Add reads it beside a Gemm with beta = 0"
    return producer, None


def _absorbers(
    tensor: str,
    producers: Mapping[str, onnx.NodeProto],
    consumers: Mapping[str, list[onnx.NodeProto]],
    inits: Mapping[str, onnx.TensorProto],
    outputs: set[str],
) -> _Absorbers:
    """The nodes that absorb ``+c`` on ``tensor``.

    * a Conv/Gemm reader compensates in its bias (``b - c * sum(W)``);
    * a pass-through reader (GlobalAveragePool, Flatten, ...) hands ``+c`` on to its
      readers, which must be unpadded Conv/Gemm or pass-through ops again;
    * a residual ``Add(tensor, z)`` stays exact when ``z`` is the output of a Conv/Gemm
      read only by that Add: its bias takes ``-c``.
    """
    found = _Absorbers([], [], [])

    def walk(name: str, through: bool) -> str | None:
        readers = consumers.get(name, [])
        if not readers:
            return "nothing reads it"
        for reader in readers:
            if reader.op_type in _PASS_THROUGH and reader.input[0] == name and list(reader.input).count(name) == 1:
                out = reader.output[0]
                if out in outputs:
                    return f"{reader.op_type} passes it to a graph output"
                found.passed.append(out)
                problem = walk(out, True)
            elif reader.op_type == "Add" and not through:
                producer, problem = _counter_problem(reader, name, producers, consumers, inits, outputs)
                if producer is not None:
                    found.counters.append(producer)
            else:
                problem = _consumer_problem(reader, name, inits, through=through)
                if problem is None:
                    found.consumers.append(reader)
            if problem:
                return problem
        return None

    found.problem = walk(tensor, False)
    return found


def choose_shifts(
    model: onnx.ModelProto,
    plan: QuantPlan,
    stats: Mapping[str, TensorStats],
    profile: Profile,
    *,
    method: str,
) -> tuple[list[Shift], list[dict[str, str]]]:
    """The activations of ``model`` to shift (see the module criterion) and why others are not.

    Returns the shifts in graph order and ``{"tensor", "node", "reason"}`` for every
    activation of a shiftable kind that is left as it is.
    """
    graph = model.graph
    view = g.GraphView(graph)
    inits, producers, consumers, outputs = view.initializers, view.producers, view.consumers, view.output_set
    bits = plan.act_bits
    taken = g.names_in_use(graph)
    shifts: list[Shift] = []
    skipped: list[dict[str, str]] = []
    for node in graph.node:
        kind = _activation_kind(node, producers)
        if kind is None:
            continue
        label = view.label(node)
        tensor = node.output[0]

        def skip(reason: str, tensor: str = tensor, label: str = label) -> None:
            _LOG.info("shift negative: %s (%s) left as it is: %s", tensor, label, reason)
            skipped.append({"tensor": tensor, "node": label, "reason": reason})

        mark = plan.activations.get(tensor)
        if mark is None or mark.source != "own":
            skip("it is not quantized on its own (fused into its consumer)")
            continue
        if not plan.allow_unsigned or not profile.is_fused(node.op_type, "Add"):
            skip(f"profile {profile.name!r} does not fuse {node.op_type} with the shift's Add")
            continue
        if tensor in outputs:
            skip("it is a graph output")
            continue
        absorbers = _absorbers(tensor, producers, consumers, inits, outputs)
        if absorbers.problem:
            skip(absorbers.problem)
            continue
        item = stats.get(tensor)
        if item is None or item.count == 0:
            skip("no calibration statistics")
            continue
        if item.minimum >= 0.0:
            skip("its observed minimum is not negative (already unsigned)")
            continue
        chosen = _shift_for(item, bits, method)
        if chosen is None:
            skip(f"no shift on the {bits}-bit unsigned grid covers its minimum {item.minimum:.4g}")
            continue
        offset, threshold = chosen
        steps = round(offset / float(th.scale_for(threshold, bits, False)))
        if steps >> ((steps & -steps).bit_length() - 1) > 2 ** (plan.const_bits - 1) - 1:
            # The Add's constant is stored like any constant (signed, const_bits): c must
            # be exact there too, which needs its odd factor within the integer range.
            skip(f"the shift {offset:.6g} is not exact as a {plan.const_bits}-bit constant")
            continue
        signed_threshold = activation_threshold(item, bits, True, method)
        moved = item.shifted(offset).histogram
        error_signed = th.histogram_error(item.histogram.counts, item.histogram.sums, signed_threshold, bits, True)
        error_shifted = th.histogram_error(moved.counts, moved.sums, threshold, bits, False)
        if not error_shifted < error_signed:
            skip(f"the shifted grid does not lower its quantization error ({error_shifted:.4g} >= {error_signed:.4g})")
            continue
        shifts.append(
            Shift(
                tensor=tensor,
                node=label,
                activation=kind,
                shift=float(offset),
                threshold=float(threshold),
                scale=float(th.scale_for(threshold, bits, False)),
                minimum=float(item.minimum),
                maximum=float(item.maximum),
                error_signed=error_signed,
                error_shifted=error_shifted,
                consumers=tuple(view.label(r) for r in absorbers.consumers),
                shifted_tensor=g.unique_name(taken, f"{tensor}_shifted"),
                add_node=g.unique_name(taken, f"{label}_shift"),
                passed=tuple(absorbers.passed),
                counters=tuple(view.label(r) for r in absorbers.counters),
                countered=tuple(r.output[0] for r in absorbers.counters),
            )
        )
        _LOG.info(
            "shift negative: %s (%s, min %.4g, max %.4g) + %.6g, unsigned threshold %g (signed %g)",
            tensor, kind, item.minimum, item.maximum, offset, threshold, signed_threshold,
        )
    return shifts, skipped


def channel_sums(node: onnx.NodeProto, weight: np.ndarray) -> np.ndarray:
    """What one unit of input shift adds to each output channel: ``sum(W[o])`` (Gemm: times alpha/beta)."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1).sum(axis=1)
    alpha, beta = g.attribute(node, "alpha", 1.0), g.attribute(node, "beta", 1.0)
    return weight.sum(axis=1 if g.attribute(node, "transB", 0) else 0) * (alpha / beta)  # type: ignore[operator]


def apply_shifts(model: onnx.ModelProto, shifts: Sequence[Shift]) -> tuple[onnx.ModelProto, frozenset[str]]:
    """A copy of ``model`` with every shift inserted and compensated (same function).

    Each ``T`` gets ``Add(T, T_shift) -> T_shifted`` and every reader of ``T`` reads
    ``T_shifted``; each consumer (a Conv with padding through ``Pad(T_shifted, pads,
    T_shift)`` and no padding of its own) gets a new bias ``b - c * sum(W)``, each residual
    counter ``b - c``. Touched nodes keep their plan labels as names. Returns the model
    and the names of the Pad nodes (their fill is on the grid).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = g.names_in_use(graph) | {name for item in shifts for name in (item.shifted_tensor, item.add_node)}
    inits = g.initializer_map(graph)
    by_label = {g.node_label(node, index): node for index, node in enumerate(graph.node)}
    pads: set[str] = set()
    replaced: list[str] = []

    def node_named(label: str) -> onnx.NodeProto:
        node = by_label[label]
        if not node.name:
            node.name = label  # touched nodes keep their plan label
        return node

    def bias_of(node: onnx.NodeProto) -> np.ndarray:
        has_bias = len(node.input) > 2 and bool(node.input[2])
        return g.to_array(inits[node.input[2]]).astype(np.float64) if has_bias else np.zeros(())

    def set_bias(node: onnx.NodeProto, name: str, value: np.ndarray) -> None:
        if len(node.input) > 2 and node.input[2]:
            replaced.append(node.input[2])
        g.add_initializer(graph, name, value.astype(np.float32))
        inits[name] = graph.initializer[-1]  # a later shift may compensate this node too
        g.set_node_input(node, 2, name)

    for item in shifts:
        node_named(item.node)
        value_name = g.unique_name(taken, f"{item.tensor}_shift")
        shifted = item.shifted_tensor
        g.add_initializer(graph, value_name, np.array(item.shift, np.float32))
        readers = [node for node in graph.node if item.tensor in node.input]
        g.add_node(graph, "Add", [item.tensor, value_name], [shifted], name=item.add_node)
        for node in readers:  # direct consumers, pass-through ops and residual Adds
            for position, name in enumerate(node.input):
                if name == item.tensor:
                    g.set_node_input(node, position, shifted)
        for label in item.counters:
            node = node_named(label)
            # Gemm adds beta * C: -c on every output is -c / beta on C (Conv: beta 1).
            beta = g.attribute(node, "beta", 1.0) if node.op_type == "Gemm" else 1.0
            set_bias(node, g.unique_name(taken, f"{label}_shift_counter_bias"), bias_of(node) - item.shift / beta)
        for label in item.consumers:
            node = node_named(label)
            source = node.input[0]  # shifted, or a pass-through op's output
            padding = [int(v) for v in g.attribute(node, "pads", [])]  # type: ignore[attr-defined]
            if any(padding):  # a Conv's zero padding becomes a Pad with value c
                half = len(padding) // 2
                full = [0, 0, *padding[:half], 0, 0, *padding[half:]]
                pads_name = g.unique_name(taken, f"{label}_shift_pads")
                g.add_initializer(graph, pads_name, np.array(full, np.int64))
                padded = g.unique_name(taken, f"{shifted}_padded")
                pad_node = g.unique_name(taken, f"{label}_shift_pad")
                pad_inputs = [source, pads_name, value_name]
                g.add_node(graph, "Pad", pad_inputs, [padded], name=pad_node, mode="constant")
                source = padded
                g.set_node_attribute(node, "pads", [0] * len(padding))
                pads.add(pad_node)
            weight = g.to_array(inits[node.input[1]]).astype(np.float64)
            delta = item.shift * channel_sums(node, weight)
            # delta runs along the last axis (Conv: the only one; Gemm: N), so a scalar or
            # row bias broadcasts to one value per output channel.
            g.set_node_input(node, 0, source)
            set_bias(node, g.unique_name(taken, f"{label}_shift_bias"), bias_of(node) - delta)
    still_read = {name for node in graph.node for name in node.input}
    g.remove_initializers(graph, [name for name in replaced if name not in still_read])
    g.topological_sort(graph)
    g.clear_value_info(graph)
    return out, frozenset(pads)


def shifted_statistics(stats: Mapping[str, TensorStats], shifts: Sequence[Shift]) -> dict[str, TensorStats]:
    """``stats`` plus each shifted tensor's statistics (its activation's, moved by ``c``),
    with the tensors that carry the shift downstream moved by ``c`` and the residual
    counters' outputs by ``-c``."""
    merged = dict(stats)
    for item in shifts:
        merged[item.shifted_tensor] = stats[item.tensor].shifted(item.shift, item.shifted_tensor)
        for name in item.passed:
            if name in merged:
                merged[name] = merged[name].shifted(item.shift)
        for name in item.countered:
            if name in merged:
                merged[name] = merged[name].shifted(-item.shift)
    return merged


def _dequantized(item: ParamQuant) -> np.ndarray:
    values, scale = np.asarray(item.values, np.float64), np.asarray(item.scale, np.float64)
    shape = [1] * values.ndim
    if item.axis is not None and scale.size > 1:
        shape[item.axis] = -1
    return values * scale.reshape(shape)


def compensate(resolved: ResolvedPlan, model: onnx.ModelProto, shifts: Sequence[Shift]) -> ResolvedPlan:
    """``resolved`` with each shifted consumer's int32 bias exact for its quantized weights.

    ``model`` is :func:`apply_shifts`' output (its biases carry ``b - c * sum(W)``); the
    bias becomes ``round((b - c * sum(W_q)) / s_b)`` with ``W_q`` the dequantized weight.
    A Gemm whose bias was quantized as a plain constant (not per output) keeps it.
    """
    inits = g.initializer_map(model.graph)
    by_label = {g.node_label(node, index): node for index, node in enumerate(model.graph.node)}
    shift_of = {label: item.shift for item in shifts for label in item.consumers}
    adds = {item.add_node: item.shift for item in shifts}
    for item in resolved.params:
        if item.node in adds and item.role == "constant":
            stored = float(_dequantized(item).reshape(-1)[0])
            if stored != adds[item.node]:
                raise QuantizationError(
                    f"the shift constant of node {item.node} quantizes to {stored!r}, not {adds[item.node]!r}",
                    "report this model to the onnxdgh developers (or pass --no-shift-negative)",
                )
    weights = {p.node: p for p in resolved.params if p.role == "weight" and p.input_index == 1}
    params = []
    for item in resolved.params:
        node = by_label.get(item.node)
        if item.role != "bias" or item.node not in shift_of or item.node not in weights or node is None:
            params.append(item)
            continue
        shift = shift_of[item.node]
        float_weight = g.to_array(inits[node.input[1]]).astype(np.float64)
        adjust = shift * (channel_sums(node, float_weight) - channel_sums(node, _dequantized(weights[item.node])))
        target = g.to_array(inits[node.input[2]]).astype(np.float64).reshape(-1) + adjust
        scale = np.broadcast_to(np.asarray(item.scale, np.float64).reshape(-1), target.shape)
        ints, clipped = round_bias(target / scale, item.bits)
        params.append(replace(item, values=ints.reshape(np.shape(item.values)), clipped=clipped))
    return replace(resolved, params=tuple(params))
