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
  Only integer initializers (and int32 biases, possibly a new one) change, written by
  :func:`onnxdgh.quantization.emit.apply_integers`: scales, zero points, node structure
  and names stay as they were, so every power-of-two and range constraint the quantizer
  established still holds. The integers stay in ``[-2^(b-1), 2^(b-1) - 1]`` for
  ``b = RoundingConfig.weight_bits`` and each is the floor or the ceiling of
  ``W / W_scale`` (clipped to that range).
* :func:`bias_correction` returns a copy whose int32 biases are shifted so that each
  weighted node's per-channel mean output on the calibration images matches the float
  model's (HPTQ/MCT-style), in topological order so each layer sees the corrected ones.
* Both also return what they did (a JSON-ready report) and log it; a layer the module
  cannot handle (shared weight, weight not a quantized constant, float model without
  the matching node, an op onnx2torch cannot convert) is skipped with a reason in the
  report -- never silently changed. A learned rounding that reconstructs worse than
  nearest rounding on the calibration images is discarded.

Units (docs/ROUNDING.md). ``mode="layer"`` optimises each weighted node on its output
passed through the ops fused behind it (AdaRound); ``"block"`` cuts the graph at quantized
tensors that every path crosses (a residual block; in a plain chain one layer) and learns
a block's rounding jointly, its inner activation quantizers active as straight-through
fake quantizers (BRECQ, Li et al. 2021, without its Fisher weighting). Every unit runs in
the one fake-quant simulation (:mod:`onnxdgh.quantization.simulate`); a block holding an
op onnx2torch cannot convert falls back to its layers.

Why the *current* quantized model: the input of unit u is taken from the QDQ model in
which units < u already carry their optimised integers and every activation quantizer
is active (AdaRound's "asymmetric reconstruction", Nagel et al. 2020, Sec. 4:
minimise ||f_a(W x) - f_a(W_soft x_q)||^2), so each unit learns to compensate the
quantization error accumulated upstream. The target is the float model's tensor on the
same images: a layer's output passed through what is fused behind it (Conv -> Relu
with no Q/DQ between: the hardware op's output is the activation's), or a block's output.

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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import onnx
import torch

from .. import graph as g
from ..errors import InvalidInputError, QuantizationError
from ..fileio import check_images
from ..ops import WEIGHTED, is_value_preserving, output_channel_axis, spec
from ..progress import progress_bar
from ..runtime import make_session, run_batched
from .emit import NewBias, apply_integers
from .plan import round_bias
from .shift import channel_sums
from .simulate import QuantizedConstant, Simulation, UnsupportedOpError, simulate

__all__ = ["RoundingConfig", "optimize_rounding", "bias_correction", "weighted_layers"]

_LOG = logging.getLogger(__name__)

# AdaRound's rectified-sigmoid stretch (Nagel et al. 2020, Sec. 4): h(V) reaches 0 and 1
# exactly, so the regulariser can drive every variable to a hard decision.
_ZETA = 1.1
_GAMMA = -0.1

# Fraction of weights whose nearest rounding of W/s may disagree with the stored integer
# (rounding ties, float noise) before the float model is judged not to match.
_MAX_NEAREST_MISMATCH = 0.01

# A block with more weighted nodes than this is optimised layer by layer instead: the
# joint optimisation's cost grows with it and BRECQ's gains come from short blocks.
_MAX_BLOCK_LAYERS = 8

# Ops fused behind a weighted node (activation, gate, range Clip) that a layer unit
# follows to its output quantizer; more means it is not a fused activation.
_MAX_FUSED_OPS = 6

# Images on which each unit's simulation is checked against onnxruntime.
_CHECK_IMAGES = 8

Target = Literal["activation", "output", "quantized"]


