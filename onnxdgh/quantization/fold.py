r"""Graph preparation before quantization: BatchNormalization folding and op normalisation.

Contract: :func:`prepare` returns a new float model computing the same function (up to
float rounding) in which

* every BatchNormalization whose input is produced by a Conv, ConvTranspose or Gemm with
  constant weights, read by nothing else, is folded into that producer;
* every other BatchNormalization (nothing to fold into) becomes the equivalent
  per-channel affine op that quantizes like any other op: a depthwise 1x1 Conv (input
  rank >= 3) or Mul + Add (rank 2);
* Gemm ``alpha`` / ``beta`` are folded into constant B / C;
* ``Div(x, c)`` by a constant becomes ``Mul(x, 1/c)`` (the hardware multiplies; profiles
  list Mul, not Div);
* every ``Add``/``Sub``/``Mul`` of a Conv, ConvTranspose or Gemm output (read by nothing
  else) and a per-output-channel constant is folded into that layer's weight and bias,
  also a chain of them and before or after a folded BN (what a compiler folds: no
  ``Conv -> Add(constant)`` left for a runtime to mis-execute, one quantizer fewer);
* inference-mode Dropout is removed.

The input model is not modified. :class:`FoldReport` counts what changed.

The math. In inference, BN computes per channel ``c``

.. math::
    y_c = \gamma_c \frac{x_c - \mu_c}{\sqrt{\sigma^2_c + \epsilon}} + \beta_c
        = s_c x_c + (\beta_c - s_c \mu_c), \qquad s_c = \gamma_c / \sqrt{\sigma^2_c + \epsilon}.

A Conv producing ``x_c = \sum W_{c,\dots} * u + b_c`` therefore folds to
``W'_{c,\dots} = s_c W_{c,\dots}`` and ``b'_c = s_c (b_c - \mu_c) + \beta_c``: the output
channel is axis 0 of a Conv weight. A ConvTranspose weight is ``(C_in, C_out / g, k...)``;
output channel ``o = j + (C_out/g) i_g`` of group ``i_g`` is column ``j`` of that group's
rows, so the weight is viewed as ``(g, C_in/g, C_out/g, k...)`` and scaled by ``s``
viewed as ``(g, 1, C_out/g, 1...)``. A Gemm ``Y = A B' + C`` (after ``alpha = beta = 1``,
``B' = B^T`` when ``transB``) has output channel ``n`` in column ``n`` of ``B'``, i.e. row
``n`` of ``B`` when ``transB = 1`` and column ``n`` otherwise; ``C' = s (C - \mu) + \beta``.
A BN with nothing to fold into is ``y = s x + (\beta - s\mu)``: a depthwise Conv with
weight ``s`` (shape ``(C, 1, 1...)``, ``group = C``) and bias ``\beta - s\mu``.

Affine constants are the same fold with other ``(s, \mu, \beta)``. A layer output ``x``
of rank ``r`` has its output channel on axis 1 (``N x C x ...`` for Conv and
ConvTranspose, ``M x C`` for Gemm). A constant ``k`` broadcasts per output channel when,
right-aligned to rank ``r`` (numpy broadcasting), every axis but axis 1 has size 1 and
axis 1 has size 1 or ``C`` (a scalar, ``[C, 1, 1]``, ``[1, C, 1, 1]``, ``[C]`` for Gemm);
it is then a vector ``k_c`` and, with ``\mu = 0``:

.. math::
    x + k = 1 \cdot x + k: \quad s = 1,\ \beta = k; \qquad
    x - k: \quad s = 1,\ \beta = -k; \qquad
    k - x: \quad s = -1,\ \beta = k; \qquad
    x \cdot k: \quad s = k,\ \beta = 0,

so ``W'_c = s_c W_c`` and ``b'_c = s_c b_c + \beta_c`` as above (``Div(x, k)`` already is
``Mul(x, 1/k)``). A ``k_c`` of 0 or below 0 is exact too: the channel's weights become 0
or change sign, and whatever activation follows now reads the layer directly (the
profile's fused patterns then apply to the layer). A constant that varies over another
axis (over H or W, or over the batch), would broadcast the output to a larger shape, or a
layer output with a second reader or that is a graph output, is left alone.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import graph as g
from ..errors import QuantizationError
from ..ops import OPS, output_channels, spec, weight_axis

__all__ = ["FoldReport", "prepare", "fold_batch_norms", "fold_affine_constants"]

_LOG = logging.getLogger(__name__)

_FOLD_TARGETS = frozenset(op for op, record in OPS.items() if record.bias is not None)
"""Layers with a weight and a bias input that a per-output-channel affine map folds into."""
_AFFINE_OPS = ("Add", "Sub", "Mul")


@dataclass
class FoldReport:
    """What :func:`prepare` changed."""

    folded: list[str] = field(default_factory=list)
    """BN nodes folded into their producer."""
    converted: list[str] = field(default_factory=list)
    """BN nodes with nothing to fold into, rewritten as a depthwise Conv or Mul + Add."""
    affine_folded: list[str] = field(default_factory=list)
    """Add/Sub/Mul (and Div turned Mul) nodes folded into the Conv/ConvTranspose/Gemm before them."""
    gemm_normalised: int = 0
    div_to_mul: int = 0
    dropout_removed: int = 0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "bn_folded": len(self.folded),
            "bn_converted": self.converted,
            "affine_folded": len(self.affine_folded),
            "gemm_normalised": self.gemm_normalised,
            "div_to_mul": self.div_to_mul,
            "dropout_removed": self.dropout_removed,
        }


def _rewrite_constant(
    graph: onnx.GraphProto, node: onnx.NodeProto, position: int, value: np.ndarray,
    taken: set[str], readers: dict[str, int],
) -> None:
    """Make ``node``'s input ``position`` the constant ``value``; under a fresh name when
    other nodes read the old one (they keep it)."""
    name = node.input[position] if position < len(node.input) else ""
    if not name:
        name = g.unique_name(taken, f"{node.name or node.output[0]}_bias")
        g.set_node_input(node, position, name)
    elif readers.get(name, 0) > 1:
        readers[name] -= 1
        name = g.unique_name(taken, f"{name}_{node.name or node.output[0]}")
        node.input[position] = name
    readers[name] = 1
    g.remove_initializers(graph, [name])
    g.add_initializer(graph, name, value)


def _bn_terms(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(s, mu, beta)`` of an inference-mode BN with constant parameters, else None."""
    if len(node.input) < 5 or any(name not in inits for name in node.input[1:5]):
        return None
    if len([name for name in node.output if name]) != 1 or g.attribute(node, "training_mode", 0):
        return None
    gamma, beta, mean, var = (g.to_array(inits[name]).astype(np.float64).reshape(-1) for name in node.input[1:5])
    return gamma / np.sqrt(var + g.attribute(node, "epsilon", 1e-5)), mean, beta


