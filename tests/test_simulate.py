"""The fake-quant simulation equals onnxruntime on every op family the quantizer emits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnxdgh.errors import QuantizationError
from onnxdgh.load import load_model_proto
from onnxdgh.quantization import QuantizeConfig, quantize
from onnxdgh.quantization import simulate as simulation
from onnxdgh.quantization.simulate import FakeQuantize, UnsupportedOpError, simulate

from .helpers_quantize import conv_weight, images, make_model, output_scale, run
from .test_quantize_ops import FAMILIES, N, _conv, _with_conv


def _conv_same() -> onnx.ModelProto:
    """auto_pad SAME_UPPER / SAME_LOWER with stride 2 (asymmetric padding)."""
    w1, w2 = conv_weight(4, 3, 2, seed=1), conv_weight(4, 4, 2, seed=2)
    nodes = [
        N("Conv", ["x", "w1"], ["h"], name="upper", auto_pad="SAME_UPPER", strides=[2, 2]),
        N("Conv", ["h", "w2"], ["y"], name="lower", auto_pad="SAME_LOWER"),
    ]
    return make_model(nodes, {"w1": w1, "w2": w2})


def _relu6_hardswish() -> onnx.ModelProto:
    def tail(h: str) -> tuple[list, dict]:
        nodes, inits = _conv("c1", "r6", "c", out_ch=4, in_ch=4, seed=3)
        return (
            [N("Clip", [h, "lo", "hi"], ["r6"], name="relu6"), *nodes, N("HardSwish", ["c"], ["y"], name="hswish")],
            {"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32), **inits},
        )

    return _with_conv(tail)


def _hard_sigmoid_gate() -> onnx.ModelProto:
    return _with_conv(lambda h: ([N("HardSigmoid", [h], ["g"], name="hsig", alpha=1 / 6, beta=0.5),
                                  N("Mul", [h, "g"], ["y"], name="gate")], {}))


MORE = {"conv_same": _conv_same, "relu6_hardswish": _relu6_hardswish, "hard_sigmoid_gate": _hard_sigmoid_gate}


def _assert_equal_to_onnxruntime(q: onnx.ModelProto, x: np.ndarray) -> None:
    sim = simulate(q, check=[x])
    for name, got, ref in zip(sim.outputs, sim.run([x]), run(q, x)):
        step = output_scale(q, name)
        # Equal but where float summation order flips a rounding tie: one output step, rarely.
        assert np.max(np.abs(got - ref)) <= 1.01 * step, name
        assert np.mean(np.abs(got - ref) > 1e-6 * max(1.0, float(np.max(np.abs(ref))))) <= 0.01, name


@pytest.mark.parametrize("family", sorted({**FAMILIES, **MORE}))
def test_simulation_equals_onnxruntime_on_the_emitted_graph(family: str) -> None:
    float_model = {**FAMILIES, **MORE}[family]()
    config = QuantizeConfig(optimize_rounding=False, bias_correction=False)
    q = quantize(load_model_proto(float_model), images(16), config, progress=False).model
    _assert_equal_to_onnxruntime(q, images(8, seed=5))


@pytest.mark.parametrize("int4_types", [False, True])
def test_simulation_of_4_bit_containers(int4_types: bool) -> None:
    """W4A4 in int8/uint8 containers behind range Clips, or in INT4/UINT4 types (opset 21)."""
    config = QuantizeConfig(weight_bits=4, act_bits=4, int4_types=int4_types, optimize_rounding=False, bias_correction=False)
    q = quantize(load_model_proto(FAMILIES["residual_add"]()), images(16), config, progress=False).model
    types = {t.data_type for t in q.graph.initializer}
    assert (onnx.TensorProto.INT4 in types) == int4_types
    _assert_equal_to_onnxruntime(q, images(8, seed=5))


def test_a_cut_between_tensors_and_its_constants() -> None:
    """A sub-graph between two tensors; weights are replaceable constants of their integer names."""
    q = quantize(load_model_proto(FAMILIES["depthwise"]()), images(16), QuantizeConfig(optimize_rounding=False),
                 progress=False).model
    dw = next(node for node in q.graph.node if node.name == "dw")
    producers = {out: node for node in q.graph.node for out in node.output}
    start, weight = dw.input[0], producers[dw.input[1]].input[0]
    (feed,) = run_tensors(q, images(8, seed=5), [start])
    sim = simulate(q, inputs=[start], outputs=["y"], check=[feed])
    assert sim.inputs == (start,) and weight in sim.constants
    constant = sim.constants[weight]
    before = sim.run([feed])[0]
    with torch.no_grad():
        constant.integers.zero_()
    assert not np.array_equal(sim.run([feed])[0], before)  # the Conv now computes with those integers


def run_tensors(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[np.ndarray]:
    from onnxdgh import graph as g

    return run(g.pruned_copy(model, names), x)


def test_fake_quantize_rounds_clamps_per_axis_with_a_straight_through_gradient() -> None:
    fq = FakeQuantize(np.array([0.5, 0.25], np.float32), np.zeros(2, np.int64), (0, 15), axis=1)
    x = torch.tensor([[0.26, 0.13], [-1.0, 9.0]], requires_grad=True)
    y = fq(x)
    torch.testing.assert_close(y, torch.tensor([[1.0, 1.0], [0.0, 15.0]]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([[2.0, 4.0], [0.0, 0.0]]))  # 1/s inside the range, 0 where clamped


def test_an_op_onnx2torch_lacks_is_named() -> None:
    q = quantize(load_model_proto(FAMILIES["relu"]()), images(16), QuantizeConfig(optimize_rounding=False), progress=False).model
    relu = next(node for node in q.graph.node if node.op_type == "Relu")
    relu.op_type = "ThresholdedRelu"  # onnxruntime runs it, onnx2torch has no converter
    with pytest.raises(UnsupportedOpError, match=f"{relu.name}.*ThresholdedRelu"):
        simulate(q, check=[images(4)])


def test_a_disagreement_with_onnxruntime_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize(load_model_proto(FAMILIES["relu"]()), images(16), QuantizeConfig(optimize_rounding=False), progress=False).model
    simulate(q, check=[images(4)])  # agrees as built
    monkeypatch.setattr(simulation, "_round_ste", lambda x: torch.floor(x))  # a wrong quantizer
    with pytest.raises(QuantizationError, match="disagrees with onnxruntime"):
        simulate(q, check=[images(4)])


def test_a_cut_keeps_the_rank_of_its_inputs() -> None:
    """onnx2torch's GlobalAveragePool of an input of unknown rank averages over every axis:
    a cut's inputs keep their shapes (a squeeze-excitation block cut at its input failed so)."""
    q = quantize(load_model_proto(FAMILIES["pools"]()), images(16), QuantizeConfig(optimize_rounding=False),
                 progress=False).model
    start = next(node for node in q.graph.node if node.op_type == "MaxPool").input[0]
    (feed,) = run_tensors(q, images(8, seed=5), [start])
    (reference,) = run_tensors(q, images(8, seed=5), ["y"])
    for check in ([feed], None):
        got = simulate(q, inputs=[start], outputs=["y"], check=check).run([feed])[0]
        np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-6)