@dataclass(frozen=True)
class RoundingConfig:
    """Settings of the rounding optimisation; validated on construction.

    The defaults were chosen on measurements listed in docs/ROUNDING.md.

    Attributes:
        weight_bits: bit width of the stored weight integers (signed, ``[-2^(b-1), 2^(b-1)-1]``);
            the quantizer passes its own setting.
        iterations: optimisation steps per unit (layer or block).
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
            ``"block"`` the nodes of each block jointly on the block's output (BRECQ).
        bias_correction: after each unit's rounding, shift each layer's int32 bias so its
            per-channel mean output matches the float model (creates a bias for
            Conv/ConvTranspose/Gemm nodes without one). Off by default: it undoes what
            the rounding compensated.
        learn_bias: learn each unit's biases (float, then put on their int32 grid) jointly
            with the rounding, in the same reconstruction loss (adds a bias to
            Conv/ConvTranspose/Gemm nodes without one).
        bias_lr: Adam learning rate of those biases.
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
        finite = math.isfinite
        checks = (
            ("weight_bits", 2 <= self.weight_bits <= 8, "must be between 2 and 8"),
            ("iterations", self.iterations >= 0, "must be >= 0"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", self.lr > 0 and finite(self.lr), "must be a positive number"),
            ("bias_lr", self.bias_lr > 0 and finite(self.bias_lr), "must be a positive number"),
            ("reg_weight", self.reg_weight >= 0 and finite(self.reg_weight), "must be >= 0"),
            ("beta_start", self.beta_start >= self.beta_end > 0, "need beta_start >= beta_end > 0"),
            ("warmup", 0.0 <= self.warmup < 1.0, "must be in [0, 1)"),
            ("mode", self.mode in ("layer", "block"), "must be 'layer' or 'block'"),
            ("target", self.target in ("activation", "output", "quantized"),
             "must be 'activation', 'output' or 'quantized'"),
        )
        for name, ok, why in checks:
            if not ok:
                problem = f"rounding option {name}={getattr(self, name)!r}: {why}"
                raise InvalidInputError(problem, "see RoundingConfig")

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
    """A weighted node of the QDQ model, its quantized weight and its float counterpart."""

    node: onnx.NodeProto
    weight_int: str  # the integer initializer read by the weight's DequantizeLinear
    weight_scale: np.ndarray  # float32, broadcast to the weight's shape
    bias_int: str | None  # int32 initializer of the bias, if any
    float_output: str  # the node's output name in the float model
    float_weight: np.ndarray  # the folded float weight
    input_shift: float = 0.0  # c of the shift negative correction on the input (its bias holds -c*sum(W))

    @property
    def label(self) -> str:
        return self.node.name or self.node.output[0]


def _initializer_value(inits: Mapping[str, onnx.TensorProto], name: str) -> np.ndarray | None:
    tensor = inits.get(name)
    return None if tensor is None else np.asarray(g.to_array(tensor))


def _dq_scale(dq: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto], shape: tuple[int, ...]) -> np.ndarray | None:
    """The scale of a DequantizeLinear of a constant, broadcast to ``shape`` along its ``axis``."""
    scale = _initializer_value(inits, dq.input[1])
    if scale is None:
        return None
    view = [1] * len(shape)
    if scale.size > 1:
        view[int(g.attribute(dq, "axis", 1)) % len(shape)] = -1  # type: ignore[call-overload]
    return np.broadcast_to(scale.astype(np.float32).reshape(view), shape).astype(np.float32)


def weighted_layers(
    qdq_model: onnx.ModelProto,
    float_model: onnx.ModelProto,
    input_shifts: Mapping[str, float] | None = None,
    *,
    max_mismatch: float = _MAX_NEAREST_MISMATCH,
) -> tuple[list[_Layer], list[dict[str, str]]]:
    """The weighted nodes of ``qdq_model`` that rounding can work on, in topological order.

    Returns the layers and, for every weighted node left out, ``{"node", "op", "reason"}``.
    The structure is traced (weight input <- DequantizeLinear <- integer initializer)
    rather than trusted from names. The float counterpart is found by node name, then by
    output name, and must have the same op and weight shape; at most a ``max_mismatch``
    share of the stored integers may differ (by 1) from nearest rounding of its weight.
    ``input_shifts``: node name -> the shift ``c`` its input carries (:func:`optimize_rounding`).
    """
    graph = qdq_model.graph
    view, f_view = g.GraphView(graph), g.GraphView(float_model)
    inits, producers, consumers = view.initializers, view.producers, view.consumers
    f_by_name = {node.name: node for node in float_model.graph.node if node.name}

    # How many nodes read each integer initializer: a shared weight cannot be optimised
    # for one consumer without hurting the other.
    readers = Counter(name for node in graph.node for name in node.input if name in inits)

    layers: list[_Layer] = []
    skipped: list[dict[str, str]] = []
    for node in graph.node:
        if node.op_type not in WEIGHTED:
            continue
        label = node.name or node.output[0]

        def skip(reason: str, node: onnx.NodeProto = node, label: str = label) -> None:
            _LOG.info("rounding: skipping %s %r: %s", node.op_type, label, reason)
            skipped.append({"node": label, "op": node.op_type, "reason": reason})

        dq = producers.get(node.input[1]) if len(node.input) > 1 else None
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            skip("weight is not a DequantizeLinear of a constant")
            continue
        weight_int = dq.input[0]
        if readers[weight_int] != 1 or len(consumers.get(dq.output[0], [])) != 1:
            skip(f"weight {weight_int!r} is shared by several nodes")
            continue
        q_weight = np.asarray(g.to_array(inits[weight_int]))
        zero = _initializer_value(inits, dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        full_scale = _dq_scale(dq, inits, q_weight.shape)
        if full_scale is None:
            skip("weight scale is not a constant")
            continue
        if zero is not None and np.any(np.asarray(zero).astype(np.int64) != 0):
            skip("weight zero point is not 0")
            continue

        # Float counterpart: same node name, else the producer of the same output name
        # (a graph output Y is written as Y_prequant in the QDQ model).
        f_node = f_by_name.get(node.name) if node.name else None
        if f_node is None:
            out = _strip(node.output[0])
            f_node = f_view.producers.get(out if out in view.output_set else node.output[0])
        if f_node is None or f_node.op_type != node.op_type or len(f_node.input) < 2:
            skip("no matching node in the float model")
            continue
        f_weight = _initializer_value(f_view.initializers, f_node.input[1])
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

        bias_int = None
        if len(node.input) > 2 and node.input[2]:
            b_dq = producers.get(node.input[2])
            if b_dq is None or b_dq.op_type != "DequantizeLinear" or b_dq.input[0] not in inits:
                skip("bias is not a DequantizeLinear of a constant")
                continue
            bias_int = b_dq.input[0]
            if readers[bias_int] != 1 or b_dq.input[1] not in inits:
                skip(f"bias {bias_int!r} has no constant scale or is shared")
                continue
        layers.append(
            _Layer(node, weight_int, full_scale, bias_int, f_node.output[0], f_weight,
                   float((input_shifts or {}).get(node.name, 0.0)))
        )
    return layers, skipped


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    """Initializers and the outputs of nodes reading only constants (weight DequantizeLinears)."""
    constant = {init.name for init in graph.initializer}
    for node in graph.node:
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
    return constant


# ------------------------------------------------------------------------------ units


@dataclass(frozen=True)
class _Unit:
    """A part of the QDQ graph whose layers' rounding is learned together.

    The simulation runs it from ``inputs`` to ``output``; the target is the float model's
    ``float_name`` tensor, passed through the QDQ graph's part ``tail`` (from, to) when
    the compared tensor lies behind ops applied to it (the emitter's range Clip).
    """

    kind: Literal["layer", "block"]
    layers: tuple[_Layer, ...]
    inputs: tuple[str, ...]
    output: str
    float_name: str | None
    tail: tuple[str, str] | None
    target: str


def _units(model: onnx.ModelProto, layers: list[_Layer], target: Target, mode: str,
           float_names: set[str]) -> list[_Unit]:
    """The optimisation units in graph order: blocks (``mode="block"``) and single layers.

    A block runs between two activation DequantizeLinear outputs such that nothing else
    computed before its output is read after it: in a ResNet a residual block (from one
    Add's quantized output to the next); in a plain chain, one layer. Its unit ends at its
    output quantizer's input (``target`` "quantized": at its output) and is compared with
    the float block output.
    """
    if mode == "layer":
        return [_layer_unit(model, layer, target, float_names) for layer in layers]
    graph = model.graph
    producers = g.producer_map(graph)
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
    units: list[tuple[int, _Unit]] = []
    in_blocks: set[str] = set()
    for (start, first), (end, last) in zip(cuts, cuts[1:]):
        members = tuple(by_output[n.output[0]] for n in data_nodes[start + 1 : end + 1] if n.output[0] in by_output)
        if members and len(members) <= _MAX_BLOCK_LAYERS:
            pre_quant = producers[producers[last].input[0]].input[0]
            name = _float_counterpart(model, pre_quant, float_names)
            name = None if name is None else _strip(name)
            output = last if target == "quantized" else pre_quant
            label = "quantized" if target == "quantized" else "block output"
            units.append((start, _Unit("block", members, (first,), output, name, None, label)))
            in_blocks.update(layer.node.output[0] for layer in members)
    for layer in layers:
        if layer.node.output[0] not in in_blocks:
            unit = _layer_unit(model, layer, target, float_names)
            units.append((position.get(layer.node.output[0], 0), unit))
    units.sort(key=lambda item: item[0])
    return [unit for _, unit in units]


def _float_counterpart(model: onnx.ModelProto, name: str, float_names: set[str]) -> str | None:
    """The QDQ tensor at or before ``name`` (back through Clips) that the float model computes.

    By the emitter's naming the float model has the same tensor under the same name, or
    (graph output Y, written as ``Y_prequant``) as ``Y``; a narrow activation passes a
    range Clip the float model does not have.
    """
    producers = g.producer_map(model.graph)
    for _ in range(4):
        if _strip(name) in float_names:
            return name
        node = producers.get(name)
        if node is None or node.op_type != "Clip":
            return None
        name = node.input[0]
    return None


def _strip(name: str) -> str:
    return name[: -len("_prequant")] if name.endswith("_prequant") else name


def _layer_unit(model: onnx.ModelProto, layer: _Layer, target: Target, float_names: set[str]) -> _Unit:
    """The unit of one layer: the node and the ops fused behind it up to its output
    quantizer (``target`` "activation"/"quantized"), else the node alone."""
    graph = model.graph
    consumers = g.consumer_map(graph)
    constant = _constant_names(graph)
    outputs = set(g.graph_output_names(graph))
    node = layer.node
    region: list[onnx.NodeProto] = []
    quants: list[onnx.NodeProto] = []
    frontier = [node.output[0]]
    fused = target != "output"
    while frontier and fused:
        tensor = frontier.pop()
        if tensor in outputs:
            fused = False
        for user in consumers.get(tensor, []):
            if user.op_type == "QuantizeLinear":
                quants.append(user)
            elif user.op_type in WEIGHTED or user.op_type == "DequantizeLinear":
                fused = False
            elif all(user is not seen for seen in region):
                region.append(user)
                frontier.extend(user.output)
        fused = fused and len(region) <= _MAX_FUSED_OPS
    fused = fused and len({id(q) for q in quants}) == 1
    members = [node] + (region if fused else [])
    produced = {name for member in members for name in member.output}
    inputs = tuple(dict.fromkeys(
        name for member in members for name in member.input if name and name not in produced and name not in constant
    ))
    pre_quant = quants[0].input[0]
    start = _float_counterpart(model, pre_quant, float_names) if fused else None
    if start is None:
        return _Unit("layer", (layer,), inputs, node.output[0], layer.float_output, None, "output")
    tail = (start, pre_quant) if start != pre_quant else None
    label = "activation" if pre_quant != node.output[0] else "output"
    dqs = consumers.get(quants[0].output[0], [])
    if target == "quantized" and dqs and dqs[0].op_type == "DequantizeLinear":
        return _Unit("layer", (layer,), inputs, dqs[0].output[0], _strip(start), tail, "quantized")
    return _Unit("layer", (layer,), inputs, pre_quant, _strip(start), tail, label)


# ------------------------------------------------------------------------ torch side


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

    def __init__(self, param: torch.Tensor, lr: float) -> None:
        self.param, self.lr, self.t = param, lr, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        self.t += 1
        b1, b2 = 0.9, 0.999
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_hat = self.v / (1 - b2**self.t)
        self.param.sub_(self.lr * m_hat / (v_hat.sqrt() + 1e-8))
        self.param.grad = None


def _reconstruction(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels (dim 1), averaged over images and positions (BRECQ's lp_loss)."""
    err = (out - target).pow(2)
    return err.sum(1).mean() if err.ndim > 1 else err.mean()


def _regulariser(h: torch.Tensor, step: int, config: RoundingConfig) -> torch.Tensor | None:
    """lambda * sum(1 - |2h - 1|^beta), beta annealed linearly after the warm-up; None during it."""
    warm = int(config.warmup * config.iterations)
    if step < warm or config.reg_weight == 0:
        return None
    progress = (step - warm) / max(1, config.iterations - warm)
    beta = config.beta_end + (config.beta_start - config.beta_end) * (1.0 - progress)
    return config.reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


class _Rounding:
    """The AdaRound variables of one layer's weight constant (Nagel et al. 2020, Sec. 4).

    W_soft = s * clip(floor(W / s) + h(V), qmin, qmax), V initialised so that h(V) is
    the fractional part of W / s; hard rounding takes the floor where V < 0, else the ceil.
    """

    def __init__(self, layer: _Layer, constant: QuantizedConstant, config: RoundingConfig) -> None:
        stored = constant.integers.numpy().astype(np.int64)
        if stored.min() < config.qmin or stored.max() > config.qmax:
            raise QuantizationError(
                f"weight {layer.weight_int!r} of node {layer.label!r} holds integers outside the "
                f"{config.weight_bits}-bit range [{config.qmin}, {config.qmax}]",
                "pass the quantizer's weight bit width as RoundingConfig.weight_bits",
            )
        self.layer, self.constant, self.stored = layer, constant, stored
        self.qmin, self.qmax = config.qmin, config.qmax
        ratio = layer.float_weight / layer.weight_scale
        self.floor = np.floor(ratio)
        self.w_floor = torch.from_numpy(self.floor.astype(np.float32))
        self.v = torch.nn.Parameter(_init_v(ratio - self.floor))
        self.adam = _Adam(self.v, config.lr)

    def soft(self) -> torch.Tensor:
        """h(V); makes the constant return the soft weight of this h until the next call."""
        h = _h(self.v)
        weight = self.constant.dequantize(torch.clamp(self.w_floor + h, self.qmin, self.qmax))
        self.constant.source = lambda: weight
        return h

    def learned(self) -> np.ndarray:
        with torch.no_grad():
            return np.clip(self.floor + (self.v.detach().numpy() >= 0), self.qmin, self.qmax).astype(np.int64)


class _Bias:
    """A layer's bias constant while its weight's rounding is learned.

    For a shifted input (``x + c``) the stored bias is ``b - c * sum(W)``: the bias of the
    unshifted input ``b`` is what is kept (or learned), and the stored one follows the
    current weight, so the DC term ``c`` adds to every input does not couple the
    rounding variables and the stored bias fits the *final* integers. ``learn``: ``b`` is
    a parameter of the reconstruction (continuous, put on its int32 grid at the end; the
    grid is so fine that this costs nothing measurable, and unlike a mean shift applied
    afterwards it cannot undo what the rounding compensates).
    """

    def __init__(self, layer: _Layer, constant: QuantizedConstant, weight: QuantizedConstant, learn: bool, lr: float) -> None:
        self.layer, self.constant, self.weight, self.learn = layer, constant, weight, learn
        self.stored = constant.integers.numpy().astype(np.int64)
        with torch.no_grad():
            base = constant.dequantize(constant.integers) + self._offset(weight.dequantize(weight.integers))
        self.base = torch.nn.Parameter(base.clone()) if learn else base
        self.adam = _Adam(self.base, lr) if learn else None
        constant.source = lambda: self.base - self._offset(weight())

    def _offset(self, weight: torch.Tensor) -> torch.Tensor | float:
        shift = self.layer.input_shift
        return shift * channel_sums(self.layer.node, weight) if shift else 0.0

    def ints(self, weight_ints: np.ndarray) -> np.ndarray:
        """The stored int32 bias for the final weight integers ``weight_ints``."""
        with torch.no_grad():
            weight = self.weight.dequantize(torch.from_numpy(weight_ints.astype(np.float32)))
            value = (self.base - self._offset(weight)).numpy().astype(np.float64)
        scale = np.broadcast_to(self.constant.scale.numpy().astype(np.float64), value.shape)
        return round_bias(value / scale, 32)[0]


def _load(constant: QuantizedConstant, ints: np.ndarray) -> None:
    """Make ``constant`` return the hard integers ``ints``."""
    constant.source = None
    constant.integers.copy_(torch.from_numpy(np.asarray(ints, np.float32)))


def _mse(sim: Simulation, feeds: Sequence[torch.Tensor], target: torch.Tensor, batch: int = 256) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, target.shape[0], batch):
            out = sim(*[f[start : start + batch] for f in feeds])[0]
            total += float((out - target[start : start + batch]).pow(2).sum())
            count += out.numel()
    return total / max(count, 1)


def _fit(
    roundings: Sequence[_Rounding], biases: Sequence[_Bias], sim: Simulation,
    feeds: Sequence[torch.Tensor], target: torch.Tensor, config: RoundingConfig, seed: int,
) -> None:
    """The AdaRound loop: reconstruction of ``target`` plus the annealed regulariser."""
    generator = torch.Generator().manual_seed(seed)
    count = target.shape[0]
    learned = [bias for bias in biases if bias.adam is not None]
    for step in range(config.iterations):
        batch = torch.randint(0, count, (min(config.batch_size, count),), generator=generator)
        hs = [rounding.soft() for rounding in roundings]
        loss = _reconstruction(sim(*[f[batch] for f in feeds])[0], target[batch])
        for h in hs:
            reg = _regulariser(h, step, config)
            if reg is not None:
                loss = loss + reg
        loss.backward()
        for rounding in roundings:
            rounding.adam.step()
        for bias in learned:
            bias.adam.step()  # type: ignore[union-attr]


# ---------------------------------------------------------------------- running ONNX


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the model's (first) input, None when it is dynamic."""
    name = g.graph_input_names(model.graph)[0]
    dims = next(value for value in model.graph.input
                if value.name == name).type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].dim_value > 0 else None


