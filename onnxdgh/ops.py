"""Op classification shared by the quantizer and the validator.

Contract: pure data and lookups, plus one structural rule, the gated activation
(:func:`is_gate_partner`, :func:`gated_activation`).
The quantizer marks tensors by these classes and the validator checks the graph by the
same classes and rule, so the two cannot drift.

* ``VALUE_PRESERVING``: the op only moves, selects or replicates values (or pads with
  zeros, which a zero-point-0 grid represents exactly), so its output sits on its input's
  quantization grid and keeps that scale.
* ``WEIGHTED``: ops whose second input is a weight tensor quantized per channel and whose
  optional third input is an int32 bias.
* ``ACTIVATIONS``: ops that may fuse behind a weighted op into one hardware op.
* ``NON_NEGATIVE_OUTPUT``: ops whose output is never negative, so an unsigned grid fits.
* ``GATES``: the gate ``G`` of a gated activation ``Mul(x, G(x))`` (SiLU/Swish is
  ``Mul(x, Sigmoid(x))``, the form every exporter writes before opset 24's ``Swish``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "VALUE_PRESERVING",
    "WEIGHTED",
    "ACTIVATIONS",
    "NON_NEGATIVE_OUTPUT",
    "QDQ_OPS",
    "SHAPE_INPUT_INDICES",
    "GATES",
    "is_value_preserving",
    "gated_activation",
    "is_gate_partner",
]

VALUE_PRESERVING: frozenset[str] = frozenset(
    {
        "Reshape",
        "Flatten",
        "MaxPool",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Split",
        "Pad",
        "Identity",
        "Gather",
        "DepthToSpace",
        "SpaceToDepth",
        "Expand",
        "Tile",
    }
)

WEIGHTED: frozenset[str] = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

ACTIVATIONS: frozenset[str] = frozenset(
    {
        "Relu",
        "Clip",
        "LeakyRelu",
        "PRelu",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Softplus",
    }
)

NON_NEGATIVE_OUTPUT: frozenset[str] = frozenset(
    {"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Softplus", "Abs"}
)

QDQ_OPS: frozenset[str] = frozenset({"QuantizeLinear", "DequantizeLinear"})

GATES: frozenset[str] = frozenset({"Sigmoid", "HardSigmoid"})

# Inputs that carry shapes, indices or axes rather than data: never quantized.
SHAPE_INPUT_INDICES: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}),
    "Slice": frozenset({1, 2, 3, 4}),
    "Split": frozenset({1}),
    "Pad": frozenset({1, 2, 3}),
    "Squeeze": frozenset({1}),
    "Unsqueeze": frozenset({1}),
    "Resize": frozenset({1, 2, 3}),
    "Gather": frozenset({1}),
    "Expand": frozenset({1}),
    "Tile": frozenset({1}),
    "ReduceMean": frozenset({1}),
    "Clip": frozenset({1, 2}),
}


def is_value_preserving(op_type: str, attributes: dict[str, object] | None = None) -> bool:
    """True when ``op_type`` keeps its input's quantization grid.

    ``Pad`` is value-preserving only in constant mode (zeros are on every zero-point-0
    grid); ``Resize`` only in nearest mode.
    """
    attributes = attributes or {}
    if op_type == "Pad":
        mode = attributes.get("mode", b"constant")
        return mode in (b"constant", "constant")
    if op_type == "Resize":
        mode = attributes.get("mode", b"nearest")
        return mode in (b"nearest", "nearest")
    return op_type in VALUE_PRESERVING


def is_gate_partner(gate: Any, mul: Any) -> bool:
    """True when ``mul`` is ``Mul(x, gate(x))`` for the gate node ``gate`` (a gated activation).

    A fused pair ``G -> Mul`` means exactly this: the gate's output never leaves the
    activation unit. A gate whose output scales some *other* tensor (a squeeze-excitation
    ``Mul(features, HardSigmoid(fc))``) is a separate op with a quantized output.
    """
    return (
        gate.op_type in GATES
        and mul.op_type == "Mul"
        and len(gate.input) >= 1
        and len(mul.input) == 2
        and sorted(mul.input) == sorted([gate.input[0], gate.output[0]])
    )


def gated_activation(tensor: str, readers: Sequence[Any]) -> tuple[Any, Any] | None:
    """``(gate, mul)`` when ``tensor``'s readers are exactly one gated activation.

    That is ``gate = G(tensor)`` with ``G`` in :data:`GATES` and ``mul = Mul(tensor,
    gate_output)`` (either order), and nothing else reads ``tensor``: the pair is one
    activation (SiLU for Sigmoid), so a fused pattern ``[P, G, "Mul"]`` lets ``tensor``
    skip its quantizer like the input of any fused activation. ``readers`` are
    ``onnx.NodeProto``; None when the readers are anything else.
    """
    if len(readers) != 2:
        return None
    for gate, mul in ((readers[0], readers[1]), (readers[1], readers[0])):
        if is_gate_partner(gate, mul) and gate.input[0] == tensor:
            return gate, mul
    return None
