"""The one fake-quant simulation of a QDQ model: the emitted graph (or a cut of it) as a torch module.

Contract:

* :func:`simulate` converts a QDQ ONNX model -- the emitter's output, or the part of it
  between given tensors -- to a differentiable torch module with onnx2torch, the converter
  :mod:`onnxdgh.convert` uses for the float model. onnx2torch has no QuantizeLinear /
  DequantizeLinear; this module registers them (per tensor or per axis, zero point of any
  integer container: int8, uint8, int4, uint4, int16, uint16, int32):

  * ``QuantizeLinear`` -> :class:`FakeQuantize`: ``clamp(round(x / s) + z, qmin, qmax)``
    with a straight-through gradient for the rounding, the integers kept as float;
  * ``DequantizeLinear`` of a computed tensor -> ``(q - z) * s``;
  * ``DequantizeLinear`` of an integer initializer -> :class:`QuantizedConstant`, a module
    without input whose integers (``integers``) can be replaced, or whose value can be
    supplied by a function (``source``: AdaRound's soft rounding, a learned bias). The
    weight and bias of a Conv/ConvTranspose are such constants too: onnx2torch bakes them
    into an ``nn.ConvNd``, whose ``weight``/``bias`` are then parametrised by them.

  Any other op is whatever onnx2torch makes of it: there is no op table here.
* With ``check`` (feeds for the graph inputs) the module is compared once with
  onnxruntime on the same (sub)graph; a disagreement raises
  :class:`~onnxdgh.errors.QuantizationError` naming the output. An op onnx2torch cannot
  convert raises :class:`UnsupportedOpError` (a QuantizationError) naming node and op.
* The input model is never modified.

Why one simulation: calibration of the rounding (AdaRound, BRECQ), bias correction and
any later fake-quant step see exactly the graph that ships, checked against the runtime
that will run it, instead of a second hand-written interpretation of ONNX semantics.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import defs, helper
from torch import fx, nn
from torch.nn.utils import parametrize

from .. import graph as g
from ..errors import ConversionError, QuantizationError
from ..runtime import make_session, run_batched

__all__ = ["FakeQuantize", "QuantizedConstant", "Simulation", "UnsupportedOpError", "simulate"]

_LOG = logging.getLogger(__name__)

# Relative RMS difference to onnxruntime above which the simulation is wrong. A correct
# simulation differs only where float summation order flips a rounding tie of an inner
# quantizer, one step on a rare element.
CHECK_RTOL = 1e-3

_INT_RANGES = {
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT4: (-8, 7),
    onnx.TensorProto.UINT4: (0, 15),
    onnx.TensorProto.INT16: (-(2**15), 2**15 - 1),
    onnx.TensorProto.UINT16: (0, 2**16 - 1),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
}

# onnx2torch's Conv/ConvTranspose converter reads the weight (1) and bias (2) from
# initializers and bakes them into an nn.ConvNd; every other converter takes computed inputs.
_BAKED_INPUTS = {"Conv": (1, 2), "ConvTranspose": (1, 2)}


class UnsupportedOpError(QuantizationError):
    """A node of the (sub)graph that onnx2torch cannot convert."""


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward (half to even, as onnxruntime), identity gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


def _along(value: np.ndarray, axis: int | None, rank: int) -> torch.Tensor:
    """A per-tensor or per-axis parameter shaped to broadcast against a rank-``rank`` tensor."""
    value = np.asarray(value, np.float32)
    if value.size == 1 or axis is None or rank == 0:
        return torch.tensor(float(value.reshape(-1)[0]) if value.size == 1 else value)
    shape = [1] * rank
    shape[axis % rank] = -1
    return torch.from_numpy(np.ascontiguousarray(value.reshape(shape)))


class FakeQuantize(nn.Module):
    """QuantizeLinear: ``clamp(round(x / scale) + zero, low, high)``, integers carried as float."""

    def __init__(self, scale: np.ndarray, zero: np.ndarray, bounds: tuple[int, int], axis: int) -> None:
        super().__init__()
        self.scale, self.zero, self.bounds, self.axis = np.asarray(scale), np.asarray(zero), bounds, axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = _along(self.scale, self.axis, x.ndim).to(x.device)
        z = _along(self.zero.astype(np.float32), self.axis, x.ndim).to(x.device)
        return torch.clamp(_round_ste(x / s) + z, *self.bounds)


class Dequantize(nn.Module):
    """DequantizeLinear of a computed tensor: ``(q - zero) * scale``."""

    def __init__(self, scale: np.ndarray, zero: np.ndarray, axis: int) -> None:
        super().__init__()
        self.scale, self.zero, self.axis = np.asarray(scale), np.asarray(zero), axis

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # noqa: D102
        s = _along(self.scale, self.axis, q.ndim).to(q.device)
        z = _along(self.zero.astype(np.float32), self.axis, q.ndim).to(q.device)
        return (q - z) * s


class QuantizedConstant(nn.Module):
    """DequantizeLinear of an integer initializer ``name``: ``(integers - zero) * scale``.

    ``integers`` (a float tensor of whole numbers) may be replaced; ``source``, when set,
    supplies the dequantized value instead (soft rounding, a learned bias).
    """

    def __init__(self, name: str, integers: np.ndarray, scale: np.ndarray, zero: np.ndarray, axis: int) -> None:
        super().__init__()
        self.name = name
        rank = np.ndim(integers)
        self.register_buffer("integers", torch.from_numpy(np.asarray(integers, np.float32).copy()))
        self.register_buffer("scale", _along(scale, axis, rank))
        self.register_buffer("zero", _along(np.asarray(zero).astype(np.float32), axis, rank))
        self.source: Callable[[], torch.Tensor] | None = None

    def dequantize(self, integers: torch.Tensor) -> torch.Tensor:
        """The float value of ``integers`` on this constant's grid."""
        return (integers - self.zero) * self.scale

    def forward(self) -> torch.Tensor:  # noqa: D102
        return self.source() if self.source is not None else self.dequantize(self.integers)


