"""Rounding optimisation (AdaRound / BRECQ-style) and bias correction for a power-of-two QDQ model.

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
  ``[-2^(b-1), 2^(b-1) - 1]`` for ``b = RoundingConfig.weight_bits`` and each is the
  floor or the ceiling of ``W / W_scale`` (clipped to that range).
* :func:`bias_correction` returns a copy whose int32 biases are shifted so that each
  weighted node's per-channel mean output on the calibration images matches the float
  model's (HPTQ/MCT-style), in topological order so each layer sees the corrected ones.
* Both also return what they did (a JSON-ready report) and log it; a layer the module
  cannot handle (shared weight, weight not a quantized constant, float model without
  the matching node, a torch re-implementation that disagrees with onnxruntime) is
  skipped with a reason in the report -- never silently changed. A learned rounding that
  reconstructs worse than nearest rounding on the calibration images is discarded.

Units. ``RoundingConfig.mode="layer"`` optimises each weighted node on its own output
(AdaRound); ``"block"`` cuts the graph at quantized tensors that every path crosses (in a
ResNet: the residual-stream tensors, so a unit is one residual block; in a plain chain:
one layer) and learns the rounding of all nodes of a block jointly on the block's
output, with the block's inner activation quantizers active as straight-through fake
quantizers (BRECQ, Li et al. 2021, without its Fisher weighting). A block holding an op
the small torch interpreter below does not know falls back to its layers.

Why the *current* quantized model: the input of unit u is taken from the QDQ model in
which units < u already carry their optimised integers and every activation quantizer
is active (AdaRound's "asymmetric reconstruction", Nagel et al. 2020, Sec. 4:
minimise ||f_a(W x) - f_a(W_soft x_q)||^2), so each unit learns to compensate the
quantization error accumulated upstream. The target is the float model's tensor on the
same images: a layer's output passed through its fused activation when it has one
(Conv -> Relu with no Q/DQ between: the hardware op's output is the activation's), or a
block's output.

AdaRound (Nagel et al. 2020, Sec. 4): W_soft = s * clip(floor(W/s) + h(V), qmin, qmax),
h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1,
loss = ||F(X_q, W_soft) - Y_fp||^2 + lambda * sum(1 - |2 h(V) - 1|^beta), beta annealed
from 20 to 2 after a warm-up; finally W_int = floor(W/s) + [V >= 0].

The DGH paper (dgh-paper.txt) evaluates its synthetic images with AdaRound [41] and
BRECQ [30] (Tables 1, 3-5; hardware-friendly setting in Sec. 6.1: every layer quantized);
this module is that step, run on whatever calibration images the caller passes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from ..progress import progress_bar

from .. import graph as g
from ..errors import InvalidInputError, QuantizationError
from ..fileio import check_images
from ..ops import ACTIVATIONS, GATES, WEIGHTED, gated_activation, is_value_preserving
from ..runtime import make_session, run_batched
from .plan import round_bias
from .shift import channel_sums

__all__ = ["RoundingConfig", "optimize_rounding", "bias_correction", "weighted_layers"]

_LOG = logging.getLogger(__name__)

# AdaRound's rectified-sigmoid stretch (Nagel et al. 2020, Sec. 4): h(V) reaches 0 and 1
# exactly, so the regulariser can drive every variable to a hard decision.
_ZETA = 1.1
_GAMMA = -0.1

# How much the torch re-implementation of a node may differ from onnxruntime's output
# (RMS error relative to the output's RMS) before the layer is skipped as not understood.
_ORT_AGREEMENT_RTOL = 1e-3

# Fraction of weights whose nearest rounding of W/s may disagree with the stored integer
# (rounding ties, float noise) before the float model is judged not to match.
_MAX_NEAREST_MISMATCH = 0.01

Target = Literal["activation", "output", "quantized"]


@dataclass(frozen=True)
class RoundingConfig:
    """Settings of the rounding optimisation; validated on construction.

    Attributes:
        weight_bits: bit width of the stored weight integers (signed, ``[-2^(b-1), 2^(b-1)-1]``);
            the quantizer passes its own setting.
        iterations: optimisation steps per unit (layer or block). fmnist_resnet8 W4A4,
            layer mode, 512 real images: 200 -> 88.5 %, 500 -> 88.0 %, 1000 -> 88.5 %,
            2000 -> 88.5 % (top-1; float 91.8 %); 300 costs ~30 s on 2 loaded cores.
        batch_size: calibration images per step.
        lr: Adam learning rate of the rounding variables V.
        reg_weight: lambda, weight of the rounding regulariser (AdaRound/BRECQ: 0.01).
        beta_start, beta_end: the regulariser's exponent, annealed linearly after warm-up
            (high beta = only variables far from 0/1 pay; low beta = all pay).
        warmup: fraction of the iterations run with reconstruction loss only.
        target: ``"activation"`` reconstructs the fused activation's output when the node
            has one (hardware op output), ``"output"`` always the node's own output,
            ``"quantized"`` the activation's output after its output quantizer (round with
            a straight-through gradient), compared with the float activation.
        mode: ``"layer"`` optimises each weighted node on its own output (AdaRound);
            ``"block"`` (default) optimises the nodes of each block (the graph between two
            quantized tensors that every path crosses, e.g. a residual block) jointly on
            the block's output with the inner activation quantizers active (BRECQ). Blocks
            the interpreter cannot run fall back to layers. Measured on fmnist_resnet8
            with 256 DGH images, 300 iterations, mean of seeds 0-2: W2A4 layer 58.3 %,
            block 73.1 %; W4A4 layer 88.2 %, block 88.1 % (docs/ROUNDING.md).
        bias_correction: after each unit's rounding, shift each layer's int32 bias so its
            per-channel mean output matches the float model (creates a bias for
            Conv/ConvTranspose/Gemm nodes without one). Off by default: measured on
            fmnist_resnet8 with DGH images it costs 3 points at W2A4 in layer mode and 15
            in block mode (it undoes what the rounding compensated) and gains nothing at W4A4.
        learn_bias: learn each unit's biases (float, then put on their int32 grid) jointly
            with the rounding, in the same reconstruction loss (adds a bias to
            Conv/ConvTranspose/Gemm nodes without one). On by default: block mode with it,
            same setting as above: W2A4 73.1 -> 76.2 %, W4A4 88.1 -> 89.1 %.
        bias_lr: Adam learning rate of those biases (1e-3: W2A4 71.5 %, 1e-2: 77.5 %, seed 0).
        seed: seeds the batch sampling; same seed, same images -> same integers.
    """

    weight_bits: int = 4
    iterations: int = 300
    batch_size: int = 32
    lr: float = 1e-2
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    target: Target = "activation"
    mode: Literal["layer", "block"] = "block"
    bias_correction: bool = False
    learn_bias: bool = True
    bias_lr: float = 1e-2
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
        if not self.bias_lr > 0 or not math.isfinite(self.bias_lr):
            raise bad("bias_lr", "must be a positive number")
        if not self.reg_weight >= 0 or not math.isfinite(self.reg_weight):
            raise bad("reg_weight", "must be >= 0")
        if not self.beta_start >= self.beta_end > 0:
            raise bad("beta_start", "need beta_start >= beta_end > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise bad("warmup", "must be in [0, 1)")
        if self.mode not in ("layer", "block"):
            raise bad("mode", "must be 'layer' or 'block'")
        if self.target not in ("activation", "output", "quantized"):
            raise bad("target", "must be 'activation', 'output' or 'quantized'")

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
    output_quant: onnx.NodeProto | None  # the QuantizeLinear of the (activation) output, if any
    float_output: str  # the node's output name in the float model
    float_weight: np.ndarray  # the folded float weight
    input_shift: float = 0.0  # c of the shift negative correction on the input (its bias holds -c*sum(W))


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
) -> tuple[tuple[onnx.NodeProto, ...], onnx.NodeProto | None]:
    """The activation chain fused behind ``node`` and the QuantizeLinear that ends it.

    The chain is every op read directly (no Q/DQ between) as the only reader: an
    activation (Relu, Clip, ...), a gated activation Mul(x, G(x)) (SiLU for Sigmoid,
    :func:`onnxdgh.ops.gated_activation`), and the Clip the emitter puts before the
    QuantizeLinear of a narrow activation, which is a Clip like any other. Returns
    ``((steps...), quantize_node_or_None)``; each step is one node or a (gate, Mul) pair
    flattened in order.
    """
    chain: list[onnx.NodeProto] = []
    tensor = node.output[0]
    for _ in range(4):
        users = consumers.get(tensor, [])
        if len(users) == 1 and users[0].op_type in ACTIVATIONS:
            chain.append(users[0])
            tensor = users[0].output[0]
            continue
        pair = gated_activation(tensor, users)
        if pair is not None:
            chain += list(pair)
            tensor = pair[1].output[0]
            continue
        break
    users = consumers.get(tensor, [])
    quant = users[0] if len(users) == 1 and users[0].op_type == "QuantizeLinear" else None
    return tuple(chain), quant


def weighted_layers(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    input_shifts: Mapping[str, float] | None = None,
    *,
    max_mismatch: float = _MAX_NEAREST_MISMATCH,
) -> tuple[list[_Layer], list[dict[str, str]]]:
    """The weighted nodes of ``qdq_model`` that rounding can work on, in topological order.

    ``max_mismatch``: the share of stored integers that may differ (by 1) from nearest
    rounding of the float weight before the float model is judged not to match.

    ``input_shifts``: node name -> the shift ``c`` its input carries (shift negative
    correction: the input is ``x + c``, padded with ``c``, and the stored bias is
    ``b - c * sum(W)``).
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
        if mismatch.max(initial=0) > 1 or float(np.mean(mismatch > 0)) > max_mismatch:
            raise QuantizationError(
                f"the float weight of node {label!r} does not round to the integers stored in {weight_int!r} "
                f"({100 * float(np.mean(mismatch > 0)):.1f}% differ)",
                "pass the BatchNorm-folded float model that the quantizer quantized, and a model quantized "
                "with nearest rounding (QuantizeConfig(optimize_rounding=False, kernel_sum_rounding=False))",
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
        chain, quant = _fused_activation(node, consumers)
        layers.append(
            _Layer(
                node=node,
                weight_int=weight_int,
                weight_scale=full_scale,
                bias_int=bias_int,
                bias_scale=None if bias_scale is None else np.asarray(bias_scale, np.float32),
                bias_zero_point=bias_zero,
                activation=chain,
                output_quant=quant,
                float_output=f_node.output[0],
                float_weight=f_weight,
                input_shift=float((input_shifts or {}).get(node.name, 0.0)),
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
    """``forward(x, w, b)`` of the layer; a shifted input is taken back to ``x`` (the Pad's
    border ``c`` becomes the zero padding), so ``b`` is the bias of the unshifted input."""
    op = layer.node.op_type
    shape = layer.float_weight.shape
    if op == "Conv":
        fn = _conv_fn(layer.node, shape)
    elif op == "ConvTranspose":
        fn = _conv_transpose_fn(layer.node, shape)
    elif op == "Gemm":
        fn = _gemm_fn(layer.node)
    else:
        fn = _matmul_fn(layer.node)
    if not layer.input_shift:
        return fn
    shift = layer.input_shift
    return lambda x, w, b: fn(x - shift, w, b)


def _shift_offset(layer: _Layer, ints: np.ndarray) -> np.ndarray | None:
    """``c * sum(W[o])`` per output channel (Gemm: times alpha / beta) for integers ``ints``:
    stored bias + offset = the bias of the unshifted input. None when the input is not shifted.

    The rounding of a shifted layer is learned on the unshifted input and its stored bias
    is derived from the *final* integers, so a changed rounding never leaves the
    correction ``c * sum(W)`` of the nearest integers behind (and the DC term ``c``
    adds to every input does not couple the rounding variables).
    """
    if not layer.input_shift:
        return None
    weight = ints.astype(np.float64) * layer.weight_scale.astype(np.float64)
    return layer.input_shift * channel_sums(layer.node, weight)


def _store_bias(model: onnx.ModelProto, layer: _Layer, value: np.ndarray) -> None:
    """Write float bias ``value`` (stored convention) as the layer's int32 bias."""
    assert layer.bias_int is not None and layer.bias_scale is not None
    scale = np.broadcast_to(np.asarray(layer.bias_scale, np.float64).reshape(-1), value.shape)
    ints, _ = round_bias(value / scale, 32)
    stored = g.to_array(g.initializer_map(model.graph)[layer.bias_int])
    g.set_initializer_value(model.graph, layer.bias_int, ints.reshape(stored.shape))


def _activation_fn(
    nodes: Sequence[onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The fused activation chain as one torch function, or None when a step is not emulated."""
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    index = 0
    while index < len(nodes):
        if nodes[index].op_type in GATES and index + 1 < len(nodes) and nodes[index + 1].op_type == "Mul":
            gate = _activation_step(nodes[index], inits)
            if gate is None:
                return None
            steps.append(F.silu if nodes[index].op_type == "Sigmoid" else _gated(gate))
            index += 2
            continue
        step = _activation_step(nodes[index], inits)
        if step is None:
            return None
        steps.append(step)
        index += 1

    def apply(y: torch.Tensor) -> torch.Tensor:
        for step in steps:
            y = step(y)
        return y

    return apply


def _gated(gate: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda y: y * gate(y)


def _activation_step(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> Callable[[torch.Tensor], torch.Tensor] | None:
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
    if op == "Selu":
        a, gamma = float(attrs.get("alpha", 1.67326319217681884765625)), float(attrs.get("gamma", 1.05070102214813232421875))
        return lambda y: gamma * torch.where(y > 0, y, a * (torch.exp(y) - 1))
    if op == "PRelu":
        value = _initializer_value(inits, node.input[1]) if len(node.input) > 1 else None
        if value is None:
            return None
        slope = torch.from_numpy(np.asarray(value, np.float32))
        return lambda y: torch.where(y >= 0, y, y * slope)
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


def _output_channels(layer: _Layer) -> int | None:
    """How many output channels (bias entries) the layer has; None for MatMul (no bias input)."""
    shape = layer.float_weight.shape
    op = layer.node.op_type
    if op == "Conv":
        return shape[0]
    if op == "ConvTranspose":
        return shape[1] * int(g.node_attributes(layer.node).get("group", 1))
    if op == "Gemm":
        return shape[0] if g.node_attributes(layer.node).get("transB", 0) else shape[1]
    return None


def _new_bias_scale(model: onnx.ModelProto, layer: _Layer, channels: int) -> np.ndarray | None:
    """The emitter's bias scale (input scale x weight scale) for a node that has no bias yet."""
    if layer.node.op_type == "MatMul":
        return None
    in_scale = _input_scale(model.graph, layer.node.input[0])
    if in_scale is None:
        return None
    axis = _weight_axis(layer.node, layer.float_weight.ndim)
    w_scale = np.moveaxis(layer.weight_scale, axis, 0).reshape(layer.weight_scale.shape[axis], -1)[:, 0]
    if channels % w_scale.shape[0]:
        return None
    # A grouped ConvTranspose has C_out / group weight scales on axis 1, repeated per group.
    w_scale = np.tile(w_scale, channels // w_scale.shape[0])
    return (in_scale * w_scale).astype(np.float32)


def _add_bias(model: onnx.ModelProto, layer: _Layer, channels: int) -> tuple[str, np.ndarray] | None:
    """Give a Conv/ConvTranspose/Gemm without bias a zero int32 bias in the emitter's convention.

    Returns the bias initializer name and its scale, or None when the node cannot take one.
    """
    node = next(n for n in model.graph.node if n.output[0] == layer.node.output[0])
    b_scale = _new_bias_scale(model, layer, channels)
    if b_scale is None:
        return None
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
    g.add_node(
        model.graph, "DequantizeLinear", [q_name, s_name, z_name], [dq_out],
        name=g.unique_name(taken, f"{base}_DequantizeLinear"), axis=0,
    )
    g.set_node_input(node, 2, dq_out)
    g.topological_sort(model.graph)
    return q_name, b_scale


def _correct_bias(
    model: onnx.ModelProto, layer: _Layer, delta: np.ndarray
) -> tuple[str, np.ndarray | None]:
    """Add ``delta`` (float, per channel) to the layer's int32 bias in ``model``.

    Returns what happened and the new dequantized bias (None when nothing changed).
    """
    inits = g.initializer_map(model.graph)
    node = next(n for n in model.graph.node if n.output[0] == layer.node.output[0])
    producers = g.producer_map(model.graph)
    b_dq = producers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if b_dq is None:
        created = _add_bias(model, layer, delta.shape[0])
        if created is None:
            return "skipped: node has no bias and cannot take one", None
        bias_int, bias_scale = created
        inits = g.initializer_map(model.graph)
    else:
        bias_int = b_dq.input[0]
        bias_scale = np.asarray(g.to_array(inits[b_dq.input[1]]), np.float64)
    current = np.asarray(g.to_array(inits[bias_int])).astype(np.int64)
    if current.shape != delta.shape:
        return f"skipped: bias shape {current.shape} is not per output channel", None
    scale = np.broadcast_to(np.asarray(bias_scale, np.float64).reshape(-1), current.shape)
    info = np.iinfo(np.int32)
    new = np.clip(current + np.round(delta / scale), info.min, info.max).astype(np.int32)
    g.set_initializer_value(model.graph, bias_int, new)
    return "corrected", (new * scale).astype(np.float32)


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def _round_ste(y: torch.Tensor) -> torch.Tensor:
    """round(y) forward, identity gradient (the straight-through estimator)."""
    return y + (torch.round(y) - y).detach()


def _fake_quant_fn(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The per-tensor QuantizeLinear ``node`` followed by its DequantizeLinear, in torch."""
    scale = _initializer_value(inits, node.input[1]) if len(node.input) > 1 else None
    zero = _initializer_value(inits, node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    bounds = _integer_bounds(zero.dtype)
    if bounds is None:
        return None
    s, z = float(scale.reshape(-1)[0]), float(np.asarray(zero).astype(np.int64).reshape(-1)[0])
    low, high = bounds

    def fake_quant(y: torch.Tensor) -> torch.Tensor:
        return (torch.clamp(_round_ste(y / s) + z, low, high) - z) * s

    return fake_quant


def _integer_bounds(dtype: np.dtype) -> tuple[int, int] | None:
    """The range of a zero point's integer type (int8, uint8, ml_dtypes int4/uint4, ...)."""
    bounds = {"int4": (-8, 7), "uint4": (0, 15)}.get(str(dtype))
    if bounds is None and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        bounds = (int(info.min), int(info.max))
    return bounds


def _targets(
    layer: _Layer, inits: dict[str, onnx.TensorProto], target: Target
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], str]:
    """(float-side function, quantized-side function, what is reconstructed) for ``layer``.

    The float target always passes through the same activation as the quantized side;
    with ``target="quantized"`` the quantized side also passes the output quantizer.
    """
    label = layer.node.name or layer.node.output[0]
    if target == "output" or not layer.activation and target == "activation":
        return _identity, _identity, "output"
    act = _activation_fn(layer.activation, inits) if layer.activation else _identity
    if act is None:
        _LOG.info("rounding: %r: fused %s not emulated, reconstructing the node output", label, layer.activation[0].op_type)
        return _identity, _identity, "output"
    if target == "activation":
        return act, act, "activation"
    fake = _fake_quant_fn(layer.output_quant, inits) if layer.output_quant is not None else None
    if fake is None:
        return act, act, "activation" if layer.activation else "output"
    return act, (lambda y: fake(act(y))), "quantized"


# ------------------------------------------------------------- block reconstruction

# A block with more weighted nodes than this is optimised layer by layer instead: the
# joint optimisation's cost grows with it and BRECQ's gains come from short blocks.
_MAX_BLOCK_LAYERS = 8


class _Unsupported(Exception):
    """A node the block interpreter does not emulate; the block then falls back to layers."""


@dataclass(frozen=True)
class _Block:
    """A run of the QDQ graph between two quantized tensors that every path crosses.

    ``input`` and ``output`` are activation DequantizeLinear outputs such that nothing
    else computed before ``output`` is read after it: in a ResNet that is a residual
    block (from one Add's quantized output to the next); in a plain chain, one layer.
    """

    input: str
    output: str
    nodes: tuple[onnx.NodeProto, ...]  # data nodes in order; the last is output's DequantizeLinear
    layers: tuple[_Layer, ...]


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers and the outputs of nodes reading only constants (weight DequantizeLinears)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return constant


def _units(model: onnx.ModelProto, layers: list[_Layer], mode: str) -> list[_Layer | _Block]:
    """The optimisation units in graph order: blocks (``mode="block"``) and single layers."""
    if mode == "layer":
        return list(layers)
    graph = model.graph
    constant = _constant_names(graph)
    data_nodes = [node for node in graph.node if not all(not n or n in constant for n in node.input)]
    last_use: dict[str, int] = {}
    for index, node in enumerate(data_nodes):
        for name in node.input:
            if name and name not in constant:
                last_use[name] = index
    for name in g.graph_output_names(graph):
        last_use[name] = len(data_nodes)
    live = set(g.graph_input_names(graph))
    cuts: list[tuple[int, str]] = []
    for index, node in enumerate(data_nodes):
        live.update(node.output)
        live = {name for name in live if last_use.get(name, -1) > index}
        if node.op_type == "DequantizeLinear" and live == {node.output[0]}:
            cuts.append((index, node.output[0]))
    by_output = {layer.node.output[0]: layer for layer in layers}
    position = {node.output[0]: index for index, node in enumerate(data_nodes)}
    units: list[tuple[int, _Layer | _Block]] = []
    in_blocks: set[str] = set()
    for (start, first), (end, last) in zip(cuts, cuts[1:]):
        segment = tuple(data_nodes[start + 1 : end + 1])
        members = tuple(by_output[n.output[0]] for n in segment if n.output[0] in by_output)
        if members and len(members) <= _MAX_BLOCK_LAYERS:
            units.append((start, _Block(first, last, segment, members)))
            in_blocks.update(layer.node.output[0] for layer in members)
    for layer in layers:
        if layer.node.output[0] not in in_blocks:
            units.append((position.get(layer.node.output[0], 0), layer))
    units.sort(key=lambda item: item[0])
    return [unit for _, unit in units]


def _dequantize_constant(node: onnx.NodeProto, values: dict[str, np.ndarray]) -> np.ndarray:
    q = values[node.input[0]].astype(np.float64)
    scale = values[node.input[1]].astype(np.float64)
    zero = values[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(())
    if scale.size > 1:
        axis = int(g.node_attributes(node).get("axis", 1)) % q.ndim
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape) if zero.size > 1 else zero
    return ((q - zero) * scale).astype(np.float32)


class _BlockProgram:
    """The nodes of a :class:`_Block` as a differentiable torch function.

    Activation QuantizeLinear/DequantizeLinear pairs inside the block become fake
    quantizers (round with a straight-through gradient, clamp to the integer range), so
    the block sees the quantization of its inner activations while its rounding is
    learned (BRECQ, Li et al. 2021). Raises :class:`_Unsupported` for ops it does not know.
    """

    def __init__(self, block: _Block, graph: onnx.GraphProto) -> None:
        inits = g.initializer_map(graph)
        values = {name: np.asarray(g.to_array(tensor)) for name, tensor in inits.items()}
        constant = _constant_names(graph)
        for node in graph.node:  # constant nodes, e.g. bias DequantizeLinear
            if node.output and node.output[0] in constant and node.output[0] not in values:
                if node.op_type != "DequantizeLinear":
                    raise _Unsupported(f"constant {node.op_type} node {node.name!r}")
                values[node.output[0]] = _dequantize_constant(node, values)
        self._values = values
        self._inits = inits
        self._layers = {layer.node.output[0]: layer for layer in block.layers}
        self._steps = [self._compile(node) for node in block.nodes]
        self.block = block

    def _const(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self._values[name], dtype=np.float32))

    def _compile(self, node: onnx.NodeProto) -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], None]:
        op = node.op_type
        attrs = g.node_attributes(node)
        out = node.output[0]

        def read(env: dict[str, torch.Tensor], name: str) -> torch.Tensor:
            value = env.get(name)
            return value if value is not None else self._const(name)

        layer = self._layers.get(out)
        if layer is not None:
            fn = _layer_fn(layer)
            bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None

            def weighted(env: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
                bias = weights.get(f"bias:{out}")
                if bias is None and bias_name is not None:
                    bias = read(env, bias_name)
                env[out] = fn(env[node.input[0]], weights[out], bias)

            return weighted
        if op in ("QuantizeLinear", "DequantizeLinear"):
            scale = self._values.get(node.input[1])
            zero = self._values.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
            if scale is None or zero is None or scale.size != 1:
                raise _Unsupported(f"{op} {node.name!r} without a constant per-tensor scale")
            s, z = float(scale.reshape(-1)[0]), float(np.asarray(zero).astype(np.int64).reshape(-1)[0])
            if op == "QuantizeLinear":
                bounds = _integer_bounds(zero.dtype)
                if bounds is None:
                    raise _Unsupported(f"{op} {node.name!r} with zero point type {zero.dtype}")
                low, high = bounds

                def quantize(env: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> None:
                    env[out] = torch.clamp(_round_ste(env[node.input[0]] / s) + z, low, high)

                return quantize

            def dequantize(env: dict[str, torch.Tensor], _: dict[str, torch.Tensor]) -> None:
                env[out] = (env[node.input[0]] - z) * s

            return dequantize
        if op in ACTIVATIONS:
            step = _activation_step(node, self._inits)
            if step is None:
                raise _Unsupported(f"{op} {node.name!r}")
            return lambda env, _: env.__setitem__(out, step(env[node.input[0]]))
        binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}.get(op)
        if binary is not None:
            return lambda env, _: env.__setitem__(out, binary(read(env, node.input[0]), read(env, node.input[1])))
        if op == "Concat":
            axis = int(attrs.get("axis", 1))
            return lambda env, _: env.__setitem__(out, torch.cat([read(env, n) for n in node.input], dim=axis))
        unary = self._shape_op(node, attrs)
        if unary is None:
            raise _Unsupported(f"{op} {node.name!r}")
        return lambda env, _: env.__setitem__(out, unary(env[node.input[0]]))

    def _shape_op(self, node: onnx.NodeProto, attrs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
        op = node.op_type
        if op == "Identity":
            return lambda x: x
        if op == "GlobalAveragePool":
            return lambda x: x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)
        if op == "Flatten":
            axis = int(attrs.get("axis", 1))
            return lambda x: x.reshape(int(np.prod(x.shape[:axis])), -1)
        if op == "Reshape":
            shape = [int(v) for v in self._values[node.input[1]].reshape(-1)]
            return lambda x: x.reshape([x.shape[i] if v == 0 else v for i, v in enumerate(shape)])
        if op == "Transpose":
            perm = attrs.get("perm")
            return lambda x: x.permute(*(perm if perm else reversed(range(x.ndim))))
        if op == "Softmax":
            axis = int(attrs.get("axis", -1))
            return lambda x: torch.softmax(x, dim=axis)
        if op == "Pad":  # constant mode, e.g. the shift negative correction's Pad with value c
            constant = attrs.get("mode", b"constant") in (b"constant", "constant")
            known = all(not name or name in self._values for name in node.input[1:3])
            if not constant or not known or len(node.input) > 3 and node.input[3]:  # no axes input
                return None
            pads = [int(v) for v in self._values[node.input[1]].reshape(-1)]
            fill = float(self._values[node.input[2]].reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0.0
            half = len(pads) // 2
            # torch lists (begin, end) pairs from the last axis backwards.
            order = [p for axis in reversed(range(half)) for p in (pads[axis], pads[axis + half])]
            return lambda x: F.pad(x, order, mode="constant", value=fill)
        if op in ("MaxPool", "AveragePool"):
            kernel = _ints(attrs, "kernel_shape", [])
            n = len(kernel)
            pads = _ints(attrs, "pads", [0] * (2 * n))
            if n != 2 or pads[:n] != pads[n:] or _auto_pad(attrs) != "NOTSET":
                return None
            strides = _ints(attrs, "strides", [1] * n)
            ceil = bool(attrs.get("ceil_mode", 0))
            if op == "MaxPool":
                dilations = _ints(attrs, "dilations", [1] * n)
                return lambda x: F.max_pool2d(x, kernel, strides, pads[:n], dilations, ceil)
            include = bool(attrs.get("count_include_pad", 0))
            return lambda x: F.avg_pool2d(x, kernel, strides, pads[:n], ceil, include)
        if op in ("ReduceMean", "Squeeze", "Unsqueeze"):
            axes = attrs.get("axes")
            if axes is None and len(node.input) > 1 and node.input[1]:
                axes = [int(v) for v in self._values[node.input[1]].reshape(-1)]
            if op == "ReduceMean":
                keep = bool(attrs.get("keepdims", 1))
                return lambda x: x.mean(dim=tuple(axes) if axes else tuple(range(x.ndim)), keepdim=keep)
            if op == "Squeeze":
                return lambda x: x.squeeze(tuple(axes)) if axes else x.squeeze()
            if axes is None:
                return None

            def unsqueeze(x: torch.Tensor) -> torch.Tensor:
                for axis in sorted(a % (x.ndim + len(axes)) for a in axes):
                    x = x.unsqueeze(axis)
                return x

            return unsqueeze
        return None

    def __call__(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the block on ``x``; ``weights`` maps each layer's output name to its weight."""
        env: dict[str, torch.Tensor] = {self.block.input: x}
        for step in self._steps:
            step(env, weights)
        return env


# ---------------------------------------------------------------------- running ONNX


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    inputs = g.graph_input_names(model.graph)
    for value in model.graph.input:
        if value.name == inputs[0]:
            dims = value.type.tensor_type.shape.dim
            if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
                return int(dims[0].dim_value)
    return None


def _run(model: onnx.ModelProto, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Compute tensors ``names`` of ``model`` on ``images``.

    Graph optimisations are off: the QDQ graph is then evaluated as written (float ops on
    dequantized values), which is exactly what the torch side re-implements.
    """
    session = make_session(g.pruned_copy(model, list(names)), optimize=False)
    return run_batched(session, images, batch_size=64, outputs=list(names), fixed_batch=_fixed_batch(model))


class _FloatTargets:
    """Float-model tensors on all images, computed a few at a time in the order needed.

    One onnxruntime pass serves as many upcoming names as fit in ``budget_bytes``
    (sized from a one-image probe), instead of one full pass per layer.
    """

    def __init__(self, float_model: onnx.ModelProto, names: Sequence[str], images: np.ndarray,
                 budget_bytes: int = 512 * 2**20) -> None:
        self._model = float_model
        self._names = list(dict.fromkeys(names))
        self._images = images
        self._cache: dict[str, np.ndarray] = {}
        probe = _run(float_model, images[:1], self._names) if self._names else []
        self._bytes = {name: value.nbytes * images.shape[0] for name, value in zip(self._names, probe)}
        self._budget = budget_bytes

    def get(self, name: str) -> np.ndarray:
        """The float tensor ``name`` on all images (forgets the ones fetched before)."""
        if name not in self._cache:
            start = self._names.index(name)
            batch, total = [name], self._bytes[name]
            for later in self._names[start + 1 :]:
                if total + self._bytes[later] > self._budget:
                    break
                batch.append(later)
                total += self._bytes[later]
            self._cache = dict(zip(batch, _run(self._model, self._images, batch)))
        return self._cache[name]


# ------------------------------------------------------------------------ public API


def optimize_rounding(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    images: np.ndarray,
    config: RoundingConfig,
    *,
    progress: bool = True,
    input_shifts: Mapping[str, float] | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Choose every weighted node's stored integers by AdaRound; see the module contract.

    Args:
        qdq_model: the quantizer's output (not modified).
        float_model: the BN-folded float model it was made from (not modified).
        images: calibration images, N x C x H x W float32 in the model's input space.
        config: the optimisation settings (``weight_bits`` must be the quantizer's).
        progress: show a progress bar over the units (blocks or layers) on stderr.
        input_shifts: node name -> shift ``c`` of its input (the quantizer's shift
            negative correction, :mod:`onnxdgh.quantization.shift`): such a node is optimised
            on its unshifted input and its stored bias ``b - c * sum(W)`` is rederived from
            the final integers.

    Returns:
        The optimised model and a report: per unit (block or layer) its nodes, the
        reconstruction MSE with nearest and with learned rounding (on ``images``), the
        fraction of integers changed, which rounding was kept, the bias correction
        outcome and the seconds spent; plus skipped layers, blocks that fell back to
        layers (with the reason) and the total time.

    Raises:
        CalibrationDataError: ``images`` is empty or not finite.
        QuantizationError: the float model does not match the quantized one, or the
            stored integers exceed ``config.weight_bits``.
    """
    images = check_images(images, what="rounding optimisation images")
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    g.topological_sort(model.graph)
    layers, skipped = weighted_layers(model, float_model, input_shifts)
    units = _units(model, layers, config.mode)
    float_names = set(_tensor_names(float_model))
    plans: list[tuple[_Layer | _Block, str | None]] = []
    for unit in units:
        plans.append((unit, _block_float_target(model, unit, float_names) if isinstance(unit, _Block) else None))
    wanted: list[str] = []
    for unit, target_name in plans:
        if target_name is not None:
            wanted.append(target_name)
        wanted += [layer.float_output for layer in (unit.layers if isinstance(unit, _Block) else (unit,))]
    targets = _FloatTargets(float_model, wanted, images)
    rows: list[dict[str, Any]] = []
    fallbacks: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = progress_bar(total=len(layers), enabled=progress, desc="rounding", unit="layer")
    index = 0
    queue = list(plans)
    while queue:
        unit, target_name = queue.pop(0)
        index += 1
        t0 = time.perf_counter()
        if isinstance(unit, _Block):
            names = [layer.node.name or layer.node.output[0] for layer in unit.layers]
            bar.set_postfix_str(f"block {names[0][-24:]}")
            try:
                if target_name is None:
                    raise _Unsupported("no float counterpart of the block output")
                row = _optimise_block(model, unit, images, targets, target_name, config, index)
            except _Unsupported as exc:
                _LOG.info("rounding: block %s -> %s optimised layer by layer: %s", unit.input, unit.output, exc)
                fallbacks.append({"nodes": names, "reason": str(exc)})
                queue[:0] = [(layer, None) for layer in unit.layers]
                continue
        else:
            bar.set_postfix_str((unit.node.name or unit.node.output[0])[-30:])
            row = _optimise_layer(model, unit, images, targets, config, index)
            if "reason" in row:
                skipped.append({"node": row["nodes"][0], "op": unit.node.op_type, "reason": row["reason"]})
                bar.update(1)
                continue
        row["seconds"] = round(time.perf_counter() - t0, 3)
        _LOG.info(
            "rounding: %s %s: mse %.4g -> %.4g (%s kept, %.1f%% changed) in %.1fs",
            row["unit"], ",".join(row["nodes"]), row["mse_nearest"], row["mse_optimized"], row["kept"],
            100 * row["changed"], row["seconds"],
        )
        rows.append(row)
        bar.update(len(row["nodes"]))
    bar.close()
    report = {
        "config": asdict(config),
        "images": int(images.shape[0]),
        "units": rows,
        "skipped": skipped,
        "block_fallbacks": fallbacks,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return model, report


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    return [name for node in model.graph.node for name in node.output] + g.graph_input_names(model.graph)


def _block_float_target(model: onnx.ModelProto, block: _Block, float_names: set[str]) -> str | None:
    """The float model's tensor that the block's output quantizes.

    The block ends ``P -> [Clip] -> QuantizeLinear -> DequantizeLinear -> output``; by
    the emitter's naming, the float model computes the same value under ``P``'s name,
    the Clip's input name, or (graph output Y, written as ``Y_prequant``) ``Y``.
    """
    if block.output in g.graph_output_names(model.graph) and block.output in float_names:
        return block.output
    producers = g.producer_map(model.graph)
    quant = producers.get(block.nodes[-1].input[0])
    if quant is None or quant.op_type != "QuantizeLinear":
        return None
    name = quant.input[0]
    for _ in range(4):
        for candidate in (name, name[: -len("_prequant")] if name.endswith("_prequant") else None):
            if candidate and candidate in float_names:
                return candidate
        node = producers.get(name)
        if node is None or node.op_type != "Clip":
            return None
        name = node.input[0]
    return None


class _Rounding:
    """The AdaRound variables of one layer (Nagel et al. 2020, Sec. 4).

    W_soft = s * clip(floor(W / s) + h(V), qmin, qmax), V initialised so that h(V) is
    the fractional part of W / s; hard rounding takes the floor where V < 0, else the ceil.
    """

    def __init__(self, layer: _Layer, stored: np.ndarray, config: RoundingConfig, label: str) -> None:
        if stored.min() < config.qmin or stored.max() > config.qmax:
            raise QuantizationError(
                f"weight {layer.weight_int!r} of node {label!r} holds integers outside the "
                f"{config.weight_bits}-bit range [{config.qmin}, {config.qmax}]",
                "pass the quantizer's weight bit width as RoundingConfig.weight_bits",
            )
        self.layer = layer
        self.stored = stored
        self.qmin, self.qmax = config.qmin, config.qmax
        ratio = layer.float_weight / layer.weight_scale
        self.floor = np.floor(ratio)
        self.scale = torch.from_numpy(np.ascontiguousarray(layer.weight_scale))
        self.w_floor = torch.from_numpy(self.floor.astype(np.float32))
        self.v = torch.nn.Parameter(_init_v(ratio - self.floor))
        self.adam = _Adam(self.v, config.lr)

    def weight(self, ints: np.ndarray) -> torch.Tensor:
        return self.scale * torch.from_numpy(ints.astype(np.float32))

    def soft(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_soft, h(V))."""
        h = _h(self.v)
        return self.scale * torch.clamp(self.w_floor + h, self.qmin, self.qmax), h

    def learned(self) -> np.ndarray:
        with torch.no_grad():
            return np.clip(self.floor + (self.v.detach().numpy() >= 0), self.qmin, self.qmax).astype(np.int64)


class _LearnedBias:
    """A layer's bias learned together with its rounding (continuous, then put on its int32 grid).

    The int32 grid (input scale x weight scale) is so fine that rounding the learned
    value costs nothing measurable; learning it inside the reconstruction cannot undo
    what the rounding compensates, unlike a mean shift applied afterwards.
    """

    def __init__(self, model: onnx.ModelProto, layer: _Layer, inits: dict[str, onnx.TensorProto], lr: float) -> None:
        self.layer = layer
        current = _layer_bias(layer, inits)
        if current is not None:
            assert layer.bias_scale is not None
            channels = current.shape[0]
            scale: np.ndarray | None = np.broadcast_to(np.asarray(layer.bias_scale, np.float32).reshape(-1), (channels,))
        else:
            channels = _output_channels(layer) or 0
            scale = _new_bias_scale(model, layer, channels) if channels else None
            current = torch.zeros(channels)
        self.usable = scale is not None
        self.scale = np.asarray(scale if scale is not None else np.ones(channels), np.float64)
        self.initial = current
        self.param = torch.nn.Parameter(current.clone())
        self.adam = _Adam(self.param, lr)

    def ints(self, offset: np.ndarray | None = None) -> np.ndarray:
        """The stored int32 bias; ``offset`` (:func:`_shift_offset` of the final integers)
        turns the learned bias of the unshifted input into the stored one."""
        value = self.param.detach().numpy().astype(np.float64)
        if offset is not None:
            value = value - offset
        return round_bias(value / self.scale, 32)[0]

    def quantized(self, offset: np.ndarray | None = None) -> torch.Tensor:
        """The bias the layer computes with once stored (in the learned convention)."""
        value = self.ints(offset) * self.scale
        return torch.from_numpy((value if offset is None else value + offset).astype(np.float32))

    def commit(self, model: onnx.ModelProto, offset: np.ndarray | None = None) -> None:
        """Write the learned int32 bias into ``model`` (adding the bias input if the node had none)."""
        name = self.layer.bias_int
        if name is None:
            created = _add_bias(model, self.layer, self.initial.shape[0])
            assert created is not None  # usable implies the emitter's bias scale exists
            name = created[0]
        g.set_initializer_value(model.graph, name, self.ints(offset))


def _regulariser(h: torch.Tensor, step: int, config: RoundingConfig) -> torch.Tensor | None:
    """lambda * sum(1 - |2h - 1|^beta), beta annealed linearly after the warm-up; None during it."""
    warm = int(config.warmup * config.iterations)
    if step < warm or config.reg_weight == 0:
        return None
    progress = (step - warm) / max(1, config.iterations - warm)
    beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress)
    return config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def _fit(
    roundings: Sequence[_Rounding],
    forward: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
    x: torch.Tensor,
    target: torch.Tensor,
    config: RoundingConfig,
    seed: int,
    biases: Sequence[_LearnedBias] = (),
) -> None:
    """The AdaRound loop: reconstruction of ``target`` plus the annealed regulariser.

    ``forward`` reads the soft weights it is given and the biases' current parameters.
    """
    generator = torch.Generator().manual_seed(seed)
    count = x.shape[0]
    for step in range(config.iterations):
        batch = torch.randint(0, count, (min(config.batch_size, count),), generator=generator)
        softs = [rounding.soft() for rounding in roundings]
        loss = _reconstruction(forward(x[batch], [w for w, _ in softs]), target[batch])
        for _, h in softs:
            reg = _regulariser(h, step, config)
            if reg is not None:
                loss = loss + reg
        for rounding in roundings:
            rounding.v.grad = None
        for bias in biases:
            bias.param.grad = None
        loss.backward()
        for rounding in roundings:
            rounding.adam.step()
        for bias in biases:
            bias.adam.step()


def _agrees(probe: np.ndarray, reference: np.ndarray, rtol: float) -> bool:
    if probe.shape != reference.shape:
        return False
    err = float(np.sqrt(np.mean((probe.astype(np.float64) - reference) ** 2)))
    return err <= rtol * (1e-6 + float(np.sqrt(np.mean(reference.astype(np.float64) ** 2))))


def _layer_bias(layer: _Layer, inits: dict[str, onnx.TensorProto]) -> torch.Tensor | None:
    """The layer's dequantized bias in :func:`_layer_fn`'s convention (for a shifted input:
    the stored bias plus ``c * sum(W)`` of the stored integers)."""
    if layer.bias_int is None:
        return None
    b_int = np.asarray(g.to_array(inits[layer.bias_int])).astype(np.float64)
    b_zero = 0.0 if layer.bias_zero_point is None else np.asarray(layer.bias_zero_point, np.float64)
    bias = (b_int - b_zero) * np.asarray(layer.bias_scale, np.float64)
    offset = _shift_offset(layer, np.asarray(g.to_array(inits[layer.weight_int])))
    if offset is not None:
        bias = bias + offset.reshape(bias.shape)
    return torch.from_numpy(bias.astype(np.float32))


def _channel_axis(layer: _Layer) -> int:
    return 1 if layer.node.op_type in ("Conv", "ConvTranspose") else -1


def _optimise_layer(
    model: onnx.ModelProto,
    layer: _Layer,
    images: np.ndarray,
    targets: _FloatTargets,
    config: RoundingConfig,
    index: int,
) -> dict[str, Any]:
    """AdaRound one layer in place in ``model``; returns its report row (with ``reason`` if skipped)."""
    label = layer.node.name or layer.node.output[0]
    row: dict[str, Any] = {"unit": "layer", "nodes": [label], "ops": [layer.node.op_type], "weights": int(layer.float_weight.size)}
    inits = g.initializer_map(model.graph)
    x_np, y_q_np = _run(model, images, [layer.node.input[0], layer.node.output[0]])
    act, quant_act, row["target"] = _targets(layer, inits, config.target)
    fn = _layer_fn(layer)
    x = torch.from_numpy(np.ascontiguousarray(x_np, np.float32))
    y_fp = torch.from_numpy(np.ascontiguousarray(targets.get(layer.float_output), np.float32))
    bias = _layer_bias(layer, inits)
    stored = np.asarray(g.to_array(inits[layer.weight_int])).astype(np.int64)
    rounding = _Rounding(layer, stored, config, label)

    # The torch re-implementation must reproduce onnxruntime on the stored integers
    # before its gradients can be trusted.
    with torch.no_grad():
        probe = fn(x[:8], rounding.weight(stored), bias).numpy()
    if not _agrees(probe, y_q_np[:8], _ORT_AGREEMENT_RTOL):
        row["reason"] = "torch re-implementation disagrees with onnxruntime (unsupported attributes)"
        return row

    target = act(y_fp)
    mse_nearest = _batched_mse(lambda xs: quant_act(fn(xs, rounding.weight(stored), bias)), x, target)
    learned_bias = _LearnedBias(model, layer, inits, config.bias_lr) if config.learn_bias else None
    if learned_bias is not None and not learned_bias.usable:
        learned_bias = None
    fit_bias = learned_bias.param if learned_bias is not None else bias
    _fit([rounding], lambda xs, ws: quant_act(fn(xs, ws[0], fit_bias)), x, target, config,
         config.seed * 1_000_003 + index, [learned_bias] if learned_bias is not None else [])
    learned = rounding.learned()
    final_bias = learned_bias.quantized(_shift_offset(layer, learned)) if learned_bias is not None else bias
    mse_learned = _batched_mse(lambda xs: quant_act(fn(xs, rounding.weight(learned), final_bias)), x, target)
    # Too few iterations can leave the learned rounding worse than nearest on the very
    # images it was fitted to; then nearest is the honest choice.
    keep = config.iterations > 0 and mse_learned <= mse_nearest
    final = learned if keep else stored
    if keep:
        g.set_initializer_value(model.graph, layer.weight_int, final)
        offset = _shift_offset(layer, final)
        if learned_bias is not None:
            learned_bias.commit(model, offset)
            bias = final_bias
            row["bias_learned"] = True
        elif offset is not None and bias is not None:  # the shift's correction follows the new integers
            _store_bias(model, layer, bias.numpy().astype(np.float64) - offset)
    row.update(
        iterations=config.iterations,
        mse_nearest=mse_nearest,
        mse_optimized=mse_learned if config.iterations > 0 else mse_nearest,
        kept="learned" if keep else "nearest",
        changed=float(np.mean(learned != stored)) if config.iterations > 0 else 0.0,
    )
    if config.bias_correction:
        w_final = rounding.weight(final)
        delta = _channel_mean_delta(lambda xs: fn(xs, w_final, bias), x, y_fp, _channel_axis(layer))
        row["bias_correction"] = [_correct_bias(model, layer, delta)[0]]
    return row


def _optimise_block(
    model: onnx.ModelProto,
    block: _Block,
    images: np.ndarray,
    targets: _FloatTargets,
    target_name: str,
    config: RoundingConfig,
    index: int,
) -> dict[str, Any]:
    """Learn the rounding of all layers of ``block`` jointly on the block's output (BRECQ).

    Raises:
        _Unsupported: the block holds an op the interpreter does not emulate, or the
            interpreter disagrees with onnxruntime; the caller falls back to layers.
    """
    program = _BlockProgram(block, model.graph)
    labels = [layer.node.name or layer.node.output[0] for layer in block.layers]
    quant = g.producer_map(model.graph).get(block.nodes[-1].input[0])
    assert quant is not None
    pre_quant = quant.input[0]
    compare = block.output if config.target == "quantized" else pre_quant
    x_np, ref_np = _run(model, images, [block.input, pre_quant])
    x = torch.from_numpy(np.ascontiguousarray(x_np, np.float32))
    target = torch.from_numpy(np.ascontiguousarray(targets.get(target_name), np.float32))
    inits = g.initializer_map(model.graph)
    roundings = []
    for layer, label in zip(block.layers, labels):
        stored = np.asarray(g.to_array(inits[layer.weight_int])).astype(np.int64)
        roundings.append(_Rounding(layer, stored, config, label))
    outs = [layer.node.output[0] for layer in block.layers]
    # A shifted layer computes on its unshifted input (_layer_fn), so it needs its bias in
    # that convention even when the bias is not learned; a learned one overrides it.
    fixed: dict[str, torch.Tensor] = {}
    for layer in block.layers:
        unshifted = _layer_bias(layer, inits) if layer.input_shift else None
        if unshifted is not None:
            fixed[f"bias:{layer.node.output[0]}"] = unshifted

    def run_with(weights: Sequence[torch.Tensor], name: str = compare) -> Callable[[torch.Tensor], torch.Tensor]:
        mapping = {**fixed, **dict(zip(outs, weights))}
        return lambda xs: program(xs, mapping)[name]

    nearest = [r.weight(r.stored) for r in roundings]
    with torch.no_grad():
        probe = run_with(nearest, pre_quant)(x[:8]).numpy()
    # Activation rounding inside the block may flip a rare value by one step between
    # torch and onnxruntime, hence a looser bound than for a single layer.
    if not _agrees(probe, ref_np[:8], 1e-2):
        raise _Unsupported("the block interpreter disagrees with onnxruntime")
    if target.shape[1:] != x_np.shape[1:] and target.shape[1:] != ref_np.shape[1:]:
        raise _Unsupported(f"float tensor {target_name!r} has shape {tuple(target.shape)}")

    mse_nearest = _batched_mse(run_with(nearest), x, target)
    biases = [_LearnedBias(model, layer, inits, config.bias_lr) for layer in block.layers] if config.learn_bias else []
    biases = [bias for bias in biases if bias.usable]

    def with_biases(weights: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(weights) + list(values)

    if biases:
        outs_b = outs + [f"bias:{bias.layer.node.output[0]}" for bias in biases]

        def run_with(weights: Sequence[torch.Tensor], name: str = compare) -> Callable[[torch.Tensor], torch.Tensor]:  # noqa: F811
            mapping = {**fixed, **dict(zip(outs_b, weights))}
            return lambda xs: program(xs, mapping)[name]


    _fit(roundings, lambda xs, ws: run_with(with_biases(ws, [b.param for b in biases]))(xs), x, target, config,
         config.seed * 1_000_003 + index, biases)
    learned = [r.learned() for r in roundings]
    learned_of = {layer.node.output[0]: ints for layer, ints in zip(block.layers, learned)}
    learned_biases = [b.quantized(_shift_offset(b.layer, learned_of[b.layer.node.output[0]])) for b in biases]
    mse_learned = _batched_mse(
        run_with(with_biases([r.weight(q) for r, q in zip(roundings, learned)], learned_biases)), x, target
    )
    keep = config.iterations > 0 and mse_learned <= mse_nearest
    finals = learned if keep else [r.stored for r in roundings]
    final_of = {layer.node.output[0]: ints for layer, ints in zip(block.layers, finals)}
    if keep:
        for layer, ints in zip(block.layers, finals):
            g.set_initializer_value(model.graph, layer.weight_int, ints)
        for bias in biases:
            bias.commit(model, _shift_offset(bias.layer, final_of[bias.layer.node.output[0]]))
        learned_outs = {bias.layer.node.output[0] for bias in biases}
        for layer in block.layers:  # the shift's correction follows the new integers
            out = layer.node.output[0]
            offset = _shift_offset(layer, final_of[out])
            if offset is not None and out not in learned_outs and f"bias:{out}" in fixed:
                _store_bias(model, layer, fixed[f"bias:{out}"].numpy().astype(np.float64) - offset)
    changed = sum(int(np.sum(q != r.stored)) for q, r in zip(learned, roundings))
    total = sum(r.stored.size for r in roundings)
    row: dict[str, Any] = {
        "unit": "block",
        "nodes": labels,
        "ops": [layer.node.op_type for layer in block.layers],
        "weights": int(total),
        "target": "quantized" if compare == block.output else "block output",
        "iterations": config.iterations,
        "mse_nearest": mse_nearest,
        "mse_optimized": mse_learned if config.iterations > 0 else mse_nearest,
        "kept": "learned" if keep else "nearest",
        "changed": changed / max(total, 1) if config.iterations > 0 else 0.0,
    }
    if biases and keep:
        row["bias_learned"] = True
    if config.bias_correction:
        # Layer by layer inside the block, each seeing the biases corrected before it.
        weights = {**fixed, **{out: r.weight(q) for out, r, q in zip(outs, roundings, finals)}}
        if keep:
            weights.update({f"bias:{b.layer.node.output[0]}": q for b, q in zip(biases, learned_biases)})
        outcomes = []
        for layer in block.layers:
            out = layer.node.output[0]
            y_fp = torch.from_numpy(np.ascontiguousarray(targets.get(layer.float_output), np.float32))
            delta = _channel_mean_delta(lambda xs: program(xs, weights)[out], x, y_fp, _channel_axis(layer))
            outcome, new_bias = _correct_bias(model, layer, delta)
            if new_bias is not None:
                offset = _shift_offset(layer, final_of[out])
                weights[f"bias:{out}"] = torch.from_numpy(
                    new_bias if offset is None else (new_bias + offset.reshape(new_bias.shape)).astype(np.float32)
                )
            outcomes.append(outcome)
        row["bias_correction"] = outcomes
    return row


def bias_correction(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    images: np.ndarray,
    *,
    progress: bool = True,
    sum_rounded: bool = False,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Shift each weighted node's int32 bias so its per-channel mean output matches the float model.

    ``sum_rounded``: the weights were stored by kernel-sum-preserving rounding
    (``plan.resolve(sum_rounding=True)``): up to half of a channel's integers may then
    differ by one from nearest rounding.

    For node l in topological order: delta_c = mean over images and positions of
    (y_float - y_quant)_c, where y_quant is the node's (pre-activation) output in the
    model whose earlier layers are already corrected; the bias becomes
    round((b_c + delta_c) / bias_scale_c) in int32 with its scale unchanged (HPTQ/MCT's
    bias correction, here measured on the calibration images rather than derived from
    BN statistics). A node without bias gets one (Conv/ConvTranspose/Gemm whose input
    comes from a per-tensor DequantizeLinear); MatMul nodes without one are skipped.

    Returns the corrected copy and a report (per layer: the mean |delta| and the outcome).
    """
    images = check_images(images, what="rounding optimisation images")
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    g.topological_sort(model.graph)
    layers, skipped = weighted_layers(model, float_model, max_mismatch=0.5 if sum_rounded else _MAX_NEAREST_MISMATCH)
    targets = _FloatTargets(float_model, [layer.float_output for layer in layers], images)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for layer in progress_bar(layers, enabled=progress, desc="bias correction", unit="layer"):
        label = layer.node.name or layer.node.output[0]
        (y_q,) = _run(model, images, [layer.node.output[0]])
        y_fp = targets.get(layer.float_output)
        axis = _channel_axis(layer) % y_q.ndim
        diff = np.moveaxis(y_fp.astype(np.float64) - y_q, axis, -1).reshape(-1, y_q.shape[axis])
        delta = diff.mean(0)
        outcome, _ = _correct_bias(model, layer, delta)
        rows.append({"node": label, "op": layer.node.op_type, "mean_abs_shift": float(np.mean(np.abs(delta))), "outcome": outcome})
        _LOG.info("bias correction: %r: mean |shift| %.4g (%s)", label, rows[-1]["mean_abs_shift"], outcome)
    return model, {"layers": rows, "skipped": skipped, "seconds": round(time.perf_counter() - started, 3)}
