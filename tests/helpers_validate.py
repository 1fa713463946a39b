"""Test helpers for the validator: a tiny float CNN and a hand-made power-of-two QDQ version of it.

The QDQ model follows the quantizer's naming convention (T -> Q -> T_q -> DQ -> T_dq;
graph output Y: Y_prequant -> Q -> Y_q -> DQ -> Y; weights W_quantized/W_scale/
W_zero_point -> DQ -> W_dq) so tests can find and mutate single tensors to break a rule.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
INPUT_SHAPE = (1, 6, 6)
CLASSES = 4

_NP_TO_ONNX = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8, np.int32: TensorProto.INT32}


def float_model(seed: int = 0) -> onnx.ModelProto:
    """X[N,1,6,6] -> Conv(3, 3x3) -> Relu -> MaxPool -> Concat(pool, pool) -> GAP -> Flatten -> Gemm -> logits."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (3, 1, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 3).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.normal(0, 0.5, (CLASSES, 6)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, CLASSES).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv_out"], ["relu_out"], name="relu"),
        helper.make_node("MaxPool", ["relu_out"], ["pool_out"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Concat", ["pool_out", "pool_out"], ["cat_out"], name="cat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat_out"], ["gap_out"], name="gap"),
        helper.make_node("Flatten", ["gap_out"], ["flat_out"], name="flatten"),
        helper.make_node("Gemm", ["flat_out", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def images(count: int = 16, seed: int = 1) -> np.ndarray:
    """Gaussian images for the tiny model."""
    return np.random.default_rng(seed).standard_normal((count, *INPUT_SHAPE)).astype(np.float32)


def pot_scale(max_abs: float, bits: int, signed: bool) -> float:
    """Power-of-two, no-clipping scale: threshold 2^ceil(log2 M) over 2^(b-1) (signed) or 2^b."""
    threshold = 2.0 ** np.ceil(np.log2(max(max_abs, 1e-8)))
    return float(threshold / 2 ** (bits - 1 if signed else bits))


def _quantize(values: np.ndarray, scale: np.ndarray | float, bits: int, signed: bool) -> np.ndarray:
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return np.clip(np.round(values / scale), low, high)


class QdqModel:
    """Builds a QDQ graph node by node (test-only)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))

    def qdq(self, tensor: str, scale: float, dtype: type = np.int8, *, out: str | None = None,
            q_input: str | None = None) -> str:
        """``tensor`` -> Q -> ``tensor_q`` -> DQ -> ``out`` (default ``tensor_dq``); returns the DQ output."""
        out = out or f"{tensor}_dq"
        base = tensor.removesuffix("_prequant")
        s = self.init(f"{base}_scale", np.array(scale, np.float32))
        z = self.init(f"{base}_zero_point", np.array(0, dtype))
        self.node("QuantizeLinear", [q_input or tensor, s, z], [f"{base}_q"], f"{base}_QuantizeLinear")
        self.node("DequantizeLinear", [f"{base}_q", s, z], [out], f"{base}_DequantizeLinear")
        return out

    def weight(self, name: str, values: np.ndarray, scale: np.ndarray, dtype: type = np.int8, axis: int = 0) -> str:
        """Constant integers ``name_quantized`` -> DQ -> ``name_dq``."""
        q = self.init(f"{name}_quantized", values.astype(dtype))
        s = self.init(f"{name}_scale", np.asarray(scale, np.float32))
        z = self.init(f"{name}_zero_point", np.zeros(np.asarray(scale).shape, dtype))
        attrs = {"axis": axis} if np.asarray(scale).size > 1 else {}
        self.node("DequantizeLinear", [q, s, z], [f"{name}_dq"], f"{name}_DequantizeLinear", **attrs)
        return f"{name}_dq"

    def build(self, opset: int = OPSET) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "tiny_q",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *INPUT_SHAPE])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
            self.inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def quantized_model(
    reference: onnx.ModelProto | None = None,
    *,
    calibration: np.ndarray | None = None,
    per_channel: bool = True,
    weight_bits: int = 8,
    activation_bits: int = 8,
) -> onnx.ModelProto:
    """A power-of-two QDQ version of :func:`float_model` that passes every rule of generic-pot-int8.

    Scales come from the float model's ranges on ``calibration`` (no clipping).
    ``activation_bits`` < 8 adds the quantizer's range Clip before each activation Q.
    """
    import onnxruntime as ort

    reference = reference or float_model()
    calibration = images() if calibration is None else calibration
    inits = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer}
    probe = onnx.ModelProto()
    probe.CopyFrom(reference)
    names = ["input", "relu_out", "pool_out", "cat_out", "gap_out", "flat_out"]
    for name in names[1:]:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip(["logits", *names[1:]], session.run(None, {"input": calibration})))
    values["input"] = calibration

    b = QdqModel()

    def act(tensor: str, signed: bool, scale: float | None = None, out: str | None = None) -> str:
        dtype = np.int8 if signed else np.uint8
        scale = scale if scale is not None else pot_scale(float(np.abs(values[tensor]).max()), activation_bits, signed)
        if activation_bits < 8:
            low = -(2 ** (activation_bits - 1)) * scale if signed else 0.0
            high = (2 ** (activation_bits - 1) - 1) * scale if signed else (2**activation_bits - 1) * scale
            lo = b.init(f"{tensor}_clip_min", np.array(low, np.float32))
            hi = b.init(f"{tensor}_clip_max", np.array(high, np.float32))
            b.node("Clip", [tensor, lo, hi], [f"{tensor}_clip"], f"{tensor}_Clip")
            return b.qdq(tensor, scale, dtype, out=out, q_input=f"{tensor}_clip")
        return b.qdq(tensor, scale, dtype, out=out)

    def weight(name: str, w: np.ndarray, axis_reduce: tuple[int, ...]) -> tuple[str, np.ndarray]:
        if per_channel:
            m = np.abs(w).max(axis=axis_reduce)
            scale = np.array([pot_scale(float(v), weight_bits, True) for v in m], np.float32)
            shaped = scale.reshape(-1, *([1] * (w.ndim - 1)))
        else:
            scale = np.array(pot_scale(float(np.abs(w).max()), weight_bits, True), np.float32)
            shaped = scale
        return b.weight(name, _quantize(w, shaped, weight_bits, True), scale), scale

    x_dq = act("input", True)
    x_scale = pot_scale(float(np.abs(values["input"]).max()), activation_bits, True)
    w_dq, w_scale = weight("conv_w", inits["conv_w"], (1, 2, 3))
    b_scale = (x_scale * w_scale).astype(np.float32)
    b_dq = b.weight("conv_b", np.round(inits["conv_b"] / b_scale), b_scale, np.int32)
    b.node("Conv", [x_dq, w_dq, b_dq], ["conv_out"], "conv", pads=[1, 1, 1, 1])
    b.node("Relu", ["conv_out"], ["relu_out"], "relu")
    relu_scale = pot_scale(float(np.abs(values["relu_out"]).max()), activation_bits, False)
    relu_dq = act("relu_out", False, relu_scale)
    b.node("MaxPool", [relu_dq], ["pool_out"], "pool", kernel_shape=[2, 2], strides=[2, 2])
    pool_dq = act("pool_out", False, relu_scale)  # value-preserving: input's scale
    b.node("Concat", [pool_dq, pool_dq], ["cat_out"], "cat", axis=1)
    cat_dq = act("cat_out", False, relu_scale)  # shared scale
    b.node("GlobalAveragePool", [cat_dq], ["gap_out"], "gap")
    gap_scale = pot_scale(float(np.abs(values["gap_out"]).max()), activation_bits, False)
    gap_dq = act("gap_out", False, gap_scale)
    b.node("Flatten", [gap_dq], ["flat_out"], "flatten")
    flat_dq = act("flat_out", False, gap_scale)
    fw_dq, fw_scale = weight("fc_w", inits["fc_w"], (1,))
    fb_scale = (gap_scale * fw_scale).astype(np.float32)
    fb_dq = b.weight("fc_b", np.round(inits["fc_b"] / fb_scale), fb_scale, np.int32)
    b.node("Gemm", [flat_dq, fw_dq, fb_dq], ["logits_prequant"], "fc", transB=1)
    out_scale = pot_scale(float(np.abs(values["logits"]).max()), activation_bits, True)
    act("logits_prequant", True, out_scale, out="logits")
    return b.build()


# ------------------------------------------------------------------- mutation


def node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    """The node called ``name``."""
    for item in model.graph.node:
        if item.name == name:
            return item
    raise KeyError(name)


def set_init(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Replace (or add) initializer ``name``."""
    for index, init in enumerate(model.graph.initializer):
        if init.name == name:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(np.asarray(value), name))
            return
    model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))


def get_init(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Initializer ``name`` as an array."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    raise KeyError(name)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def insert_after(model: onnx.ModelProto, anchor: str, new_node: onnx.NodeProto) -> None:
    """Insert ``new_node`` right after the node named ``anchor``."""
    nodes = list(model.graph.node)
    index = next(i for i, item in enumerate(nodes) if item.name == anchor)
    nodes.insert(index + 1, new_node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