def _fold_into(
    graph: onnx.GraphProto,
    producer: onnx.NodeProto,
    s: np.ndarray,
    mean: np.ndarray,
    beta: np.ndarray,
    taken: set[str],
    readers: dict[str, int],
) -> bool:
    inits = g.initializer_map(graph)
    if len(producer.input) < 2 or producer.input[1] not in inits:
        return False
    if len(producer.input) > 2 and producer.input[2] and producer.input[2] not in inits:
        return False
    weight = g.to_array(inits[producer.input[1]]).astype(np.float64)
    attrs = g.node_attributes(producer)
    op = producer.op_type
    channels = s.shape[0]
    if op == "Gemm" and (weight.ndim != 2 or g.attribute(producer, "alpha", 1.0) != 1.0
                         or g.attribute(producer, "beta", 1.0) != 1.0):
        return False  # _normalise_gemm runs first; a computed C keeps beta
    if output_channels(op, attrs, weight.shape) != channels:
        return False
    if spec(op).layout == "conv_transpose":
        group = int(g.attribute(producer, "group", 1))  # type: ignore[call-overload]
        view = weight.reshape((group, weight.shape[0] // group, weight.shape[1]) + weight.shape[2:])
        factor = s.reshape((group, 1, weight.shape[1]) + (1,) * (weight.ndim - 2))
        scaled = (view * factor).reshape(weight.shape)
    else:
        shape = [1] * weight.ndim
        shape[weight_axis(op, attrs, weight.ndim)] = -1  # type: ignore[index]
        scaled = weight * s.reshape(shape)
    if len(producer.input) > 2 and producer.input[2]:
        bias = g.to_array(inits[producer.input[2]]).astype(np.float64)
        if op == "Gemm" and bias.size not in (1, channels) and bias.shape[-1] != channels:
            return False
        new_bias = s * (np.broadcast_to(bias, bias.shape) - mean) + beta if op == "Gemm" else s * (bias.reshape(-1) - mean) + beta
    else:
        new_bias = s * (-mean) + beta
    _rewrite_constant(graph, producer, 1, scaled.astype(np.float32), taken, readers)
    _rewrite_constant(graph, producer, 2, np.asarray(new_bias, np.float32), taken, readers)
    return True


def _rank(graph: onnx.GraphProto, name: str) -> int | None:
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


def _convert_bn(
    graph: onnx.GraphProto, node: onnx.NodeProto, label: str, s: np.ndarray, mean: np.ndarray, beta: np.ndarray,
    taken: set[str],
) -> None:
    """Replace an unfoldable BN by a depthwise 1x1 Conv (rank >= 3) or Mul + Add (rank 2)."""
    rank = _rank(graph, node.input[0])
    if rank is None:
        raise QuantizationError(
            f"BatchNormalization {label} has nothing to fold into and the rank of its input is unknown",
            "export the model with static shapes so the BN can be rewritten as a per-channel op",
        )
    channels = s.shape[0]
    shift = (beta - s * mean).astype(np.float32)
    base = node.name or node.output[0]
    if rank >= 3:
        weight_name = g.unique_name(taken, f"{base}_weight")
        bias_name = g.unique_name(taken, f"{base}_bias")
        g.add_initializer(graph, weight_name, s.astype(np.float32).reshape((channels, 1) + (1,) * (rank - 2)))
        g.add_initializer(graph, bias_name, shift)
        g.add_node(
            graph, "Conv", [node.input[0], weight_name, bias_name], [node.output[0]],
            name=node.name or g.unique_name(taken, f"{base}_conv"),
            group=channels, kernel_shape=[1] * (rank - 2),
        )
    elif rank == 2:
        scale_name = g.unique_name(taken, f"{base}_scale")
        shift_name = g.unique_name(taken, f"{base}_shift")
        scaled = g.unique_name(taken, f"{base}_scaled")
        g.add_initializer(graph, scale_name, s.astype(np.float32))
        g.add_initializer(graph, shift_name, shift)
        g.add_node(graph, "Mul", [node.input[0], scale_name], [scaled], name=g.unique_name(taken, f"{base}_mul"))
        g.add_node(graph, "Add", [scaled, shift_name], [node.output[0]], name=g.unique_name(taken, f"{base}_add"))
    else:
        raise QuantizationError(
            f"BatchNormalization {label} normalises a rank-{rank} tensor; onnxdgh expects rank >= 2",
            "re-export the model; BN over a rank-1 tensor is unusual",
        )


def fold_batch_norms(model: onnx.ModelProto, report: FoldReport | None = None) -> onnx.ModelProto:
    """Fold (or rewrite) every BatchNormalization of ``model``; see the module docstring."""
    report = report if report is not None else FoldReport()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=False)
    except Exception as exc:  # ranks are only needed for BNs that cannot fold
        _LOG.info("shape inference before BN folding failed: %s", exc)
    graph = out.graph
    taken, readers = _name_tables(graph)
    outputs = set(g.graph_output_names(graph))
    doomed: list[onnx.NodeProto] = []
    for index, node in enumerate(list(graph.node)):  # new nodes go to the end: indices hold
        if node.op_type != "BatchNormalization":
            continue
        inits = g.initializer_map(graph)
        terms = _bn_terms(node, inits)
        label = g.node_label(node, index)
        if terms is None:
            raise QuantizationError(
                f"BatchNormalization {label} is in training mode or has computed parameters",
                "export the model in eval mode: model.eval() before torch.onnx.export",
            )
        s, mean, beta = terms
        view = g.GraphView(graph)
        source = node.input[0]
        producer = view.producers.get(source)
        if (producer is not None and producer.op_type in _FOLD_TARGETS and source not in outputs
                and len(view.readers(source)) == 1
                and _fold_into(graph, producer, s, mean, beta, taken, readers)):
            g.rename_output(graph, source, node.output[0])
            report.folded.append(label)
        else:
            _convert_bn(graph, node, label, s, mean, beta, taken)
            report.converted.append(label)
        doomed.append(node)
    g.remove_nodes(graph, doomed)
    _drop_unused_initializers(graph)
    g.topological_sort(graph)
    g.clear_value_info(graph)
    return out


def _name_tables(graph: onnx.GraphProto) -> tuple[set[str], dict[str, int]]:
    """Every name in use (for fresh names) and how many node inputs read each tensor."""
    return g.names_in_use(graph), dict(Counter(name for node in graph.node for name in node.input if name))


def _layer_shape(producer: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[int, int] | None:
    """``(rank, channels)`` of a Conv/ConvTranspose/Gemm output (channels on axis 1), if its weight is constant."""
    if len(producer.input) < 2 or producer.input[1] not in inits:
        return None
    dims = tuple(inits[producer.input[1]].dims)
    if spec(producer.op_type).layout == "gemm" and len(dims) != 2:
        return None
    return len(dims), output_channels(producer.op_type, g.node_attributes(producer), dims)


def _channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per output channel (axis 1 of a rank-``rank`` output), or None
    when it broadcasts along any other axis or would widen the output."""
    if value.ndim > rank:
        return None
    aligned = value.reshape((1,) * (rank - value.ndim) + value.shape)
    if any(size != 1 for axis, size in enumerate(aligned.shape) if axis != 1):
        return None
    if aligned.shape[1] not in (1, channels):
        return None
    return np.broadcast_to(aligned.astype(np.float64).reshape(-1), (channels,)).copy()


def fold_affine_constants(model: onnx.ModelProto, report: FoldReport | None = None) -> onnx.ModelProto:
    """Fold every Add/Sub/Mul by a per-channel constant into the layer before it; see the module docstring.

    One pass in graph order suffices for a chain (``Conv -> Mul -> Add``): after a fold the
    layer writes the folded node's output, which the next node of the chain reads.
    """
    report = report if report is not None else FoldReport()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken, readers = _name_tables(graph)
    outputs = set(g.graph_output_names(graph))
    view = g.GraphView(graph)
    producers = dict(view.producers)  # follows the folds below
    doomed: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type not in _AFFINE_OPS or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        inits = g.initializer_map(graph)
        constant_first = node.input[0] in inits
        first, second = node.input
        source, constant = (second, first) if constant_first else (first, second)
        producer = producers.get(source)
        if (constant not in inits or source in inits or source in outputs
                or producer is None or producer.op_type not in _FOLD_TARGETS
                or len(view.readers(source)) != 1
                or len([name for name in node.output if name]) != 1):
            continue
        value = g.to_array(inits[constant])
        layer = _layer_shape(producer, inits)
        if layer is None or not np.issubdtype(value.dtype, np.floating):
            continue
        vector = _channel_vector(value, *layer)
        if vector is None:
            continue
        ones, zeros = np.ones_like(vector), np.zeros_like(vector)
        if node.op_type == "Mul":
            s, beta = vector, zeros
        elif node.op_type == "Add":
            s, beta = ones, vector
        elif constant_first:  # Sub(k, x) = -x + k
            s, beta = -ones, vector
        else:  # Sub(x, k) = x - k
            s, beta = ones, -vector
        if not _fold_into(graph, producer, s, zeros, beta, taken, readers):
            continue
        g.rename_output(graph, source, node.output[0])
        producers[node.output[0]] = producer
        readers[constant] -= 1
        report.affine_folded.append(view.label(node))
        doomed.append(node)
    if doomed:
        g.remove_nodes(graph, doomed)
        _drop_unused_initializers(graph)
        g.clear_value_info(graph)
    return out


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    read = {name for node in graph.node for name in node.input}
    g.remove_initializers(graph, [init.name for init in graph.initializer if init.name not in read])


def _normalise_gemm(graph: onnx.GraphProto, taken: set[str], readers: dict[str, int]) -> int:
    count = 0
    for node in graph.node:
        if node.op_type != "Gemm":
            continue
        inits = g.initializer_map(graph)
        alpha, beta = g.attribute(node, "alpha", 1.0), g.attribute(node, "beta", 1.0)
        changed = False
        if alpha != 1.0 and len(node.input) > 1 and node.input[1] in inits:
            scaled = (g.to_array(inits[node.input[1]]) * alpha).astype(np.float32)
            _rewrite_constant(graph, node, 1, scaled, taken, readers)
            g.set_node_attribute(node, "alpha", 1.0)
            changed = True
        has_c = len(node.input) > 2 and bool(node.input[2])
        if beta != 1.0 and (not has_c or node.input[2] in inits):
            if has_c:
                c = g.to_array(g.initializer_map(graph)[node.input[2]])
                _rewrite_constant(graph, node, 2, (c * beta).astype(np.float32), taken, readers)
            g.set_node_attribute(node, "beta", 1.0)
            changed = True
        count += int(changed)
    return count


def _div_to_mul(graph: onnx.GraphProto, taken: set[str], readers: dict[str, int]) -> int:
    count = 0
    inits = g.initializer_map(graph)
    for node in graph.node:
        if node.op_type != "Div" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        value = g.to_array(inits[node.input[1]])
        if not np.issubdtype(value.dtype, np.floating) or np.any(value == 0):
            continue
        name = g.unique_name(taken, f"{node.input[1]}_reciprocal")
        g.add_initializer(graph, name, (1.0 / value.astype(np.float64)).astype(value.dtype))
        readers[node.input[1]] = readers.get(node.input[1], 1) - 1
        node.input[1] = name
        node.op_type = "Mul"
        count += 1
    return count


def _drop_dropout(graph: onnx.GraphProto) -> int:
    outputs = set(g.graph_output_names(graph))
    inits = g.initializer_map(graph)
    doomed = []
    for node in graph.node:
        if node.op_type != "Dropout":
            continue
        if len(node.input) > 2 and node.input[2]:
            mode = g.to_array(inits[node.input[2]]) if node.input[2] in inits else None
            if mode is None or bool(mode):
                continue
        if len([name for name in node.output[1:] if name]) or node.output[0] in outputs:
            continue
        g.replace_input_uses(graph, node.output[0], node.input[0])
        doomed.append(node)
    g.remove_nodes(graph, doomed)
    return len(doomed)


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, FoldReport]:
    """Normalise Gemm/Div/Dropout, then fold affine constants and BatchNormalization (see module docstring).

    Affine constants are folded before the BNs (``Conv -> Mul(k) -> BN``: the BN then
    folds too) and after them (``Conv -> BN -> Add(k)``, and behind a BN rewritten as a
    depthwise Conv).
    """
    report = FoldReport()
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken, readers = _name_tables(graph)
    report.dropout_removed = _drop_dropout(graph)
    report.gemm_normalised = _normalise_gemm(graph, taken, readers)
    report.div_to_mul = _div_to_mul(graph, taken, readers)
    out = fold_affine_constants(out, report)
    out = fold_batch_norms(out, report)
    out = fold_affine_constants(out, report)
    _LOG.info(
        "prepared graph: %d BN folded, %d BN rewritten, %d Div->Mul, %d Add/Sub/Mul folded",
        len(report.folded), len(report.converted), report.div_to_mul, len(report.affine_folded),
    )
    return out, report
