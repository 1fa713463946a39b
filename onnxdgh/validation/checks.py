"""Structural checks of a quantized ONNX QDQ model against a constraint profile.

Contract:
* :func:`analyse` reads a QDQ graph into a :class:`QuantGraph`: every QuantizeLinear /
  DequantizeLinear with its constant scale, zero point, integer type and role
  (activation, weight, bias), traced by structure (DQ <- Q <- source tensor), not by
  tensor names.
* :func:`check_model` returns one :class:`Violation` per broken rule instance, each
  naming the rule id (stable strings, see :data:`RULES` and ``docs/VALIDATE.md``), the
  node, the tensor and what is wrong. It never raises for a rule the model breaks; an
  empty list means the graph is what the profile's hardware accepts.
* Nothing here mutates the model.

The rules mirror how the quantizer builds the graph (HPTQ, ALGORITHMS.md section 2):
model inputs go through Q->DQ first, every compute op reads dequantized values except
the second op of a fused pattern (one hardware op; for a fused gated activation
``[P, "Sigmoid", "Mul"]`` both the gate and its Mul read P's output) and the quantizer's
range-restricting ``Clip`` right before a QuantizeLinear, scales are powers of two with zero point 0,
int32 biases carry ``input_scale * weight_scale``, value-preserving ops keep their
input's scale and shared-scale ops (Concat) have one scale on all inputs and the output.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from .. import graph as g
from ..ops import (
    INTEGER_TYPES,
    gated_activation,
    is_gate_partner,
    is_value_preserving,
    written_out_ops,
    output_bounds,
    spec,
)
from ..profile import Profile
from ..quantization.float_weights import restore_quantized_weights
from ..quantization.thresholds import grid

__all__ = [
    "RULES",
    "Violation",
    "QParams",
    "QuantGraph",
    "analyse",
    "check_model",
    "integer_type_info",
]

_LOG = logging.getLogger(__name__)

RULES: dict[str, str] = {
    "opset-range": "the model's default-domain opset lies within the profile's opset_min..opset_max",
    "graph-input-not-quantized": "every graph input is read only by QuantizeLinear (or a range Clip feeding one)",
    "graph-output-not-dequantized": "every graph output is produced by DequantizeLinear",
    "float-input-not-dequantized": (
        "every float data input of every compute op comes from DequantizeLinear (except the second "
        "op of a fused pattern, the Mul of a fused gated activation, a range Clip that feeds only "
        "QuantizeLinear, and the inner tensors and constants of an op written out as several nodes -- "
        "LayerNorm as ReduceMean, Sub, Pow 2, ReduceMean, Add eps, Sqrt, Div; HardSwish as "
        "x * Clip(x + 3, 0, 6) / 6 -- where the profile allows that op)"
    ),
    "qdq-pair-mismatch": "a DequantizeLinear reading a QuantizeLinear uses the same scale, zero point and type",
    "scale-not-power-of-two": "every Q/DQ scale is a constant, positive, exact power of two",
    "zero-point-not-zero": "every Q/DQ zero point is a constant 0 (or absent)",
    "activation-bits": "activation quantizers use an integer type and a bit width the profile allows",
    "activation-signedness": "activation quantizers are signed/unsigned as the profile allows",
    "per-channel-activations": "activation quantizers are per tensor (one scale)",
    "weight-bits": "stored weight integers fit the profile's widest weight width; sub-byte types are allowed widths",
    "weight-signedness": "weights are stored signed/unsigned as the profile allows",
    "per-channel-weights": "weights have one scale per tensor unless the profile allows per-channel weights",
    "bias-bits": "biases of weighted ops are stored as int32 values within bias_bits",
    "bias-scale": "a bias scale equals input scale x weight scale (per channel)",
    "batchnorm-left": "no BatchNormalization remains (it must be folded before quantization)",
    "op-not-allowed": "every op type is in the profile's allowed_ops (Q/DQ always are)",
    "fused-pattern-branch": (
        "the inner tensor of a fused pattern feeds only the next op of the pattern (and, for a gated "
        "activation, the gate's Mul)"
    ),
    "shared-scale": (
        "ops in shared_scale_ops use one scale for all data inputs and the output; ops in "
        "shared_input_scale_ops use one scale for all data inputs"
    ),
    "value-preserving-scale": "a value-preserving op's output quantizer has its input's scale",
    "weight-off-grid": (
        "in the float-grid flavour (--weights-as-float), every recorded float constant is a whole number of "
        "steps of its recorded power-of-two scale within its recorded integer type"
    ),
    "pad-value-off-grid": (
        "a constant-mode Pad that reads a quantized tensor fills with a value on that tensor's grid "
        "(a whole number of its steps within its integer range)"
    ),
}
"""Rule id -> one-line statement of what the rule requires."""

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Ops that read only a tensor's shape, never its values: nothing to quantize.
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})

_TP = onnx.TensorProto
_FLOAT_TYPES = (_TP.FLOAT, _TP.FLOAT16, _TP.DOUBLE, _TP.BFLOAT16)


def integer_type_info(elem_type: int | None) -> tuple[str, int, bool] | None:
    """``(name, bits, signed)`` for an integer ONNX elem type a Q/DQ can carry, else None."""
    return None if elem_type is None else INTEGER_TYPES.get(elem_type)


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` id, the ``node`` and ``tensor`` concerned, and what is wrong."""

    rule: str
    node: str | None
    tensor: str | None
    message: str

    def to_dict(self) -> dict[str, str | None]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class QParams:
    """A QuantizeLinear or DequantizeLinear node's quantization parameters.

    ``scale``/``zero_point`` are None when not a constant. ``role`` is ``activation``
    (quantizes a computed tensor), ``weight`` (dequantizes a constant), ``bias`` (a
    constant feeding input 2 of a Conv/ConvTranspose/Gemm) or ``other``. ``source`` is the
    float tensor this quantizer stands for (through a range Clip), ``bits`` the effective
    width (container width, or the narrower grid a range Clip restricts it to).
    """

    node: str
    op_type: str
    input: str
    output: str
    role: str
    scale: np.ndarray | None = field(repr=False)
    zero_point: np.ndarray | None = field(repr=False)
    elem_type: int | None
    bits: int | None
    signed: bool | None
    source: str | None = None
    clip_node: str | None = None

    @property
    def per_tensor(self) -> bool:
        """True when the scale is one value."""
        return self.scale is None or self.scale.size == 1

    @property
    def type_name(self) -> str:
        """The integer type's name, e.g. ``int8``."""
        if self.elem_type is None:
            return "unknown type"
        info = integer_type_info(self.elem_type)
        if info:
            return info[0]
        try:
            name = onnx.helper.tensor_dtype_to_string(self.elem_type)
        except (KeyError, ValueError):
            return f"type {self.elem_type}"
        return name.replace("TensorProto.", "").lower()


