"""The ``--weights-as-float`` output flavour: constants as float values on their power-of-two grid.

Some converters cannot read the integer-initializer -> DequantizeLinear weight path
(onnx2tf mis-converts it; ALGORITHMS.md section 4, issue 18). For them every quantized
constant can be stored as the float32 value its DequantizeLinear would produce,
``float32(q) * scale``, without that node; activations keep their Q/DQ pairs. The function
is the same bit for bit (a power-of-two scale only shifts the exponent, so nothing rounds).

Contract:
* :func:`store_weights_as_float` rewrites every DequantizeLinear whose input is an
  integer initializer into one float32 initializer (named after the constant, without the
  ``_quantized`` suffix) and records each one's grid (integer type, scale, per-axis axis)
  as JSON in the ``metadata_props`` key :data:`WEIGHT_GRID_KEY`, with
  :data:`WEIGHT_FORMAT_KEY` = :data:`FLOAT_GRID`.
* :func:`restore_quantized_weights` is the inverse for checking: it turns every recorded
  float initializer back into integers + DequantizeLinear (exactly the structure
  :mod:`onnxdgh.quantization.emit` writes), so the validator's rules (power-of-two scales,
  bit widths, bias scales, per-channel granularity) apply unchanged, and returns a
  :class:`GridProblem` for every recorded value that is not on its grid (not a whole
  number of steps, or outside the integer type's range) and for a record it cannot read.
  A model without the metadata is returned unchanged. Neither function modifies its input.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .. import graph as g
from ..ops import INTEGER_TYPES
from .thresholds import along, grid

__all__ = [
    "WEIGHT_FORMAT_KEY",
    "WEIGHT_GRID_KEY",
    "FLOAT_GRID",
    "GridProblem",
    "store_weights_as_float",
    "restore_quantized_weights",
]

WEIGHT_FORMAT_KEY = "onnxdgh.weight_format"
"""``metadata_props`` key naming how quantized constants are stored (absent: integers + DQ)."""
WEIGHT_GRID_KEY = "onnxdgh.weight_grid"
"""``metadata_props`` key holding ``{tensor: {"type", "scale", "axis"}}`` as JSON."""
FLOAT_GRID = "float-grid"
"""The :data:`WEIGHT_FORMAT_KEY` value of the ``--weights-as-float`` flavour."""

_TP = onnx.TensorProto
# Integer types a quantized constant can be stored in: name -> (elem type, qmin, qmax).
_TYPES: dict[str, tuple[int, int, int]] = {
    name: (elem, *grid(bits, signed)[:2]) for elem, (name, bits, signed) in INTEGER_TYPES.items() if bits >= 4
}
_TYPE_NAMES = {elem: name for name, (elem, _low, _high) in _TYPES.items()}


@dataclass(frozen=True)
class GridProblem:
    """A recorded constant that is not what its grid record says (``tensor`` None: the record itself)."""

    tensor: str | None
    message: str


def store_weights_as_float(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every quantized constant stored as float32 on its grid.

    Raises:
        ValueError: a constant's DequantizeLinear has a non-zero zero point or a computed
            scale (the quantizer never writes either; this is a bug, not bad input).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = g.initializer_map(graph)
    taken = g.names_in_use(graph)
    records: dict[str, dict[str, Any]] = {}
    doomed_nodes: list[onnx.NodeProto] = []
    released: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        ints = inits[node.input[0]]
        if ints.data_type not in _TYPE_NAMES:
            continue
        if len(node.input) < 2 or node.input[1] not in inits:
            raise ValueError(f"DequantizeLinear {node.name!r} has a computed scale")
        scale = g.to_array(inits[node.input[1]]).astype(np.float32)
        if len(node.input) > 2 and node.input[2] and np.any(g.to_array(inits[node.input[2]]) != 0):
            raise ValueError(f"DequantizeLinear {node.name!r} has a non-zero zero point")
        values = g.to_array(ints).astype(np.int64)
        axis: int | None = None
        if scale.size > 1:
            axis = g.attribute(node, "axis", 1) % values.ndim  # type: ignore[operator]
        # float32(q) * scale is what DequantizeLinear computes; the power-of-two scale is exact.
        stored = values.astype(np.float32) * along(scale, axis, values.ndim)
        name = g.unique_name(taken, node.input[0].removesuffix("_quantized"))
        g.add_initializer(graph, name, stored.astype(np.float32))
        g.replace_input_uses(graph, node.output[0], name)
        doomed_nodes.append(node)
        released.update(part for part in node.input if part)
        records[name] = {
            "type": _TYPE_NAMES[ints.data_type],
            "scale": scale.reshape(-1).tolist() if axis is not None else float(scale.reshape(())),
            "axis": axis,
        }
    g.remove_nodes(graph, doomed_nodes)
    still_read = {name for node in graph.node for name in node.input}
    g.remove_initializers(graph, [name for name in released if name not in still_read])
    g.clear_value_info(graph)
    entries = {prop.key: prop.value for prop in out.metadata_props}
    entries[WEIGHT_FORMAT_KEY] = FLOAT_GRID
    entries[WEIGHT_GRID_KEY] = json.dumps(records, sort_keys=True)
    onnx.helper.set_model_props(out, entries)
    return out


def _read_record(name: str, record: object) -> tuple[str, np.ndarray, int | None] | str:
    """``(type, scale, axis)`` of one grid record, or what is wrong with it."""
    if not isinstance(record, dict) or set(record) != {"type", "scale", "axis"}:
        return "its grid record is not {\"type\", \"scale\", \"axis\"}"
    kind, scale, axis = record["type"], record["scale"], record["axis"]
    if kind not in _TYPES:
        return f"its grid record names integer type {kind!r} (known: {', '.join(_TYPES)})"
    values = scale if isinstance(scale, list) else [scale]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for v in values):
        return f"its grid record has scale {json.dumps(scale)}; scales are positive numbers"
    if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
        return f"its grid record has axis {json.dumps(axis)}; an axis is an integer or null"
    if isinstance(scale, list) and axis is None:
        return "its grid record lists several scales without an axis"
    return kind, np.asarray(values, np.float32), axis


def restore_quantized_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[GridProblem]]:
    """``model`` with recorded float constants turned back into integers + DequantizeLinear.

    Returns the model to check (``model`` itself when it carries no float-grid record)
    and the problems found. A constant that is off its grid is still restored, rounded
    and clipped to the grid, so the other rules see the structure it claims; the problem
    names it. A record the function cannot read leaves that tensor float (the validator
    then also reports it as a float input).
    """
    entries = {prop.key: prop.value for prop in model.metadata_props}
    fmt = entries.get(WEIGHT_FORMAT_KEY)
    if fmt is None:
        return model, []
    if fmt != FLOAT_GRID:
        return model, [GridProblem(None, f"metadata {WEIGHT_FORMAT_KEY} is {fmt!r}; this onnxdgh reads {FLOAT_GRID!r}")]
    try:
        records = json.loads(entries.get(WEIGHT_GRID_KEY, ""))
    except json.JSONDecodeError as exc:
        return model, [GridProblem(None, f"metadata {WEIGHT_GRID_KEY} is not valid JSON ({exc.msg})")]
    if not isinstance(records, dict):
        return model, [GridProblem(None, f"metadata {WEIGHT_GRID_KEY} is not a JSON object of tensor records")]
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = g.initializer_map(graph)
    taken = g.names_in_use(graph)
    problems: list[GridProblem] = []
    for name, record in records.items():
        init = inits.get(name)
        if init is None or init.data_type != _TP.FLOAT:
            problems.append(GridProblem(name, f"{name!r} has a grid record but is not a float32 initializer"))
            continue
        parsed = _read_record(name, record)
        if isinstance(parsed, str):
            problems.append(GridProblem(name, f"{name!r}: {parsed}"))
            continue
        kind, scale, axis = parsed
        elem_type, qmin, qmax = _TYPES[kind]
        values = g.to_array(init).astype(np.float64)
        if axis is not None and not (-values.ndim <= axis < values.ndim and values.shape[axis] == scale.size):
            problems.append(GridProblem(name, f"{name!r}: {scale.size} scales do not fit axis {axis} of shape "
                                              f"{list(values.shape)}"))
            continue
        steps = values / along(scale.astype(np.float64), axis, values.ndim)
        ints = np.clip(np.rint(steps), qmin, qmax)
        off = np.abs(steps - ints) > 0
        if off.any():
            where = int(np.argmax(off.reshape(-1)))
            problems.append(GridProblem(
                name, f"{name!r} holds {values.reshape(-1)[where]:.9g}, which is {steps.reshape(-1)[where]:.6g} steps "
                      f"of its scale: not a whole number of steps within {kind} [{qmin}, {qmax}]"))
        g.remove_initializers(graph, [name])
        g.add_typed_initializer(graph, name, ints.astype(np.int64), elem_type)
        s_name, z_name, dq_name = (
            g.unique_name(taken, f"{name}_{suffix}") for suffix in ("scale", "zero_point", "dq")
        )
        per_axis = scale.size > 1
        g.add_initializer(graph, s_name, scale if per_axis else scale.reshape(()))
        g.add_typed_initializer(graph, z_name, np.zeros(scale.shape if per_axis else (), np.int64), elem_type)
        g.replace_input_uses(graph, name, dq_name)
        g.add_node(graph, "DequantizeLinear", [name, s_name, z_name], [dq_name],
                   name=g.unique_name(taken, f"{name}_DequantizeLinear"),
                   **({"axis": int(axis)} if per_axis and axis is not None else {}))
    g.topological_sort(graph)
    g.clear_value_info(graph)
    return out, problems
