"""Conversion of the canonical ONNX graph to a frozen torch module: stage 2 of the pipeline.

Contract:
* :func:`to_torch` converts a :class:`~onnxdgh.load.LoadedModel` with onnx2torch into a
  :class:`TorchModel`: the module is in ``eval()`` mode and no parameter requires a
  gradient (image generation differentiates with respect to the *input* only).
* The converted module is checked against onnxruntime on random input; a disagreement
  beyond a tolerance relative to the output's scale, or an op onnx2torch cannot convert,
  raises :class:`~onnxdgh.errors.ConversionError` naming the ONNX node and its op.
* Every usable BatchNormalization node of the ONNX graph is mapped to the tensor that
  feeds it in the torch graph, whether onnx2torch built an ``nn.BatchNorm*d`` or an
  ``OnnxBatchNorm``. The number of mapped tensors must equal the number of usable BN nodes.
* :meth:`TorchModel.forward` returns ``(outputs, bn_inputs)`` for a batch;
  :meth:`TorchModel.probe` also returns the tensors the output-stretching loss acts on
  (the logits when the graph ends in Softmax/Sigmoid/LogSoftmax).

Fixed-batch graphs (often batch 1) are first rewritten with
:func:`~onnxdgh.load.make_batch_dynamic` so that torch runs whole batches. When that
rewrite is not safe the module is kept as exported and :meth:`TorchModel.probe` runs the
images of a batch one at a time and concatenates the results (slower, same values), as
long as the fixed batch size is 1; any other fixed size is refused.

Capturing BN inputs and logits is done by rewriting a *copy* of the torch.fx graph so it
returns those tensors as extra outputs, instead of forward hooks: there is no hidden
mutable capture state, and the copy shares every submodule (and so every weight) with
``module``, which stays exactly what onnx2torch built.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx

from . import graph as g
from .errors import ConversionError, UnsupportedModelError, exception_line
from .kernels import channel_affine
from .load import REEXPORT_RECIPE, LoadedModel, attribute_summary, make_batch_dynamic
from .runtime import make_session, run_batched, with_extra_outputs

__all__ = [
    "BNLayer", "ProbeResult", "TorchModel", "to_torch", "fold_bn_taps", "STRETCH_THROUGH_OPS", "CHECK_RTOL",
    "check_converters", "convert_graph", "quiet_onnx2torch",
]

_LOG = logging.getLogger(__name__)

STRETCH_THROUGH_OPS: frozenset[str] = frozenset({"Softmax", "Sigmoid", "LogSoftmax"})
"""Final ops whose *input* (the logits) the output-stretching loss acts on.