class QuantGraph(g.GraphView):
    """A QDQ graph read for checking: the graph view plus every quantizer; see :func:`analyse`."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__(model)
        self.opset = g.opset_version(model)
        try:
            typed = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception as exc:  # untypeable tensors are then treated as float (the strict choice)
            _LOG.info("shape inference failed during validation: %s", exc)
            typed = model
        self.elem_types = g.tensor_elem_types(typed.graph)
        self.quantizers: dict[int, QParams] = {}
        # Q first: the types of Q outputs are needed to type DQ inputs.
        for op_type, read in (("QuantizeLinear", self._read_q),
                              ("DequantizeLinear", self._read_dq)):
            self.quantizers.update((id(node), read(node)) for node in self.graph.node
                                   if node.op_type == op_type and node.domain in _DEFAULT_DOMAINS)

    # ------------------------------------------------------------ lookups

    def dq_for(self, tensor: str) -> QParams | None:
        """The DequantizeLinear producing ``tensor``, if one does."""
        node = self.producers.get(tensor)
        if node is None or node.op_type != "DequantizeLinear":
            return None
        return self.quantizers.get(id(node))

    def q_consumers(self, tensor: str) -> list[QParams]:
        """QuantizeLinear nodes reading ``tensor``."""
        found = (self.quantizers.get(id(node)) for node in self.readers(tensor))
        return [p for p in found if p is not None and p.op_type == "QuantizeLinear"]

    def is_range_clip(self, node: onnx.NodeProto) -> bool:
        """The quantizer's sub-8-bit range restriction: a ``Clip`` that feeds only QuantizeLinear
        nodes and whose bounds span exactly 2^b steps of their scale.

        A Clip that merely happens to precede a quantizer (Relu6 = Clip(0, 6)) is a compute op.
        """
        if node.op_type != "Clip" or node.output[0] in self.output_set:
            return False
        users = self.readers(node.output[0])
        return bool(users) and all(
            user.op_type == "QuantizeLinear"
            and (scale := self.input_constant(user, 1)) is not None
            and scale.size == 1
            and self._clip_bits(node, float(scale.reshape(-1)[0])) is not None
            for user in users
        )

    def activation_dequantizers(self) -> list[QParams]:
        """DequantizeLinear nodes of computed tensors (their Q's input is not a constant), in graph order."""
        return [
            params
            for node in self.graph.node
            if (params := self.quantizers.get(id(node))) is not None
            and params.op_type == "DequantizeLinear"
            and params.role == "activation"
        ]

    def weight_bits_summary(self) -> dict[str, int]:
        """How many weight tensors store values needing each bit width (``{"8": 5, "4": 1}``)."""
        return _by_bits(
            _value_bits(values, p.signed)
            for p in self.quantizers.values()
            if p.op_type == "DequantizeLinear" and p.role == "weight" and p.signed is not None
            and (values := self.constant(p.input)) is not None
        )

    def activation_bits_summary(self) -> dict[str, int]:
        """How many activation quantizers use each effective bit width."""
        return _by_bits(
            p.bits
            for p in self.quantizers.values()
            if p.op_type == "QuantizeLinear" and p.role == "activation" and p.bits is not None
        )

    # ------------------------------------------------------------ reading Q/DQ

    def _read_q(self, node: onnx.NodeProto) -> QParams:
        scale = self.input_constant(node, 1)
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if zero_point:
            elem_type: int | None = (self.constant_type(zero_point)
                                     or self.elem_types.get(zero_point))
        else:
            # Without a zero point the output type is output_dtype (opset 21) or uint8.
            elem_type = (int(g.attribute(node, "output_dtype", 0))  # type: ignore[call-overload]
                         or _TP.UINT8)
        _name, bits, signed = integer_type_info(elem_type) or (None, None, None)
        source, clip_name = node.input[0], None
        producer = self.producers.get(source)
        if producer is not None and self.is_range_clip(producer) and scale is not None and scale.size == 1:
            narrowed = self._clip_bits(producer, float(scale.reshape(-1)[0]))
            if narrowed is not None and bits is not None and narrowed < bits:
                bits = narrowed
            source, clip_name = producer.input[0], self.label(producer)
        role = "weight" if self.is_constant(node.input[0]) else "activation"
        return QParams(self.label(node), node.op_type, node.input[0], node.output[0], role, scale,
                       self.input_constant(node, 2), elem_type, bits, signed, source, clip_name)

    def _clip_bits(self, clip: onnx.NodeProto, scale: float) -> int | None:
        """The grid width a Clip before a Q restricts to: log2((hi - lo)/scale + 1), when exact."""
        bounds = output_bounds("Clip", g.node_attributes(clip), clip.input, self.constant)
        if bounds is None or not all(map(math.isfinite, bounds)) or scale <= 0:
            return None
        lo, hi = bounds
        levels = (hi - lo) / scale + 1.0
        if levels < 2:
            return None
        bits = math.log2(levels)
        # Only a Clip exactly on a 2^b-level grid is a bit-width restriction; a Relu6-style
        # Clip(0, 6) before an 8-bit quantizer is an activation, and its range says nothing.
        if abs(bits - round(bits)) > 1e-6 or abs(levels - round(levels)) > 1e-3:
            return None
        return int(round(bits))

    def _read_dq(self, node: onnx.NodeProto) -> QParams:
        tensor = node.input[0]
        constant_type = self.constant_type(tensor)
        producer = self.producers.get(tensor)
        q_params = self.quantizers.get(id(producer)) if producer is not None else None
        zero_point = node.input[2] if len(node.input) > 2 else ""
        elem_type: int | None
        if constant_type is not None:
            elem_type, source = constant_type, tensor
            role = "bias" if self._feeds_bias(node.output[0]) else "weight"
        elif q_params is not None:
            elem_type, role, source = q_params.elem_type, q_params.role, q_params.source
        else:
            role, source = "other", None
            if zero_point and self.is_constant(zero_point):
                elem_type = self.constant_type(zero_point)
            else:
                elem_type = self.elem_types.get(tensor)
        info = integer_type_info(elem_type)
        bits = q_params.bits if q_params is not None else (info[1] if info else None)
        return QParams(self.label(node), node.op_type, tensor, node.output[0], role,
                       self.input_constant(node, 1), self.input_constant(node, 2), elem_type, bits,
                       info[2] if info else None, source, q_params.clip_node if q_params else None)

    def _feeds_bias(self, tensor: str) -> bool:
        users = self.readers(tensor)
        return bool(users) and all(
            (bias := spec(user.op_type).bias) is not None
            and len(user.input) > bias
            and user.input[bias] == tensor
            and tensor not in user.input[:bias]
            for user in users
        )


def analyse(model: onnx.ModelProto) -> QuantGraph:
    """Read ``model``'s Q/DQ structure (the model is not changed).

    A ``--weights-as-float`` model is read as the integer + DequantizeLinear model its grid
    record describes (:func:`~onnxdgh.quantization.float_weights.restore_quantized_weights`).
    """
    return QuantGraph(restore_quantized_weights(model)[0])


# --------------------------------------------------------------------- helpers


def _by_bits(widths: Iterable[int]) -> dict[str, int]:
    counts = Counter(widths)
    return {str(bits): counts[bits] for bits in sorted(counts)}


def _is_power_of_two(values: np.ndarray) -> bool:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    if flat.size == 0 or not np.all(np.isfinite(flat)) or np.any(flat <= 0):
        return False
    mantissa, _ = np.frexp(flat)
    return bool(np.all(mantissa == 0.5))


def _value_bits(values: np.ndarray, signed: bool) -> int:
    """The narrowest two's-complement (signed) or plain (unsigned) width holding ``values``."""
    flat = np.asarray(values).astype(np.int64).reshape(-1)
    if flat.size == 0:
        return 1
    low, high = int(flat.min()), int(flat.max())
    if not signed:
        return max(1, high.bit_length())
    return 1 + max(max(high, 0).bit_length(), max(-low - 1, 0).bit_length())


def _fmt(values: np.ndarray | None) -> str:
    if values is None:
        return "a computed value"
    flat = np.asarray(values).reshape(-1)
    if flat.size == 1:
        return f"{float(flat[0]):.9g}"
    return f"[{', '.join(f'{float(v):.6g}' for v in flat[:4])}{', ...' if flat.size > 4 else ''}] ({flat.size} values)"


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a64, b64 = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
    if a64.size != b64.size and min(a64.size, b64.size) != 1:
        return False
    return bool(np.allclose(a64, b64, rtol=1e-6, atol=0.0))


def _data_inputs(node: onnx.NodeProto) -> list[str]:
    skip = spec(node.op_type).shape_inputs
    return [name for index, name in enumerate(node.input) if name and index not in skip]


# ---------------------------------------------------------------------- checks


def check_model(model: onnx.ModelProto, profile: Profile, *, qgraph: QuantGraph | None = None) -> list[Violation]:
    """Every rule instance ``model`` breaks under ``profile`` (empty: the graph conforms).

    ``qgraph`` may pass an already analysed graph of the same model.
    """
    q = qgraph or analyse(model)
    found: list[Violation] = [
        Violation("weight-off-grid", None, problem.tensor, problem.message)
        for problem in restore_quantized_weights(model)[1]
    ]
    for check in (
        _check_opset,
        _check_graph_inputs,
        _check_graph_outputs,
        _check_ops,
        _check_float_inputs,
        _check_qdq_params,
        _check_biases,
        _check_shared_scales,
        _check_value_preserving,
        _check_pad_values,
    ):
        found.extend(check(q, profile))
    _LOG.info("structural check against %s: %d violation(s)", profile.name, len(found))
    return found


def _check_opset(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    if q.opset is not None and not profile.opset_min <= q.opset <= profile.opset_max:
        yield Violation("opset-range", None, None,
                        f"the model uses opset {q.opset}; profile {profile.name} accepts opsets "
                        f"{profile.opset_min} to {profile.opset_max}")


def _check_graph_inputs(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for name in q.inputs:
        for user in q.readers(name):
            if user.op_type == "QuantizeLinear" or user.op_type in _SHAPE_ONLY_OPS or q.is_range_clip(user):
                continue
            yield Violation("graph-input-not-quantized", q.label(user), name,
                            f"graph input {name!r} is read by {user.op_type} {q.label(user)!r} "
                            "instead of QuantizeLinear")


def _check_graph_outputs(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for name in q.outputs:
        producer = q.producers.get(name)
        if producer is not None and producer.op_type == "DequantizeLinear":
            continue
        label, what = None, "no node (an input or constant)"
        if producer is not None:
            label = q.label(producer)
            what = f"{producer.op_type} {label!r}"
        yield Violation("graph-output-not-dequantized", label, name,
                        f"graph output {name!r} is produced by {what}, not by DequantizeLinear")


def _written_out_inside(q: QuantGraph, profile: Profile) -> dict[int, frozenset[str]]:
    """For each node of an op written out as several nodes that ``profile`` allows (LayerNorm,
    HardSwish): the float tensors it may read without Q/DQ (inner tensors and parameters)."""
    inside: dict[int, frozenset[str]] = {}
    for pattern in written_out_ops(q):
        if profile.allows_op(pattern.op):
            floats = frozenset((*pattern.inner, *pattern.parameters))
            inside.update((id(node), floats) for node in pattern.nodes)
    return inside


def _check_ops(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    written_out = _written_out_inside(q, profile)
    for node in q.graph.node:
        label, output = q.label(node), (node.output[0] if node.output else None)
        if node.op_type == "BatchNormalization":
            yield Violation("batchnorm-left", label, node.output[0],
                            f"BatchNormalization {label!r} is still in the graph; "
                            "fold it into the preceding Conv/Gemm")
        elif node.domain not in _DEFAULT_DOMAINS:
            yield Violation("op-not-allowed", label, output,
                            f"{node.domain}.{node.op_type} {label!r} is a custom-domain op; "
                            f"profile {profile.name} accepts standard ONNX ops only")
        # The range Clip before a QuantizeLinear is part of the quantizer (a narrower grid),
        # not a compute op the target must run.
        elif not (profile.allows_op(node.op_type) or q.is_range_clip(node)
                  or id(node) in written_out):
            yield Violation("op-not-allowed", label, output,
                            f"{node.op_type} {label!r} is not in the allowed ops of profile "
                            f"{profile.name}")


def _check_float_inputs(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    written_out = _written_out_inside(q, profile)
    for node in q.graph.node:
        # A range Clip feeding only QuantizeLinear is part of the quantizer (a narrower grid).
        if node.op_type in _QDQ or node.op_type in _SHAPE_ONLY_OPS or q.is_range_clip(node):
            continue
        for name in _data_inputs(node):
            # inside one op written out as several nodes, which the profile allows
            if name not in written_out.get(id(node), ()):
                yield from _check_float_input(q, profile, node, name)


def _check_float_input(
    q: QuantGraph, profile: Profile, node: onnx.NodeProto, name: str
) -> Iterator[Violation]:
    producer = q.producers.get(name)
    if producer is not None and producer.op_type == "DequantizeLinear":
        return
    label, op = q.label(node), node.op_type
    if producer is not None and producer.op_type == "QuantizeLinear":
        yield Violation("float-input-not-dequantized", label, name,
                        f"{op} {label!r} reads the integers {name!r} of QuantizeLinear "
                        f"{q.label(producer)!r} directly; a QDQ graph feeds compute ops through "
                        "DequantizeLinear")
    elif q.elem_types.get(name, _TP.FLOAT) not in _FLOAT_TYPES:
        return  # integer indices, booleans: not quantized values
    elif producer is None:
        what = "graph input" if name in q.inputs else "float constant"
        yield Violation("float-input-not-dequantized", label, name,
                        f"{op} {label!r} reads {what} {name!r} in float, "
                        "not through DequantizeLinear")
    elif not profile.is_fused(producer.op_type, op):
        if not _gated_mul_input(q, producer, node, name, profile):
            yield Violation("float-input-not-dequantized", label, name,
                            f"{op} {label!r} reads {name!r} from {producer.op_type} "
                            f"{q.label(producer)!r} without Q/DQ, and {producer.op_type}->{op} "
                            f"is no fused pattern of {profile.name}")
    elif spec(producer.op_type).gate and op == "Mul" and not is_gate_partner(producer, node):
        yield Violation("float-input-not-dequantized", label, name,
                        f"Mul {label!r} reads {producer.op_type} {q.label(producer)!r} without "
                        f"Q/DQ, but {producer.op_type}->Mul is fused only as a gated activation "
                        f"Mul(x, {producer.op_type}(x))")
    else:
        yield from _fused_branch(q, producer, node, name, profile)


def _gated_pair(q: QuantGraph, tensor: str, profile: Profile) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """The (gate, Mul) of a gated activation on ``tensor`` that ``profile`` fuses, else None."""
    pair = gated_activation(tensor, q.readers(tensor))
    return pair if pair is not None and profile.is_fused(pair[0].op_type, "Mul") else None


def _gated_mul_input(
    q: QuantGraph, producer: onnx.NodeProto, node: onnx.NodeProto, tensor: str, profile: Profile
) -> bool:
    """True when ``node`` is the Mul of a gated activation fused behind ``producer``: it
    reads ``tensor`` (the gate's input) inside the pattern ``[producer, gate, "Mul"]``."""
    pair = _gated_pair(q, tensor, profile)
    return pair is not None and pair[1] is node and profile.is_fused(producer.op_type, pair[0].op_type)


def _fused_branch(
    q: QuantGraph, producer: onnx.NodeProto, node: onnx.NodeProto, tensor: str, profile: Profile
) -> Iterator[Violation]:
    pair = _gated_pair(q, tensor, profile)
    partner = pair[1] if pair is not None and pair[0] is node else None  # the gate's Mul
    readers = [f"{user.op_type} {q.label(user)!r}" for user in q.readers(tensor)
               if user is not node and user is not partner]
    if tensor in q.output_set:
        readers.append("the graph output")
    if readers:
        yield Violation("fused-pattern-branch", q.label(producer), tensor,
                        f"{tensor!r} is inside the fused {producer.op_type}->{node.op_type} "
                        f"({q.label(producer)!r} -> {q.label(node)!r}) but is also read by "
                        f"{', '.join(readers)}; fused hardware never exposes it")


def _check_qdq_params(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for node in q.graph.node:
        params = q.quantizers.get(id(node))
        if params is None:
            continue
        name, tensor, what = params.node, params.input, f"{params.op_type} {params.node!r}"
        # Scale and zero point: every Q and DQ.
        if params.scale is None:
            yield Violation("scale-not-power-of-two", name, tensor,
                            f"{what} takes its scale from a computed tensor; "
                            "the target needs a constant")
        elif profile.power_of_two_scales and not _is_power_of_two(params.scale):
            yield Violation("scale-not-power-of-two", name, tensor,
                            f"{what} on {tensor!r} has scale {_fmt(params.scale)}, "
                            "not an exact power of two")
        if profile.zero_point_zero and len(node.input) > 2 and node.input[2]:
            if params.zero_point is None:
                yield Violation("zero-point-not-zero", name, tensor,
                                f"{what} takes its zero point from a computed tensor; it must be 0")
            elif np.any(np.asarray(params.zero_point).astype(np.int64) != 0):
                yield Violation("zero-point-not-zero", name, tensor,
                                f"{what} on {tensor!r} has zero point "
                                f"{_fmt(params.zero_point)}, not 0")
        if params.op_type == "DequantizeLinear":
            yield from _check_pair(q, node, params)
            if params.role == "weight":
                yield from _check_weight(q, params, profile)
        elif params.role == "activation":
            yield from _check_activation(params, profile)


def _check_pair(q: QuantGraph, node: onnx.NodeProto, params: QParams) -> Iterator[Violation]:
    producer = q.producers.get(node.input[0])
    if producer is None or producer.op_type != "QuantizeLinear" or id(producer) not in q.quantizers:
        return
    qp = q.quantizers[id(producer)]
    problems = []
    if not _same(qp.scale, params.scale):
        problems.append(f"scale {_fmt(params.scale)} vs {_fmt(qp.scale)}")
    zp_q = qp.zero_point if qp.zero_point is not None else np.zeros(1)
    zp_dq = params.zero_point if params.zero_point is not None else np.zeros(1)
    if not _same(zp_q, zp_dq):
        problems.append(f"zero point {_fmt(zp_dq)} vs {_fmt(zp_q)}")
    if problems:
        yield Violation("qdq-pair-mismatch", params.node, node.input[0],
                        f"DequantizeLinear {params.node!r} does not undo QuantizeLinear "
                        f"{qp.node!r}: {'; '.join(problems)}")


def _check_activation(params: QParams, profile: Profile) -> Iterator[Violation]:
    info = integer_type_info(params.elem_type)
    where = f"QuantizeLinear {params.node!r} on {params.input!r}"
    allows = f"profile {profile.name} allows"
    if info is None or params.bits is None:
        yield Violation("activation-bits", params.node, params.input,
                        f"{where} produces {params.type_name}, not an integer type")
        return
    if params.bits not in profile.activation_bits:
        narrowed = params.clip_node and params.bits < info[1]
        how = f" (a range Clip {params.clip_node!r} narrows {info[0]})" if narrowed else ""
        yield Violation("activation-bits", params.node, params.input,
                        f"{where} uses {params.bits} bits{how}; "
                        f"{allows} {', '.join(map(str, profile.activation_bits))}")
    signedness = "signed" if info[2] else "unsigned"
    if signedness not in profile.activation_signedness:
        yield Violation("activation-signedness", params.node, params.input,
                        f"{where} is {signedness} ({info[0]}); "
                        f"{allows} {', '.join(profile.activation_signedness)} activations")
    if not params.per_tensor:
        yield Violation("per-channel-activations", params.node, params.input,
                        f"{where} has {params.scale.size} scales "  # type: ignore[union-attr]
                        "(per channel); activations are quantized per tensor")


def _check_weight(q: QuantGraph, params: QParams, profile: Profile) -> Iterator[Violation]:
    info = integer_type_info(params.elem_type)
    what, allows = f"weight {params.input!r}", f"profile {profile.name} allows"
    if info is None:
        yield Violation("weight-bits", params.node, params.input,
                        f"{what} is stored as {params.type_name}, not an integer type")
        return
    type_name, container_bits, signed = info
    values = q.constant(params.input)
    widest = profile.max_weight_bits
    if container_bits < 8 and container_bits not in profile.weight_bits:
        yield Violation("weight-bits", params.node, params.input,
                        f"{what} is stored as {type_name}; "
                        f"{allows} {', '.join(map(str, profile.weight_bits))}-bit weights")
    elif values is not None and (needed := _value_bits(values, signed)) > widest:
        flat = np.asarray(values).astype(np.int64)
        yield Violation("weight-bits", params.node, params.input,
                        f"{what} stores values {int(flat.min())}..{int(flat.max())} "
                        f"({needed} bits); {allows} at most {widest}-bit weights")
    signedness = "signed" if signed else "unsigned"
    if signedness not in profile.weight_signedness:
        yield Violation("weight-signedness", params.node, params.input,
                        f"{what} is stored {signedness} ({type_name}); "
                        f"{allows} {', '.join(profile.weight_signedness)} weights")
    if not params.per_tensor and not profile.per_channel_weights:
        yield Violation("per-channel-weights", params.node, params.input,
                        f"{what} has {params.scale.size} scales "  # type: ignore[union-attr]
                        "(per channel); "
                        f"{allows} per-tensor weight scales only")


def _check_biases(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for node in q.graph.node:
        record = spec(node.op_type)
        if record.bias is None or len(node.input) <= record.bias or not node.input[record.bias]:
            continue
        bias = q.dq_for(node.input[record.bias])
        if bias is None or bias.role != "bias":
            continue  # a float bias is reported by float-input-not-dequantized
        info = integer_type_info(bias.elem_type)
        values = q.constant(bias.input)
        if info is None or info[0] != "int32":
            yield Violation("bias-bits", bias.node, bias.input,
                            f"bias {bias.input!r} of {node.op_type} {q.label(node)!r} is stored as "
                            f"{bias.type_name}; QDQ biases are int32")
        elif values is not None and _value_bits(values, True) > profile.bias_bits:
            flat = np.asarray(values).astype(np.int64)
            yield Violation("bias-bits", bias.node, bias.input,
                            f"bias {bias.input!r} of {q.label(node)!r} stores values "
                            f"{int(flat.min())}..{int(flat.max())}, "
                            f"beyond {profile.bias_bits} bits")
        x_dq, w_dq = q.dq_for(node.input[0]), q.dq_for(node.input[record.weight])  # type: ignore[index]
        if x_dq is None or w_dq is None or x_dq.scale is None or w_dq.scale is None or bias.scale is None:
            continue
        w_scale = np.asarray(w_dq.scale, np.float64).reshape(-1)
        actual = np.asarray(bias.scale, np.float64).reshape(-1)
        grouped = 1 < w_scale.size < actual.size and actual.size % w_scale.size == 0
        if record.layout == "conv_transpose" and grouped:
            # ConvTranspose weights are (C_in, C_out/group, ...): per-channel scales along
            # axis 1 cover C_out/group channels and repeat for each group in the output.
            w_scale = np.tile(w_scale, actual.size // w_scale.size)
        expected = np.asarray(x_dq.scale, np.float64).reshape(-1) * w_scale
        if actual.size == 1 and expected.size > 1:
            actual = np.broadcast_to(actual, expected.shape)
        if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=1e-6, atol=0.0):
            yield Violation("bias-scale", bias.node, bias.input,
                            f"bias {bias.input!r} of {node.op_type} {q.label(node)!r} has scale "
                            f"{_fmt(bias.scale)}; input scale x weight scale is {_fmt(expected)}")


def _check_shared_scales(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for node in q.graph.node:
        with_output = node.op_type in profile.shared_scale_ops
        if not with_output and node.op_type not in profile.shared_input_scale_ops:
            continue
        members = [(f"input {name!r}", dq.scale) for name in _data_inputs(node)
                   if (dq := q.dq_for(name)) is not None and dq.scale is not None]
        if with_output:
            members += [(f"output quantizer {qp.node!r}", qp.scale)
                        for qp in q.q_consumers(node.output[0]) if qp.scale is not None]
        if len(members) < 2:
            continue
        first_label, first = members[0]
        odd = next((member for member in members[1:] if not _same(first, member[1])), None)
        if odd is not None:
            scope = "all inputs and the output" if with_output else "all inputs"
            yield Violation("shared-scale", q.label(node), node.output[0],
                            f"{node.op_type} {q.label(node)!r}: {odd[0]} has scale {_fmt(odd[1])} "
                            f"but {first_label} has {_fmt(first)}; profile {profile.name} requires "
                            f"one scale for {scope}")


def _check_value_preserving(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    for node in q.graph.node:
        if not is_value_preserving(node.op_type, g.node_attributes(node)) or not node.input:
            continue
        source = q.dq_for(node.input[0])
        if source is None or source.scale is None:
            continue
        for qp in q.q_consumers(node.output[0]):
            if qp.scale is not None and not _same(qp.scale, source.scale):
                yield Violation("value-preserving-scale", qp.node, node.output[0],
                                f"{node.op_type} {q.label(node)!r} only moves values, but its "
                                f"output quantizer {qp.node!r} has scale {_fmt(qp.scale)} "
                                f"while its input has {_fmt(source.scale)}")


def _check_pad_values(q: QuantGraph, profile: Profile) -> Iterator[Violation]:
    """A Pad's fill must be a grid value of its input, or the padded tensor is not on the
    grid its (value-preserving) quantizer claims; zero always is, the shift negative
    correction's fill ``c`` is by construction."""
    for node in q.graph.node:
        if node.op_type != "Pad" or not is_value_preserving("Pad", g.node_attributes(node)):
            continue
        if len(node.input) < 3 or not node.input[2]:
            continue  # zero fill
        source = q.dq_for(node.input[0])
        if source is None or source.scale is None or source.scale.size != 1 or source.bits is None:
            continue  # a float input is reported by float-input-not-dequantized
        fill = q.constant(node.input[2])
        label = q.label(node)
        if fill is None:
            yield Violation("pad-value-off-grid", label, node.input[2],
                            f"Pad {label!r} takes its fill value from a computed tensor; "
                            "the target needs a constant on its input's grid")
            continue
        scale = float(source.scale.reshape(-1)[0])
        steps = float(np.asarray(fill, np.float64).reshape(-1)[0]) / scale
        low, high, _ = grid(source.bits, bool(source.signed))
        if steps != round(steps) or not low <= steps <= high:
            yield Violation("pad-value-off-grid", label, node.input[2],
                            f"Pad {label!r} fills with {_fmt(fill)}, which is not a whole number "
                            f"of its input's steps ({_fmt(source.scale)}) within {low}..{high}")
