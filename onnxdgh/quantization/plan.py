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
   biases. This is the one place where a weight scale is chosen (emit writes it, the
   shift correction and the rounding optimisation read it): the HPTQ threshold per
   output channel, raised (still a power of two) where the channel's bias would not fit
   int32 at ``input scale x weight scale`` (:func:`~.thresholds.bias_fit_thresholds`),
   so a bias is never clipped. Only a bias whose weight is an activation (one scale
   the bias cannot move) can still be clipped, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx

from .. import graph as g
from ..errors import QuantizationError
from ..ops import (
    ACTIVATIONS,
    NON_NEGATIVE_OUTPUT,
    QDQ_OPS,
    SHAPE_INPUT_INDICES,
    VALUE_PRESERVING,
    WEIGHTED,
    GATES,
    gated_activation,
    is_gate_partner,
    is_value_preserving,
)
from ..profile import Profile
from . import thresholds as th
from .calibrate import TensorStats

__all__ = [
    "COMPUTE_OPS",
    "ActivationMark",
    "ParamMark",
    "QuantPlan",
    "ActivationQuant",
    "ParamQuant",
    "ResolvedPlan",
    "float_tensors",
    "mark",
    "resolve",
]

_LOG = logging.getLogger(__name__)

COMPUTE_OPS: frozenset[str] = (
    WEIGHTED
    | ACTIVATIONS
    | frozenset(
        {
            "Add",
            "Sub",
            "Mul",
            "Div",
            "Abs",
            "Neg",
            "AveragePool",
            "GlobalAveragePool",
            "GlobalMaxPool",
            "ReduceMean",
            "ReduceMax",
            "Softmax",
            "Resize",
            "Concat",
        }
    )
)
"""Ops whose output gets its own quantizer (threshold from calibration statistics).

Together with the value-preserving ops of :mod:`onnxdgh.ops` (which inherit their
input's quantizer, or get their own when their attributes break value preservation)
these are the ops the quantizer handles."""

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

    def group_index(self) -> dict[str, int]:
        """The group number of each marked tensor."""
        return {name: index for index, members in enumerate(self.groups) for name in members}


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self.parent.setdefault(name, name)

    def find(self, name: str) -> str:
        self.add(name)
        root = name
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[name] != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

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


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"{node.op_type}_{index}"


def _constant_input(node: onnx.NodeProto, index: int, inits: Mapping[str, onnx.TensorProto]) -> np.ndarray | None:
    if index < len(node.input) and node.input[index] in inits:
        return g.to_array(inits[node.input[index]])
    return None


