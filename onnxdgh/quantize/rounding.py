"""Rounding optimisation (AdaRound) and bias correction for a power-of-two QDQ model.

Contract:

* Input: ``qdq_model``, the quantizer's output (every weight an integer initializer
  ``W_quantized`` read by a ``DequantizeLinear`` with its power-of-two ``W_scale``; every
  bias an int32 initializer with scale = input scale x weight scale), and
  ``float_model``, the *BatchNorm-folded* float model that was quantized (same node
  names, same weight shapes, float weights such that nearest rounding of ``W / W_scale``
  gives the stored integers). Both are read, never modified.
* :func:`optimize_rounding` returns a copy of ``qdq_model`` in which, for every weighted
  node (Conv incl. grouped/depthwise, ConvTranspose, Gemm, MatMul with a constant
  weight), the stored integers were chosen by AdaRound instead of nearest rounding.
  Only integer initializers (and, with bias correction, int32 biases) change: scales,
  zero points, node structure and names stay as they were, so every power-of-two and
  range constraint the quantizer established still holds. The integers stay in
  ``[-2^(b-1), 2^(b-1) - 1]`` for ``b = RoundingConfig.weight_bits``.
* :func:`bias_correction` returns a copy whose int32 biases are shifted so that each
  weighted node's per-channel mean output on the calibration images matches the float
  model's (HPTQ/MCT-style), in topological order so each layer sees the corrected ones.
* Both also return/log what they did; a layer the module cannot handle (shared weight,
  weight not a quantized constant, float model without the matching node, a torch
  re-implementation that disagrees with onnxruntime) is skipped with a log line and a
  reason in the report -- never silently changed.

Why layer by layer with the *current* quantized model: the input of layer l is taken
from the QDQ model in which layers < l already carry their optimised integers and every
activation quantizer is active (AdaRound's "asymmetric reconstruction", Nagel et al.
2020, Sec. 4, Eq. 25: minimise ||f_a(W x) - f_a(W_soft x_q)||^2), so each layer learns
to compensate the quantization error accumulated upstream. The target is the float
model's output of the same node on the same images, passed through the fused
activation when the node has one (Conv -> Relu with no Q/DQ between), because the
hardware op's output is the activation's output.

The DGH paper (dgh-paper.txt) uses AdaRound [41] and BRECQ [30] as the quantization
algorithms that its synthetic images drive (Tables 1, 3-5); this module is the AdaRound
part, run on whatever calibration images the caller passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from tqdm.auto import tqdm

from .. import graph as g
from ..errors import CalibrationDataError, InvalidInputError, QuantizationError
from ..ops import ACTIVATIONS, WEIGHTED, is_value_preserving
from ..runtime import make_session, run_batched

__all__ = ["RoundingConfig", "optimize_rounding", "bias_correction", "weighted_layers"]

_LOG = logging.getLogger(__name__)

# AdaRound's rectified-sigmoid stretch (Nagel et al. 2020, Sec. 4): h(V) reaches 0 and 1
# exactly, so the regulariser can drive every variable to a hard decision.
_ZETA = 1.1
_GAMMA = -0.1

# How much the torch re-implementation of a node may differ from onnxruntime's output
# (relative to the output's magnitude) before the layer is skipped as not understood.
_ORT_AGREEMENT_RTOL = 1e-3

# Fraction of weights whose nearest rounding of W/s may disagree with the stored integer
# (rounding ties, float noise) before the float model is judged not to match.
_MAX_NEAREST_MISMATCH = 0.01

Target = Literal["activation", "output"]


@dataclass(frozen=True)
class RoundingConfig:
    """Settings of the rounding optimisation; validated on construction.

    Attributes:
        weight_bits: bit width of the stored weight integers (signed, ``[-2^(b-1), 2^(b-1)-1]``);
            the quantizer passes its own setting.
        iterations: optimisation steps per layer.
        batch_size: calibration images per step.
        lr: Adam learning rate of the rounding variables V.
        reg_weight: lambda, weight of the rounding regulariser (AdaRound/BRECQ: 0.01).
        beta_start, beta_end: the regulariser's exponent, annealed linearly after warm-up
            (high beta = only variables far from 0/1 pay; low beta = all pay).
        warmup: fraction of the iterations run with reconstruction loss only.
        target: ``"activation"`` reconstructs the fused activation's output when the node
            has one (hardware op output), ``"output"`` always the node's own output.
        bias_correction: after each layer's rounding, shift its int32 bias so its
            per-channel mean output matches the float model (creates a bias for
            Conv/ConvTranspose/Gemm nodes without one).
        seed: seeds the batch sampling; same seed, same images -> same integers.
    """

    weight_bits: int = 4
    iterations: int = 1000
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    target: Target = "activation"
    bias_correction: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InvalidInputError:
            return InvalidInputError(f"rounding option {field}={getattr(self, field)!r}: {why}", "see RoundingConfig")

        if not 2 <= self.weight_bits <= 8:
            raise bad("weight_bits", "must be between 2 and 8")
        if self.iterations < 0:
            raise bad("iterations", "must be >= 0")
        if self.batch_size < 1:
            raise bad("batch_size", "must be >= 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise bad("lr", "must be a positive number")
        if not self.reg_weight >= 0 or not math.isfinite(self.reg_weight):
            raise bad("reg_weight", "must be >= 0")
        if not self.beta_start >= self.beta_end > 0:
            raise bad("beta_start", "need beta_start >= beta_end > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise bad("warmup", "must be in [0, 1)")
        if self.target not in ("activation", "output"):
            raise bad("target", "must be 'activation' or 'output'")

    @property
    def qmin(self) -> int:
        """Smallest stored weight integer."""
        return -(2 ** (self.weight_bits - 1))

    @property
    def qmax(self) -> int:
        """Largest stored weight integer."""
        return 2 ** (self.weight_bits - 1) - 1


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class _Layer:
    """A weighted node of the QDQ model and everything needed to re-run it in torch."""

    node: onnx.NodeProto
    weight_int: str  # the integer initializer read by the weight's DequantizeLinear
    weight_scale: np.ndarray  # float32, broadcast to the weight's shape
    bias_int: str | None  # int32 initializer of the bias, if any
    bias_scale: np.ndarray | None  # float32, shape (channels,) or scalar
    bias_zero_point: np.ndarray | None
    activation: tuple[onnx.NodeProto, ...]  # fused activation nodes (no Q/DQ between), maybe empty
    float_output: str  # the node's output name in the float model
    float_weight: np.ndarray  # the folded float weight


def _initializer_value(inits: dict[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = inits.get(name)
    return None if tensor is None else np.asarray(g.to_array(tensor))


def _weight_axis(node: onnx.NodeProto, rank: int) -> int:
    """The output-channel axis of a weighted node's weight (the emitter's DQ axis)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if g.node_attributes(node).get("transB", 0) else 1
    return rank - 1  # MatMul


