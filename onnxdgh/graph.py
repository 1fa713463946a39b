"""ONNX protobuf editing primitives: the one place that mutates ``onnx.ModelProto`` graphs.

Contract: small, pure-ish helpers over a ``GraphProto`` (name maps, producer/consumer
lookups, renaming a tensor's uses, removing nodes, adding initializers). Stages
(canonicalisation, BN folding, Q/DQ emission) describe *what* to change in names and
plans and call these helpers to do it; no other module pokes at repeated protobuf fields.
:class:`GraphView` is the read-only side: one snapshot of producers, consumers,
constants (initializers and Constant nodes), typed attributes and node labels.

Why a small class over the protobuf and not onnx-ir: every stage already hands
``onnx.NodeProto`` objects around and edits through the helpers below; onnx-ir's
``ir.Model`` would need a conversion (a copy of every weight) at each stage boundary
and different node objects, so it could not be adopted one module at a time, and it
would be a new dependency for about a hundred lines of lookups.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["GraphView", "node_label", "attribute", "constant_value", "initializer_map",
           "producer_map", "consumer_map", "graph_input_names", "graph_output_names",
           "node_attributes", "opset_version", "replace_input_uses", "remove_nodes", "keep_only",
           "add_initializer", "unique_name", "topological_sort", "to_array", "tensor_elem_types",
           "add_node", "add_typed_initializer", "rename_output", "remove_initializers",
           "clear_value_info", "set_initializer_value", "set_node_input", "pruned_copy",
           "names_in_use", "set_node_attribute"]


def node_label(node: onnx.NodeProto, index: int) -> str:
    """The name plans, reports and violations use for ``node``: its name, or ``OpType_index``
    (``index`` is its position in ``graph.node``) when unnamed."""
    return node.name or f"{node.op_type}_{index}"


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """Attribute ``name`` of ``node`` as a plain value (strings decoded), ``default`` when absent.

    A ``default`` of type int or float converts the value to that type.
    """
    for attr in node.attribute:
        if attr.name == name:
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                return value.decode()
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                return type(default)(value)
            return value
    return default


_CONSTANT_DTYPES = {"value_float": np.float32, "value_floats": np.float32,
                    "value_int": np.int64, "value_ints": np.int64}


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node (None for sparse or string constants)."""
    for attr in node.attribute:  # the spec allows exactly one value attribute
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in _CONSTANT_DTYPES:
            return np.array(helper.get_attribute_value(attr), dtype=_CONSTANT_DTYPES[attr.name])
    return None


class GraphView:
    """A read-only snapshot of one graph: who produces and reads each tensor, the constants
    and the node labels. Build it after the last edit; it does not follow later changes.

    Constants are initializers and the outputs of default-domain ``Constant`` nodes
    (:meth:`constant`); :attr:`initializers` holds only the former (what a stage may
    rewrite in place).
    """

    def __init__(self, graph: onnx.GraphProto | onnx.ModelProto) -> None:
        self.graph = graph.graph if isinstance(graph, onnx.ModelProto) else graph
        self.initializers = initializer_map(self.graph)
        self.producers = producer_map(self.graph)
        self.consumers = consumer_map(self.graph)
        self.inputs = graph_input_names(self.graph)
        self.outputs = graph_output_names(self.graph)
        self.output_set = set(self.outputs)
        self._labels = {id(node): node_label(node, index) for index, node in enumerate(self.graph.node)}
        self._constant_nodes = {
            node.output[0]: node
            for node in self.graph.node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output
        }

    def label(self, node: onnx.NodeProto) -> str:
        """:func:`node_label` of ``node`` (a node of this graph)."""
        return self._labels[id(node)]

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes reading ``tensor`` (each once), in graph order."""
        return self.consumers.get(tensor, [])

    def is_constant(self, tensor: str) -> bool:
        """True for an initializer or a Constant node's output."""
        return tensor in self.initializers or tensor in self._constant_nodes

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a constant ``tensor``, None when it is computed (or an input)."""
        if tensor in self.initializers:
            return to_array(self.initializers[tensor])
        node = self._constant_nodes.get(tensor)
        return None if node is None else constant_value(node)

    def constant_type(self, tensor: str) -> int | None:
        """The ONNX element type of a constant ``tensor`` (None when computed)."""
        if tensor in self.initializers:
            return int(self.initializers[tensor].data_type)
        value = self.constant(tensor)
        return None if value is None else int(helper.np_dtype_to_tensor_dtype(value.dtype))

    def input_constant(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        """The value of input ``index`` of ``node`` when present and constant, else None."""
        return (self.constant(node.input[index])
                if index < len(node.input) and node.input[index] else None)


def initializer_map(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers by name."""
    return {init.name: init for init in graph.initializer}