def _non_negative(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    if node.op_type in NON_NEGATIVE_OUTPUT:
        return True
    if node.op_type == "Clip":
        low = _constant_input(node, 1, inits)
        if low is None:
            attrs = g.node_attributes(node)
            low_attr = attrs.get("min")
            return low_attr is not None and float(low_attr) >= 0.0  # type: ignore[arg-type]
        return bool(np.all(low >= 0))
    return False


def _preserves_values(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    if not is_value_preserving(node.op_type, g.node_attributes(node)):
        return False
    if node.op_type == "Pad":
        fill = _constant_input(node, 2, inits)
        if len(node.input) > 2 and node.input[2] and fill is None:
            return False  # a computed pad value may fall off the grid
        if fill is not None and np.any(fill != 0):
            return False
    return True


def _weight_axis(node: onnx.NodeProto, weight: np.ndarray) -> int | None:
    """Output-channel axis of a weight initializer, or None for a vector/scalar weight."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 1
    if op == "Gemm":
        return 0 if int(g.node_attributes(node).get("transB", 0)) else 1  # type: ignore[arg-type]
    if weight.ndim < 2:
        return None
    return weight.ndim - 1  # MatMul: (..., K, N)


def _output_channels(node: onnx.NodeProto, weight: np.ndarray) -> int:
    op = node.op_type
    if op == "ConvTranspose":
        group = int(g.node_attributes(node).get("group", 1))  # type: ignore[arg-type]
        return int(weight.shape[1]) * group
    axis = _weight_axis(node, weight)
    return int(weight.shape[axis]) if axis is not None else 1


def mark(
    model: onnx.ModelProto,
    profile: Profile,
    *,
    weight_bits: int,
    act_bits: int,
    per_channel: bool,
    grid_pads: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Mark every tensor of the BN-folded float ``model`` that needs a quantizer.

    ``grid_pads``: labels of constant-mode Pad nodes whose fill value is known to lie on
    their input's grid (the shift negative correction's); they inherit their input's
    quantizer like a zero-padding Pad, where any other non-zero fill gets its own.

    Raises:
        QuantizationError: an op the quantizer cannot handle, an op ``profile`` does not
            allow, an already quantized model, or a constant input that cannot be quantized.
    """
    graph = model.graph
    inits = g.initializer_map(graph)
    consumers = g.consumer_map(graph)
    outputs = g.graph_output_names(graph)
    output_set = set(outputs)
    inputs = g.graph_input_names(graph)
    if len(inputs) != 1:
        raise QuantizationError(
            f"the model has {len(inputs)} graph inputs; the quantizer needs exactly one image input",
            "export the model with a single N x C x H x W input",
        )
    image = inputs[0]
    floats = float_tensors(model)
    per_channel = per_channel and profile.per_channel_weights
    allow_unsigned = "unsigned" in profile.activation_signedness
    if "signed" not in profile.weight_signedness:
        raise QuantizationError(
            f"profile {profile.name!r} allows only unsigned weights; onnxdgh quantizes weights signed and symmetric",
            "use a profile whose weight_signedness lists \"signed\"",
        )
    const_bits = profile.max_weight_bits

    marks: dict[str, ActivationMark] = {image: ActivationMark(image, "graph_input", None, None, False)}
    order: list[str] = [image]
    params: list[ParamMark] = []
    fused: list[tuple[str, str, str]] = []
    fused_tensors: set[str] = set()
    union = _UnionFind()
    union.add(image)
    shared_constants: list[tuple[str, int, str]] = []  # (node label, input index, partner activation)

    labels = {id(node): _node_label(node, index) for index, node in enumerate(graph.node)}
    for node in graph.node:
        label = labels[id(node)]
        op = node.op_type
        float_outs = [name for name in node.output if name and name in floats]
        if op in QDQ_OPS:
            raise QuantizationError(
                f"node {label} is a {op}: the model is already quantized",
                "give onnxdgh the float model (before any quantization)",
            )
        if not float_outs:
            continue  # shape/index arithmetic: nothing to quantize
        if node.domain not in ("", "ai.onnx"):
            raise QuantizationError(
                f"cannot quantize op {node.domain}.{op} (node {label}): custom-domain ops are not supported",
                "re-export the model with standard ONNX ops",
            )
        supported = op in COMPUTE_OPS or op in VALUE_PRESERVING
        if not supported:
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

        shape_inputs = SHAPE_INPUT_INDICES.get(op, frozenset())
        data_inputs: list[str] = []
        constant_inputs: list[tuple[int, str]] = []
        for position, name in enumerate(node.input):
            if not name or position in shape_inputs or name not in floats:
                continue
            if name in inits:
                constant_inputs.append((position, name))
            else:
                data_inputs.append(name)
        for name in data_inputs:
            if name not in marks and name not in fused_tensors:
                raise QuantizationError(  # would be a float island; should not happen on a sorted graph
                    f"input {name} of node {label} ({op}) has no quantizer",
                    "report this model to the onnxdgh developers",
                )

        weighted = op in WEIGHTED
        weight_array = _constant_input(node, 1, inits) if weighted else None
        for position, name in constant_inputs:
            value = g.to_array(inits[name])
            if weighted and position == 1:
                axis = _weight_axis(node, value) if per_channel else None
                params.append(ParamMark(name, label, op, position, "weight", weight_bits, axis))
            elif weighted and position == 2 and op in ("Conv", "ConvTranspose", "Gemm"):
                data = node.input[0]
                if data not in marks:
                    raise QuantizationError(
                        f"the data input {data} of node {label} ({op}) is not quantized, so its bias has no scale",
                        "remove the fused pattern that ends at this op from the profile",
                    )
                weight_name = node.input[1]
                channels = _output_channels(node, weight_array) if weight_array is not None else None
                if op == "Gemm" and channels is not None and value.size not in (1, channels):
                    params.append(ParamMark(name, label, op, position, "constant", const_bits, None))
                    continue
                repeat = 1
                if op == "ConvTranspose" and per_channel and weight_array is not None:
                    repeat = int(g.node_attributes(node).get("group", 1))  # type: ignore[arg-type]
                params.append(
                    ParamMark(
                        name, label, op, position, "bias", profile.bias_bits, None,
                        data_input=data, weight=weight_name, repeat=repeat, channels=channels,
                    )
                )
            else:
                params.append(ParamMark(name, label, op, position, "constant", const_bits, None))
                if op in profile.shared_scale_ops or op in profile.shared_input_scale_ops:
                    if data_inputs:
                        shared_constants.append((label, position, data_inputs[0]))

        # The outputs' quantizers.
        if len(float_outs) == 1 and op not in VALUE_PRESERVING:
            out = float_outs[0]
            readers = consumers.get(out, [])
            if (
                out not in output_set
                and len(readers) == 1
                and list(readers[0].input).count(out) == 1
                and profile.is_fused(op, readers[0].op_type)
                and (op not in GATES or readers[0].op_type != "Mul" or is_gate_partner(node, readers[0]))
            ):
                fused_tensors.add(out)
                reader_label = labels[id(readers[0])]
                fused.append((label, reader_label, out))
                continue
            pair = gated_activation(out, readers)
            if (
                out not in output_set
                and pair is not None
                and profile.is_fused(op, pair[0].op_type)
                and profile.is_fused(pair[0].op_type, "Mul")
            ):
                # Conv -> SiLU as Sigmoid + Mul(x, Sigmoid(x)): x feeds both halves of one
                # activation, which the profile fuses behind the producer.
                fused_tensors.add(out)
                fused.append((label, labels[id(pair[0])], out))
                continue
        inherits = bool(data_inputs) and data_inputs[0] in marks and (
            _preserves_values(node, inits)
            or (op == "Pad" and label in grid_pads)
            or (op == "Concat" and op in profile.shared_scale_ops)
        )
        # A value-preserving op that only moves a constant (an exporter's Reshape of a bias
        # to 1 x C x 1 x 1): its outputs are the constant's values, so constant and outputs
        # share one scale, found from the constant itself (no statistics needed).
        moves_constant = not data_inputs and bool(constant_inputs) and _preserves_values(node, inits)
        if moves_constant:
            shared_constants.extend((label, position, float_outs[0]) for position, _name in constant_inputs)
        unsigned = _non_negative(node, inits)
        for out in float_outs:
            marks[out] = ActivationMark(out, "inherited" if inherits or moves_constant else "own", label, op, unsigned)
            order.append(out)
            union.add(out)
            if inherits:
                union.union(data_inputs[0], out)
            if moves_constant:
                union.union(float_outs[0], out)
        if op in profile.shared_scale_ops or op in profile.shared_input_scale_ops:
            quantized_inputs = [name for name in data_inputs if name in marks]
            for name in quantized_inputs[1:]:
                union.union(quantized_inputs[0], name)
            if op in profile.shared_scale_ops and quantized_inputs:
                for out in float_outs:
                    union.union(quantized_inputs[0], out)

    if shared_constants:
        params = [_share(item, shared_constants) for item in params]
    return QuantPlan(
        activations=marks,
        params=tuple(params),
        groups=union.groups(order),
        fused=tuple(fused),
        graph_input=image,
        graph_outputs=tuple(outputs),
        act_bits=act_bits,
        weight_bits=weight_bits,
        const_bits=const_bits,
        per_channel=per_channel,
        allow_unsigned=allow_unsigned,
        bias_bits=profile.bias_bits,
    )


def _share(item: ParamMark, shared: list[tuple[str, int, str]]) -> ParamMark:
    for label, position, partner in shared:
        if item.node == label and item.input_index == position and item.role == "constant":
            return ParamMark(
                item.tensor, item.node, item.op_type, item.input_index, "constant", item.bits, None, scale_from=partner
            )
    return item


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
        acts = [
            {
                "tensor": item.tensor,
                "bits": item.bits,
                "signed": item.signed,
                "threshold": item.threshold,
                "scale": item.scale,
                "group": item.group,
                "source": item.source,
            }
            for item in self.activations.values()
        ]
        params = [
            {
                "tensor": item.tensor,
                "node": item.node,
                "role": item.role,
                "bits": item.bits,
                "axis": item.axis,
                "per_channel": item.scale.size > 1,
                "scale_min": float(item.scale.min()),
                "scale_max": float(item.scale.max()),
                "clipped": item.clipped,
                "raised_for_bias": item.raised,
            }
            for item in self.params
        ]
        return {
            "activations": acts,
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


def _act_elem_type(bits: int, signed: bool, int4_types: bool) -> int:
    if int4_types and bits <= 4:
        return onnx.TensorProto.INT4 if signed else onnx.TensorProto.UINT4
    return onnx.TensorProto.INT8 if signed else onnx.TensorProto.UINT8


def activation_threshold(stats: TensorStats, bits: int, signed: bool, method: str) -> float:
    """The power-of-two threshold ``method`` ("mse" or "noclip") gives one activation's statistics."""
    if method == "mse":
        return th.histogram_mse_threshold(
            stats.histogram.counts, stats.histogram.sums, stats.minimum, stats.maximum, bits, signed
        )
    return float(th.noclip_threshold(stats.minimum, stats.maximum, bits, signed))


OUTPUT_NOCLIP_BITS = 8
"""From this activation width on, graph outputs take the no-clipping threshold (see ``resolve``)."""

_SUM_ROUNDED_OPS = ("Conv", "Gemm", "MatMul")
"""Ops whose output channel sums all its weights for a constant input (a ConvTranspose with
stride > 1 does not: each output position sees only some taps)."""


def resolve(
    plan: QuantPlan,
    stats: Mapping[str, TensorStats],
    model: onnx.ModelProto,
    *,
    method: str,
    int4_types: bool = False,
    sum_rounding: bool = False,
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
    group_of = plan.group_index()
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
        # A graph output's largest values are what is read from it (a classifier's top-1 logit): at 8
        # bits it is not clipped to the calibration images' MSE optimum, which synthetic images can put
        # below the real top logits (EfficientNet-Lite0, DGH: 8 instead of 16; docs/BENCHMARKS.md, depthwise).
        rule = "noclip" if bits >= OUTPUT_NOCLIP_BITS and any(name in plan.graph_outputs for name in members) else method
        candidates = [activation_threshold(stats[name], bits, signed, rule) for name in measured]
        candidates += [float(th.noclip_threshold(value.min(), value.max(), bits, signed)) for value in constants]
        threshold = max(candidates) if candidates else th.ZERO_RANGE_THRESHOLD
        scale = float(th.scale_for(threshold, bits, signed))
        elem_type = _act_elem_type(bits, signed, int4_types)
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
                           scale, ints.astype(_numpy_container(partner.elem_type)), partner.elem_type, clipped)
            )
            continue
        thresholds = th.weight_thresholds(value, item.axis, item.bits, method)
        raised = 0
        bias = bias_of.get((item.node, item.tensor))
        if bias is not None:
            thresholds, raised = _fit_bias(thresholds, bias, g.to_array(inits[bias.tensor]), activations, item.bits)
        scale = th.scale_for(thresholds, item.bits, signed=True)
        if item.axis is None:
            ints = th.quantize_to_int(value, scale, item.bits, True)
        elif sum_rounding and item.role == "weight" and item.op_type in _SUM_ROUNDED_OPS:
            shape = [1] * value.ndim
            shape[item.axis] = -1
            ints = th.quantize_preserving_sums(value, scale.reshape(shape), item.bits, item.axis)
        else:
            shape = [1] * value.ndim
            shape[item.axis] = -1
            ints = th.quantize_to_int(value, scale.reshape(shape), item.bits, True)
        if item.op_type == "Div" and item.input_index == 1 and np.any((ints == 0) & (value != 0)):
            raise QuantizationError(
                f"divisor {item.tensor} of node {item.node} has entries that quantize to 0",
                "rewrite the division as a multiplication by the reciprocal before export",
            )
        elem_type = onnx.TensorProto.INT4 if (int4_types and item.bits <= 4) else onnx.TensorProto.INT8
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
            channels = scale.size
            if value.size == 1:
                value = np.full((channels,), float(value.reshape(-1)[0]))
            axis = int(np.argmax(np.array(value.shape) == channels)) if value.ndim > 1 else 0
            shape = [1] * value.ndim
            shape[axis] = -1
            ratio = value / scale.astype(np.float64).reshape(shape)
        else:
            scale = scale.reshape(())
            ratio = value / np.float64(scale)
        ints, clipped = round_bias(ratio, plan.bias_bits)
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
    thresholds: np.ndarray,
    bias: ParamMark,
    value: np.ndarray,
    activations: Mapping[str, ActivationQuant],
    weight_bits: int,
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


def _numpy_container(elem_type: int) -> type:
    return {
        onnx.TensorProto.INT8: np.int8,
        onnx.TensorProto.UINT8: np.uint8,
        onnx.TensorProto.INT4: np.int8,
        onnx.TensorProto.UINT4: np.uint8,
    }[elem_type]