def _broadcast_scale(scale: np.ndarray, weight_shape: tuple[int, ...], axis: int) -> np.ndarray | None:
    scale = np.asarray(scale, dtype=np.float32)
    if scale.size == 1:
        return np.full(weight_shape, float(scale.reshape(-1)[0]), dtype=np.float32)
    if scale.ndim != 1 or scale.shape[0] != weight_shape[axis]:
        return None
    shape = [1] * len(weight_shape)
    shape[axis] = scale.shape[0]
    return np.broadcast_to(scale.reshape(shape), weight_shape).astype(np.float32)


def _fused_activation(
    node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]
) -> tuple[onnx.NodeProto, ...]:
    """The activation nodes fused behind ``node`` (read its output directly, no Q/DQ between)."""
    users = consumers.get(node.output[0], [])
    if len(users) == 1 and users[0].op_type in ACTIVATIONS:
        return (users[0],)
    # SiLU exported as Mul(x, Sigmoid(x)).
    if len(users) == 2:
        by_type = {user.op_type: user for user in users}
        sigmoid, mul = by_type.get("Sigmoid"), by_type.get("Mul")
        if sigmoid is not None and mul is not None and set(mul.input) == {node.output[0], sigmoid.output[0]}:
            return (sigmoid, mul)
    return ()