class _Bound(nn.Module):
    """Parametrisation of a baked nn.ConvNd weight/bias by a :class:`QuantizedConstant`."""

    def __init__(self, constant: QuantizedConstant) -> None:
        super().__init__()
        self.constant = constant

    def forward(self, _: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.constant()


# ----------------------------------------------------------------- onnx2torch converters


def _initializer(graph: object, name: str, node: object) -> onnx.TensorProto:
    tensor = graph.initializers.get(name) if name else None  # type: ignore[attr-defined]
    if tensor is None:
        raise NotImplementedError(f"{node.operation_type} {node.name!r}: input {name!r} is not a constant")  # type: ignore[attr-defined]
    return tensor.proto


def _qdq_parameters(node: object, graph: object) -> tuple[np.ndarray, np.ndarray, int, tuple[int, int]]:
    """(scale, zero point, axis, integer range) of a Q/DQ node of the onnx2torch graph."""
    inputs = node.input_values  # type: ignore[attr-defined]
    attrs = node.attributes  # type: ignore[attr-defined]
    if int(attrs.get("block_size", 0)):
        raise NotImplementedError("blocked quantization is not supported")
    scale = g.to_array(_initializer(graph, inputs[1], node)).astype(np.float32)
    if len(inputs) > 2 and inputs[2]:
        proto = _initializer(graph, inputs[2], node)
        zero, elem_type = np.asarray(g.to_array(proto)).astype(np.int64), proto.data_type
    else:
        zero, elem_type = np.zeros(scale.shape, np.int64), int(attrs.get("output_dtype", 0)) or onnx.TensorProto.UINT8
    if elem_type not in _INT_RANGES:
        raise NotImplementedError(f"integer type {onnx.TensorProto.DataType.Name(elem_type)}")
    return scale, zero, int(attrs.get("axis", 1)), _INT_RANGES[elem_type]


def _convert_qdq(node: Any, graph: Any) -> object:
    """onnx2torch converter of QuantizeLinear and DequantizeLinear (see the module contract)."""
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    scale, zero, axis, bounds = _qdq_parameters(node, graph)
    source, inputs = node.input_values[0], (node.input_values[0],)
    module: nn.Module
    if node.operation_type == "QuantizeLinear":
        module = FakeQuantize(scale, zero, bounds, axis)
    elif source in graph.initializers:
        integers = g.to_array(graph.initializers[source].proto).astype(np.int64)
        module, inputs = QuantizedConstant(source, integers, scale, zero, axis), ()
    else:
        module = Dequantize(scale, zero, axis)
    return OperationConverterResult(module, OnnxMapping(inputs=inputs, outputs=node.output_values))


# Newer opsets of ops whose later versions only added element types: onnx2torch's converter
# of the last version it knows computes the same function (models with INT4 Q/DQ types
# are opset 21).
_TYPE_ONLY_VERSIONS = {
    "Reshape": (19, 21), "Flatten": (21,), "Transpose": (21,), "Unsqueeze": (21,),
    "Identity": (19, 21), "Cast": (19, 21), "Shape": (19, 21), "Constant": (19, 21),
}


@functools.cache
def _register_converters() -> None:
    """Add the Q/DQ converters (and the type-only newer versions) to onnx2torch's registry, once."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.node_converters.registry import add_converter

    def missing(op: str, version: int) -> bool:
        try:
            return get_converter(op, version) is None
        except NotImplementedError:
            return True

    schemas = defs.get_all_schemas_with_history()
    for op in ("QuantizeLinear", "DequantizeLinear"):
        for version in sorted({s.since_version for s in schemas if s.name == op and not s.domain}):
            if missing(op, version):
                add_converter(op, version)(_convert_qdq)
    for op, versions in _TYPE_ONLY_VERSIONS.items():
        for version in versions:
            if missing(op, version):
                add_converter(op, version)(get_converter(op, version - 1))


# ------------------------------------------------------------------------- the module


@dataclass
class Simulation:
    """A QDQ (sub)graph as a torch module: ``sim(*inputs) -> [outputs]``, in ONNX names' order.

    ``constants``: every :class:`QuantizedConstant`, by the name of its integer initializer.
    """

    module: fx.GraphModule = field(repr=False)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    constants: dict[str, QuantizedConstant] = field(repr=False)

    def __call__(self, *values: torch.Tensor) -> list[torch.Tensor]:
        from ..convert import quiet_onnx2torch

        with quiet_onnx2torch():
            result = self.module(*values)
        return list(result) if isinstance(result, (tuple, list)) else [result]

    def run(self, feeds: Sequence[np.ndarray], batch: int = 256) -> list[np.ndarray]:
        """Run on numpy ``feeds`` (one per input) in batches, without gradients."""
        parts: list[list[np.ndarray]] = []
        with torch.no_grad():
            for start in range(0, feeds[0].shape[0], batch):
                xs = [torch.from_numpy(np.ascontiguousarray(f[start : start + batch], np.float32)) for f in feeds]
                parts.append([y.numpy() for y in self(*xs)])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self.outputs))]


def _fold_baked(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Replace, in ``model``, each constant DequantizeLinear read where onnx2torch bakes the
    value (Conv weight/bias) by a float initializer of the same name; return those nodes."""
    inits = g.initializer_map(model.graph)
    producers = g.producer_map(model.graph)
    folded: dict[str, onnx.NodeProto] = {}
    for node in model.graph.node:
        for index in _BAKED_INPUTS.get(node.op_type, ()):
            dq = producers.get(node.input[index]) if index < len(node.input) and node.input[index] else None
            if dq is None or dq.op_type != "DequantizeLinear" or not all(n in inits for n in dq.input if n):
                continue
            folded[dq.output[0]] = dq
    g.remove_nodes(model.graph, folded.values())
    for name, dq in folded.items():  # placeholder value: the parametrisation supplies it
        g.add_initializer(model.graph, name, np.zeros(tuple(inits[dq.input[0]].dims), np.float32))
    return folded


def _needs_explicit_pads(node: onnx.NodeProto) -> bool:
    """A Conv/ConvTranspose whose padding onnx2torch cannot express (auto_pad SAME_*;
    ConvTranspose with asymmetric pads or an output_shape)."""
    if node.op_type not in _BAKED_INPUTS:
        return False
    if str(g.attribute(node, "auto_pad", "NOTSET")).startswith("SAME"):
        return True
    if node.op_type != "ConvTranspose":
        return False
    pads = list(g.attribute(node, "pads", []))  # type: ignore[call-overload]
    return (bool(g.attribute(node, "output_shape"))
            or pads[: len(pads) // 2] != pads[len(pads) // 2 :])


def _explicit_pads(model: onnx.ModelProto) -> None:
    """Rewrite, in ``model``, the paddings onnx2torch lacks into ones it has, same function:
    a SAME_* Conv gets its explicit pads for the input size; such a ConvTranspose computes
    its full output (no pads) and a Slice crops it as ONNX's pads / output_shape /
    auto_pad say. Needs the graph inputs' shapes (the padding depends on the size)."""
    graph = model.graph
    targets = [node for node in graph.node if _needs_explicit_pads(node)]
    if not targets:
        return
    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim][2:] for v in
             [*inferred.graph.value_info, *inferred.graph.input]}
    taken = g.names_in_use(graph)
    for node in targets:
        size = sizes.get(node.input[0])
        weight = g.initializer_map(graph).get(node.input[1])
        if not size or not all(size) or weight is None:
            raise NotImplementedError(f"{node.op_type} {node.name!r}: padding of an input of unknown size")
        n = len(size)
        kernel = list(weight.dims[2:])
        strides = list(g.attribute(node, "strides", [1] * n))  # type: ignore[call-overload]
        dilations = list(g.attribute(node, "dilations", [1] * n))  # type: ignore[call-overload]
        pads = list(g.attribute(node, "pads", [0] * 2 * n))  # type: ignore[call-overload]
        extra = list(g.attribute(node, "output_padding", [0] * n))  # type: ignore[call-overload]
        wanted = list(g.attribute(node, "output_shape", []))[-n:]  # type: ignore[call-overload]
        auto = str(g.attribute(node, "auto_pad", "NOTSET"))
        begin, end = pads[:n], pads[n:]
        for i in range(n):
            full = strides[i] * (size[i] - 1) + (kernel[i] - 1) * dilations[i] + 1 + extra[i]
            if node.op_type == "Conv":
                total = max(0, (-(-size[i] // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i])
            elif wanted or auto.startswith("SAME"):
                total = full - (wanted[i] if wanted else size[i] * strides[i])
            else:
                continue
            small, large = total // 2, total - total // 2
            begin[i], end[i] = (small, large) if auto == "SAME_UPPER" else (large, small)
        for name in ("auto_pad", "output_shape", "pads"):
            for attribute in [a for a in node.attribute if a.name == name]:
                node.attribute.remove(attribute)
        if node.op_type == "Conv":
            node.attribute.append(helper.make_attribute("pads", begin + end))
            continue
        full_out = g.unique_name(taken, f"{node.output[0]}_full")
        out, node.output[0] = node.output[0], full_out
        names = [g.unique_name(taken, f"{out}_{part}") for part in ("starts", "ends", "axes")]
        g.add_initializer(graph, names[0], np.array(begin, np.int64))
        g.add_initializer(graph, names[1], np.array([-e if e else np.iinfo(np.int64).max for e in end], np.int64))
        g.add_initializer(graph, names[2], np.arange(2, 2 + n, dtype=np.int64))
        g.add_node(graph, "Slice", [full_out, *names], [out], name=g.unique_name(taken, f"{out}_crop"))
    g.topological_sort(graph)


def _constant_of(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> QuantizedConstant:
    ints = g.to_array(inits[dq.input[0]]).astype(np.int64)
    scale = g.to_array(inits[dq.input[1]]).astype(np.float32)
    zero = g.to_array(inits[dq.input[2]]).astype(np.int64) if len(dq.input) > 2 and dq.input[2] else np.zeros(scale.shape, np.int64)
    return QuantizedConstant(dq.input[0], ints, scale, zero, int(g.node_attributes(dq).get("axis", 1)))  # type: ignore[call-overload]


def _bind_baked(module: fx.GraphModule, folded: Mapping[str, onnx.NodeProto], model: onnx.ModelProto,
                inits: Mapping[str, onnx.TensorProto]) -> list[QuantizedConstant]:
    """Parametrise each nn.ConvNd's weight/bias by the QuantizedConstant of its folded input."""
    by_output = {node.output[0]: node for node in model.graph.node}
    bound: list[QuantizedConstant] = []
    for sub in module.modules():
        mapping = getattr(sub, "onnx_mapping", None)
        node = by_output.get(mapping.outputs[0]) if mapping is not None and mapping.outputs else None
        if node is None or node.op_type not in _BAKED_INPUTS:
            continue
        conv = sub[-1] if isinstance(sub, nn.Sequential) else sub  # Sequential(pad, conv) for asymmetric pads
        for index, attribute in zip(_BAKED_INPUTS[node.op_type], ("weight", "bias")):
            name = node.input[index] if index < len(node.input) else ""
            if name in folded:
                constant = _constant_of(folded[name], inits)
                parametrize.register_parametrization(conv, attribute, _Bound(constant), unsafe=True)
                bound.append(constant)
    return bound


def simulate(
    model: onnx.ModelProto,
    *,
    inputs: Sequence[str] | None = None,
    outputs: Sequence[str] | None = None,
    check: Sequence[np.ndarray] | None = None,
    rtol: float = CHECK_RTOL,
) -> Simulation:
    """The fake-quant torch module of ``model`` between ``inputs`` and ``outputs``.

    Args:
        model: a QDQ model (not modified).
        inputs, outputs: tensor names delimiting the part to simulate (default: the graph's).
        check: one array per input: compare the module with onnxruntime on them once.
        rtol: allowed RMS difference relative to the RMS of onnxruntime's output.

    Raises:
        UnsupportedOpError: a node onnx2torch cannot convert (named with its op).
        QuantizationError: the module disagrees with onnxruntime on ``check``.
    """
    from ..convert import check_converters, convert_graph

    _register_converters()
    out_names = list(outputs) if outputs is not None else g.graph_output_names(model.graph)
    part = g.pruned_copy(model, out_names, inputs)
    in_names = g.graph_input_names(part.graph)
    for value, feed in zip([v for v in part.graph.input if v.name in in_names], check or ()):
        value.CopyFrom(helper.make_tensor_value_info(value.name, onnx.TensorProto.FLOAT, ["N", *np.shape(feed)[1:]]))
    inits = g.initializer_map(part.graph)
    prepared = onnx.ModelProto()
    prepared.CopyFrom(part)
    folded = _fold_baked(prepared)
    try:
        _explicit_pads(prepared)
        check_converters(prepared)
        with warnings.catch_warnings():  # e.g. Resize's "results might differ": the check below decides
            warnings.filterwarnings("ignore", category=UserWarning, module="onnx2torch")
            module = convert_graph(prepared)
    except ConversionError as exc:
        raise UnsupportedOpError(exc.message, "the simulation converts with onnx2torch; this op has no converter") from exc
    except NotImplementedError as exc:
        raise UnsupportedOpError(str(exc), "pass check= inputs so the padding can be resolved") from exc
    module.eval()
    constants = {m.name: m for m in module.modules() if isinstance(m, QuantizedConstant)}
    constants.update({c.name: c for c in _bind_baked(module, folded, prepared, inits)})
    sim = Simulation(module, tuple(in_names), tuple(out_names), constants)
    if check is not None:
        _check(sim, part, check, rtol)
    return sim


def _check(sim: Simulation, part: onnx.ModelProto, feeds: Sequence[np.ndarray], rtol: float) -> None:
    session = make_session(part, optimize=False)
    if len(feeds) == 1:
        expected = run_batched(session, feeds[0], batch_size=64, outputs=list(sim.outputs))
    else:
        expected = session.run(list(sim.outputs), dict(zip(sim.inputs, feeds)))
    got = sim.run(feeds)
    for name, ref, out in zip(sim.outputs, expected, got):
        if ref.shape != out.shape or error(out, ref) > rtol:
            detail = f"shape {out.shape} vs {ref.shape}" if ref.shape != out.shape else f"relative RMS difference {error(out, ref):.3g}"
            raise QuantizationError(
                f"the fake-quant simulation of tensor {name!r} disagrees with onnxruntime ({detail})",
                "report this model to the onnxdgh developers; an op is converted with other semantics",
            )


def error(out: np.ndarray, ref: np.ndarray) -> float:
    """RMS of ``out - ref`` relative to the RMS of ``ref``."""
    diff = float(np.sqrt(np.mean((out.astype(np.float64) - ref) ** 2)))
    return diff / (1e-12 + float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))))
