"""The op table: what each ONNX op means to the quantizer and the validator.

Contract: pure data (:data:`OPS`, one :class:`OpSpec` per op type) and lookups over it,
plus two structural rules, the gated activation (:func:`is_gate_partner`,
:func:`gated_activation`) and ops written out as several nodes that are quantized as the
one op they compute (:func:`written_out_ops`: LayerNorm, HardSwish). Marking, folding, shifting, equalizing, emitting and
validation read these records, so they cannot drift; adding an operator is one entry
here and one marking policy (:mod:`onnxdgh.quantization.plan`).

Record fields (all default to "no"):

* ``weight`` / ``bias``: input index of the constant weight (quantized per output
  channel) and of the int32 bias; ``layout`` says where a weight's output channels are
  (:func:`weight_axis`, :func:`output_channels`);
* ``bounds``: the output range ``(lo, hi)`` whatever the input (Relu ``[0, inf)``,
  Sigmoid ``(0, 1)``); Clip's come from its attributes or constant inputs
  (:func:`output_bounds`); a non-negative lower bound means an unsigned grid fits;
* ``preserves``: the op only moves, selects or replicates values (or pads with zeros,
  which a zero-point-0 grid represents exactly), so its output sits on its input's grid
  (:func:`is_value_preserving` adds the attribute conditions of Pad and Resize);
* ``activation``: may fuse behind a weighted op into one hardware op;
* ``gate``: the gate ``G`` of a gated activation ``Mul(x, G(x))`` (SiLU is
  ``Mul(x, Sigmoid(x))``, the form every exporter writes before opset 24's ``Swish``);
* ``shape_inputs``: inputs that carry shapes, indices or axes, never quantized;
* ``sums_weights``: each output channel sums all of its weights against a constant
  input (a ConvTranspose with stride > 1 does not: each position sees some taps);
* ``homogeneous``: ``f(D x) = D f(x)`` for a positive per-channel diagonal ``D`` (Clip
  and Pad only with a zero lower bound / zero fill; the callers check those);
* ``passes_shift``: ``f(x + c) = f(x) + c`` for a scalar ``c`` (no padding);
* ``shiftable``: an activation with a thin negative tail (shift negative correction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx

__all__ = ["OpSpec", "OPS", "spec", "QDQ_OPS", "INTEGER_TYPES", "numpy_container", "WEIGHTED",
           "ACTIVATIONS", "GATES", "SHAPE_INPUT_INDICES", "ops_where", "is_value_preserving",
           "output_channel_axis", "weight_axis", "output_channels", "output_bounds",
           "gated_activation", "is_gate_partner", "WrittenOutOp", "decomposed_layer_norm",
           "decomposed_hard_swish", "written_out_ops"]

Layout = Literal["conv", "conv_transpose", "gemm", "matmul"]
Bounds = tuple[float, float]
_INF = math.inf


@dataclass(frozen=True)
class OpSpec:
    """What one op type means for quantization (see the module docstring for each field)."""

    weight: int | None = None
    bias: int | None = None
    layout: Layout | None = None
    bounds: Bounds | None = None
    preserves: bool = False
    activation: bool = False
    gate: bool = False
    shape_inputs: frozenset[int] = frozenset()
    sums_weights: bool = False
    homogeneous: bool = False
    passes_shift: bool = False
    shiftable: bool = False


def _idx(*indices: int) -> frozenset[int]:
    return frozenset(indices)


_MOVE = OpSpec(preserves=True)
OPS: dict[str, OpSpec] = {
    # Weighted ops.
    "Conv": OpSpec(weight=1, bias=2, layout="conv", sums_weights=True),
    "ConvTranspose": OpSpec(weight=1, bias=2, layout="conv_transpose"),
    "Gemm": OpSpec(weight=1, bias=2, layout="gemm", sums_weights=True),
    "MatMul": OpSpec(weight=1, layout="matmul", sums_weights=True),
    # Activations (fusable behind a weighted op).
    "Relu": OpSpec(activation=True, bounds=(0.0, _INF), homogeneous=True),
    "Clip": OpSpec(activation=True, shape_inputs=_idx(1, 2), homogeneous=True),
    "LeakyRelu": OpSpec(activation=True, homogeneous=True, shiftable=True),
    "PRelu": OpSpec(activation=True, shiftable=True),
    "Sigmoid": OpSpec(activation=True, bounds=(0.0, 1.0), gate=True),
    "HardSigmoid": OpSpec(activation=True, bounds=(0.0, 1.0), gate=True),
    "HardSwish": OpSpec(activation=True, shiftable=True),
    "Tanh": OpSpec(activation=True, bounds=(-1.0, 1.0)),
    "Elu": OpSpec(activation=True, shiftable=True),
    "Selu": OpSpec(activation=True, shiftable=True),
    "Softplus": OpSpec(activation=True, bounds=(0.0, _INF)),
    # Other compute ops with their own output quantizer.
    "Add": OpSpec(),
    "Sub": OpSpec(),
    "Mul": OpSpec(),
    "Div": OpSpec(),
    "Abs": OpSpec(bounds=(0.0, _INF)),
    "Neg": OpSpec(),
    "AveragePool": OpSpec(homogeneous=True),
    "GlobalAveragePool": OpSpec(passes_shift=True),
    "GlobalMaxPool": OpSpec(),
    "ReduceMean": OpSpec(shape_inputs=_idx(1)),
    "ReduceMax": OpSpec(),
    "Softmax": OpSpec(bounds=(0.0, 1.0)),
    # Elementwise functions of one activation (a lookup table on an integer target); the
    # pieces of a decomposed LayerNorm (ReduceMean, Sub, Pow by 2, Sqrt, Div) and of GELU
    # (Erf form x * 0.5 * (1 + Erf(x / sqrt 2)); tanh form with Pow by 3 and Tanh).
    # Pow's exponent is a parameter of the function, not a tensor to quantize; its
    # bounds depend on it (:func:`output_bounds`).
    "Pow": OpSpec(shape_inputs=_idx(1)),
    "Sqrt": OpSpec(bounds=(0.0, _INF)),
    "Erf": OpSpec(bounds=(-1.0, 1.0)),
    # LayerNormalization (opset 17): scale and bias are per-tensor constants.
    "LayerNormalization": OpSpec(),
    "Resize": OpSpec(shape_inputs=_idx(1, 2, 3)),
    "Concat": OpSpec(),  # one scale for inputs and output: the profile's shared_scale_ops
    # Value-preserving ops (inherit their input's quantizer).
    "Reshape": OpSpec(preserves=True, shape_inputs=_idx(1), passes_shift=True),
    "Flatten": OpSpec(preserves=True, passes_shift=True),
    "MaxPool": OpSpec(preserves=True, homogeneous=True),
    "Transpose": _MOVE,
    "Squeeze": OpSpec(preserves=True, shape_inputs=_idx(1), passes_shift=True),
    "Unsqueeze": OpSpec(preserves=True, shape_inputs=_idx(1), passes_shift=True),
    "Slice": OpSpec(preserves=True, shape_inputs=_idx(1, 2, 3, 4)),
    "Split": OpSpec(preserves=True, shape_inputs=_idx(1)),
    "Pad": OpSpec(preserves=True, shape_inputs=_idx(1, 2, 3), homogeneous=True),
    "Identity": _MOVE,
    "Gather": OpSpec(preserves=True, shape_inputs=_idx(1)),
    "DepthToSpace": _MOVE,
    "SpaceToDepth": _MOVE,
    "Expand": OpSpec(preserves=True, shape_inputs=_idx(1)),
    "Tile": OpSpec(preserves=True, shape_inputs=_idx(1)),
}
"""Every op type the quantizer handles, by ONNX op type (default domain)."""

_NONE = OpSpec()

QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})

_TP = onnx.TensorProto
INTEGER_TYPES: dict[int, tuple[str, int, bool]] = {
    _TP.INT8: ("int8", 8, True),
    _TP.UINT8: ("uint8", 8, False),
    _TP.INT16: ("int16", 16, True),
    _TP.UINT16: ("uint16", 16, False),
    _TP.INT32: ("int32", 32, True),
    _TP.INT4: ("int4", 4, True),
    _TP.UINT4: ("uint4", 4, False),
    **{getattr(_TP, name): (name.lower(), 2, name == "INT2") for name in ("INT2", "UINT2") if hasattr(_TP, name)},
}
"""The integer element types a Q/DQ can carry: ``elem type -> (name, bits, signed)``."""


def numpy_container(elem_type: int) -> np.dtype:
    """The numpy dtype holding values of integer ``elem_type`` (sub-byte types in a byte)."""
    _name, bits, signed = INTEGER_TYPES[elem_type]
    return np.dtype(f"{'int' if signed else 'uint'}{max(8, bits)}")


def spec(op_type: str) -> OpSpec:
    """The record of ``op_type`` (an all-"no" record for an op the table does not know)."""
    return OPS.get(op_type, _NONE)


def ops_where(test: Callable[[OpSpec], bool]) -> frozenset[str]:
    """The op types whose record passes ``test`` (e.g. ``ops_where(lambda s: s.gate)``)."""
    return frozenset(op for op, record in OPS.items() if test(record))


WEIGHTED = ops_where(lambda s: s.weight is not None)
ACTIVATIONS = ops_where(lambda s: s.activation)
GATES = ops_where(lambda s: s.gate)
SHAPE_INPUT_INDICES: dict[str, frozenset[int]] = {op: s.shape_inputs for op, s in OPS.items() if s.shape_inputs}
"""Views of :data:`OPS` by one field, for callers that test membership."""


def _text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def is_value_preserving(op_type: str, attributes: dict[str, object] | None = None) -> bool:
    """True when ``op_type`` keeps its input's quantization grid.

    ``Pad`` is value-preserving only in constant mode (zeros are on every zero-point-0
    grid); ``Resize`` only in nearest mode.
    """
    attributes = attributes or {}
    if op_type == "Pad":
        return _text(attributes.get("mode", "constant")) == "constant"
    if op_type == "Resize":
        return _text(attributes.get("mode", "nearest")) == "nearest"
    return spec(op_type).preserves


def weight_axis(op_type: str, attributes: dict[str, object], ndim: int) -> int | None:
    """Output-channel axis of a weight of rank ``ndim``, or None (a vector/scalar MatMul weight).

    Conv ``(O, I/g, k...)``: 0; ConvTranspose ``(I, O/g, k...)``: 1; Gemm: 0 with
    ``transB`` else 1; MatMul ``(..., K, N)``: the last.
    """
    layout = spec(op_type).layout
    if layout == "conv":
        return 0
    if layout == "conv_transpose":
        return 1
    if layout == "gemm":
        return 0 if int(attributes.get("transB", 0)) else 1  # type: ignore[call-overload]
    return ndim - 1 if ndim >= 2 else None


def output_channel_axis(op_type: str) -> int:
    """Channel axis of a weighted op's *output* (where its bias adds): 1 for Conv and
    ConvTranspose (N x C x ...), the last for Gemm and MatMul (... x N)."""
    return 1 if spec(op_type).layout in ("conv", "conv_transpose") else -1


def output_channels(op_type: str, attributes: dict[str, object], shape: Sequence[int]) -> int:
    """How many output channels a weight of ``shape`` produces (ConvTranspose: per group x groups)."""
    axis = weight_axis(op_type, attributes, len(shape))
    if axis is None:
        return 1
    groups = int(attributes.get("group", 1)) if spec(op_type).layout == "conv_transpose" else 1  # type: ignore[call-overload]
    return int(shape[axis]) * groups


def output_bounds(
    op_type: str, attributes: dict[str, object], inputs: Sequence[str], constant: Callable[[str], np.ndarray | None]
) -> Bounds | None:
    """``(lo, hi)`` of the op's output whatever its input, or None when not bounded by the op.

    Clip: its ``min``/``max`` attributes (opset < 11) or constant inputs 1 and 2, infinite
    where absent; None when a bound is computed. Pow: ``[0, inf)`` for a constant even
    integer exponent, else unbounded. ``constant`` maps a tensor name to its value (None
    when computed).
    """
    if op_type == "Pow":
        value = _scalar(constant, inputs[1]) if len(inputs) > 1 else None
        return ((0.0, _INF) if value is not None and value == round(value) and int(value) % 2 == 0
                else None)
    if op_type != "Clip":
        return spec(op_type).bounds
    low, high = float(attributes.get("min", -_INF)), float(attributes.get("max", _INF))  # type: ignore[arg-type]
    for index in (1, 2):
        if len(inputs) > index and inputs[index]:
            value = constant(inputs[index])
            if value is None:
                return None
            bound = float(np.asarray(value).reshape(-1)[0])
            low, high = (bound, high) if index == 1 else (low, bound)
    return low, high


def is_gate_partner(gate: Any, mul: Any) -> bool:
    """True when ``mul`` is ``Mul(x, gate(x))`` for the gate node ``gate`` (a gated activation).

    A fused pair ``G -> Mul`` means exactly this: the gate's output never leaves the
    activation unit. A gate whose output scales some *other* tensor (a squeeze-excitation
    ``Mul(features, HardSigmoid(fc))``) is a separate op with a quantized output.
    """
    return (
        spec(gate.op_type).gate
        and mul.op_type == "Mul"
        and len(gate.input) >= 1
        and len(mul.input) == 2
        and sorted(mul.input) == sorted([gate.input[0], gate.output[0]])
    )


def gated_activation(tensor: str, readers: Sequence[Any]) -> tuple[Any, Any] | None:
    """``(gate, mul)`` when ``tensor``'s readers are exactly one gated activation.

    That is ``gate = G(tensor)`` with ``G`` a gate and ``mul = Mul(tensor, gate_output)``
    (either order), and nothing else reads ``tensor``: the pair is one activation (SiLU
    for Sigmoid), so a fused pattern ``[P, G, "Mul"]`` lets ``tensor`` skip its quantizer
    like the input of any fused activation. ``readers`` are ``onnx.NodeProto``; None when
    the readers are anything else.
    """
    if len(readers) != 2:
        return None
    for gate, mul in ((readers[0], readers[1]), (readers[1], readers[0])):
        if is_gate_partner(gate, mul) and gate.input[0] == tensor:
            return gate, mul
    return None


@dataclass(frozen=True)
class WrittenOutOp:
    """One op (``op``, e.g. ``LayerNormalization``) written out as several nodes.

    ``nodes`` in dataflow order, the last one producing ``output``; ``inner`` the tensors
    that never leave the pattern; ``data`` the op's input; ``parameters`` the constants
    the nodes read (epsilon, 3 and 6 of HardSwish), which are the op's attributes, not
    tensors to quantize. Quantized as the op: at ``data`` and ``output`` only.
    """

    op: str
    nodes: tuple[Any, ...]
    inner: tuple[str, ...]
    data: str
    output: str
    parameters: tuple[str, ...]


def _reduce_axes(node: Any, constant: Callable[[str], np.ndarray | None]) -> tuple[int, ...] | None:
    for attribute in node.attribute:
        if attribute.name == "axes":
            return tuple(attribute.ints)
    if len(node.input) > 1 and node.input[1]:  # opset >= 18: axes is an input
        value = constant(node.input[1])
        return None if value is None else tuple(int(v) for v in np.asarray(value).reshape(-1))
    return None


def _keeps_dims(node: Any) -> bool:
    return all(a.i == 1 for a in node.attribute if a.name == "keepdims")


def _only_reader(view: Any, tensor: str, op_type: str) -> Any:
    readers = view.readers(tensor)
    if len(readers) == 1 and readers[0].op_type == op_type and tensor not in view.output_set:
        return readers[0]
    return None


def decomposed_layer_norm(view: Any, mean: Any) -> WrittenOutOp | None:
    """The LayerNorm (:class:`WrittenOutOp`) that starts at the ReduceMean node ``mean``, or None.

    ``view`` is a :class:`~onnxdgh.graph.GraphView` (of the float or the quantized graph).
    Exactly this dataflow matches: ``mu = ReduceMean(x)``, ``d = Sub(x, mu)``, ``d`` read
    only by ``Pow(d, 2)`` and the final ``Div(d, s)``, ``v = ReduceMean(d^2)`` over the
    same single axis (keepdims), ``Add(v, eps)`` with a constant scalar ``eps``,
    ``s = Sqrt(...)``; every inner tensor read only inside the pattern. It is the
    normalisation of ONNX's ``LayerNormalization`` (opset 17) as Paddle2ONNX and older
    torch exports write it, so it is quantized as that one op: its input and its output.
    The affine ``Mul(gamma)``/``Add(beta)`` that follows is left out: ordinary ops.
    """
    if mean.op_type != "ReduceMean" or not mean.input or not _keeps_dims(mean):
        return None
    axes = _reduce_axes(mean, view.constant)
    if axes is None or len(axes) != 1:
        return None
    x, mu = mean.input[0], mean.output[0]
    sub = _only_reader(view, mu, "Sub")
    if sub is None or list(sub.input) != [x, mu]:
        return None
    d = sub.output[0]
    readers = view.readers(d)
    if d in view.output_set or len(readers) != 2:
        return None
    by_op = {node.op_type: node for node in readers}
    power, div = by_op.get("Pow"), by_op.get("Div")
    if power is None or div is None or list(power.input[:1]) != [d]:
        return None
    if len(power.input) < 2 or _scalar(view.constant, power.input[1]) != 2.0:
        return None
    variance = _only_reader(view, power.output[0], "ReduceMean")
    if variance is None or not _keeps_dims(variance) or _reduce_axes(variance, view.constant) != axes:
        return None
    add = _only_reader(view, variance.output[0], "Add")
    if add is None or variance.output[0] not in add.input:
        return None
    epsilon = [name for name in add.input if name != variance.output[0]]
    if len(epsilon) != 1 or _scalar(view.constant, epsilon[0]) is None:
        return None
    sqrt = _only_reader(view, add.output[0], "Sqrt")
    if sqrt is None or _only_reader(view, sqrt.output[0], "Div") is not div or list(div.input) != [d, sqrt.output[0]]:
        return None
    nodes = (mean, sub, power, variance, add, sqrt, div)
    inner = (mu, d, power.output[0], variance.output[0], add.output[0], sqrt.output[0])
    return WrittenOutOp("LayerNormalization", nodes, inner, x, div.output[0], (epsilon[0],))


def _scalar(constant: Callable[[str], np.ndarray | None], name: str) -> float | None:
    value = constant(name) if name else None
    return None if value is None or np.asarray(value).size != 1 else float(np.asarray(value).reshape(-1)[0])


def _other_input(node: Any, name: str) -> str | None:
    others = [item for item in node.input if item != name]
    return others[0] if len(node.input) == 2 and len(others) == 1 else None


def decomposed_hard_swish(view: Any, add: Any) -> WrittenOutOp | None:
    """The HardSwish ``x * Clip(x + 3, 0, 6) / 6`` that starts at the Add node ``add``, or None.

    Exactly: ``a = Add(x, 3)`` read only by ``c = Clip(a, 0, 6)``, ``c`` read only by
    ``m = Mul(x, c)``, ``m`` read only by ``Div(m, 6)`` or ``Mul(m, 1/6)`` (the folded Div);
    3, 0, 6 constants; then, when they are the only readers, a ``Mul`` and an ``Add`` by
    scalar constants (an affine of the activation's output, still a function of ``x``). Paddle2ONNX writes ``hardswish`` this way (opset < 14 has no
    HardSwish op); it is ONNX's ``HardSwish`` (alpha 1/6, beta 1/2), so it is quantized as
    that op: at ``x`` and the output, the 8-bit grids between would only add error.
    """
    if add.op_type != "Add" or len(add.input) != 2:
        return None
    for x in add.input:
        three = _other_input(add, x)
        if three is not None and _scalar(view.constant, three) == 3.0 and view.constant(x) is None:
            break
    else:
        return None
    clip = _only_reader(view, add.output[0], "Clip")
    if clip is None or clip.input[0] != add.output[0]:
        return None
    attrs = {a.name: a.f for a in clip.attribute}
    low = _scalar(view.constant, clip.input[1]) if len(clip.input) > 1 else attrs.get("min")
    high = _scalar(view.constant, clip.input[2]) if len(clip.input) > 2 else attrs.get("max")
    if low != 0.0 or high != 6.0:
        return None
    mul = _only_reader(view, clip.output[0], "Mul")
    if mul is None or sorted(mul.input) != sorted([x, clip.output[0]]):
        return None
    readers = view.readers(mul.output[0])
    if len(readers) != 1 or mul.output[0] in view.output_set or readers[0].op_type not in ("Div", "Mul"):
        return None
    scale = readers[0]
    divisor = _other_input(scale, mul.output[0])
    value = _scalar(view.constant, divisor) if divisor is not None else None
    if value is None or (scale.op_type == "Div" and scale.input[0] != mul.output[0]):
        return None
    if not math.isclose(value if scale.op_type == "Div" else 1.0 / value if value else 0.0, 6.0, rel_tol=1e-6):
        return None
    nodes, inner, parameters = [add, clip, mul, scale], [add.output[0], clip.output[0], mul.output[0]], [three, divisor]
    # PP-LCNetV3's learnable affine after the activation, s * hardswish(x) + b with scalars
    # s, b: still one elementwise function of x (one lookup table on an 8-bit input), so it
    # ends the op; a grid between would round hardswish's output twice more.
    for op_type in ("Mul", "Add"):
        follower = _only_reader(view, nodes[-1].output[0], op_type)
        constant = _other_input(follower, nodes[-1].output[0]) if follower is not None else None
        if constant is None or _scalar(view.constant, constant) is None:
            break
        inner.append(nodes[-1].output[0])
        nodes.append(follower)
        parameters.append(constant)
    return WrittenOutOp("HardSwish", tuple(nodes), tuple(inner), x, nodes[-1].output[0], tuple(parameters))


def written_out_ops(view: Any) -> list[WrittenOutOp]:
    """Every op of the graph ``view`` written out as several nodes (:func:`decomposed_layer_norm`,
    :func:`decomposed_hard_swish`), in graph order of their first node."""
    found = (match(view, node) for node in view.graph.node
             for match in (decomposed_layer_norm, decomposed_hard_swish))
    return [pattern for pattern in found if pattern is not None]