def weighted_layers(
    qdq_model: onnx.ModelProto, float_model: onnx.ModelProto
) -> tuple[list[_Layer], list[dict[str, str]]]:
    """The weighted nodes of ``qdq_model`` that rounding can work on, in topological order.

    Returns the layers and, for every weighted node left out, ``{"node", "op", "reason"}``.
    The structure is traced (weight input <- DequantizeLinear <- integer initializer)
    rather than trusted from names; the float counterpart is found by node name, then by
    output name, and must have the same op and weight shape.
    """
    graph = qdq_model.graph
    inits = g.initializer_map(graph)
    producers = g.producer_map(graph)
    consumers = g.consumer_map(graph)
    f_graph = float_model.graph
    f_inits = g.initializer_map(f_graph)
    f_by_name = {node.name: node for node in f_graph.node if node.name}
    f_by_output = g.producer_map(f_graph)
    graph_outputs = set(g.graph_output_names(graph))

    # How many weight DQs read each integer initializer: a shared weight cannot be
    # optimised for one consumer without hurting the other.
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                readers[name] = readers.get(name, 0) + 1

    layers: list[_Layer] = []
    skipped: list[dict[str, str]] = []
    for node in graph.node:
        if node.op_type not in WEIGHTED:
            continue
        label = node.name or node.output[0]

        def skip(reason: str, node: onnx.NodeProto = node, label: str = label) -> None:
            _LOG.info("rounding: skipping %s %r: %s", node.op_type, label, reason)
            skipped.append({"node": label, "op": node.op_type, "reason": reason})

        if len(node.input) < 2:
            skip("no weight input")
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            skip("weight is not a DequantizeLinear of a constant")
            continue
        weight_int = dq.input[0]
        if readers.get(weight_int, 0) != 1 or len(consumers.get(dq.output[0], [])) != 1:
            skip(f"weight {weight_int!r} is shared by several nodes")
            continue
        q_weight = _initializer_value(inits, weight_int)
        scale = _initializer_value(inits, dq.input[1]) if len(dq.input) > 1 else None
        zero = _initializer_value(inits, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        if q_weight is None or scale is None:
            skip("weight scale is not a constant")
            continue
        if zero is not None and np.any(np.asarray(zero).astype(np.int64) != 0):
            skip("weight zero point is not 0")
            continue
        if node.op_type == "MatMul" and q_weight.ndim != 2:
            skip("MatMul weight is not 2-D")
            continue
        if node.op_type == "Gemm" and g.node_attributes(node).get("transA", 0) not in (0,):
            # transA transposes the data input, which the torch side handles; kept simple.
            pass
        axis = _weight_axis(node, q_weight.ndim)
        dq_axis = g.node_attributes(dq).get("axis", 1)
        full_scale = _broadcast_scale(scale, q_weight.shape, axis)
        if full_scale is None or (np.asarray(scale).size > 1 and int(dq_axis) % q_weight.ndim != axis):
            skip(f"weight scale of shape {tuple(np.shape(scale))} is not per output channel on axis {axis}")
            continue

        # Float counterpart: same node name, else the producer of the same output name
        # (a graph output Y is written as Y_prequant in the QDQ model).
        f_node = f_by_name.get(node.name) if node.name else None
        if f_node is None:
            out = node.output[0]
            if out.endswith("_prequant") and out[: -len("_prequant")] in graph_outputs:
                out = out[: -len("_prequant")]
            f_node = f_by_output.get(out)
        if f_node is None or f_node.op_type != node.op_type or len(f_node.input) < 2:
            skip("no matching node in the float model")
            continue
        f_weight = _initializer_value(f_inits, f_node.input[1])
        if f_weight is None or f_weight.shape != q_weight.shape:
            skip("float model's weight is not a constant of the same shape (pass the BN-folded float model)")
            continue
        f_weight = f_weight.astype(np.float32)
        stored = q_weight.astype(np.int64)
        # Clip to the range actually used: the container (int8) may be wider than the
        # quantizer's bit width, which clipped the largest weights.
        nearest = np.clip(np.round(f_weight / full_scale), stored.min(), stored.max())
        mismatch = np.abs(nearest - stored)
        if mismatch.max(initial=0) > 1 or float(np.mean(mismatch > 0)) > _MAX_NEAREST_MISMATCH:
            raise QuantizationError(
                f"the float weight of node {label!r} does not round to the integers stored in {weight_int!r} "
                f"({100 * float(np.mean(mismatch > 0)):.1f}% differ)",
                "pass the BatchNorm-folded float model that the quantizer quantized",
            )

        bias_int = bias_scale = bias_zero = None
        if len(node.input) > 2 and node.input[2]:
            b_dq = producers.get(node.input[2])
            if b_dq is None or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in inits:
                skip("bias is not a DequantizeLinear of a constant")
                continue
            bias_int = b_dq.input[0]
            bias_scale = _initializer_value(inits, b_dq.input[1])
            bias_zero = _initializer_value(inits, b_dq.input[2]) if len(b_dq.input) > 2 and b_dq.input[2] else None
            if bias_scale is None or readers.get(bias_int, 0) != 1:
                skip(f"bias {bias_int!r} has no constant scale or is shared")
                continue
        layers.append(
            _Layer(
                node=node,
                weight_int=weight_int,
                weight_scale=full_scale,
                bias_int=bias_int,
                bias_scale=None if bias_scale is None else np.asarray(bias_scale, np.float32),
                bias_zero_point=bias_zero,
                activation=_fused_activation(node, consumers),
                float_output=f_node.output[0],
                float_weight=f_weight,
            )
        )
    return layers, skipped


# ------------------------------------------------------------------------ torch side


def _ints(attrs: dict[str, Any], key: str, default: Sequence[int]) -> list[int]:
    value = attrs.get(key)
    return [int(v) for v in value] if value else list(default)


def _auto_pad(attrs: dict[str, Any]) -> str:
    value = attrs.get("auto_pad", b"NOTSET")
    return value.decode() if isinstance(value, bytes) else str(value)


def _conv_fn(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """``f(x, w, b)`` computing the ONNX Conv ``node`` with torch functional ops."""
    attrs = g.node_attributes(node)
    n = len(weight_shape) - 2
    kernel = list(weight_shape[2:])
    strides = _ints(attrs, "strides", [1] * n)
    dilations = _ints(attrs, "dilations", [1] * n)
    group = int(attrs.get("group", 1))
    auto_pad = _auto_pad(attrs)
    pads = _ints(attrs, "pads", [0] * (2 * n))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]

    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(n):
                size = x.shape[2 + i]
                out = -(-size // strides[i])
                total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
                small, large = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else large)
                end.append(large if auto_pad == "SAME_UPPER" else small)
        elif auto_pad == "VALID":
            begin, end = [0] * n, [0] * n
        else:
            begin, end = pads[:n], pads[n:]
        if begin == end:
            return conv(x, w, b, strides, begin, dilations, group)
        flat: list[int] = []
        for i in reversed(range(n)):
            flat += [begin[i], end[i]]
        return conv(F.pad(x, flat), w, b, strides, 0, dilations, group)

    return forward


def _conv_transpose_fn(node: onnx.NodeProto, weight_shape: tuple[int, ...]) -> Callable[..., torch.Tensor]:
    """``f(x, w, b)`` computing the ONNX ConvTranspose ``node``: full transposed conv, then crop."""
    attrs = g.node_attributes(node)
    n = len(weight_shape) - 2
    kernel = list(weight_shape[2:])
    strides = _ints(attrs, "strides", [1] * n)
    dilations = _ints(attrs, "dilations", [1] * n)
    out_pad = _ints(attrs, "output_padding", [0] * n)
    group = int(attrs.get("group", 1))
    auto_pad = _auto_pad(attrs)
    pads = _ints(attrs, "pads", [0] * (2 * n))
    output_shape = _ints(attrs, "output_shape", [])
    conv_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]

    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        full = conv_t(x, w, None, strides, 0, 0, group, dilations)
        if any(out_pad):
            flat: list[int] = []
            for i in reversed(range(n)):
                flat += [0, out_pad[i]]
            full = F.pad(full, flat)
        begin, end = pads[:n], pads[n:]
        if output_shape or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            target = output_shape[-n:] if output_shape else [x.shape[2 + i] * strides[i] for i in range(n)]
            begin, end = [], []
            for i in range(n):
                total = full.shape[2 + i] - target[i]
                small, large = total // 2, total - total // 2
                begin.append(small if auto_pad == "SAME_UPPER" else large)
                end.append(large if auto_pad == "SAME_UPPER" else small)
        elif auto_pad == "VALID":
            begin, end = [0] * n, [0] * n
        index = [slice(None), slice(None)] + [slice(begin[i], full.shape[2 + i] - end[i]) for i in range(n)]
        y = full[tuple(index)]
        if b is not None:
            y = y + b.reshape(1, -1, *([1] * n))
        return y

    return forward


