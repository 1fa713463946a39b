"""Stage 2: onnx2torch conversion, BN-input capture, checks against onnxruntime, errors naming the node."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnxdgh.convert import TorchModel, to_torch
from onnxdgh.errors import ConversionError
from onnxdgh.load import load_model, load_model_proto
from onnxdgh.runtime import make_session, with_extra_outputs

from .conftest import TinyConvBnRelu, export_onnx, ort_run, settle_bn


class SoftmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyConvBnRelu(channels=1, classes=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.body(x), dim=1)


def test_outputs_and_bn_inputs_match_onnxruntime(tiny_model_path: Path) -> None:
    loaded = load_model(tiny_model_path)
    model = to_torch(loaded)
    assert len(model.bn_layers) == len(loaded.bn_nodes) == 2
    assert not model.module.training
    assert all(not p.requires_grad for p in model.module.parameters())

    images = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    bn_names = [bn.input_name for bn in loaded.bn_nodes]
    session = make_session(with_extra_outputs(loaded.model, bn_names), optimize=False)
    expected = session.run(list(loaded.output_names) + bn_names, {loaded.input_name: images})
    with torch.no_grad():
        outputs, bn_inputs = model.forward(torch.from_numpy(images))
    np.testing.assert_allclose(outputs[0].numpy(), expected[0], rtol=1e-4, atol=1e-5)
    for got, want in zip(bn_inputs, expected[1:]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-5)
    for layer, bn in zip(model.bn_layers, loaded.bn_nodes):
        np.testing.assert_allclose(layer.mean.numpy(), bn.mean)
        np.testing.assert_allclose(layer.std.numpy(), np.sqrt(bn.var), rtol=1e-6)
    assert model.bn_layers[1].depth > model.bn_layers[0].depth
    # The probe runs BN as a frozen affine map; the shared module keeps onnx2torch's BatchNorm2d.
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.module.modules()) == 2


def test_gradient_reaches_the_input_only(tiny_model_path: Path) -> None:
    model = to_torch(load_model(tiny_model_path))
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    outputs, bn_inputs = model.forward(x)
    (outputs[0].sum() + bn_inputs[1].pow(2).mean()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.module.parameters())


class SharedConvOutput(nn.Module):
    """conv1's output feeds its BN and, directly, a residual add: it must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn0(self.conv0(x)))
        z = self.conv1(y)
        return self.head((torch.relu(self.bn1(z)) + z).mean(dim=(2, 3)))


def _tap_moments(model: TorchModel, images: torch.Tensor) -> list[torch.Tensor]:
    """The output, then per BN layer: batch mean and variance, per-image mean and std of its input."""
    from onnxdgh.generation.losses import batch_moments, per_image_moments

    probe = model.probe(images)
    taps = model.bn_taps or (None,) * len(model.bn_layers)
    result = [probe.outputs[0]]
    for x, tap in zip(probe.bn_inputs, taps):
        mean, var = batch_moments(x)
        if tap is not None:
            mean, var = (mean - tap[1]) / tap[0], var / tap[0].square()
        result += [mean, var, *per_image_moments(x, tap)]
    return result


def test_folded_bn_taps_give_the_bn_input_statistics(tiny_model_path: Path, tmp_path: Path) -> None:
    from onnxdgh.convert import fold_bn_taps

    model = to_torch(load_model(tiny_model_path))
    folded = fold_bn_taps(model)
    assert [tap is not None for tap in folded.bn_taps] == [True, True]  # conv with and without bias
    assert not model.bn_taps  # the original is untouched
    images = torch.randn(5, 3, 12, 12) * 2 + 0.5
    for want, got in zip(_tap_moments(model, images), _tap_moments(folded, images), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
    # Input gradients of a loss on the mapped statistics agree too.
    grads = []
    for m in (model, folded):
        x = images.clone().requires_grad_(True)
        outputs, *moments = _tap_moments(m, x)
        loss = outputs.square().sum() + sum((value - 0.3).square().sum() for value in moments)
        loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-5)

    # Not folded: a conv output read by something besides its BN; a BN with a zero scale.
    torch.manual_seed(0)
    shared = to_torch(load_model(export_onnx(settle_bn(SharedConvOutput(), (3, 8, 8)), (3, 8, 8), tmp_path / "s.onnx")))
    assert [tap is not None for tap in fold_bn_taps(shared).bn_taps] == [True, False]
    torch.manual_seed(0)
    dead = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    with torch.no_grad():
        dead.features[1].weight[2] = 0.0
    dead_model = to_torch(load_model(export_onnx(dead, (3, 12, 12), tmp_path / "dead.onnx")))
    assert [tap is not None for tap in fold_bn_taps(dead_model).bn_taps] == [False, True]


