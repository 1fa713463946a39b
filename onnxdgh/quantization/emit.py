"""The one place that inserts QuantizeLinear / DequantizeLinear nodes.

Contract: :func:`emit` takes the BN-folded float model and a
:class:`~onnxdgh.quantization.plan.ResolvedPlan` and returns a new model in QDQ form; every
edit goes through :mod:`onnxdgh.graph`. Names follow one convention, which the
validator relies on:

* internal activation ``T``: its producer keeps writing ``T``;
  ``QuantizeLinear(T, T_scale, T_zero_point) -> T_q``,
  ``DequantizeLinear(T_q, T_scale, T_zero_point) -> T_dq``; consumers read ``T_dq``;
* graph input ``X``: ``X -> Q -> X_q -> DQ -> X_dq``; consumers read ``X_dq``;
* graph output ``Y``: the producer writes ``Y_prequant``, ``Q -> Y_q``, and the final
  ``DequantizeLinear`` writes ``Y`` (the graph keeps its output names and float type);
* an activation narrower than its integer container (4-bit values in int8/uint8) passes
  ``Clip(T, T_clip_min, T_clip_max) -> T_clip`` right before its QuantizeLinear; the
  bounds are the grid's extremes ``scale * qmin`` and ``scale * qmax``, so the Clip is
  what tells a reader the activation's true width;
* weight / constant ``W``: integer initializer ``W_quantized``, ``W_scale`` (float32, one
  per output channel or one), ``W_zero_point`` (zeros of the integer type) ->
  ``DequantizeLinear(axis = output-channel axis) -> W_dq``; bias ``B``: int32
  ``B_quantized`` with ``B_scale`` = input scale x weight scale -> ``B_dq``.

Value-preserving ops get their own Q/DQ pair with their input's scale: the values are
already on that grid, and the graph stays in the canonical DQ -> op -> Q form that
onnxruntime and accelerator toolchains fuse. All zero points are exactly 0 and all
scales exact powers of two (the plan guarantees it; :func:`emit` writes them as given).

:func:`apply_integers` is the second entry point, for steps that choose integers after
``emit`` (the rounding optimisation, bias correction): it replaces the values of integer
initializers and gives a node a new int32 bias in the convention above; scales, zero
points and every other node stay as they were.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .. import graph as g
from ..ops import INTEGER_TYPES, numpy_container
from .plan import ActivationQuant, ParamQuant, ResolvedPlan

__all__ = ["NewBias", "apply_integers", "emit"]

_LOG = logging.getLogger(__name__)


def _add_integer(graph: onnx.GraphProto, name: str, values: np.ndarray, elem_type: int) -> None:
    if INTEGER_TYPES[elem_type][1] >= 8:
        g.add_initializer(graph, name, np.asarray(values).astype(numpy_container(elem_type)))
    else:  # INT4 / UINT4: onnx packs two values per byte
        g.add_typed_initializer(graph, name, np.asarray(values).astype(np.int64), elem_type)


def _emit_param(
    graph: onnx.GraphProto, item: ParamQuant, taken: set[str], uses: dict[str, int]
) -> str:
    """Write the integer initializer, scale, zero point and DQ node of one constant; return the DQ output."""
    # A constant shared by nodes that need different quantization gets a suffixed copy.
    used = uses.get(item.tensor, 0)
    base = g.unique_name(taken, f"{item.tensor}_{used}") if used else item.tensor
    uses[item.tensor] = used + 1
    q_name, s_name, z_name, dq_name = (
        g.unique_name(taken, f"{base}_{suffix}")
        for suffix in ("quantized", "scale", "zero_point", "dq")
    )
    scale = np.asarray(item.scale, np.float32)
    per_axis = scale.size > 1
    if not per_axis:
        scale = scale.reshape(())
    _add_integer(graph, q_name, item.values, item.elem_type)
    g.add_initializer(graph, s_name, scale)
    _add_integer(graph, z_name, np.zeros(scale.shape, np.int64), item.elem_type)
    attributes = {"axis": int(item.axis)} if per_axis and item.axis is not None else {}
    g.add_node(
        graph, "DequantizeLinear", [q_name, s_name, z_name], [dq_name],
        name=g.unique_name(taken, f"{base}_DequantizeLinear"), **attributes,
    )
    return dq_name


def _emit_activation(
    graph: onnx.GraphProto, item: ActivationQuant, output: bool, taken: set[str]
) -> None:
    tensor = item.tensor

    def new(suffix: str) -> str:
        return g.unique_name(taken, f"{tensor}_{suffix}")

    if output:  # the graph output keeps its name (written by the DQ); internal readers read the DQ
        source = new("prequant")
        g.rename_output(graph, tensor, source)
        q_name, dq_name = new("q"), tensor
    else:
        source, q_name, dq_name = tensor, new("q"), new("dq")
        g.replace_input_uses(graph, tensor, dq_name)
    s_name, z_name = new("scale"), new("zero_point")
    g.add_initializer(graph, s_name, np.array(item.scale, np.float32))
    _add_integer(graph, z_name, np.zeros((), np.int64), item.elem_type)
    clip = item.clip_range
    if clip is not None:
        lo_name, hi_name = new("clip_min"), new("clip_max")
        g.add_initializer(graph, lo_name, np.array(clip[0], np.float32))
        g.add_initializer(graph, hi_name, np.array(clip[1], np.float32))
        clipped = new("clip")
        g.add_node(graph, "Clip", [source, lo_name, hi_name], [clipped], name=new("Clip"))
        source = clipped
    g.add_node(graph, "QuantizeLinear", [source, s_name, z_name], [q_name],
               name=new("QuantizeLinear"))
    g.add_node(graph, "DequantizeLinear", [q_name, s_name, z_name], [dq_name],
               name=new("DequantizeLinear"))


def emit(model: onnx.ModelProto, resolved: ResolvedPlan) -> onnx.ModelProto:
    """A copy of ``model`` with every quantizer of ``resolved`` written as Q/DQ nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = g.names_in_use(graph)
    labels = {g.node_label(node, index): node for index, node in enumerate(graph.node)}

    replaced: set[str] = set()
    uses: dict[str, int] = {}
    cache: dict[tuple[object, ...], str] = {}
    for item in resolved.params:
        node = labels[item.node]
        key = (item.tensor, item.role, item.axis, item.elem_type, item.scale.tobytes(), item.values.tobytes())
        if key not in cache:
            cache[key] = _emit_param(graph, item, taken, uses)
        node.input[item.input_index] = cache[key]
        replaced.add(item.tensor)
    still_read = {name for node in graph.node for name in node.input}
    g.remove_initializers(graph, [name for name in replaced if name not in still_read])

    for tensor, item in resolved.activations.items():
        output = tensor != resolved.graph_input and tensor in resolved.graph_outputs
        _emit_activation(graph, item, output, taken)

    g.topological_sort(graph)
    g.clear_value_info(graph)
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception as exc:  # shapes are a convenience for readers; the graph is complete without them
        _LOG.info("shape inference on the quantized model failed: %s", exc)
    return out


