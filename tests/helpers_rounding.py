"""Helpers for the rounding tests: tiny float models and a minimal QDQ emitter.

The emitter follows the quantizer's documented naming convention (activation T is
written by its op, ``QuantizeLinear(T) -> T_q``, ``DequantizeLinear(T_q) -> T_dq``;
graph output Y written as ``Y_prequant``; weight W as ``W_quantized``/``W_scale``/
``W_zero_point`` -> ``W_dq`` per output channel; bias int32 with scale = input scale x
weight scale), with power-of-two no-clipping thresholds, so the rounding module can be
tested without the real quantizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxdgh.ops import ACTIVATIONS, WEIGHTED, is_value_preserving

OPSET = 17


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name=name)


def _model(nodes, inits, in_shape, out_name="logits") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", None])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> Relu -> grouped Conv -> Relu -> depthwise Conv (stride 2, no bias) -> Relu -> GAP -> Flatten -> Gemm."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.normal(size=s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = [
        _init("c1_w", w(8, 3, 3, 3)), _init("c1_b", rng.normal(size=8).astype(np.float32) * 0.1),
        _init("c2_w", w(8, 4, 3, 3)), _init("c2_b", rng.normal(size=8).astype(np.float32) * 0.1),
        _init("c3_w", w(8, 1, 3, 3)),
        _init("fc_w", w(5, 8)), _init("fc_b", rng.normal(size=5).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "c2_w", "c2_b"], ["c2"], name="conv2", pads=[1, 1, 1, 1], group=2),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "c3_w"], ["c3"], name="dwconv", pads=[1, 1, 1, 1], strides=[2, 2], group=8),
        helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
        helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [3, 10, 10])


def convtranspose_model(seed: int = 0) -> onnx.ModelProto:
    """Conv -> SiLU (Sigmoid + Mul) -> ConvTranspose (stride 2, pads 1, output_padding 1, 2 groups)."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("c1_w", (rng.normal(size=(6, 4, 3, 3)) / 6).astype(np.float32)),
        _init("c1_b", rng.normal(size=6).astype(np.float32) * 0.1),
        _init("t_w", (rng.normal(size=(6, 2, 3, 3)) / 4).astype(np.float32)),
        _init("t_b", rng.normal(size=4).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "c1_w", "c1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Sigmoid", ["c1"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["c1", "sig"], ["silu"], name="silu_mul"),
        helper.make_node(
            "ConvTranspose", ["silu", "t_w", "t_b"], ["logits"], name="deconv",
            strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], group=2,
        ),
    ]
    return _model(nodes, inits, [4, 6, 6])


def matmul_model(seed: int = 0) -> onnx.ModelProto:
    """Flatten -> MatMul (no bias) -> Relu -> Gemm (transB=0) on a 1 x 4 x 4 image."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("m_w", (rng.normal(size=(16, 12)) / 4).astype(np.float32)),
        _init("g_w", (rng.normal(size=(12, 6)) / 3.5).astype(np.float32)),
        _init("g_b", rng.normal(size=6).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "m_w"], ["mm"], name="matmul"),
        helper.make_node("Relu", ["mm"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "g_w", "g_b"], ["logits"], name="gemm"),
    ]
    return _model(nodes, inits, [1, 4, 4])


def residual_model(seed: int = 0, branch_op: str = "Relu") -> onnx.ModelProto:
    """A residual block first (Conv -> branch_op -> Conv, plus the input, Add, Relu), then Conv -> GAP -> Gemm."""
    rng = np.random.default_rng(seed)
    w = lambda *s: (rng.normal(size=s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    b = lambda n: (rng.normal(size=n) * 0.1).astype(np.float32)  # noqa: E731
    inits = [
        _init("a_w", w(4, 4, 3, 3)), _init("a_b", b(4)),
        _init("b_w", w(4, 4, 3, 3)), _init("b_b", b(4)),
        _init("c_w", w(6, 4, 3, 3)), _init("c_b", b(6)),
        _init("fc_w", w(3, 6)), _init("fc_b", b(3)),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "a_w", "a_b"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node(branch_op, ["a"], ["a_act"], name="branch_act"),
        helper.make_node("Conv", ["a_act", "b_w", "b_b"], ["b"], name="conv_b", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["b", "input"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["block_out"], name="relu_out"),
        helper.make_node("Conv", ["block_out", "c_w", "c_b"], ["c"], name="conv_c", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["c_act"], name="relu_c"),
        helper.make_node("GlobalAveragePool", ["c_act"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    return _model(nodes, inits, [4, 8, 8])


def run(model: onnx.ModelProto, images: np.ndarray, names: list[str] | None = None) -> list[np.ndarray]:
    """Run ``model`` (optionally exposing intermediate tensors ``names``) on ``images``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    for name in names or []:
        if name not in present:
            copy.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    wanted = names if names else [o.name for o in copy.graph.output]
    return session.run(wanted, {"input": images.astype(np.float32)})


