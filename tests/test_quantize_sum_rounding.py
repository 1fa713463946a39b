"""Kernel-sum-preserving rounding: sums kept within half a step, integers moved by at most one, wired through quantize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh import QuantizeConfig, quantize
from onnxdgh import graph as g
from onnxdgh.errors import InvalidInputError
from onnxdgh.quantization import thresholds as th
from onnxdgh.quantization.rounding import bias_correction

from .helpers_quantize import images, make_model, rng, run

N = helper.make_node


@pytest.mark.parametrize("axis", [0, 1])
def test_sums_are_kept_and_integers_move_by_one_at_most(axis: int) -> None:
    values = rng(0).standard_normal((6, 5, 3, 3)) * 1.5  # |v| < 6: nothing clips on the grids below
    scale = np.exp2(rng(1).integers(-4, -1, size=values.shape[axis])).reshape([-1 if a == axis else 1 for a in range(4)])
    nearest = th.quantize_to_int(values, scale, 8, True)
    kept = th.quantize_preserving_sums(values, scale, 8, axis)
    other = tuple(a for a in range(4) if a != axis)
    exact = (values / scale).sum(axis=other)
    assert np.all(np.abs(kept.sum(axis=other) - exact) <= 0.5 + 1e-9)
    assert np.abs(nearest.sum(axis=other) - exact).max() > 0.5  # nearest misses: the test can fail
    assert np.abs(kept - nearest).max() == 1
    assert np.all(np.abs(kept - values / scale) < 1.0)  # each integer stays a neighbour of its value


def test_sum_rounding_respects_the_grid() -> None:
    # Every value sits at the top of the grid and rounds down: the sum cannot be raised.
    values = np.full((2, 9), 127.4)
    kept = th.quantize_preserving_sums(values, np.ones((2, 1)), 8, 0)
    assert kept.max() == 127 and kept.min() == 127


def _edge_model() -> onnx.ModelProto:
    """x -> Relu -> depthwise 3x3 whose taps nearly cancel (BN-folded edge filters) -> global pool -> y.

    The pool averages the rounding noise away but not a gain error on the (positive) mean."""
    w = rng(3).standard_normal((16, 1, 3, 3)).astype(np.float32) * 9.0
    w -= w.mean(axis=(1, 2, 3), keepdims=True)  # sum of taps ~0: high gain, no DC response
    nodes = [N("Relu", ["x"], ["r"]), N("Conv", ["r", "w", "b"], ["e"], name="dw", group=16, pads=[1, 1, 1, 1]),
             N("GlobalAveragePool", ["e"], ["y"])]
    return make_model(nodes, {"w": w, "b": np.zeros(16, np.float32)}, input_shape=("batch", 16, 8, 8))


def _stored(model: onnx.ModelProto, node: str) -> tuple[np.ndarray, np.ndarray]:
    inits = g.initializer_map(model.graph)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] in
              next(c for c in model.graph.node if c.name == node).input)
    return g.to_array(inits[dq.input[0]]).astype(np.int64), g.to_array(inits[dq.input[1]])


def _saved(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "edge.onnx"
    onnx.save(model, str(path))
    return path


def test_quantize_stores_sum_preserving_weights_at_w8a8_and_helps_an_edge_filter(tmp_path: Path) -> None:
    model = _edge_model()
    path = _saved(model, tmp_path)
    x = images(16, (16, 8, 8), seed=2) + 2.0  # positive mean: the DC leak of nearest rounding shows
    default = quantize(path, x, QuantizeConfig(gptq_rounding=False), progress=False)  # GPTQ: tests/test_quantize_gptq.py
    plain = quantize(path, x, QuantizeConfig(kernel_sum_rounding=False), progress=False)
    assert default.report["config"]["kernel_sum_rounding"] is True
    assert plain.report["config"]["kernel_sum_rounding"] is False
    ints, scale = _stored(default.model, "dw")
    w = g.to_array(g.initializer_map(model.graph)["w"]).astype(np.float64)
    exact = (w / scale.reshape(-1, 1, 1, 1)).reshape(16, -1).sum(axis=1)
    assert np.all(np.abs(ints.reshape(16, -1).sum(axis=1) - exact) <= 0.5 + 1e-9)
    meta = {p.key: p.value for p in default.model.metadata_props}
    assert meta["onnxdgh.kernel_sum_rounding"] == "true"

    def error(q: onnx.ModelProto) -> float:
        return float(np.mean((run(q, x)[0] - run(model, x)[0]) ** 2))

    assert not np.array_equal(ints, _stored(plain.model, "dw")[0])
    assert error(default.model) < 0.5 * error(plain.model)
    # The calibration bias correction accepts the sum-rounded integers.
    corrected = quantize(path, x, QuantizeConfig(bias_correction=True), progress=False)
    assert corrected.report["rounding"]["layers"][0]["outcome"]


def test_bias_correction_refuses_sum_rounded_weights_unless_told(tmp_path: Path) -> None:
    from onnxdgh.errors import QuantizationError
    from onnxdgh.quantization.fold import prepare

    model = _edge_model()
    x = images(8, (16, 8, 8), seed=2) + 2.0
    result = quantize(_saved(model, tmp_path), x, QuantizeConfig(kernel_sum_rounding=True), progress=False)
    folded, _ = prepare(model)
    with pytest.raises(QuantizationError, match="does not round"):
        bias_correction(result.model, folded, x, progress=False)
    bias_correction(result.model, folded, x, progress=False, sum_rounded=True)


def test_rounding_optimisation_and_sum_rounding_are_exclusive() -> None:
    assert QuantizeConfig(weight_bits=4).kernel_sum_rounding_enabled is False  # AdaRound chooses the integers
    assert QuantizeConfig(weight_bits=4, optimize_rounding=False).kernel_sum_rounding_enabled is False  # nearest
    assert QuantizeConfig(weight_bits=4, optimize_rounding=False, kernel_sum_rounding=True).kernel_sum_rounding_enabled
    assert QuantizeConfig(optimize_rounding=False).kernel_sum_rounding_enabled is True  # W8A8
    with pytest.raises(InvalidInputError, match="rounding optimisation"):
        QuantizeConfig(weight_bits=4, kernel_sum_rounding=True)
    with pytest.raises(InvalidInputError, match="kernel_sum_rounding"):
        QuantizeConfig(kernel_sum_rounding=1)  # type: ignore[arg-type]


def test_cli_flags(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnxdgh.cli import main
    from onnxdgh.fileio import save_images_npz

    path = tmp_path / "m.onnx"
    onnx.save(_edge_model(), str(path))
    calib = save_images_npz(tmp_path / "c.npz", images(8, (16, 8, 8), seed=2), {"source": "test"})
    out = tmp_path / "q.onnx"
    ok = CliRunner().invoke(main, ["quantize", str(path), "-o", str(out), "--calib-data", str(calib), "--no-validate",
                                   "--no-gptq-rounding"])
    assert ok.exit_code == 0 and "kernel-sum preserving" in ok.output, ok.output
    bad = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q4.onnx"), "--calib-data", str(calib),
                                    "--weight-bits", "4", "--kernel-sum-rounding"])
    assert bad.exit_code == 2 and "error:" in bad.output and "hint:" in bad.output
    assert not (tmp_path / "q4.onnx").exists()
