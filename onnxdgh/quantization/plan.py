"""Quantization policies: which tensor gets which quantizer (mark), then its numbers (resolve).

Contract, in two steps (onnxruntime's QDQ design: policies only *mark*, ``emit`` is the
one place that writes Q/DQ nodes):

1. :func:`mark` walks the BN-folded float graph once and returns a :class:`QuantPlan`:

   * the graph input and every float op output get an activation quantizer, except a
     tensor inside a fused pattern (``profile.is_fused(producer, consumer)``, e.g.
     Conv->Relu: the pair is one hardware op; only the Relu output is quantized; a
     tensor read by both halves of a gated activation ``Mul(x, Sigmoid(x))`` is inside
     the pattern ``[producer, "Sigmoid", "Mul"]``);
   * value-preserving ops (:func:`onnxdgh.ops.is_value_preserving`) *inherit* their
     input's quantizer: their output gets its own Q/DQ pair with the same scale; when
     that input is a constant, the constant takes its outputs' scale (``scale_from``),
     chosen to cover the constant;
   * shared-scale groups: the data inputs and output of ``profile.shared_scale_ops``
     (Concat) share one scale, as do the data inputs of ``profile.shared_input_scale_ops``;
   * constant inputs: the weight of Conv/ConvTranspose/Gemm/MatMul (signed, per output
     channel unless per-tensor is asked or the profile forbids it), the bias of
     Conv/ConvTranspose/Gemm (int32, scale = input scale x weight scale), and every other
     float constant (Add/Sub/Mul operands, PRelu slopes, ...) quantized per tensor with
     the profile's widest weight width, so no float island remains;
   * an op the quantizer cannot handle, or one the profile does not allow, is a
     :class:`~onnxdgh.errors.QuantizationError` naming the op and the node.

2. :func:`resolve` turns the marks into numbers using calibration statistics: signedness
   per group (unsigned when every member is non-negative by its op -- Relu, Relu6, Sigmoid,
   HardSigmoid, Softmax -- or by observation), a power-of-two threshold per member
   (``thresholds``), the largest threshold in each group, integer weights and int32
   biases. Which threshold rule an activation follows is decided here too (the threshold
   policy: :func:`default_threshold`, :func:`group_rule`). This is the one place where a
   weight scale is chosen (emit writes it, the
   shift correction and the rounding optimisation read it): the HPTQ threshold per
   output channel, raised (still a power of two) where the channel's bias would not fit
   int32 at ``input scale x weight scale`` (:func:`~.thresholds.bias_fit_thresholds`),
   so a bias is never clipped. Only a bias whose weight is an activation (one scale
   the bias cannot move) can still be clipped, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import onnx

from .. import graph as g
from ..errors import QuantizationError
from ..ops import (
    OPS, QDQ_OPS, gated_activation, is_gate_partner, is_value_preserving, numpy_container,
    output_bounds, output_channels, spec, weight_axis, written_out_ops,
)
from ..profile import Profile
from . import thresholds as th
from .calibrate import TensorStats

__all__ = [
    "POLICIES", "ActivationMark", "ParamMark", "QuantPlan", "ActivationQuant", "ParamQuant",
    "ResolvedPlan",
    "OUTPUT_NOCLIP_BITS", "default_threshold", "group_rule", "float_tensors", "mark", "resolve",
]

_LOG = logging.getLogger(__name__)

Source = Literal["graph_input", "own", "inherited"]
Role = Literal["weight", "bias", "constant"]


@dataclass(frozen=True)
class ActivationMark:
    """An activation tensor that gets a Q/DQ pair.

    ``source``: ``graph_input`` or ``own`` -- its threshold comes from its calibration
    statistics; ``inherited`` -- it takes its group's scale (value-preserving op output,
    shared-scale op output).
    """

    tensor: str
    source: Source
    node: str | None
    op_type: str | None
    unsigned_by_op: bool = False


@dataclass(frozen=True)
class ParamMark:
    """A constant (initializer) input of a node that gets quantized."""

    tensor: str
    node: str
    op_type: str
    input_index: int
    role: Role
    bits: int
    axis: int | None
    data_input: str | None = None
    """bias: the activation whose scale multiplies the weight scale."""
    weight: str | None = None
    """bias: the weight tensor (an initializer or an activation)."""
    repeat: int = 1
    """bias: how often the weight scales repeat to cover the output channels (grouped ConvTranspose)."""
    channels: int | None = None
    """bias: number of output channels the bias must cover."""
    scale_from: str | None = None
    """constant: an activation whose scale the constant must use (shared-scale group)."""


@dataclass(frozen=True)
class QuantPlan:
    """Every mark, the fused pairs and the shared-scale groups of one graph."""

    activations: dict[str, ActivationMark]
    params: tuple[ParamMark, ...]
    groups: tuple[tuple[str, ...], ...]
    fused: tuple[tuple[str, str, str], ...]
    graph_input: str
    graph_outputs: tuple[str, ...]
    act_bits: int
    weight_bits: int
    const_bits: int
    per_channel: bool
    allow_unsigned: bool
    bias_bits: int

    def stat_tensors(self) -> list[str]:
        """Tensors whose calibration statistics are needed (graph input and ``own`` marks)."""
        return [name for name, item in self.activations.items() if item.source != "inherited"]


class _UnionFind:
    """Shared-scale groups: disjoint sets of tensor names."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        self.parent.setdefault(name, name)
        while self.parent[name] != name:
            self.parent[name] = self.parent[self.parent[name]]  # path halving
            name = self.parent[name]
        return name

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(b)] = self.find(a)

    def groups(self, order: Sequence[str]) -> tuple[tuple[str, ...], ...]:
        by_root: dict[str, list[str]] = {}
        for name in order:
            by_root.setdefault(self.find(name), []).append(name)
        return tuple(tuple(members) for members in by_root.values())


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor of the graph (inputs, node outputs, initializers).

    Types come from ONNX shape inference; tensors it leaves untyped are asked of
    onnxruntime (which types every output of a session).
    """
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    types = g.tensor_elem_types(graph)
    missing = [name for node in graph.node for name in node.output if name and name not in types]
    if missing:
        from ..runtime import make_session, with_extra_outputs

        session = make_session(with_extra_outputs(model, missing), optimize=False)
        for out in session.get_outputs():
            if out.name in missing and out.type == "tensor(float)":
                types[out.name] = onnx.TensorProto.FLOAT
    return {name for name, kind in types.items() if kind == onnx.TensorProto.FLOAT}


def _non_negative(node: onnx.NodeProto, view: g.GraphView) -> bool:
    bounds = output_bounds(node.op_type, g.node_attributes(node), node.input, view.constant)
    return bounds is not None and bounds[0] >= 0.0


def _preserves_values(node: onnx.NodeProto, view: g.GraphView) -> bool:
    if not is_value_preserving(node.op_type, g.node_attributes(node)):
        return False
    if node.op_type != "Pad":
        return True
    fill = view.input_constant(node, 2)
    if fill is None:
        # a computed pad value may fall off the grid
        return not (len(node.input) > 2 and node.input[2])
    return not np.any(fill != 0)


@dataclass(frozen=True)
class _Node:
    """One node as the policies see it: its float outputs and its float inputs split into
    activations (``data``) and initializers (``constants``, with their input index)."""

    proto: onnx.NodeProto
    label: str
    op: str
    outputs: list[str]
    data: list[str]
    constants: list[tuple[int, str]]


class _Marking:
    """The state :func:`mark` builds while the policies visit the nodes in graph order."""

    def __init__(self, model: onnx.ModelProto, profile: Profile, *, weight_bits: int, act_bits: int,
                 per_channel: bool, grid_pads: frozenset[str], image: str) -> None:
        self.view = g.GraphView(model)
        self.profile = profile
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.per_channel = per_channel and profile.per_channel_weights
        self.const_bits = profile.max_weight_bits
        self.grid_pads = grid_pads
        self.marks: dict[str, ActivationMark] = {image: ActivationMark(image, "graph_input", None, None, False)}
        self.order: list[str] = [image]
        self.params: list[ParamMark] = []
        self.fused: list[tuple[str, str, str]] = []
        self.fused_tensors: set[str] = set()
        self.union = _UnionFind()
        # (node label, input index) -> partner activation
        self.shared_constants: dict[tuple[str, int], str] = {}

    def shares_scale(self, op: str) -> bool:
        return op in self.profile.shared_scale_ops or op in self.profile.shared_input_scale_ops

    def constant(self, node: _Node, position: int, name: str) -> None:
        """A constant input that is neither a weight nor a bias: per tensor at ``const_bits``."""
        self.params.append(ParamMark(name, node.label, node.op, position, "constant", self.const_bits, None))
        if self.shares_scale(node.op) and node.data:
            self.shared_constants[(node.label, position)] = node.data[0]

    def fuses_output(self, node: _Node) -> bool:
        """Record ``node``'s single output as inside a fused pattern when the profile fuses
        ``node`` with its only reader (or with a gated activation ``Mul(x, G(x))`` reading it)."""
        out = node.outputs[0]
        if len(node.outputs) != 1 or out in self.view.output_set:
            return False
        fused = self.profile.is_fused
        readers = self.view.readers(out)
        if (
            len(readers) == 1
            and list(readers[0].input).count(out) == 1
            and fused(node.op, readers[0].op_type)
            and (not spec(node.op).gate or readers[0].op_type != "Mul" or is_gate_partner(node.proto, readers[0]))
        ):
            reader = readers[0]
        elif ((pair := gated_activation(out, readers)) is not None
              and fused(node.op, pair[0].op_type) and fused(pair[0].op_type, "Mul")):
            # Conv -> SiLU as Sigmoid + Mul(x, Sigmoid(x)): x feeds both halves of one
            # activation, which the profile fuses behind the producer.
            reader = pair[0]
        else:
            return False
        self.fused_tensors.add(out)
        self.fused.append((node.label, self.view.label(reader), out))
        return True

    def outputs(self, node: _Node) -> None:
        """Mark ``node``'s float outputs: inherited from its data input when the values stay
        on that grid (value-preserving op, grid Pad, shared-scale Concat), else their own."""
        proto, op, data = node.proto, node.op, node.data
        inherits = bool(data) and data[0] in self.marks and (
            _preserves_values(proto, self.view)
            or (op == "Pad" and node.label in self.grid_pads)
            or (op == "Concat" and op in self.profile.shared_scale_ops)
        )
        # A value-preserving op that only moves a constant (an exporter's Reshape of a bias
        # to 1 x C x 1 x 1): its outputs are the constant's values, so constant and outputs
        # share one scale, found from the constant itself (no statistics needed).
        moves_constant = not data and bool(node.constants) and _preserves_values(proto, self.view)
        if moves_constant:
            self.shared_constants.update({(node.label, position): node.outputs[0]
                                          for position, _ in node.constants})
        unsigned = _non_negative(proto, self.view)
        for out in node.outputs:
            source: Source = "inherited" if inherits or moves_constant else "own"
            self.marks[out] = ActivationMark(out, source, node.label, op, unsigned)
            self.order.append(out)
            if inherits:
                self.union.union(data[0], out)
            if moves_constant:
                self.union.union(node.outputs[0], out)
        if self.shares_scale(op):
            quantized_inputs = [name for name in data if name in self.marks]
            for name in quantized_inputs[1:]:
                self.union.union(quantized_inputs[0], name)
            if op in self.profile.shared_scale_ops and quantized_inputs:
                for out in node.outputs:
                    self.union.union(quantized_inputs[0], out)


Policy = Callable[[_Marking, _Node], None]
POLICIES: dict[str, Policy] = {}
"""The marking policy of each op type the quantizer handles (onnx2torch's converter
registry, onnxruntime's QDQ operator classes): it marks the node's constant inputs and its
outputs. An op type without one is refused with "no quantization rule"."""


def _policy(*op_types: str) -> Callable[[Policy], Policy]:
    def register(function: Policy) -> Policy:
        for op in op_types:
            POLICIES[op] = function
        return function

    return register


@_policy(*(op for op, record in OPS.items() if record.weight is None))
def _mark_plain(m: _Marking, node: _Node) -> None:
    """Any op without a weight: constants per tensor; its own output quantizer unless fused
    behind it or value-preserving (then inherited)."""
    for position, name in node.constants:
        m.constant(node, position, name)
    if spec(node.op).preserves or not m.fuses_output(node):
        m.outputs(node)


@_policy("Pow")
def _mark_pow(m: _Marking, node: _Node) -> None:
    """Pow by a constant scalar exponent: an elementwise function of its base (the square
    of a decomposed LayerNorm, the cube of tanh-form GELU), marked like any plain op."""
    exponent = m.view.input_constant(node.proto, 1)
    if exponent is None or exponent.size != 1:
        raise QuantizationError(
            f"cannot quantize Pow node {node.label}: its exponent is not a constant scalar",
            "export the power with a constant exponent (x ** 2), or as Mul(x, x)",
        )
    _mark_plain(m, node)


@_policy(*(op for op, record in OPS.items() if record.weight is not None))
def _mark_weighted(m: _Marking, node: _Node) -> None:
    """Conv, ConvTranspose, Gemm, MatMul: a constant weight per output channel (signed,
    ``weight_bits``) and an int32 bias at ``input scale x weight scale``."""
    record, proto, op = spec(node.op), node.proto, node.op
    attrs = g.node_attributes(proto)
    weight_array = m.view.input_constant(proto, record.weight)
    for position, name in node.constants:
        value = g.to_array(m.view.initializers[name])
        if position == record.weight:
            axis = weight_axis(op, attrs, value.ndim) if m.per_channel else None
            m.params.append(ParamMark(name, node.label, op, position, "weight", m.weight_bits, axis))
        elif position == record.bias:
            data = proto.input[0]
            if data not in m.marks:
                raise QuantizationError(
                    f"the data input {data} of node {node.label} ({op}) is not quantized, so its bias has no scale",
                    "remove the fused pattern that ends at this op from the profile",
                )
            channels = output_channels(op, attrs, weight_array.shape) if weight_array is not None else None
            if record.layout == "gemm" and channels is not None and value.size not in (1, channels):
                m.params.append(ParamMark(name, node.label, op, position, "constant", m.const_bits, None))
                continue
            repeat = 1
            if record.layout == "conv_transpose" and m.per_channel and weight_array is not None:
                repeat = int(attrs.get("group", 1))  # type: ignore[call-overload]
            m.params.append(
                ParamMark(
                    name, node.label, op, position, "bias", m.profile.bias_bits, None,
                    data_input=data, weight=proto.input[record.weight], repeat=repeat, channels=channels,
                )
            )
        else:
            m.constant(node, position, name)
    if not m.fuses_output(node):
        m.outputs(node)


def mark(
    model: onnx.ModelProto, profile: Profile, *, weight_bits: int, act_bits: int, per_channel: bool,
    grid_pads: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Mark every tensor of the BN-folded float ``model`` that needs a quantizer.

    Each node goes to the policy :data:`POLICIES` registers for its op type.
    ``grid_pads``: labels of constant-mode Pad nodes whose fill value is known to lie on
    their input's grid (the shift negative correction's); they inherit their input's
    quantizer like a zero-padding Pad, where any other non-zero fill gets its own.

    Raises:
        QuantizationError: an op the quantizer cannot handle, an op ``profile`` does not
            allow, an already quantized model, or a constant input that cannot be quantized.
    """
    graph = model.graph
    inputs = g.graph_input_names(graph)
    if len(inputs) != 1:
        raise QuantizationError(
            f"the model has {len(inputs)} graph inputs; the quantizer needs exactly one image input",
            "export the model with a single N x C x H x W input",
        )
    floats = float_tensors(model)
    if "signed" not in profile.weight_signedness:
        raise QuantizationError(
            f"profile {profile.name!r} allows only unsigned weights; onnxdgh quantizes weights signed and symmetric",
            "use a profile whose weight_signedness lists \"signed\"",
        )
    m = _Marking(model, profile, weight_bits=weight_bits, act_bits=act_bits, per_channel=per_channel,
                 grid_pads=grid_pads, image=inputs[0])
    # An op written out as several nodes (LayerNorm, HardSwish) is quantized as that op
    # where the profile allows it: no quantizer inside (8-bit variances of near-constant
    # tokens round to 0 and blow the division up), its constants are its attributes.
    inside: set[int] = set()
    parameters: dict[int, frozenset[str]] = {}
    for pattern in written_out_ops(m.view):
        if profile.allows_op(pattern.op):
            m.fused_tensors.update(pattern.inner)
            inside.update(id(node) for node in pattern.nodes[:-1])
            parameters[id(pattern.nodes[-1])] = frozenset(pattern.parameters)
            _LOG.debug("%s written out as %d nodes ending at %s: quantized as one op",
                       pattern.op, len(pattern.nodes), m.view.label(pattern.nodes[-1]))
    for proto in graph.node:
        label = m.view.label(proto)
        op = proto.op_type
        float_outs = [name for name in proto.output if name and name in floats]
        if op in QDQ_OPS:
            raise QuantizationError(
                f"node {label} is a {op}: the model is already quantized",
                "give onnxdgh the float model (before any quantization)",
            )
        if id(proto) in inside:
            continue  # its outputs stay inside the written-out op; the last node is marked below
        if not float_outs:
            continue  # shape/index arithmetic: nothing to quantize
        if proto.domain not in ("", "ai.onnx"):
            raise QuantizationError(
                f"cannot quantize op {proto.domain}.{op} (node {label}): custom-domain ops are not supported",
                "re-export the model with standard ONNX ops",
            )
        policy = POLICIES.get(op)
        if policy is None:
            raise QuantizationError(
                f"cannot quantize op {op} (node {label}): onnxdgh has no quantization rule for it",
                f"replace {op} with supported ops before export (see `onnxdgh quantize --help`), "
                "or file an issue with the model",
            )
        if not profile.allows_op(op):
            raise QuantizationError(
                f"op {op} (node {label}) is not allowed by profile {profile.name!r}",
                "choose a profile that allows it (--profile generic-pot-int8) or remove the op from the model",
            )
        # Float tensor inputs; a written-out op's parameters are its attributes, not tensors.
        skipped = spec(op).shape_inputs
        attributes = parameters.get(id(proto), frozenset())
        tensors = [
            (position, name) for position, name in enumerate(proto.input)
            if name and position not in skipped and name in floats and name not in attributes
        ]
        constants = [(position, name) for position, name in tensors if name in m.view.initializers]
        data = [name for _, name in tensors if name not in m.view.initializers]
        for name in data:
            if name not in m.marks and name not in m.fused_tensors:
                raise QuantizationError(  # would be a float island; should not happen on a sorted graph
                    f"input {name} of node {label} ({op}) has no quantizer",
                    "report this model to the onnxdgh developers",
                )
        policy(m, _Node(proto, label, op, float_outs, data, constants))

    shared = m.shared_constants
    params = tuple(
        replace(item, scale_from=shared[(item.node, item.input_index)])
        if item.role == "constant" and (item.node, item.input_index) in shared else item
        for item in m.params
    )
    return QuantPlan(
        activations=m.marks,
        params=params,
        groups=m.union.groups(m.order),
        fused=tuple(m.fused),
        graph_input=inputs[0],
        graph_outputs=tuple(m.view.outputs),
        act_bits=act_bits,
        weight_bits=weight_bits,
        const_bits=m.const_bits,
        per_channel=m.per_channel,
        allow_unsigned="unsigned" in profile.activation_signedness,
        bias_bits=profile.bias_bits,
    )


# ----------------------------------------------------------------------- resolve


@dataclass(frozen=True)
class ActivationQuant:
    """The quantizer of one activation tensor: power-of-two scale, zero point 0."""

    tensor: str
    bits: int
    signed: bool
    threshold: float
    scale: float
    elem_type: int
    group: int
    source: Source

    @property
    def container_bits(self) -> int:
        """Bits of the integer type carrying the values (8 or 4)."""
        return 4 if self.elem_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 8

    @property
    def clip_range(self) -> tuple[float, float] | None:
        """``(lo, hi)`` in float when the grid is narrower than its container, else None."""
        if self.bits >= self.container_bits:
            return None
        qmin, qmax, _ = th.grid(self.bits, self.signed)
        return float(np.float32(self.scale) * qmin), float(np.float32(self.scale) * qmax)


@dataclass(frozen=True)
class ParamQuant:
    """A quantized initializer: integer values, per-channel or per-tensor scales, zero points 0."""

    tensor: str
    node: str
    input_index: int
    role: Role
    bits: int
    axis: int | None
    scale: np.ndarray = field(repr=False)
    values: np.ndarray = field(repr=False)
    elem_type: int
    clipped: int = 0
    raised: int = 0
    """weight: how many of its scales were raised so the layer's int32 bias fits."""


@dataclass(frozen=True)
class ResolvedPlan:
    """Everything :func:`~onnxdgh.quantization.emit.emit` needs, plus a JSON-ready summary."""

    activations: dict[str, ActivationQuant]
    params: tuple[ParamQuant, ...]
    graph_input: str
    graph_outputs: tuple[str, ...]
    fused: tuple[tuple[str, str, str], ...]

    def summary(self) -> dict[str, Any]:
        """Per-tensor thresholds, scales and bits (for the report)."""
        act_keys = ("tensor", "bits", "signed", "threshold", "scale", "group", "source")
        params = [
            {
                **{key: getattr(item, key) for key in ("tensor", "node", "role", "bits", "axis")},
                "per_channel": item.scale.size > 1,
                "scale_min": float(item.scale.min()),
                "scale_max": float(item.scale.max()),
                "clipped": item.clipped,
                "raised_for_bias": item.raised,
            }
            for item in self.params
        ]
        return {
            "activations": [{key: getattr(item, key) for key in act_keys}
                            for item in self.activations.values()],
            "params": params,
            "fused": [{"producer": p, "consumer": c, "tensor": t} for p, c, t in self.fused],
        }


def round_bias(ratio: np.ndarray, bits: int) -> tuple[np.ndarray, int]:
    """Bias values over their scale rounded to the nearest ``bits``-bit integer (int32 array)
    and how many had to be clipped into range."""
    low, high, _ = th.grid(bits, True)
    ints = np.rint(ratio)
    clipped = int(np.sum((ints < low) | (ints > high)))
    return np.clip(ints, low, high).astype(np.int32), clipped


def _elem_type(bits: int, signed: bool, int4_types: bool) -> int:
    """The Q/DQ integer type of a ``bits``-wide grid (INT4/UINT4 only with ``int4_types``)."""
    if int4_types and bits <= 4:
        return onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8


def activation_threshold(stats: TensorStats, bits: int, signed: bool, method: str) -> float:
    """The power-of-two threshold ``method`` ("mse", "lp" or "noclip") gives one activation's
    statistics."""
    if method in ("mse", "lp"):
        return th.histogram_mse_threshold(
            stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum,
            bits, signed,
            power=th.LP_POWER if method == "lp" else 2.0,
        )
    return float(th.noclip_threshold(stats.minimum, stats.maximum, bits, signed))


# ------------------------------------------------------------ activation threshold policy
# Which rule sets an activation's threshold (measurements: docs/QUANTIZE.md, "Thresholds"):
# * ``--threshold`` left open (:func:`default_threshold`): ``lp`` at 8-bit activations when a
#   graph output of rank > 2 is a dense prediction (a detector's anchors, a segmenter's map),
#   whose answer is in rare strong responses among background: the MSE search, which weighs
#   values by how often they occur, clips exactly those, and no clipping coarsens every grid
#   for them. Otherwise ``mse``: a classifier's N x K scores, an embedding, an output written
#   by one of :data:`_SCORE_OPS` at any rank (scores or a probability map, read at a cut, not
#   at rare peaks), and every model below 8-bit activations, whose grids need MSE's clipping.
# * Whatever the rule, a graph output (and its scale group) at >= :data:`OUTPUT_NOCLIP_BITS`
#   takes ``noclip`` (:func:`group_rule`): its largest values are what is read from it (a
#   classifier's top-1 logit), and synthetic images can put the MSE optimum below the real
#   top logits (EfficientNet-Lite0, DGH: 8 instead of 16). At 4 bits no step can be spared.

OUTPUT_NOCLIP_BITS = 8
"""From this activation width on, graph outputs take the no-clipping threshold."""
_SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid"})
"""Ops whose output is scores or probabilities at any rank."""


def default_threshold(model: onnx.ModelProto, act_bits: int) -> str:
    """The threshold rule of ``model`` when ``--threshold`` is left open (the policy above)."""
    scores = {name for name, node in g.producer_map(model.graph).items()
              if node.op_type in _SCORE_OPS}
    dense = any(len(value.type.tensor_type.shape.dim) > 2 for value in model.graph.output
                if value.type.tensor_type.HasField("shape") and value.name not in scores)
    return "lp" if act_bits >= 8 and dense else "mse"


def group_rule(method: str, bits: int, graph_output: bool) -> str:
    """The rule of one activation scale group under ``method`` (the policy above)."""
    return "noclip" if graph_output and bits >= OUTPUT_NOCLIP_BITS else method


def resolve(
    plan: QuantPlan, stats: Mapping[str, TensorStats], model: onnx.ModelProto, *, method: str,
    int4_types: bool = False, sum_rounding: bool = False,
) -> ResolvedPlan:
    """Choose every scale of ``plan`` from calibration ``stats`` and quantize the constants.

    ``sum_rounding``: per-channel weights of Conv, Gemm and MatMul keep each output
    channel's integer sum at the nearest integer of the float sum
    (:func:`~onnxdgh.quantization.thresholds.quantize_preserving_sums`) instead of nearest
    rounding entry by entry.

    Raises:
        QuantizationError: a needed statistic is missing (the tensor never ran), or a
            divisor constant quantizes to zero.
    """
    inits = g.initializer_map(model.graph)
    constants_by_partner: dict[str, list[np.ndarray]] = {}
    for item in plan.params:
        if item.scale_from is not None:
            constants_by_partner.setdefault(item.scale_from, []).append(g.to_array(inits[item.tensor]))

    activations: dict[str, ActivationQuant] = {}
    for number, members in enumerate(plan.groups):
        measured = [name for name in members if plan.activations[name].source != "inherited"]
        for name in measured:
            if name not in stats or stats[name].count == 0:
                raise QuantizationError(
                    f"no calibration statistics for tensor {name}",
                    "the calibration run did not produce it; check the model runs in onnxruntime",
                )
        constants = [value for name in members for value in constants_by_partner.get(name, [])]
        non_negative = all(
            plan.activations[name].unsigned_by_op or stats[name].minimum >= 0.0 for name in measured
        ) and all(float(np.min(value)) >= 0.0 for value in constants)
        signed = not (plan.allow_unsigned and non_negative)
        bits = plan.act_bits
        rule = group_rule(method, bits, any(name in plan.graph_outputs for name in members))
        candidates = [activation_threshold(stats[name], bits, signed, rule) for name in measured]
        candidates += [float(th.noclip_threshold(value.min(), value.max(), bits, signed)) for value in constants]
        threshold = max(candidates) if candidates else th.ZERO_RANGE_THRESHOLD
        scale = float(th.scale_for(threshold, bits, signed))
        elem_type = _elem_type(bits, signed, int4_types)
        for name in members:
            activations[name] = ActivationQuant(
                name, bits, signed, threshold, scale, elem_type, number, plan.activations[name].source
            )

    bias_of = {(p.node, p.weight): p for p in plan.params if p.role == "bias"}
    weight_scales: dict[tuple[str, str], np.ndarray] = {}
    resolved: list[ParamQuant] = []
    for item in [p for p in plan.params if p.role != "bias"]:
        value = g.to_array(inits[item.tensor]).astype(np.float64)
        if item.scale_from is not None:
            partner = activations[item.scale_from]
            scale = np.asarray(partner.scale, np.float32)
            ints = th.quantize_to_int(value, scale, partner.bits, partner.signed)
            clipped = int(np.sum(np.abs(ints * np.float64(scale) - value) > np.float64(scale)))
            resolved.append(
                ParamQuant(item.tensor, item.node, item.input_index, "constant", partner.bits, None,
                           scale, ints.astype(numpy_container(partner.elem_type)), partner.elem_type, clipped)
            )
            continue
        thresholds = th.weight_thresholds(value, item.axis, item.bits, method)
        raised = 0
        bias = bias_of.get((item.node, item.tensor))
        if bias is not None:
            thresholds, raised = _fit_bias(thresholds, bias, g.to_array(inits[bias.tensor]), activations, item.bits)
        scale = th.scale_for(thresholds, item.bits, signed=True)
        steps = th.along(scale, item.axis, value.ndim)
        if (sum_rounding and item.axis is not None and item.role == "weight"
                and spec(item.op_type).sums_weights):
            ints = th.quantize_preserving_sums(value, steps, item.bits, item.axis)
        else:
            ints = th.quantize_to_int(value, steps, item.bits, True)
        if item.op_type == "Div" and item.input_index == 1 and np.any((ints == 0) & (value != 0)):
            raise QuantizationError(
                f"divisor {item.tensor} of node {item.node} has entries that quantize to 0",
                "rewrite the division as a multiplication by the reciprocal before export",
            )
        elem_type = _elem_type(item.bits, True, int4_types)
        weight_scales[(item.node, item.tensor)] = scale
        resolved.append(
            ParamQuant(item.tensor, item.node, item.input_index, item.role, item.bits, item.axis,
                       scale, ints.astype(np.int8), elem_type, raised=raised)
        )

    for item in [p for p in plan.params if p.role == "bias"]:
        value = g.to_array(inits[item.tensor]).astype(np.float64)
        input_scale = np.float64(activations[item.data_input].scale)  # type: ignore[index]
        if (item.node, item.weight) in weight_scales:
            w_scale = np.tile(weight_scales[(item.node, item.weight)].astype(np.float64), item.repeat)
        else:  # the weight is an activation: one scale
            w_scale = np.asarray(activations[item.weight].scale, np.float64)  # type: ignore[index]
        scale = (input_scale * w_scale).astype(np.float32)  # product of powers of two: exact
        axis: int | None = None
        if scale.size > 1:
            if value.size == 1:
                value = np.full((scale.size,), float(value.reshape(-1)[0]))
            axis = int(np.argmax(np.array(value.shape) == scale.size)) if value.ndim > 1 else 0
        else:
            scale = scale.reshape(())
        ints, clipped = round_bias(value / th.along(scale.astype(np.float64), axis, value.ndim),
                                   plan.bias_bits)
        if clipped:
            worst = float(np.max(np.abs(value)))
            why = (
                "even at the largest weight threshold" if (item.node, item.weight) in weight_scales
                else "and the weight is an activation whose scale cannot grow for it"
            )
            _LOG.warning(
                "bias %s of node %s: %d value(s) exceed int%d at scale input x weight "
                "(largest |bias| %.4g) %s; clipped",
                item.tensor, item.node, clipped, plan.bias_bits, worst, why,
            )
        resolved.append(
            ParamQuant(item.tensor, item.node, item.input_index, "bias", plan.bias_bits, axis,
                       scale, ints, onnx.TensorProto.INT32, clipped)
        )
    # Restore graph order (weights, biases and constants of one node together).
    position = {(p.node, p.input_index): n for n, p in enumerate(plan.params)}
    resolved.sort(key=lambda p: position[(p.node, p.input_index)])
    return ResolvedPlan(activations, tuple(resolved), plan.graph_input, plan.graph_outputs, plan.fused)


def _fit_bias(
    thresholds: np.ndarray, bias: ParamMark, value: np.ndarray,
    activations: Mapping[str, ActivationQuant], weight_bits: int,
) -> tuple[np.ndarray, int]:
    """``thresholds`` of a weight raised where its layer's bias would not fit, and how many rose."""
    channels = bias.channels or value.size
    per_channel = np.broadcast_to(value.reshape(-1), (channels,)) if value.size == 1 else value.reshape(-1)
    slots = thresholds.size
    if per_channel.size != slots * (bias.repeat if slots > 1 else per_channel.size):
        return thresholds, 0  # a bias the weight scales do not cover channel for channel
    input_scale = activations[bias.data_input].scale  # type: ignore[index]
    floor = th.bias_fit_thresholds(per_channel, input_scale, weight_bits, bias.bits, slots)
    raised = int(np.sum(floor.reshape(thresholds.shape) > thresholds))
    if raised:
        _LOG.info(
            "weight %s of node %s: %d scale(s) raised so the int%d bias fits (largest |bias| %.4g)",
            bias.weight, bias.node, raised, bias.bits, float(np.max(np.abs(per_channel))),
        )
    return np.maximum(thresholds, floor.reshape(thresholds.shape)), raised
