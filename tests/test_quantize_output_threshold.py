"""Graph outputs at 8 bits take the no-clipping threshold (a classifier reads its largest logits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from onnxdgh import QuantizeConfig, quantize
from onnxdgh.quantization import thresholds as th

from .helpers_quantize import make_model, rng


def _model() -> onnx.ModelProto:
    """x -> 1x1 Conv (gain 1) -> h -> 1x1 Conv (gain 1) -> y: the same values inside and at the output."""
    one = np.ones((1, 1, 1, 1), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"), helper.make_node("Conv", ["h", "w2"], ["y"], name="c2")]
    return make_model(nodes, {"w1": one, "w2": one.copy()}, input_shape=("batch", 1, 8, 8))


def _images() -> np.ndarray:
    x = rng(0).standard_normal((256, 1, 8, 8)).astype(np.float32)
    x.reshape(-1)[::4000] = 9.0  # a rare tail that the MSE rule clips
    return x


def _thresholds(result: object) -> dict[str, float]:
    return {a["tensor"]: a["threshold"] for a in result.report["tensors"]["activations"]}  # type: ignore[attr-defined]


def test_output_is_not_clipped_at_8_bits_but_inner_tensors_keep_the_mse_rule(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    # threshold="mse" named: a model whose output has rank > 2 defaults to lp
    # (plan.default_threshold), and this test is about the output exception to the MSE rule.
    got = _thresholds(quantize(path, _images(), QuantizeConfig(threshold="mse"), progress=False))
    noclip = float(th.noclip_threshold(_images().min(), 9.0, 8, True))
    assert got["y"] == noclip == 16.0
    assert got["h"] < got["y"]  # the same values inside the graph: MSE clips the tail (the test can fail)


def test_below_8_bit_activations_outputs_keep_the_mse_rule(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    config = QuantizeConfig(weight_bits=8, act_bits=4, optimize_rounding=False, shift_negative=False)
    got = _thresholds(quantize(path, _images(), config, progress=False))
    assert got["y"] < 16.0
