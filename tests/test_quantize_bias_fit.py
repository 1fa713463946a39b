"""Biases that fit: a dead channel (BN running variance 0, weights ~0) keeps its bias exact.

Its folded weights are tiny, so the MSE rule gives it a tiny weight scale, and its bias
``beta - s mu`` would not fit int32 at ``input scale x weight scale``; the quantizer raises
that channel's (power-of-two) weight scale instead of clipping the bias.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh.load import load_model_proto
from onnxdgh.profile import load_profile
from onnxdgh.quantization import QuantizeConfig, quantize
from onnxdgh.quantization import thresholds as th
from onnxdgh.validation import validate
from onnxdgh.validation.checks import check_model

from .helpers_quantize import bias_scale_problems, conv_weight, images, is_pow2, make_model, output_scale, qdq_scale, run

N = helper.make_node
DEAD = 2  # weights 1e-9 and BN variance 0: the EfficientNet-Lite0 case
ZERO = 3  # weights exactly 0 and BN variance 0


def _dead_channel_model() -> onnx.ModelProto:
    w = conv_weight(4, 3, seed=4)
    w[DEAD] = 1e-9
    w[ZERO] = 0.0
    gamma = np.array([1.0, 0.8, 1.0, 1.0], np.float32)
    beta = np.array([0.1, -0.2, 0.5, 0.25], np.float32)
    mean = np.array([0.3, -0.1, -0.05, -0.04], np.float32)
    var = np.array([1.5, 0.7, 0.0, 0.0], np.float32)
    nodes = [
        N("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        N("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["h"], name="bn", epsilon=1e-3),
        N("Relu", ["h"], ["y"], name="relu"),
    ]
    inits = {"w": w, "b": np.zeros(4, np.float32), "gamma": gamma, "beta": beta, "mean": mean, "var": var}
    return make_model(nodes, inits)


W8A8 = QuantizeConfig()
W4A8_ROUNDED = QuantizeConfig(weight_bits=4, optimize_rounding=True, bias_correction=True, rounding_iterations=20)


@pytest.mark.parametrize("config", [W8A8, W4A8_ROUNDED], ids=["w8a8", "w4a8-rounding-bias-correction"])
def test_dead_channel_bias_is_exact_not_clipped(config: QuantizeConfig) -> None:
    # The rounding optimisation and bias correction read the weight scales resolve chose
    # (from the emitted model) and rewrite the int32 bias: it must still be exact.
    model = _dead_channel_model()
    calib = images(32, seed=5)
    result = quantize(load_model_proto(model), calib, config, progress=False)
    q = result.model
    assert result.report["counts"]["bias_values_clipped"] == 0
    weight = next(p for p in result.report["tensors"]["params"] if p["role"] == "weight")
    assert weight["raised_for_bias"] == 1  # only the tiny channel needed it; the zero one has the layer's

    conv = next(node for node in q.graph.node if node.op_type == "Conv")
    producers = {out: node for node in q.graph.node for out in node.output}
    w_scale = qdq_scale(q, producers[conv.input[1]]).reshape(-1)
    assert all(is_pow2(float(s)) for s in w_scale)
    # Raised from ~2^-31 (MSE on 3e-8 weights) to the smallest power of two that fits the
    # folded bias 0.5 + 0.05 / sqrt(1e-3) with one bit of int32 to spare.
    bias = 0.5 + 0.05 / np.sqrt(1e-3)
    needed = bias / (float(qdq_scale(q, producers[conv.input[0]]).reshape(-1)[0]) * 2.0**30)
    assert needed <= w_scale[DEAD] < 2 * needed
    assert bias_scale_problems(q) == []
    assert [v.to_dict() for v in check_model(q, load_profile("generic-pot-int8"))] == []

    x = images(8, seed=6)
    expected, got = run(model, x)[0], run(q, x)[0]
    step = output_scale(q)
    for channel in (DEAD, ZERO):  # constant channels: the bias is the whole output
        np.testing.assert_allclose(got[:, channel], expected[:, channel], rtol=0, atol=step)
    assert validate(q, model, data=calib).passed


def test_bias_fit_thresholds_per_channel_per_tensor_and_repeated() -> None:
    # 8-bit weights (scale t / 128), input scale 2^-4, int32 bias with one bit spare: |b| <= 2^30 s_in s_w.
    bias = np.array([0.0, 2.0**10, -(2.0**12), 3.0])
    got = th.bias_fit_thresholds(bias, 2.0**-4, 8, 32, 4)
    need = np.abs(bias) * 128 / (2.0**-4 * 2.0**30)
    assert got[0] == 0.0  # no bias: any threshold
    assert np.all(got[1:] >= need[1:]) and np.all(got[1:] / 2 < need[1:])
    assert all(is_pow2(float(t)) for t in got[1:])
    per_tensor = th.bias_fit_thresholds(bias, 2.0**-4, 8, 32, 1)
    assert per_tensor.shape == (1,) and per_tensor[0] == got.max()
    # Grouped ConvTranspose: output channel o uses weight scale o % 2.
    repeated = th.bias_fit_thresholds(bias, 2.0**-4, 8, 32, 2)
    assert np.array_equal(repeated, np.maximum(got[:2], got[2:]))


@pytest.mark.parametrize("bits", [8, 4])
def test_ordinary_biases_leave_the_weight_scales_alone(bits: int) -> None:
    # A bias far inside int32 never raises a scale: thresholds are the HPTQ ones.
    model = _dead_channel_model()
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(conv_weight(4, 3, seed=4), "w"))
    for init in model.graph.initializer:
        if init.name == "var":
            init.CopyFrom(onnx.numpy_helper.from_array(np.array([1.5, 0.7, 0.4, 0.9], np.float32), "var"))
    result = quantize(
        load_model_proto(model), images(16, seed=5),
        QuantizeConfig(weight_bits=bits, act_bits=8, optimize_rounding=False), progress=False,
    )
    assert all(p["raised_for_bias"] == 0 for p in result.report["tensors"]["params"] if p["role"] == "weight")
