"""Helpers for the quantizer tests: tiny graphs built in-process, ORT runs, a QDQ structure check."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxdgh.ops import SHAPE_INPUT_INDICES

QDQ = ("QuantizeLinear", "DequantizeLinear")


def rng(seed: int = 0) -> np.random.Generator:
    """A seeded generator (every test is reproducible)."""
    return np.random.default_rng(seed)


def make_model(
    nodes: Sequence[onnx.NodeProto],
    initializers: Mapping[str, np.ndarray],
    *,
    input_shape: Sequence[int | str] = ("batch", 3, 8, 8),
    outputs: Sequence[str] = ("y",),
    opset: int = 17,
    input_name: str = "x",
) -> onnx.ModelProto:
    """A float model with one input ``x`` and float outputs, opset ``opset``, checked."""
    inits = [numpy_helper.from_array(np.asarray(value), name) for name, value in initializers.items()]
    graph = helper.make_graph(
        list(nodes),
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # Output shapes are left to shape inference (it fills the graph outputs in).
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_weight(out_ch: int, in_ch: int, k: int = 3, seed: int = 0) -> np.ndarray:
    """Random Conv weights with a spread of per-channel magnitudes."""
    r = rng(seed)
    w = r.standard_normal((out_ch, in_ch, k, k)).astype(np.float32) * 0.3
    return w * r.uniform(0.2, 2.0, size=(out_ch, 1, 1, 1)).astype(np.float32)


def images(n: int = 32, shape: Sequence[int] = (3, 8, 8), seed: int = 1) -> np.ndarray:
    """Gaussian calibration images."""
    return rng(seed).standard_normal((n, *shape)).astype(np.float32)


def session(model: onnx.ModelProto | str, *, optimize: bool, save_to: Path | None = None) -> ort.InferenceSession:
    """A CPU session with graph optimisations on or off; ``save_to`` keeps the optimised graph."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, x: np.ndarray, *, optimize: bool = False) -> list[np.ndarray]:
    """All outputs of ``model`` on ``x``."""
    sess = session(model, optimize=optimize)
    return sess.run(None, {sess.get_inputs()[0].name: x})


def is_pow2(value: float) -> bool:
    """Exact positive power of two."""
    if not value > 0 or not math.isfinite(value):
        return False
    return math.frexp(value)[0] == 0.5


def _const(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def qdq_scale(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """The scale initializer of a Q or DQ node."""
    value = _const(model, node.input[1])
    assert value is not None, f"{node.name}: scale is not a constant"
    return value


def structure_problems(
    model: onnx.ModelProto, fused: Iterable[tuple[str, str]] = (), float_inside: Iterable[str] = ()
) -> list[str]:
    """Everything that breaks 'every tensor quantized, power-of-two, zero point 0' in ``model``.

    ``fused``: (producer op, consumer op) pairs allowed to pass a float tensor directly;
    ``float_inside``: tensor and initializer names allowed in float (inside one op).
    """
    allowed_float = set(float_inside)
    graph = model.graph
    fused_pairs = set(fused)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {init.name: init for init in graph.initializer}
    problems: list[str] = []
    for node in graph.node:
        if node.op_type in QDQ:
            scale = qdq_scale(model, node)
            if scale.dtype != np.float32 or not all(is_pow2(float(s)) for s in scale.reshape(-1)):
                problems.append(f"{node.name}: scale {scale} not float32 powers of two")
            zp = _const(model, node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if zp is None or np.any(zp.astype(np.int64) != 0):
                problems.append(f"{node.name}: zero point {zp} is not 0")
            continue
        shape_idx = SHAPE_INPUT_INDICES.get(node.op_type, frozenset())
        for index, name in enumerate(node.input):
            if not name or index in shape_idx or name in allowed_float:
                continue
            if name in inits:
                if inits[name].data_type == TensorProto.FLOAT:
                    problems.append(f"{node.name}: reads float initializer {name} directly")
                continue
            if node.op_type == "Clip" and all(c.op_type == "QuantizeLinear" for c in consumers.get(node.output[0], [])):
                continue  # the quantizer's own range Clip
            producer = producers.get(name)
            if producer is None:
                problems.append(f"{node.name}: reads graph input {name} without Q/DQ")
                continue
            if producer.op_type == "DequantizeLinear":
                continue
            if producer.op_type in ("Shape", "Size") or name not in _float_names(model):
                continue
            if (producer.op_type, node.op_type) in fused_pairs:
                continue
            if node.op_type == "Mul" and _is_fused_gate_mul(node, name, producer, producers, fused_pairs):
                continue
            problems.append(f"{node.name} ({node.op_type}): input {name} from {producer.op_type} is not dequantized")
    graph_input = graph.input[0].name
    for reader in consumers.get(graph_input, []):
        if reader.op_type not in ("QuantizeLinear", "Clip"):
            problems.append(f"graph input read by {reader.op_type}")
    for out in graph.output:
        producer = producers.get(out.name)
        if producer is None or producer.op_type != "DequantizeLinear":
            problems.append(f"graph output {out.name} is not produced by DequantizeLinear")
    return problems


def _is_fused_gate_mul(mul: onnx.NodeProto, name: str, producer: onnx.NodeProto,
                       producers: Mapping[str, onnx.NodeProto], fused_pairs: set[tuple[str, str]]) -> bool:
    """``mul`` is ``Mul(name, G(name))`` with producer -> G -> Mul fused: SiLU read whole."""
    other = [x for x in mul.input if x != name]
    gate = producers.get(other[0]) if len(other) == 1 else None
    return (
        gate is not None
        and list(gate.input[:1]) == [name]
        and (producer.op_type, gate.op_type) in fused_pairs
        and (gate.op_type, "Mul") in fused_pairs
    )


_FLOAT_CACHE: dict[int, set[str]] = {}


def _float_names(model: onnx.ModelProto) -> set[str]:
    key = id(model)
    if key not in _FLOAT_CACHE:
        inferred = onnx.shape_inference.infer_shapes(model)
        names = set()
        for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            if value.type.tensor_type.elem_type == TensorProto.FLOAT:
                names.add(value.name)
        _FLOAT_CACHE[key] = names
    return _FLOAT_CACHE[key]


def bias_scale_problems(model: onnx.ModelProto) -> list[str]:
    """Biases whose DQ scale is not input scale x weight scale, or not int32."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    problems = []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        x_dq, w_dq, b_dq = (producers.get(name) for name in node.input[:3])
        if b_dq is None or b_dq.op_type != "DequantizeLinear":
            problems.append(f"{node.name}: bias not dequantized")
            continue
        values = _const(model, b_dq.input[0])
        if values is None or values.dtype != np.int32:
            problems.append(f"{node.name}: bias not int32")
        assert x_dq is not None and w_dq is not None
        expected = qdq_scale(model, x_dq).astype(np.float64) * qdq_scale(model, w_dq).astype(np.float64).reshape(-1)
        got = qdq_scale(model, b_dq).astype(np.float64).reshape(-1)
        if node.op_type == "ConvTranspose" and got.size != expected.size:
            expected = np.tile(expected, got.size // expected.size)
        if not np.array_equal(np.broadcast_to(expected, got.shape), got):
            problems.append(f"{node.name}: bias scale {got} != input x weight {expected}")
    return problems


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def output_scale(model: onnx.ModelProto, output: str | None = None) -> float:
    """Scale of the DQ writing a graph output."""
    name = output or model.graph.output[0].name
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] == name:
            return float(qdq_scale(model, node).reshape(-1)[0])
    raise AssertionError(f"no DQ writes {name}")