@dataclass(frozen=True)
class NewBias:
    """An int32 bias for a node that has none: ``values`` on grid ``scale`` (input x weight scale)."""

    node: str
    values: np.ndarray
    scale: np.ndarray


def apply_integers(
    model: onnx.ModelProto, integers: Mapping[str, np.ndarray], new_biases: Sequence[NewBias] = ()
) -> onnx.ModelProto:
    """A copy of ``model`` with the integer initializers ``integers`` (name -> values, same
    shape, stored in the initializer's own type) replaced and each of ``new_biases`` written
    as ``B_quantized`` / ``B_scale`` / ``B_zero_point`` -> DequantizeLinear -> the node's
    input 2 (``B`` = ``<node>_bias``).

    Raises:
        KeyError: an unknown initializer or node name (a caller's bug).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for name, values in integers.items():
        g.set_initializer_value(graph, name, np.asarray(values))
    if new_biases:
        taken = g.names_in_use(graph)
        nodes = {node.name or node.output[0]: node for node in graph.node}
        for bias in new_biases:
            node = nodes[bias.node]
            scale = np.asarray(bias.scale, np.float32)
            item = ParamQuant(f"{bias.node}_bias", bias.node, 2, "bias", 32, 0 if scale.size > 1 else None,
                              scale, np.asarray(bias.values).astype(np.int32), onnx.TensorProto.INT32)
            g.set_node_input(node, 2, _emit_param(graph, item, taken, {}))
        g.topological_sort(graph)
    return out