def test_fixed_batch_graph_runs_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = settle_bn(TinyConvBnRelu(), (3, 12, 12))
    path = export_onnx(module, (3, 12, 12), tmp_path / "fixed.onnx", dynamic_batch=False)
    loaded = load_model(path)
    assert loaded.batch_fixed
    model = to_torch(loaded)
    assert model.batch_dynamic
    images = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        together = model.probe(images)
        # The one-image-at-a-time path (used when the batch cannot be made dynamic) agrees.
        single = dataclasses.replace(model, batch_dynamic=False).probe(images)
    torch.testing.assert_close(together.outputs[0], single.outputs[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(together.bn_inputs, single.bn_inputs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_softmax_output_stretches_the_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = settle_bn(SoftmaxHead(), (1, 10, 10))
    loaded = load_model(export_onnx(module, (1, 10, 10), tmp_path / "softmax.onnx"))
    model = to_torch(loaded)
    producer = {out: node for node in loaded.model.graph.node for out in node.output}
    assert producer[loaded.output_names[0]].op_type == "Softmax"
    assert model.stretch_names[0] == producer[loaded.output_names[0]].input[0]
    with torch.no_grad():
        result = model.probe(torch.randn(2, 1, 10, 10))
    torch.testing.assert_close(torch.softmax(result.stretch[0], dim=1), result.outputs[0])


def _model(nodes: str, inits: list[onnx.TensorProto] | None = None) -> onnx.ModelProto:
    model = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        net (float[N, 1, 4, 4] input) => (float[N, 1, 4, 4] out) {{
            {nodes}
        }}
        """
    )
    if inits:
        model.graph.initializer.extend(inits)
    return model


def test_unconvertible_op_names_the_node() -> None:
    model = _model("mid = Relu(input)\nout = Shrink <lambd = 0.5> (mid)")
    model.graph.node[1].name = "my_shrink"
    with pytest.raises(ConversionError, match=r"node 'my_shrink'.*Shrink.*onnx2torch"):
        to_torch(load_model_proto(model))


def test_converter_failure_names_the_node() -> None:
    shape = numpy_helper.from_array(np.array([0, 1, 4, 4], np.int64), "shape")
    model = _model("mid = Relu(input)\nout = Reshape <allowzero = 1> (mid, shape)", [shape])
    model.graph.node[1].name = "reshape_allowzero"
    with pytest.raises(ConversionError, match=r"node 'reshape_allowzero' \(Reshape\)"):
        to_torch(load_model_proto(model))


def test_mismatch_with_onnxruntime_names_the_first_bad_node(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx2torch.node_converters import registry
    from onnx2torch.utils.common import OperationConverterResult, onnx_mapping_from_node

    def wrong_relu(node, graph):  # a converter with the wrong semantics: Relu -> Tanh
        return OperationConverterResult(torch_module=nn.Tanh(), onnx_mapping=onnx_mapping_from_node(node))

    for description in [d for d in registry._CONVERTER_REGISTRY if d.operation_type == "Relu"]:
        monkeypatch.setitem(registry._CONVERTER_REGISTRY, description, wrong_relu)
    loaded = load_model(tiny_model_path)
    first_relu = next(node.name for node in loaded.model.graph.node if node.op_type == "Relu")
    with pytest.raises(ConversionError, match=rf"disagree.*first difference at node '{first_relu}' \(Relu\)"):
        to_torch(loaded)


def test_bn_count_disagreement_is_refused(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnx2torch.node_converters import registry
    from onnx2torch.utils.common import OperationConverterResult, OnnxMapping

    original = registry.get_converter(operation_type="BatchNormalization", version=15)

    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    def hidden_bn(node, graph):
        result = original(node, graph)
        return OperationConverterResult(Wrapped(result.torch_module), OnnxMapping(result.onnx_mapping.inputs, result.onnx_mapping.outputs))

    for description in [d for d in registry._CONVERTER_REGISTRY if d.operation_type == "BatchNormalization"]:
        monkeypatch.setitem(registry._CONVERTER_REGISTRY, description, hidden_bn)
    with pytest.raises(ConversionError, match="BatchNormalization node .* became a torch Wrapped"):
        to_torch(load_model(tiny_model_path))


def test_opset_helper_model_is_valid() -> None:
    # Guard for the hand-written graphs above: they must pass the loader on their own.
    model = _model("out = Relu(input)")
    loaded = load_model_proto(model)
    assert to_torch(loaded).output_names == ("out",)
    assert helper.printable_graph(model.graph)


@pytest.mark.parametrize("stride, groups, size", [(1, 1, 9), (2, 1, 9), (2, 1, 8), (2, 4, 11), (1, 4, 7)])
def test_transposed_input_grad_conv_matches_autograd(stride: int, groups: int, size: int) -> None:
    """The transposed-convolution backward equals autograd's input gradient, odd sizes included."""
    from onnxdgh.convert import _InputGradConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3, stride=stride, padding=1, groups=groups, bias=True).requires_grad_(False)
    x = torch.randn(3, 4, size, size, requires_grad=True)
    wrapped = _InputGradConv2d(conv)
    y = wrapped(x)
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    (expected,) = torch.autograd.grad(conv(x), x, grad)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class TinySiLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.silu(self.bn(self.conv(x)))
        # a Sigmoid read by something else than its Mul: not a SiLU, kept as is
        gate = torch.sigmoid(y)
        return self.head((y * gate + gate).mean(dim=(2, 3)))


def test_probe_fuses_exported_silu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    loaded = load_model(export_onnx(settle_bn(TinySiLU(), (1, 8, 8)), (1, 8, 8), tmp_path / "silu.onnx"))
    assert sum(node.op_type == "Sigmoid" for node in loaded.model.graph.node) == 2
    model = to_torch(loaded)
    targets = [node.target for node in model._probe.graph.nodes]
    assert targets.count(torch.nn.functional.silu) == 1
    x = torch.randn(3, 1, 8, 8, requires_grad=True)
    probe = model.probe(x)
    expected = ort_run(loaded.model, x.detach().numpy())[0]
    np.testing.assert_allclose(probe.outputs[0].detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    probe.outputs[0].sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    model.module(reference).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=1e-4, atol=1e-6)