def to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """An initializer's value as a numpy array (external data must already be loaded)."""
    return numpy_helper.to_array(tensor)


def producer_map(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """The node producing each tensor name."""
    return {out: node for node in graph.node for out in node.output if out}


def consumer_map(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes reading each tensor name (a node reading a name twice appears once)."""
    users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            if name:
                users[name].append(node)
    return users


def graph_input_names(graph: onnx.GraphProto) -> list[str]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    inits = {init.name for init in graph.initializer}
    return [value.name for value in graph.input if value.name not in inits]


def graph_output_names(graph: onnx.GraphProto) -> list[str]:
    """Graph output names in order."""
    return [value.name for value in graph.output]


def node_attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes as plain Python values."""
    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    """The imported opset version of ``domain`` ('' is the default ONNX domain)."""
    for entry in model.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return None


def replace_input_uses(graph: onnx.GraphProto, old: str, new: str) -> int:
    """Make every node input (also in subgraphs' outer scope) reading ``old`` read ``new``.

    Returns the number of inputs rewritten. Graph outputs are not touched.
    """
    count = 0
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name == old:
                node.input[index] = new
                count += 1
    return count


def remove_nodes(graph: onnx.GraphProto, doomed: Iterable[onnx.NodeProto]) -> None:
    """Remove the given nodes (matched by identity) keeping the others' order."""
    doomed_ids = {id(node) for node in doomed}
    keep_only(graph.node, lambda node: id(node) not in doomed_ids)


def keep_only(field: Any, keep: Callable[[Any], bool]) -> None:
    """Drop the items of the repeated protobuf ``field`` that ``keep`` rejects, in place."""
    kept = [item for item in field if keep(item)]
    del field[:]
    field.extend(kept)


def add_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> onnx.TensorProto:
    """Append ``value`` as an initializer named ``name`` and return it."""
    tensor = numpy_helper.from_array(np.asarray(value), name=name)
    graph.initializer.append(tensor)
    return tensor


def unique_name(taken: set[str], base: str) -> str:
    """``base`` if unused, else ``base_1``, ``base_2``...; the result is added to ``taken``."""
    name = base
    index = 0
    while name in taken:
        index += 1
        name = f"{base}_{index}"
    taken.add(name)
    return name


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs.

    Raises:
        ValueError: the graph has a cycle or reads a tensor nobody provides.
    """
    available = {init.name for init in graph.initializer} | {value.name for value in graph.input} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest: list[onnx.NodeProto] = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({n for node in rest for n in node.input if n not in available})
            raise ValueError(f"graph cannot be ordered; unresolved tensors: {', '.join(missing[:5])}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


# Additions for the quantizer (Q/DQ emission, BN folding); same contract as above.


def add_node(
    graph: onnx.GraphProto,
    op_type: str,
    inputs: list[str],
    outputs: list[str],
    *,
    name: str,
    **attributes: object,
) -> onnx.NodeProto:
    """Append a default-domain node and return it (callers re-sort the graph when done)."""
    node = helper.make_node(op_type, inputs, outputs, name=name, **attributes)
    graph.node.append(node)
    return node


def add_typed_initializer(
    graph: onnx.GraphProto, name: str, value: np.ndarray, elem_type: int
) -> onnx.TensorProto:
    """Append ``value`` as an initializer of ONNX type ``elem_type`` (e.g. INT4, packed by onnx)."""
    array = np.asarray(value)
    tensor = helper.make_tensor(name, elem_type, list(array.shape), array.reshape(-1).tolist())
    graph.initializer.append(tensor)
    return tensor


def rename_output(graph: onnx.GraphProto, old: str, new: str) -> onnx.NodeProto:
    """Make the node producing ``old`` write ``new`` instead (readers are not touched).

    Raises:
        KeyError: no node produces ``old``.
    """
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == old:
                node.output[index] = new
                return node
    raise KeyError(old)


def remove_initializers(graph: onnx.GraphProto, names: Iterable[str]) -> None:
    """Drop the named initializers (and their graph-input entries, as old IR versions list them)."""
    doomed = set(names)
    keep_only(graph.initializer, lambda init: init.name not in doomed)
    keep_only(graph.input, lambda value: value.name not in doomed)


def clear_value_info(graph: onnx.GraphProto) -> None:
    """Forget intermediate shapes/types (stale after a rewrite; shape inference refills them)."""
    del graph.value_info[:]


def tensor_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """The ONNX element type of every typed tensor: inputs, outputs, value_info, initializers."""
    types: dict[str, int] = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


# Additions for rounding optimisation (rewriting stored integers, adding a bias input).


def set_initializer_value(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    """Overwrite initializer ``name`` with ``value``, keeping its ONNX element type (INT4 included).

    Raises:
        KeyError: no initializer is called ``name``.
    """
    for tensor in graph.initializer:
        if tensor.name == name:
            old = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(old.dtype), name=name))
            return
    raise KeyError(name)


def set_node_input(node: onnx.NodeProto, index: int, name: str) -> None:
    """Make input ``index`` of ``node`` read ``name``, padding skipped optional inputs with ''."""
    while len(node.input) <= index:
        node.input.append("")
    node.input[index] = name


def pruned_copy(
    model: onnx.ModelProto, outputs: Sequence[str], inputs: Sequence[str] | None = None
) -> onnx.ModelProto:
    """A copy of ``model`` whose graph outputs are ``outputs`` and that keeps only the nodes they need.

    With ``inputs`` the copy is cut there: those tensors become float graph inputs (keeping
    the shape inference knew: onnx2torch needs ranks) and the nodes before them are dropped.
    Output types are left for the runtime to infer; unused initializers are dropped.
    """
    producers = producer_map(model.graph)
    stop = set(inputs or ())
    needed: set[int] = set()
    stack = [name for name in outputs if name not in stop]
    while stack:
        node = producers.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(name for name in node.input if name and name not in stop)
    keep = [node for node in model.graph.node if id(node) in needed]
    used = {name for node in keep for name in node.input}
    if inputs is None:
        inits = {init.name for init in model.graph.initializer}
        graph_inputs = [value for value in model.graph.input if value.name not in inits or value.name in used]
    else:
        graph_inputs = [_float_value_info(model.graph, name) for name in inputs]
    graph = helper.make_graph(
        keep,
        model.graph.name,
        graph_inputs,
        [onnx.ValueInfoProto(name=name) for name in outputs],
        initializer=[init for init in model.graph.initializer if init.name in used],
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _float_value_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    """Tensor ``name`` as a graph input: its known value info, else a float of unknown shape."""
    for value in [*graph.value_info, *graph.input, *graph.output]:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            copy = onnx.ValueInfoProto()
            copy.CopyFrom(value)
            return copy
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)


# Additions for the shift negative correction (new Add/Pad nodes, a Conv's padding moved out).


def names_in_use(graph: onnx.GraphProto) -> set[str]:
    """Every tensor, initializer, value-info and node name of ``graph`` (for :func:`unique_name`)."""
    names = {init.name for init in graph.initializer}
    names |= {value.name for value in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for node in graph.node:
        names.update(node.input, node.output, [node.name])
    names.discard("")
    return names


def set_node_attribute(node: onnx.NodeProto, name: str, value: object) -> None:
    """Set attribute ``name`` of ``node`` to ``value`` (replacing any existing one)."""
    keep_only(node.attribute, lambda attr: attr.name != name)
    node.attribute.append(helper.make_attribute(name, value))