def _pot_threshold(max_abs: float) -> float:
    return float(2.0 ** np.ceil(np.log2(max(max_abs, 1e-8))))


def quantize_for_test(
    model: onnx.ModelProto, images: np.ndarray, *, weight_bits: int, act_bits: int = 8
) -> onnx.ModelProto:
    """A QDQ copy of ``model``: every non-fused, non-value-preserving tensor power-of-two quantized."""
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors = [o for n in graph.node for o in n.output]
    values = dict(zip(tensors, run(model, images, tensors)))
    values["input"] = images
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}

    def fused(node: onnx.NodeProto) -> bool:
        users = consumers.get(node.output[0], [])
        if node.op_type not in WEIGHTED:
            return False
        if len(users) == 1 and users[0].op_type in ACTIVATIONS:
            return True
        return sorted(u.op_type for u in users) == ["Mul", "Sigmoid"]

    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    rename: dict[str, str] = {}
    scale_of: dict[str, float] = {}

    def quantize_tensor(name: str, written_as: str, read_as: str) -> None:
        x = values[name]
        unsigned = float(x.min()) >= 0
        t = _pot_threshold(float(np.abs(x).max()))
        scale = t / 2 ** (act_bits if unsigned else act_bits - 1)
        zp = np.zeros((), np.uint8 if unsigned else np.int8)
        new_inits.extend([_init(f"{name}_scale", np.array(scale, np.float32)), _init(f"{name}_zero_point", zp)])
        new_nodes.append(helper.make_node("QuantizeLinear", [written_as, f"{name}_scale", f"{name}_zero_point"], [f"{name}_q"], name=f"{name}_QuantizeLinear"))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero_point"], [read_as], name=f"{name}_DequantizeLinear"))
        scale_of[read_as] = scale

    quantize_tensor("input", "input", "input_dq")
    rename["input"] = "input_dq"
    sigmoid_of_fused: set[str] = set()
    qmin, qmax = -(2 ** (weight_bits - 1)), 2 ** (weight_bits - 1) - 1
    for node in graph.node:
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for i, name in enumerate(new.input):
            new.input[i] = rename.get(name, name)
        if node.op_type in WEIGHTED:
            w = inits[node.input[1]]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            axis = {"Conv": 0, "ConvTranspose": 1}.get(node.op_type, 0 if trans_b else w.ndim - 1)
            moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            thresholds = np.array([_pot_threshold(float(np.abs(r).max())) for r in moved])
            w_scale = (thresholds / 2 ** (weight_bits - 1)).astype(np.float32)
            shape = [1] * w.ndim
            shape[axis] = -1
            w_int = np.clip(np.round(w / w_scale.reshape(shape)), qmin, qmax).astype(np.int8)
            base = node.input[1]
            new_inits += [_init(f"{base}_quantized", w_int), _init(f"{base}_scale", w_scale), _init(f"{base}_zero_point", np.zeros(w_scale.shape, np.int8))]
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"], [f"{base}_dq"], name=f"{base}_DequantizeLinear", axis=axis))
            new.input[1] = f"{base}_dq"
            if len(node.input) > 2 and node.input[2]:
                b = inits[node.input[2]]
                # A grouped ConvTranspose's axis-1 scales repeat for every group of outputs.
                reps = b.shape[0] // w_scale.shape[0]
                b_scale = (scale_of[new.input[0]] * np.tile(w_scale, reps)).astype(np.float32)
                b_int = np.round(b / b_scale).astype(np.int32)
                bb = node.input[2]
                new_inits += [_init(f"{bb}_quantized", b_int), _init(f"{bb}_scale", b_scale), _init(f"{bb}_zero_point", np.zeros(b_int.shape, np.int32))]
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{bb}_quantized", f"{bb}_scale", f"{bb}_zero_point"], [f"{bb}_dq"], name=f"{bb}_DequantizeLinear", axis=0))
                new.input[2] = f"{bb}_dq"
        out = node.output[0]
        if fused(node):
            sigmoid_of_fused.update(u.output[0] for u in consumers[out] if u.op_type == "Sigmoid")
            new_nodes.append(new)
            continue
        if out in sigmoid_of_fused or (is_value_preserving(node.op_type) and out not in outputs):
            new_nodes.append(new)
            if out not in sigmoid_of_fused:
                scale_of[out] = scale_of[new.input[0]]
            continue
        if out in outputs:
            new.output[0] = f"{out}_prequant"
            new_nodes.append(new)
            quantize_tensor(out, f"{out}_prequant", out)
        else:
            new_nodes.append(new)
            quantize_tensor(out, out, f"{out}_dq")
            rename[out] = f"{out}_dq"
    qgraph = helper.make_graph(new_nodes, "tiny_qdq", list(graph.input), list(graph.output), initializer=new_inits)
    qmodel = helper.make_model(qgraph, opset_imports=[helper.make_opsetid("", OPSET)])
    qmodel.ir_version = 8
    onnx.checker.check_model(qmodel)
    return qmodel