def _gemm_fn(node: onnx.NodeProto) -> Callable[..., torch.Tensor]:
    attrs = g.node_attributes(node)
    alpha = float(attrs.get("alpha", 1.0))
    beta = float(attrs.get("beta", 1.0))
    trans_a = int(attrs.get("transA", 0))
    trans_b = int(attrs.get("transB", 0))

    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        a = x.transpose(0, 1) if trans_a else x
        y = alpha * (a @ (w.transpose(0, 1) if trans_b else w))
        return y if b is None else y + beta * b

    return forward


def _matmul_fn(node: onnx.NodeProto) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        y = torch.matmul(x, w)
        return y if b is None else y + b

    return forward


def _layer_fn(layer: _Layer) -> Callable[..., torch.Tensor]:
    op = layer.node.op_type
    shape = layer.float_weight.shape
    if op == "Conv":
        return _conv_fn(layer.node, shape)
    if op == "ConvTranspose":
        return _conv_transpose_fn(layer.node, shape)
    if op == "Gemm":
        return _gemm_fn(layer.node)
    return _matmul_fn(layer.node)


def _activation_fn(
    nodes: Sequence[onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fused activation as a torch function, or None when it is not one we emulate."""
    if not nodes:
        return lambda y: y
    if len(nodes) == 2:  # Sigmoid + Mul = SiLU
        return F.silu
    node = nodes[0]
    attrs = g.node_attributes(node)
    op = node.op_type
    if op == "Relu":
        return F.relu
    if op == "Sigmoid":
        return torch.sigmoid
    if op == "Tanh":
        return torch.tanh
    if op == "LeakyRelu":
        slope = float(attrs.get("alpha", 0.01))
        return lambda y: F.leaky_relu(y, slope)
    if op == "HardSigmoid":
        a, c = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        return lambda y: torch.clamp(a * y + c, 0.0, 1.0)
    if op == "HardSwish":
        return lambda y: y * torch.clamp(y / 6.0 + 0.5, 0.0, 1.0)
    if op == "Elu":
        a = float(attrs.get("alpha", 1.0))
        return lambda y: F.elu(y, a)
    if op == "Softplus":
        return F.softplus
    if op == "Clip":
        low = high = None
        if "min" in attrs or "max" in attrs:  # opset < 11
            low, high = attrs.get("min"), attrs.get("max")
        else:
            if len(node.input) > 1 and node.input[1]:
                value = _initializer_value(inits, node.input[1])
                if value is None:
                    return None
                low = float(value)
            if len(node.input) > 2 and node.input[2]:
                value = _initializer_value(inits, node.input[2])
                if value is None:
                    return None
                high = float(value)
        return lambda y: torch.clamp(y, low, high)
    return None


def _h(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0.0, 1.0)


def _init_v(rest: np.ndarray) -> torch.Tensor:
    """V such that h(V) equals the fractional part ``rest`` (so training starts at W itself)."""
    p = (np.clip(rest, 1e-4, 1 - 1e-4) - _GAMMA) / (_ZETA - _GAMMA)
    return torch.from_numpy(np.log(p / (1.0 - p)).astype(np.float32))


class _Adam:
    """Adam (Kingma & Ba 2015, default betas) on one tensor.

    ``torch.optim.Adam`` would do the same, but its first use imports torch._dynamo,
    several seconds on this machine for a handful of arithmetic lines.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        self.t += 1
        b1, b2 = self.betas
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def _reconstruction(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over images and positions (BRECQ's lp_loss)."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.ndim > 1 else err.mean()


def _batched_mse(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, batch: int = 256
) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            out = fn(x[start : start + batch])
            total += float((out - y[start : start + batch]).pow(2).sum())
            count += out.numel()
    return total / max(count, 1)


def _channel_mean_delta(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, axis: int, batch: int = 256
) -> np.ndarray:
    """Per output channel, the mean of (float - quantized) pre-activation output over everything else."""
    sums: torch.Tensor | None = None
    count = 0
    with torch.no_grad():
        for start in range(0, x.shape[0], batch):
            diff = y[start : start + batch] - fn(x[start : start + batch])
            diff = diff.movedim(axis, -1).reshape(-1, diff.shape[axis])
            sums = diff.sum(0) if sums is None else sums + diff.sum(0)
            count += diff.shape[0]
    assert sums is not None
    return (sums / max(count, 1)).numpy().astype(np.float64)


# ------------------------------------------------------------------------- ONNX edits


def _set_initializer(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    """Overwrite initializer ``name`` with ``value`` keeping its ONNX element type."""
    for tensor in graph.initializer:
        if tensor.name == name:
            old = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(value).astype(old.dtype), name=name))
            return
    raise KeyError(name)


def _input_scale(graph: onnx.GraphProto, tensor: str) -> float | None:
    """The per-tensor scale of the DequantizeLinear that ``tensor`` comes from (through value-preserving ops)."""
    producers = g.producer_map(graph)
    inits = g.initializer_map(graph)
    seen = 0
    while seen < 32:
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            scale = _initializer_value(inits, node.input[1])
            return float(scale.reshape(-1)[0]) if scale is not None and scale.size == 1 else None
        if not is_value_preserving(node.op_type, g.node_attributes(node)):
            return None
        tensor = node.input[0]
        seen += 1
    return None


def _add_bias(model: onnx.ModelProto, layer: _Layer, channels: int) -> tuple[str, np.ndarray] | None:
    """Give a Conv/ConvTranspose/Gemm without bias a zero int32 bias in the emitter's convention.

    Returns the bias initializer name and its scale, or None when the node cannot take one.
    """
    node = next(n for n in model.graph.node if n.output[0] == layer.node.output[0])
    if node.op_type == "MatMul":
        return None
    in_scale = _input_scale(model.graph, node.input[0])
    if in_scale is None:
        return None
    axis = _weight_axis(node, layer.float_weight.ndim)
    w_scale = np.moveaxis(layer.weight_scale, axis, 0).reshape(layer.weight_scale.shape[axis], -1)[:, 0]
    if channels % w_scale.shape[0]:
        return None
    # A grouped ConvTranspose has C_out / group weight scales on axis 1, repeated per group.
    w_scale = np.tile(w_scale, channels // w_scale.shape[0])
    b_scale = (in_scale * w_scale).astype(np.float32)
    taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
    taken |= {n.name for n in model.graph.node}
    base = g.unique_name(taken, f"{node.name or node.output[0]}_bias")
    q_name = g.unique_name(taken, f"{base}_quantized")
    s_name = g.unique_name(taken, f"{base}_scale")
    z_name = g.unique_name(taken, f"{base}_zero_point")
    dq_out = g.unique_name(taken, f"{base}_dq")
    g.add_initializer(model.graph, q_name, np.zeros(channels, np.int32))
    g.add_initializer(model.graph, s_name, b_scale)
    g.add_initializer(model.graph, z_name, np.zeros(channels, np.int32))
    model.graph.node.append(
        helper.make_node(
            "DequantizeLinear", [q_name, s_name, z_name], [dq_out], name=g.unique_name(taken, f"{base}_DequantizeLinear"), axis=0
        )
    )
    while len(node.input) < 3:
        node.input.append("")
    node.input[2] = dq_out
    g.topological_sort(model.graph)
    return q_name, b_scale


def _correct_bias(
    model: onnx.ModelProto, layer: _Layer, bias_int: str | None, bias_scale: np.ndarray | None, delta: np.ndarray
) -> str:
    """Add ``delta`` (float, per channel) to the layer's int32 bias; returns what happened."""
    if bias_int is None:
        created = _add_bias(model, layer, delta.shape[0])
        if created is None:
            return "skipped: node has no bias and cannot take one"
        bias_int, bias_scale = created
    assert bias_scale is not None
    inits = g.initializer_map(model.graph)
    current = np.asarray(g.to_array(inits[bias_int])).astype(np.int64)
    scale = np.broadcast_to(np.asarray(bias_scale, np.float64).reshape(-1), current.shape)
    if current.shape != delta.shape:
        return f"skipped: bias shape {current.shape} is not per output channel"
    info = np.iinfo(np.int32)
    new = np.clip(current + np.round(delta / scale), info.min, info.max).astype(np.int32)
    _set_initializer(model.graph, bias_int, new)
    return "corrected"


# ---------------------------------------------------------------------- running ONNX


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    inputs = g.graph_input_names(model.graph)
    for value in model.graph.input:
        if value.name == inputs[0]:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _pruned(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (onnxruntime runs every node of a graph)."""
    producers = g.producer_map(model.graph)
    needed: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))  # type: ignore[arg-type]
        stack.extend(n for n in node.input if n)
    keep = [node for node in model.graph.node if id(node) in needed]
    used = {n for node in keep for n in node.input}
    inits = {t.name for t in model.graph.initializer}
    graph = helper.make_graph(
        keep,
        model.graph.name,
        [value for value in model.graph.input if value.name not in inits or value.name in used],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        initializer=[t for t in model.graph.initializer if t.name in used],
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    return out


def _run(model: onnx.ModelProto, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Compute tensors ``names`` of ``model`` on ``images``.

    Graph optimisations are off: the QDQ graph is then evaluated as written (float ops on
    dequantized values), which is exactly what the torch side re-implements.
    """
    session = make_session(_pruned(model, names), optimize=False)
    return run_batched(session, images, batch_size=64, outputs=list(names), fixed_batch=_fixed_batch(model))


class _FloatTargets:
    """The float model's outputs of the layers, computed a few layers at a time.

    One onnxruntime pass serves as many upcoming layers as fit in ``budget_bytes``
    (sized from a one-image probe), instead of one full pass per layer.
    """

    def __init__(self, float_model: onnx.ModelProto, names: Sequence[str], images: np.ndarray,
                 budget_bytes: int = 512 * 2**20) -> None:
        self._model = float_model
        self._names = list(names)
        self._images = images
        self._cache: dict[str, np.ndarray] = {}
        probe = _run(float_model, images[:1], self._names) if self._names else []
        self._bytes = {name: value.nbytes * images.shape[0] for name, value in zip(self._names, probe)}
        self._budget = budget_bytes

    def get(self, index: int) -> np.ndarray:
        """The float output of layer ``index`` on all images (drops the earlier ones)."""
        name = self._names[index]
        if name not in self._cache:
            self._cache.clear()
            batch, total = [name], self._bytes[name]
            for later in self._names[index + 1 :]:
                if later in batch:
                    continue
                if total + self._bytes[later] > self._budget:
                    break
                batch.append(later)
                total += self._bytes[later]
            self._cache = dict(zip(batch, _run(self._model, self._images, batch)))
        return self._cache[name]


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim < 2 or images.shape[0] == 0:
        raise CalibrationDataError(
            f"rounding optimisation needs a batch of calibration images, got an array of shape {images.shape}",
            "pass the calibration images (N x C x H x W) used for quantization",
        )
    if not np.all(np.isfinite(images)):
        raise CalibrationDataError("calibration images contain NaN or infinity", "regenerate or clean the images")
    return np.ascontiguousarray(images, dtype=np.float32)


# ------------------------------------------------------------------------ public API


def optimize_rounding(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    images: np.ndarray,
    config: RoundingConfig,
    *,
    progress: bool = True,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Choose every weighted node's stored integers by AdaRound; see the module contract.

    Args:
        qdq_model: the quantizer's output (not modified).
        float_model: the BN-folded float model it was made from (not modified).
        images: calibration images, N x C x H x W float32 in the model's input space.
        config: the optimisation settings (``weight_bits`` must be the quantizer's).
        progress: show a progress bar per layer on stderr.

    Returns:
        The optimised model and a report: per layer the reconstruction MSE with nearest
        and with learned rounding (on ``images``), the fraction of integers changed, which
        rounding was kept, the bias correction outcome and the seconds spent; plus
        skipped layers and the total time.

    Raises:
        CalibrationDataError: ``images`` is empty or not finite.
        QuantizationError: the float model does not match the quantized one.
    """
    images = _check_images(images)
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    g.topological_sort(model.graph)
    layers, skipped = weighted_layers(model, float_model)
    targets = _FloatTargets(float_model, [layer.float_output for layer in layers], images)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = tqdm(layers, desc="rounding", unit="layer", disable=not progress, leave=False)
    for index, layer in enumerate(bar):
        label = layer.node.name or layer.node.output[0]
        bar.set_postfix_str(label[-30:])
        t0 = time.perf_counter()
        row: dict[str, Any] = {"node": label, "op": layer.node.op_type, "weights": int(layer.float_weight.size)}
        inits = g.initializer_map(model.graph)
        x_np, y_q_np = _run(model, images, [layer.node.input[0], layer.node.output[0]])
        y_fp_np = targets.get(index)
        act = _activation_fn(layer.activation, inits) if config.target == "activation" else (lambda y: y)
        if act is None:
            _LOG.info("rounding: %r: fused %s not emulated, reconstructing the node output", label, layer.activation[0].op_type)
            act = lambda y: y  # noqa: E731
        row["target"] = "activation" if layer.activation and config.target == "activation" else "output"
        outcome = _optimise_layer(model, layer, inits, x_np, y_q_np, y_fp_np, act, config, index, row)
        if outcome is not None:
            skipped.append({"node": label, "op": layer.node.op_type, "reason": outcome})
            continue
        row["seconds"] = round(time.perf_counter() - t0, 3)
        _LOG.info(
            "rounding: %s %r: mse %.4g -> %.4g (%s kept, %.1f%% changed) in %.1fs",
            layer.node.op_type, label, row["mse_nearest"], row["mse_optimized"], row["kept"],
            100 * row["changed"], row["seconds"],
        )
        rows.append(row)
    bar.close()
    report = {
        "config": asdict(config),
        "images": int(images.shape[0]),
        "layers": rows,
        "skipped": skipped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return model, report


def _optimise_layer(
    model: onnx.ModelProto,
    layer: _Layer,
    inits: dict[str, onnx.TensorProto],
    x_np: np.ndarray,
    y_q_np: np.ndarray,
    y_fp_np: np.ndarray,
    act: Callable[[torch.Tensor], torch.Tensor],
    config: RoundingConfig,
    index: int,
    row: dict[str, Any],
) -> str | None:
    """AdaRound one layer in place in ``model``; fills ``row``. Returns a skip reason or None."""
    fn = _layer_fn(layer)
    x = torch.from_numpy(np.ascontiguousarray(x_np, np.float32))
    y_fp = torch.from_numpy(np.ascontiguousarray(y_fp_np, np.float32))
    scale = torch.from_numpy(np.ascontiguousarray(layer.weight_scale))
    stored = np.asarray(g.to_array(inits[layer.weight_int])).astype(np.int64)
    bias: torch.Tensor | None = None
    if layer.bias_int is not None:
        b_int = np.asarray(g.to_array(inits[layer.bias_int])).astype(np.float64)
        b_zero = 0.0 if layer.bias_zero_point is None else np.asarray(layer.bias_zero_point, np.float64)
        bias = torch.from_numpy(((b_int - b_zero) * np.asarray(layer.bias_scale, np.float64)).astype(np.float32))

    # The torch re-implementation must reproduce onnxruntime on the stored integers
    # before its gradients can be trusted.
    w_stored = scale * torch.from_numpy(stored.astype(np.float32))
    with torch.no_grad():
        probe = fn(x[:8], w_stored, bias).numpy()
    reference = y_q_np[:8]
    if probe.shape != reference.shape or np.max(np.abs(probe - reference)) > _ORT_AGREEMENT_RTOL * (
        1.0 + float(np.max(np.abs(reference)))
    ):
        return "torch re-implementation disagrees with onnxruntime (unsupported attributes)"

    qmin, qmax = config.qmin, config.qmax
    if stored.min() < qmin or stored.max() > qmax:
        raise QuantizationError(
            f"weight {layer.weight_int!r} of node {row['node']!r} holds integers outside the "
            f"{config.weight_bits}-bit range [{qmin}, {qmax}]",
            "pass the quantizer's weight bit width as RoundingConfig.weight_bits",
        )
    ratio = layer.float_weight / layer.weight_scale
    floor = np.floor(ratio)
    w_floor = torch.from_numpy(floor.astype(np.float32))
    v = torch.nn.Parameter(_init_v(ratio - floor))
    target = act(y_fp)

    def forward_with(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda xs: act(fn(xs, w, bias))

    mse_nearest = _batched_mse(forward_with(w_stored), x, target)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    adam = _Adam(v, config.lr)
    warm = int(config.warmup * config.iterations)
    count = x.shape[0]
    for step in range(config.iterations):
        batch = torch.randint(0, count, (min(config.batch_size, count),), generator=generator)
        h = _h(v)
        w_soft = scale * torch.clamp(w_floor + h, qmin, qmax)
        loss = _reconstruction(act(fn(x[batch], w_soft, bias)), target[batch])
        if step >= warm and config.reg_weight > 0:
            # Linear anneal of beta from beta_start to beta_end over the post-warm-up steps.
            progress = (step - warm) / max(1, config.iterations - warm)
            beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress)
            loss = loss + config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        v.grad = None
        loss.backward()
        adam.step()

    with torch.no_grad():
        learned = np.clip(floor + (v.detach().numpy() >= 0), qmin, qmax).astype(np.int64)
    w_learned = scale * torch.from_numpy(learned.astype(np.float32))
    mse_learned = _batched_mse(forward_with(w_learned), x, target)
    # Too few iterations can leave the learned rounding worse than nearest on the very
    # images it was fitted to; then nearest is the honest choice.
    keep_learned = config.iterations > 0 and mse_learned <= mse_nearest
    final = learned if keep_learned else stored
    if keep_learned:
        _set_initializer(model.graph, layer.weight_int, final)
    row.update(
        iterations=config.iterations,
        mse_nearest=mse_nearest,
        mse_optimized=mse_learned if config.iterations > 0 else mse_nearest,
        kept="learned" if keep_learned else "nearest",
        changed=float(np.mean(learned != stored)) if config.iterations > 0 else 0.0,
    )
    if config.bias_correction:
        w_final = scale * torch.from_numpy(final.astype(np.float32))
        axis = 1 if layer.node.op_type in ("Conv", "ConvTranspose") else -1
        delta = _channel_mean_delta(lambda xs: fn(xs, w_final, bias), x, y_fp, axis)
        row["bias_correction"] = _correct_bias(model, layer, layer.bias_int, layer.bias_scale, delta)
    return None


def bias_correction(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    images: np.ndarray,
    *,
    progress: bool = True,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Shift each weighted node's int32 bias so its per-channel mean output matches the float model.

    For node l in topological order: delta_c = mean over images and positions of
    (y_float - y_quant)_c, where y_quant is the node's (pre-activation) output in the
    model whose earlier layers are already corrected; the bias becomes
    round((b_c + delta_c) / bias_scale_c) in int32 with its scale unchanged. A node
    without bias gets one (Conv/ConvTranspose/Gemm whose input comes from a per-tensor
    DequantizeLinear); MatMul nodes without one are skipped and reported.

    Returns the corrected copy and a report (per layer: the mean |delta| and the outcome).
    """
    images = _check_images(images)
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    g.topological_sort(model.graph)
    layers, skipped = weighted_layers(model, float_model)
    targets = _FloatTargets(float_model, [layer.float_output for layer in layers], images)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index, layer in enumerate(tqdm(layers, desc="bias correction", unit="layer", disable=not progress, leave=False)):
        label = layer.node.name or layer.node.output[0]
        (y_q,) = _run(model, images, [layer.node.output[0]])
        y_fp = targets.get(index)
        axis = 1 if layer.node.op_type in ("Conv", "ConvTranspose") else y_q.ndim - 1
        diff = np.moveaxis(y_fp.astype(np.float64) - y_q, axis, -1).reshape(-1, y_q.shape[axis])
        delta = diff.mean(0)
        outcome = _correct_bias(model, layer, layer.bias_int, layer.bias_scale, delta)
        rows.append({"node": label, "op": layer.node.op_type, "mean_abs_shift": float(np.mean(np.abs(delta))), "outcome": outcome})
        _LOG.info("bias correction: %r: mean |shift| %.4g (%s)", label, rows[-1]["mean_abs_shift"], outcome)
    return model, {"layers": rows, "skipped": skipped, "seconds": round(time.perf_counter() - started, 3)}