A Softmax output lies in [0, 1]: stretching its range stretches nothing useful, while
the logits feeding it carry the dynamic range the quantizer has to cover."""

CHECK_RTOL = 1e-3
"""Allowed torch-vs-onnxruntime difference, relative to the largest output magnitude."""

_CHECK_ATOL = 1e-5
_CHECK_IMAGES = 2


@dataclass(frozen=True)
class BNLayer:
    """One usable BN node mapped into the torch graph, with its targets as tensors.

    ``mean``/``std`` are the per-channel statistics of the BN *input* (``input_mean`` and
    ``sqrt(input_var)``) on the module's device. ``spatial`` is False for a BN on a 2-D
    (N x C) tensor, where a single image has no spatial extent to take statistics over.
    ``depth`` is the number of nodes on the longest path from the graph input to the BN
    node: the deepest BN is the "last BN layer" of the DGH paper's Eq. 6, also when a
    shortcut branch's BN comes later in the node list.
    """

    node_name: str
    input_name: str
    channels: int
    mean: torch.Tensor = field(repr=False)
    std: torch.Tensor = field(repr=False)
    spatial: bool = True
    depth: int = 0


@dataclass(frozen=True)
class ProbeResult:
    """What one forward pass exposes: graph outputs, BN input tensors, stretch tensors."""

    outputs: list[torch.Tensor]
    bn_inputs: list[torch.Tensor]
    stretch: list[torch.Tensor]


@dataclass(frozen=True)
class TorchModel:
    """A frozen torch version of a loaded ONNX model.

    ``module`` is the onnx2torch ``GraphModule`` (``eval()``, no parameter requires a
    gradient); it takes a float32 N x C x H x W tensor and returns the graph output(s) as
    onnx2torch arranges them. Use :meth:`forward` / :meth:`probe` for the normalised view.
    """

    module: fx.GraphModule = field(repr=False)
    loaded: LoadedModel = field(repr=False)
    bn_layers: tuple[BNLayer, ...]
    output_names: tuple[str, ...]
    stretch_names: tuple[str, ...]
    batch_dynamic: bool
    device: str
    max_abs_error: float
    _probe: fx.GraphModule = field(repr=False)
    bn_taps: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] = field(default=(), repr=False)
    """Empty, or per BN layer ``(scale, shift)`` when :func:`fold_bn_taps` made :meth:`probe`
    return ``scale * bn_input + shift`` (the BN's output) for that layer instead of its input."""

    def probe(self, images: torch.Tensor) -> ProbeResult:
        """Run a batch; return outputs, BN input tensors (``bn_layers`` order) and stretch tensors."""
        with quiet_onnx2torch():
            if self.batch_dynamic or images.shape[0] == 1:
                values = list(self._probe(images))
            else:
                # Fixed batch of 1 that could not be made dynamic: one image at a time. Statistics
                # over the batch are unchanged because every tensor is concatenated along N.
                parts = [self._probe(images[i : i + 1]) for i in range(images.shape[0])]
                values = [torch.cat(column) for column in zip(*parts)]
        n_out, n_bn = len(self.output_names), len(self.bn_layers)
        return ProbeResult(values[:n_out], values[n_out : n_out + n_bn], values[n_out + n_bn :])

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run a batch; return ``(outputs, bn_inputs)`` in graph-output and ``bn_layers`` order."""
        result = self.probe(images)
        return result.outputs, result.bn_inputs

    __call__ = forward


@contextlib.contextmanager
def quiet_onnx2torch() -> Any:
    """Silence onnx2torch's Slice deprecation warning (list indexing) and its own warnings
    (Resize's "results might differ"); the result is checked against onnxruntime at
    conversion, so the warnings tell the user nothing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing")
        warnings.filterwarnings("ignore", category=UserWarning, module="onnx2torch")
        yield


# ------------------------------------------------------------------------ conversion


def to_torch(loaded: LoadedModel, *, device: str = "cpu", check: bool = True) -> TorchModel:
    """Convert ``loaded`` to a frozen :class:`TorchModel` on ``device``.

    Raises:
        ConversionError: an op onnx2torch cannot convert, a BN node that cannot be
            mapped, or torch disagreeing with onnxruntime (the first disagreeing node is named).
        UnsupportedModelError: a non-float32 input, or a fixed batch larger than 1 that
            cannot be made dynamic.
    """
    if loaded.input_dtype != "float32":
        raise UnsupportedModelError(
            f"input {loaded.input_name!r} of {loaded.source} is {loaded.input_dtype}; conversion needs float32",
            "export the model in float32 (cast float16/float64 models to float32 before onnxdgh)",
        )
    model = loaded.model
    batch_dynamic = True
    if loaded.batch_fixed:
        dynamic = make_batch_dynamic(loaded)
        if dynamic is None:
            if loaded.batch_dim != 1:
                raise UnsupportedModelError(
                    f"{loaded.source} fixes the batch dimension to {loaded.batch_dim} and cannot be rewritten to any batch",
                    "re-export with a dynamic batch: torch.onnx.export(..., dynamic_axes={'input': {0: 'batch'}})",
                )
            _LOG.warning(
                "%s fixes the batch to 1 and its graph cannot safely take batches; images are run one at a time (slower)",
                loaded.source,
            )
            batch_dynamic = False
        else:
            model = dynamic
    check_converters(model)
    module = convert_graph(model)
    module.eval().requires_grad_(False)
    error = _check_against_onnxruntime(module, model, loaded, batch_dynamic) if check else 0.0
    module = module.to(device)

    probe, bn_layers, stretch_names = _build_probe(module, model, loaded, device)
    _LOG.info(
        "converted %s to torch: %d BN inputs captured, stretch loss on %s, max |torch - onnxruntime| %.2e",
        loaded.source, len(bn_layers), ", ".join(stretch_names), error,
    )
    return TorchModel(
        module=module,
        loaded=loaded,
        bn_layers=bn_layers,
        output_names=tuple(loaded.output_names),
        stretch_names=stretch_names,
        batch_dynamic=batch_dynamic,
        device=device,
        max_abs_error=error,
        _probe=probe,
    )


def check_converters(model: onnx.ModelProto) -> None:
    """Refuse, naming the first such node, any op onnx2torch has no converter for."""
    from onnx2torch.node_converters import get_converter

    for index, node in enumerate(model.graph.node):
        version = g.opset_version(model, node.domain)
        name = g.node_label(node, index)
        if version is None:
            raise ConversionError(
                f"node {name!r} ({node.op_type}) uses domain {node.domain!r}, which the model does not import",
                "re-export the model; its opset imports are inconsistent",
            )
        try:
            get_converter(domain=node.domain, operation_type=node.op_type, version=version)
        except NotImplementedError as exc:
            raise ConversionError(
                f"node {name!r}: op {node.op_type} (opset {version}{', domain ' + node.domain if node.domain else ''}) "
                "cannot be converted to torch by onnx2torch",
                f"re-export the model without {node.op_type} (replace it by supported ops) or use opset 17",
            ) from exc


def convert_graph(model: onnx.ModelProto) -> fx.GraphModule:
    from onnx2torch import convert

    try:
        return convert(model, attach_onnx_mapping=True)
    except Exception as exc:  # onnx2torch raises NotImplementedError, KeyError, ValueError...
        culprit = _find_failing_node(model)
        if culprit is not None:
            node, reason = culprit
            raise ConversionError(
                f"node {node.name!r} ({node.op_type}) cannot be converted to torch: {reason}",
                f"re-export the model so that {node.op_type} uses supported attributes "
                f"({attribute_summary(node) or 'no attributes'})",
            ) from exc
        raise ConversionError(
            f"onnx2torch cannot convert the model: {exception_line(exc)}",
            "re-export the model with opset 17 and standard ops",
        ) from exc


def _find_failing_node(model: onnx.ModelProto) -> tuple[onnx.NodeProto, str] | None:
    """Run each node's onnx2torch converter alone to find the one that fails, if any."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        graph = OnnxGraph(inferred.graph)
    except Exception:  # diagnosis only; the caller reports the original error
        return None
    for (_, node), proto in zip(graph.nodes.items(), inferred.graph.node):
        try:
            converter = get_converter(
                domain=node.domain, operation_type=node.operation_type,
                version=g.opset_version(inferred, node.domain) or 0,
            )
            converter(node, graph)
        except Exception as exc:  # any converter failure names this node
            return proto, exception_line(exc)
    return None


# ---------------------------------------------------------------------- fx plumbing


def _output_index(module: fx.GraphModule) -> dict[str, tuple[fx.Node, int | None]]:
    """Map every ONNX tensor produced by a converted node to (fx node, tuple index or None)."""
    index: dict[str, tuple[fx.Node, int | None]] = {}
    for node in module.graph.nodes:
        if node.op != "call_module":
            continue
        mapping = getattr(module.get_submodule(node.target), "onnx_mapping", None)
        if mapping is None:
            continue
        outputs = list(mapping.outputs)
        for position, name in enumerate(outputs):
            if name:
                index[name] = (node, position if len(outputs) > 1 else None)
    return index


def _value_for(
    new_graph: fx.Graph, val_map: dict[fx.Node, fx.Node], module: fx.GraphModule, name: str,
    index: dict[str, tuple[fx.Node, int | None]], placeholder_for: dict[str, fx.Node],
) -> fx.Node:
    if name in placeholder_for:
        return val_map[placeholder_for[name]]
    node, position = index[name]
    mapped = val_map[node]
    if position is None:
        return mapped
    return new_graph.call_function(operator.getitem, (mapped, position))


def _build_probe(
    module: fx.GraphModule, model: onnx.ModelProto, loaded: LoadedModel, device: str
) -> tuple[fx.GraphModule, tuple[BNLayer, ...], tuple[str, ...]]:
    index = _output_index(module)
    placeholders = [node for node in module.graph.nodes if node.op == "placeholder"]
    placeholder_for = {loaded.input_name: placeholders[0]} if placeholders else {}
    producers = g.producer_map(model.graph)

    usable = loaded.usable_bn_nodes
    hint = "report this model; as a workaround re-export it with " + REEXPORT_RECIPE
    depths = _node_depths(model)
    bn_sources: list[fx.Node] = []
    layers: list[BNLayer] = []
    for bn in usable:
        bn_module_node = index.get(bn.output_name, (None,))[0]
        if bn_module_node is None or not bn_module_node.args or not isinstance(bn_module_node.args[0], fx.Node):
            raise ConversionError(
                f"BatchNormalization node {bn.node_name!r} has no counterpart in the torch module",
                hint,
            )
        bn_module = module.get_submodule(bn_module_node.target)
        if not _is_batch_norm(bn_module):
            raise ConversionError(
                f"BatchNormalization node {bn.node_name!r} became a torch "
                f"{type(bn_module).__name__}, not a batch norm",
                hint,
            )
        bn_sources.append(bn_module_node.args[0])
        rank = _tensor_rank(model, bn.input_name)
        layers.append(BNLayer(
            bn.node_name, bn.input_name, bn.channels,
            torch.as_tensor(bn.mean, dtype=torch.float32, device=device),
            torch.as_tensor(bn.std, dtype=torch.float32, device=device),
            spatial=rank is None or rank > 2, depth=depths.get(bn.output_name, 0),
        ))
    bn_modules_in_torch = sum(
        1 for node in module.graph.nodes
        if node.op == "call_module" and _is_batch_norm(module.get_submodule(node.target))
    )
    bn_nodes_in_onnx = sum(1 for node in model.graph.node if node.op_type == "BatchNormalization")
    if bn_modules_in_torch != bn_nodes_in_onnx or len(bn_sources) != len(usable):
        raise ConversionError(
            f"{loaded.source}: {bn_nodes_in_onnx} BatchNormalization nodes in ONNX but {bn_modules_in_torch} batch norms "
            f"in torch ({len(bn_sources)} of {len(usable)} usable BN inputs captured)",
            hint,
        )

    stretch_names: list[str] = []
    for name in loaded.output_names:
        producer = producers.get(name)
        if (producer is not None and producer.op_type in STRETCH_THROUGH_OPS
                and producer.input and producer.input[0]):
            stretch_names.append(producer.input[0])  # the logits under the Softmax/Sigmoid
        else:
            stretch_names.append(name)

    new_graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    new_graph.graph_copy(module.graph, val_map)
    outputs = [_value_for(new_graph, val_map, module, n, index, placeholder_for) for n in loaded.output_names]
    bn_values = [val_map[src] for src in bn_sources]
    stretch = [_value_for(new_graph, val_map, module, n, index, placeholder_for) for n in stretch_names]
    new_graph.output(tuple(outputs + bn_values + stretch))
    new_graph.lint()
    probe = fx.GraphModule(module, new_graph)
    _faster_probe_modules(probe)
    _fused_silu(probe)
    probe.eval()
    return probe, tuple(layers), tuple(stretch_names)


class _AffineFunction(torch.autograd.Function):
    """y = x * scale + shift per channel: forward through the fast eval-mode batch-norm
    kernel (mean 0, var 1, eps 0), backward as a single multiplication."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                zeros: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return channel_affine(x, scale, shift, zeros, ones)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.view((1, -1) + (1,) * (grad.dim() - 2)), None, None, None, None


class _FrozenAffine(torch.nn.Module):
    """An eval-mode BatchNorm as a frozen per-channel affine map: the same values, a
    one-multiply backward.

    The eval-mode ``native_batch_norm_backward`` took ~13% of a mobilenetv2 step; only the
    input gradient is ever needed, and for an affine map it is ``grad * a``. Measured:
    8-15% faster mobilenetv2 steps (no change on resnet8); outputs within 2.4e-6 of BatchNorm.
    """

    def __init__(self, bn: torch.nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())
        self.register_buffer("zeros", torch.zeros_like(scale))
        self.register_buffer("ones", torch.ones_like(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _AffineFunction.apply(x, self.scale, self.shift, self.zeros, self.ones)


def _faster_probe_modules(probe: fx.GraphModule) -> None:
    """Swap the probe's (not the shared module's) eval-mode ``nn.BatchNorm*d`` for
    :class:`_FrozenAffine` and frozen zero-padded ``nn.Conv2d`` for :class:`_InputGradConv2d`."""
    for node in probe.graph.nodes:
        if node.op != "call_module":
            continue
        target = probe.get_submodule(node.target)
        if type(target) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d) and target.affine \
                and target.track_running_stats and target.running_var is not None:
            setattr(probe, node.target, _FrozenAffine(target))
        elif type(target) is torch.nn.Conv2d and target.padding_mode == "zeros" \
                and not isinstance(target.padding, str) and not target.weight.requires_grad \
                and (target.bias is None or not target.bias.requires_grad):
            setattr(probe, node.target, _InputGradConv2d(target))


class _InputGradConvFunction(torch.autograd.Function):
    """conv2d with frozen weights whose backward is the input gradient only, computed as
    the transposed convolution of the output gradient (the adjoint of conv2d)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
        y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        # output_padding restores the input size the strided forward rounded down
        ctx.output_padding = tuple(
            size - ((out - 1) * stride - 2 * pad + dil * (k - 1) + 1)
            for size, out, stride, pad, dil, k in zip(
                x.shape[2:], y.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size
            )
        )
        ctx.conv = conv
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        conv = ctx.conv
        return torch.nn.functional.conv_transpose2d(
            grad, conv.weight, None, conv.stride, conv.padding, ctx.output_padding, conv.groups, conv.dilation
        ), None


class _InputGradConv2d(torch.nn.Module):
    """A frozen ``nn.Conv2d`` (zero padding) with a transposed-convolution backward.

    oneDNN's convolution backward-data was measured slower than its forward transposed
    convolution for the same result (64-image batches, 2 threads: 3x3 convs of the
    Fashion-MNIST samples, total forward + backward 8.1 -> 5.4 ms at 16 ch 28x28,
    2.2 -> 1.7 ms for a stride-2 16 -> 32 conv); both compute sum over output
    positions of grad x weight, bit-identical in these tests but for the 1-channel
    input conv (3e-5, summation order).
    """

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _InputGradConvFunction.apply(x, self.conv)
        return self.conv(x)


def _fused_silu(probe: fx.GraphModule) -> None:
    """Rewrite the exported SiLU pattern ``Mul(x, Sigmoid(x))`` as ``F.silu(x)`` in the probe.

    ONNX exports (opset < 22 has no Swish) spell SiLU as two ops; autograd then keeps
    both outputs and runs a sigmoid backward, a two-input multiply backward and an add.
    torch's fused SiLU does forward and backward in one pass each: measured 12% faster
    steps on the Fashion-MNIST resnet8_silu sample. Same values up to rounding.
    """
    from onnx2torch.node_converters.binary_math_operations import OnnxBinaryMathOperation

    for node in list(probe.graph.nodes):
        if node.op != "call_module" or type(probe.get_submodule(node.target)) is not torch.nn.Sigmoid:
            continue
        (source,) = node.args
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        mul = users[0]
        module = probe.get_submodule(mul.target)
        if not isinstance(module, OnnxBinaryMathOperation) or module.math_op_function is not torch.mul \
                or module.broadcast == 1 or set(mul.args) != {source, node} or len(mul.args) != 2:
            continue
        with probe.graph.inserting_before(mul):
            fused = probe.graph.call_function(torch.nn.functional.silu, (source,))
        mul.replace_all_uses_with(fused)
        probe.graph.erase_node(mul)
        probe.graph.erase_node(node)
    probe.graph.lint()
    probe.recompile()


def fold_bn_taps(model: TorchModel) -> TorchModel:
    """A copy of ``model`` whose probe folds each frozen BN into the convolution before it.

    Generation needs every BN's *input* statistics, but the network needs the BN's
    output; computing one from the other is a full pass over the activation forward and
    another backward (measured: 13-16% of a DGH optimisation step on the Fashion-MNIST
    samples). When a BN's input comes from a zero-padded Conv2d used by that BN alone,
    the copy computes the BN output directly with the folded convolution
    (W' = a W, b' = a b + c per output channel for the BN's y = a x + c) and returns it
    in the BN input's place; ``bn_taps[i] = (a, c)`` says so, and the statistics map back
    exactly: mean_in = (mean_out - c) / a, var_in = var_out / a^2 (per image as well).
    A BN with a zero (or denormal) scale in any channel is left unfolded: its input cannot
    be recovered from its output. ``model`` itself is not changed.
    """
    probe = copy.deepcopy(model._probe)
    output_node = next(node for node in probe.graph.nodes if node.op == "output")
    first_bn = len(model.output_names)
    taps: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(model.bn_layers)
    for layer in range(len(model.bn_layers)):
        source = output_node.args[0][first_bn + layer]
        folded = _fold_into_conv(probe, source)
        if folded is not None:
            # the conv node now computes the BN's output: every reader of the BN (the
            # graph output tuple included) reads the conv instead
            bn_node, scale, shift = folded
            taps[layer] = (scale, shift)
            bn_node.replace_all_uses_with(source)
            probe.graph.erase_node(bn_node)
    probe.graph.lint()
    probe.recompile()
    if not any(tap is not None for tap in taps):
        return model
    return replace(model, _probe=probe, bn_taps=tuple(taps))


def _fold_into_conv(probe: fx.GraphModule, source: Any) -> tuple[fx.Node, torch.Tensor, torch.Tensor] | None:
    """Fold the BN reading ``source`` into ``source``'s convolution; (BN node, a, c), or None."""
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return None
    conv_module = probe.get_submodule(source.target)
    conv = conv_module.conv if isinstance(conv_module, _InputGradConv2d) else conv_module
    if type(conv) is not torch.nn.Conv2d or conv.padding_mode != "zeros":
        return None
    users = [user for user in source.users if user.op != "output"]
    if len(users) != 1 or users[0].op != "call_module" or users[0].args[0] is not source or len(users[0].args) != 1:
        return None
    bn_node = users[0]
    bn = probe.get_submodule(bn_node.target)
    if not isinstance(bn, _FrozenAffine):
        return None
    scale, shift = bn.scale.detach().clone(), bn.shift.detach().clone()
    if not bool(torch.isfinite(scale).all()) or float(scale.abs().min()) < 1e-12:
        return None
    with torch.no_grad():
        fused = torch.nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=True,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        fused.bias.copy_(bias * scale + shift)
    fused.requires_grad_(False).eval()
    probe.add_submodule(source.target, _InputGradConv2d(fused))
    return bn_node, scale, shift


def _is_batch_norm(module: torch.nn.Module) -> bool:
    from onnx2torch.node_converters.batch_norm import OnnxBatchNorm

    return isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, OnnxBatchNorm))


def _node_depths(model: onnx.ModelProto) -> dict[str, int]:
    """Longest path (in nodes) from a graph input to each node's outputs, by output name."""
    depth: dict[str, int] = {}
    for node in model.graph.node:  # topologically sorted by canonicalisation
        level = 1 + max((depth.get(name, 0) for name in node.input if name), default=0)
        for name in node.output:
            depth[name] = level
    return depth


def _tensor_rank(model: onnx.ModelProto, name: str) -> int | None:
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:
        return None
    for value in inferred.graph.value_info:
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return len(value.type.tensor_type.shape.dim)
    return None


# ------------------------------------------------------------- onnxruntime agreement


def _check_against_onnxruntime(
    module: fx.GraphModule, model: onnx.ModelProto, loaded: LoadedModel, batch_dynamic: bool
) -> float:
    rng = np.random.default_rng(0)
    images = rng.standard_normal((_CHECK_IMAGES, *loaded.input_shape)).astype(np.float32)
    session = make_session(model, optimize=False)
    expected = run_batched(session, images, batch_size=_CHECK_IMAGES, fixed_batch=None if batch_dynamic else 1)
    got = _run_plain(module, images, batch_dynamic)
    worst = 0.0
    for name, ref, out in zip(loaded.output_names, expected, got):
        if ref.shape != out.shape:
            raise ConversionError(
                f"torch output {name!r} has shape {tuple(out.shape)} but onnxruntime gives {tuple(ref.shape)}",
                "report this model; the conversion changed a shape",
            )
        error, tolerance = _error(ref, out)
        worst = max(worst, error)
        if error > tolerance:
            where = _localise_mismatch(module, model, images, batch_dynamic)
            raise ConversionError(
                f"torch and onnxruntime disagree on output {name!r} (max difference {error:.3g}, "
                f"allowed {tolerance:.3g}){where}",
                "the op is converted with different semantics; re-export the model with opset 17 or report it",
            )
    return worst


def _error(ref: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    finite = np.isfinite(ref)
    if not np.array_equal(finite, np.isfinite(out)):
        return float("inf"), 0.0
    if not finite.any():
        return 0.0, _CHECK_ATOL
    diff = float(np.max(np.abs(ref[finite].astype(np.float64) - out[finite])))
    scale = float(np.max(np.abs(ref[finite])))
    return diff, _CHECK_ATOL + CHECK_RTOL * scale


def _run_plain(module: fx.GraphModule, images: np.ndarray, batch_dynamic: bool) -> list[np.ndarray]:
    def once(batch: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad(), quiet_onnx2torch():
            result = module(torch.from_numpy(batch))
        values = list(result) if isinstance(result, (tuple, list)) else [result]
        return [np.asarray(v.detach().cpu().numpy()) for v in values]

    if batch_dynamic:
        return once(images)
    parts = [once(images[i : i + 1]) for i in range(images.shape[0])]
    return [np.concatenate(column) for column in zip(*parts)]


def _localise_mismatch(module: fx.GraphModule, model: onnx.ModelProto, images: np.ndarray, batch_dynamic: bool) -> str:
    """Name the first ONNX node (in graph order) whose torch output disagrees with onnxruntime."""
    try:
        index = _output_index(module)
        names = [name for node in model.graph.node for name in node.output[:1] if name in index]
        session = make_session(with_extra_outputs(model, names), optimize=False)
        expected = dict(zip(names, run_batched(session, images, outputs=names, fixed_batch=None if batch_dynamic else 1)))
        new_graph = fx.Graph()
        val_map: dict[fx.Node, fx.Node] = {}
        new_graph.graph_copy(module.graph, val_map)
        values = [_value_for(new_graph, val_map, module, n, index, {}) for n in names]
        new_graph.output(tuple(values))
        probe = fx.GraphModule(module, new_graph)
        got = _run_plain(probe, images, batch_dynamic)
        by_output = {name: node for node in model.graph.node for name in node.output}
        for name, out in zip(names, got):
            ref = expected[name]
            if ref.shape != out.shape:
                detail = f": shape {tuple(out.shape)} vs {tuple(ref.shape)}"
            elif not np.issubdtype(ref.dtype, np.floating):
                detail = "" if not np.array_equal(ref, out) else None
            else:
                error, tolerance = _error(ref, out)
                detail = f": max difference {error:.3g}" if error > tolerance else None
            if detail is not None:
                node = by_output[name]
                return f"; first difference at node {node.name!r} ({node.op_type}){detail}"
    except Exception as exc:  # localisation is best effort; the mismatch itself is already known
        _LOG.debug("could not localise the mismatch: %s", exc)
    return ""