def _run(model: onnx.ModelProto, images: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Compute tensors ``names`` of ``model`` on ``images`` in onnxruntime, graph as written."""
    session = make_session(g.pruned_copy(model, list(names)), optimize=False)
    return run_batched(session, images, batch_size=64, outputs=list(names), fixed_batch=_fixed_batch(model))


class _FloatTargets:
    """Float-model tensors on all images, computed a few at a time in the order needed.

    One onnxruntime pass serves as many upcoming names as fit in ``budget_bytes``
    (sized from a one-image probe), instead of one full pass per layer.
    """

    def __init__(self, float_model: onnx.ModelProto, names: Sequence[str], images: np.ndarray,
                 budget_bytes: int = 512 * 2**20) -> None:
        self._model, self._images, self._budget = float_model, images, budget_bytes
        self._names = list(dict.fromkeys(names))
        self._cache: dict[str, np.ndarray] = {}
        probe = _run(float_model, images[:1], self._names) if self._names else []
        self._bytes = {name: value.nbytes * images.shape[0] for name, value in zip(self._names, probe)}

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


def _tensor(value: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(value, np.float32))


# -------------------------------------------------------------------------- biases


def _input_scale(graph: onnx.GraphProto, tensor: str) -> float | None:
    """The per-tensor scale of the DequantizeLinear that ``tensor`` comes from (through value-preserving ops)."""
    producers = g.producer_map(graph)
    inits = g.initializer_map(graph)
    for _ in range(32):
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear":
            scale = _initializer_value(inits, node.input[1])
            return float(scale.reshape(-1)[0]) if scale is not None and scale.size == 1 else None
        if not is_value_preserving(node.op_type, g.node_attributes(node)):
            return None
        tensor = node.input[0]
    return None


def _new_bias(model: onnx.ModelProto, layer: _Layer, channels: int) -> NewBias | None:
    """A zero int32 bias in the emitter's convention (input scale x weight scale) for a
    node without one, or None when the node cannot take one (MatMul, unknown input scale)."""
    if spec(layer.node.op_type).bias is None:
        return None
    in_scale = _input_scale(model.graph, layer.node.input[0])
    producers = g.producer_map(model.graph)
    w_scale = _initializer_value(g.initializer_map(model.graph), producers[layer.node.input[1]].input[1])
    if in_scale is None or w_scale is None or channels % w_scale.size:
        return None
    # A grouped ConvTranspose has C_out / group weight scales on axis 1, repeated per group.
    scale = (in_scale * np.tile(w_scale.reshape(-1), channels // w_scale.size)).astype(np.float32)
    return NewBias(layer.label, np.zeros(channels, np.int32), scale)


def _bias_int(model: onnx.ModelProto, node_label: str) -> str | None:
    """The int32 initializer behind input 2 of node ``node_label``, if any."""
    node = next(n for n in model.graph.node if (n.name or n.output[0]) == node_label)
    if len(node.input) < 3 or not node.input[2]:
        return None
    dq = g.producer_map(model.graph).get(node.input[2])
    return dq.input[0] if dq is not None and dq.op_type == "DequantizeLinear" else None


def _channel_delta(reference: np.ndarray, quantized: np.ndarray, op: str) -> np.ndarray:
    """Per output channel, the mean of (float - quantized) node output over everything else."""
    axis = output_channel_axis(op) % quantized.ndim
    diff = np.moveaxis(reference.astype(np.float64) - quantized, axis, -1)
    return diff.reshape(-1, quantized.shape[axis]).mean(0)


def _corrected(ints: np.ndarray, scale: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """int32 bias ``ints`` (grid ``scale``) moved by the float ``delta``."""
    step = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), ints.shape)
    info = np.iinfo(np.int32)
    return np.clip(ints.astype(np.int64) + np.round(delta / step), info.min, info.max).astype(np.int32)


# ------------------------------------------------------------------------ one unit


def _optimise_unit(
    model: onnx.ModelProto,
    unit: _Unit,
    images: np.ndarray,
    targets: _FloatTargets,
    config: RoundingConfig,
    index: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray], list[NewBias]]:
    """Learn the rounding (and biases) of the unit's layers jointly on its output.

    Returns the report row and what changes: integer initializers by name and new biases.

    Raises:
        UnsupportedOpError: the unit holds an op onnx2torch cannot convert.
        QuantizationError: the simulation disagrees with onnxruntime.
    """
    feeds_np = _run(model, images, unit.inputs)
    # Nodes without a bias get a zero one in the simulated copy when it may be learned or corrected.
    created: dict[str, NewBias] = {}
    missing = [layer for layer in unit.layers
               if layer.bias_int is None and spec(layer.node.op_type).bias is not None]
    if missing and (config.learn_bias or config.bias_correction):
        shapes = _run(model, images[:1], [layer.node.output[0] for layer in missing])
        for layer, out in zip(missing, shapes):
            new = _new_bias(model, layer, out.shape[output_channel_axis(layer.node.op_type)])
            if new is not None:
                created[layer.label] = new
    simulated = apply_integers(model, {}, list(created.values())) if created else model
    bias_names = {layer.label: _bias_int(simulated, layer.label) for layer in unit.layers}
    extra = [layer.node.output[0] for layer in unit.layers] if config.bias_correction else []
    outputs = list(dict.fromkeys([unit.output, *extra]))
    sim = simulate(simulated, inputs=unit.inputs, outputs=outputs, check=[f[:_CHECK_IMAGES] for f in feeds_np])
    feeds = [_tensor(f) for f in feeds_np]
    target_np = targets.get(unit.float_name) if unit.float_name is not None else None
    if target_np is not None and unit.tail is not None:
        target_np = simulate(model, inputs=[unit.tail[0]], outputs=[unit.tail[1]]).run([target_np])[0]
    if target_np is None or target_np.shape[1:] != tuple(sim.run([f[:1] for f in feeds_np])[0].shape[1:]):
        raise UnsupportedOpError(f"no float counterpart of tensor {unit.output!r} with its shape")
    target = _tensor(target_np)

    mse_nearest = _mse(sim, feeds, target)
    roundings = [_Rounding(layer, sim.constants[layer.weight_int], config) for layer in unit.layers]
    biases: list[_Bias] = []
    for layer, rounding in zip(unit.layers, roundings):
        name = bias_names[layer.label]
        if name is not None and (config.learn_bias or layer.input_shift):
            biases.append(_Bias(layer, sim.constants[name], rounding.constant, config.learn_bias, config.bias_lr))
    _fit(roundings, biases, sim, feeds, target, config, config.seed * 1_000_003 + index)
    learned = [rounding.learned() for rounding in roundings]
    weight_of = {rounding.layer.label: ints for rounding, ints in zip(roundings, learned)}
    learned_biases = [bias.ints(weight_of[bias.layer.label]) for bias in biases]
    for param, ints in zip([*roundings, *biases], [*learned, *learned_biases]):
        _load(param.constant, ints)
    mse_learned = _mse(sim, feeds, target)
    # Too few iterations can leave the learned rounding worse than nearest on the very
    # images it was fitted to; then nearest is the honest choice.
    keep = config.iterations > 0 and mse_learned <= mse_nearest
    if not keep:
        for param in [*roundings, *biases]:
            _load(param.constant, param.stored)
    changed = sum(int(np.sum(q != r.stored)) for q, r in zip(learned, roundings))
    total = sum(r.stored.size for r in roundings)
    row: dict[str, Any] = {
        "unit": unit.kind,
        "nodes": [layer.label for layer in unit.layers],
        "ops": [layer.node.op_type for layer in unit.layers],
        "weights": int(total),
        "target": unit.target,
        "iterations": config.iterations,
        "mse_nearest": mse_nearest,
        "mse_optimized": mse_learned if config.iterations > 0 else mse_nearest,
        "kept": "learned" if keep else "nearest",
        "changed": changed / max(total, 1) if config.iterations > 0 else 0.0,
    }
    if keep and any(bias.learn for bias in biases):
        row["bias_learned"] = True
    touched = {r.layer.weight_int for r in roundings} | {b.constant.name for b in biases} if keep else set()
    if config.bias_correction:
        # Layer by layer, each seeing the biases corrected before it.
        outcomes = []
        for layer in unit.layers:
            name = bias_names[layer.label]
            if name is None:
                outcomes.append("skipped: node has no bias and cannot take one")
                continue
            constant = sim.constants[name]
            (y_q,) = [y for out, y in zip(sim.outputs, sim.run(feeds_np)) if out == layer.node.output[0]]
            delta = _channel_delta(targets.get(layer.float_output), y_q, layer.node.op_type)
            current = constant.integers.numpy().astype(np.int64)
            if delta.shape != current.shape:
                outcomes.append(f"skipped: bias shape {current.shape} is not per output channel")
                continue
            _load(constant, _corrected(current, constant.scale.numpy(), delta))
            touched.add(name)
            outcomes.append("corrected")
        row["bias_correction"] = outcomes
    by_bias = {bias_names[label]: label for label in created}
    integers: dict[str, np.ndarray] = {}
    new_biases: list[NewBias] = []
    for name in touched:
        ints = sim.constants[name].integers.numpy().astype(np.int64)
        if name in by_bias:
            new = created[by_bias[name]]
            new_biases.append(NewBias(new.node, ints.astype(np.int32), new.scale))
        else:
            integers[name] = ints
    return row, integers, new_biases


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
            negative correction, :mod:`onnxdgh.quantization.shift`): such a node's stored
            bias ``b - c * sum(W)`` follows the integers being learned, so ``b`` is what
            is kept or learned.

    Returns:
        The optimised model and a report (its fields: docs/ROUNDING.md): per unit the
        reconstruction MSE with nearest and with learned rounding, which was kept; the
        skipped layers and the blocks that fell back to layers, with the reason.

    Raises:
        CalibrationDataError: ``images`` is empty or not finite.
        QuantizationError: the float model does not match the quantized one, the
            stored integers exceed ``config.weight_bits``, or the simulation of a unit
            disagrees with onnxruntime.
    """
    images = check_images(images, what="rounding optimisation images")
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    g.topological_sort(model.graph)
    layers, skipped = weighted_layers(model, float_model, input_shifts)
    float_names = {name for node in float_model.graph.node for name in node.output} | set(g.graph_input_names(float_model.graph))
    units = _units(model, layers, config.target, config.mode, float_names)
    wanted = [name for unit in units
              for name in (unit.float_name, *(layer.float_output for layer in unit.layers))
              if name is not None]
    targets = _FloatTargets(float_model, wanted, images)
    rows: list[dict[str, Any]] = []
    fallbacks: list[dict[str, Any]] = []
    started = time.perf_counter()
    bar = progress_bar(total=len(layers), enabled=progress, desc="rounding", unit="layer")
    index = 0
    queue = list(units)
    while queue:
        unit = queue.pop(0)
        index += 1
        t0 = time.perf_counter()
        names = [layer.label for layer in unit.layers]
        bar.set_postfix_str(f"{unit.kind} {names[0][-24:]}")
        try:
            row, integers, new_biases = _optimise_unit(model, unit, images, targets, config, index)
        except UnsupportedOpError as exc:
            if unit.kind == "block":
                _LOG.info("rounding: block %s optimised layer by layer: %s", ",".join(names), exc)
                fallbacks.append({"nodes": names, "reason": str(exc)})
                queue[:0] = [_layer_unit(model, layer, config.target, float_names) for layer in unit.layers]
                continue
            if unit.output != unit.layers[0].node.output[0]:
                _LOG.info("rounding: %r: %s; reconstructing the node output", names[0], exc)
                queue.insert(0, _layer_unit(model, unit.layers[0], "output", float_names))
                continue
            skipped.append({"node": names[0], "op": unit.layers[0].node.op_type, "reason": str(exc)})
            bar.update(1)
            continue
        model = apply_integers(model, integers, new_biases)
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
        (y_q,) = _run(model, images, [layer.node.output[0]])
        delta = _channel_delta(targets.get(layer.float_output), y_q, layer.node.op_type)
        outcome, corrected = _apply_delta(model, layer, delta)
        model = corrected if corrected is not None else model
        shift = float(np.mean(np.abs(delta)))
        rows.append({"node": layer.label, "op": layer.node.op_type, "mean_abs_shift": shift,
                     "outcome": outcome})
        _LOG.info("bias correction: %r: mean |shift| %.4g (%s)", layer.label, shift, outcome)
    return model, {"layers": rows, "skipped": skipped, "seconds": round(time.perf_counter() - started, 3)}


def _apply_delta(model: onnx.ModelProto, layer: _Layer, delta: np.ndarray) -> tuple[str, onnx.ModelProto | None]:
    """``model`` with ``delta`` (float, per channel) added to the layer's int32 bias, and what happened."""
    name = _bias_int(model, layer.label)
    if name is None:
        new = _new_bias(model, layer, delta.shape[0])
        if new is None:
            return "skipped: node has no bias and cannot take one", None
        corrected = NewBias(new.node, _corrected(new.values, new.scale, delta), new.scale)
        return "corrected", apply_integers(model, {}, [corrected])
    inits = g.initializer_map(model.graph)
    current = np.asarray(g.to_array(inits[name])).astype(np.int64)
    if current.shape != delta.shape:
        return f"skipped: bias shape {current.shape} is not per output channel", None
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == name)
    scale = np.asarray(g.to_array(inits[dq.input[1]]), np.float64)
    return "corrected", apply_integers(model, {name: _corrected(current, scale, delta)})
