"""GPTQ weight rounding: lower layer error than nearest/kernel-sum rounding, grid and scales kept, wired through quantize."""

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
from onnxdgh.quantization.gptq import gptq_integers

from .helpers_quantize import images, make_model, rng, run

N = helper.make_node


def _objective(rows: np.ndarray, step: np.ndarray, ints: np.ndarray, hessian: np.ndarray) -> float:
    err = rows - step * ints
    if hessian.ndim == 2:
        return float(np.einsum("rk,km,rm->", err, hessian, err))
    return float(np.einsum("rk,rkm,rm->", err, hessian, err))


def _moments(samples: np.ndarray) -> np.ndarray:
    return samples.T @ samples / samples.shape[0]


def test_a_diagonal_hessian_gives_nearest_rounding() -> None:
    rows = rng(0).standard_normal((5, 12))
    step = np.full((5, 1), 2.0**-5)
    hessian = np.diag(rng(1).uniform(0.5, 2.0, size=12))
    assert np.array_equal(gptq_integers(rows, step[:, 0], hessian, 8), th.quantize_to_int(rows, step, 8, True))


@pytest.mark.parametrize("per_row", [False, True])
def test_gptq_lowers_the_output_error_on_correlated_inputs(per_row: bool) -> None:
    r = rng(2)
    rows = r.standard_normal((16, 9)) * 0.4
    step = np.exp2(r.integers(-6, -4, size=16)).astype(np.float64)
    # Smooth inputs with a positive mean (neighbouring taps see nearly the same value).
    base = r.standard_normal((4000, 1)) + 1.0
    samples = base + 0.1 * r.standard_normal((4000, 9))
    shared = _moments(samples)
    hessian = np.stack([_moments(samples * r.uniform(0.5, 2.0)) for _ in range(16)]) if per_row else shared
    ints = gptq_integers(rows, step, hessian, 8)
    nearest = th.quantize_to_int(rows, step[:, None], 8, True)
    summed = th.quantize_preserving_sums(rows, step[:, None], 8, 0)
    got = _objective(rows, step[:, None], ints, hessian)
    assert got < 0.5 * _objective(rows, step[:, None], nearest, hessian)
    assert got < _objective(rows, step[:, None], summed, hessian)
    assert ints.min() >= -128 and ints.max() <= 127


def test_dead_inputs_and_the_grid() -> None:
    r = rng(3)
    samples = r.standard_normal((500, 6)) + 0.5
    samples[:, 2] = 0.0  # an input that is always zero
    hessian = _moments(samples)
    rows = r.standard_normal((4, 6)) * 0.3
    rows[0, :] = 50.0  # far beyond the grid: clipped, never past it
    step = np.full(4, 2.0**-4)
    ints = gptq_integers(rows, step, hessian, 8)
    nearest = th.quantize_to_int(rows, step[:, None], 8, True)
    assert np.array_equal(ints[:, 2], nearest[:, 2])  # nothing was passed onto, or from, the dead column
    assert ints.max() == 127 and ints.min() >= -128
    assert np.array_equal(gptq_integers(rows, step, hessian, 4).clip(-8, 7), gptq_integers(rows, step, hessian, 4))


def _model(fixed_batch: bool = False) -> onnx.ModelProto:
    """Relu -> depthwise 3x3 (taps nearly cancel) -> pointwise -> Relu -> pool -> Gemm (transB 0) -> MatMul."""
    r = rng(4)
    dw = r.standard_normal((8, 1, 3, 3)).astype(np.float32) * 6.0
    dw -= dw.mean(axis=(1, 2, 3), keepdims=True)
    pw = r.standard_normal((12, 8, 1, 1)).astype(np.float32) * 0.3
    fc = r.standard_normal((12, 5)).astype(np.float32) * 0.3
    mm = r.standard_normal((5, 3)).astype(np.float32)
    nodes = [N("Relu", ["x"], ["r"]),
             N("Conv", ["r", "dw", "db"], ["d"], name="dw", group=8, pads=[1, 1, 1, 1]),
             N("Conv", ["d", "pw", "pb"], ["p"], name="pw"),
             N("Relu", ["p"], ["pr"]),
             N("GlobalAveragePool", ["pr"], ["gp"]),
             N("Flatten", ["gp"], ["f"], axis=1),
             N("Gemm", ["f", "fc", "fb"], ["z"], name="fc"),
             N("MatMul", ["z", "mm"], ["y"], name="mm")]
    inits = {"dw": dw, "db": np.zeros(8, np.float32), "pw": pw, "pb": np.full(12, 0.1, np.float32),
             "fc": fc, "fb": np.zeros(5, np.float32), "mm": mm}
    return make_model(nodes, inits, input_shape=(2 if fixed_batch else "batch", 8, 8, 8))


def _weights(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """node -> (stored weight integers, weight scale) of a QDQ model."""
    inits = g.initializer_map(model.graph)
    producers = g.producer_map(model.graph)
    out = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul") and node.input[1] in producers:
            dq = producers[node.input[1]]
            if dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                out[node.name] = (g.to_array(inits[dq.input[0]]), g.to_array(inits[dq.input[1]]))
    return out


def test_quantize_uses_gptq_by_default_at_w8a8_keeps_the_scales_and_helps(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = images(24, (8, 8, 8), seed=5) + 1.0
    default = quantize(path, x, QuantizeConfig(), progress=False)
    plain = quantize(path, x, QuantizeConfig(gptq_rounding=False), progress=False)
    assert default.report["config"]["gptq_rounding"] is True and plain.report["config"]["gptq_rounding"] is False
    assert "gptq" not in plain.report
    report = default.report["gptq"]
    assert report["layers"] == 3 and report["integers_changed"] > 0
    assert [row["node"] for row in report["skipped"]] == ["mm"]
    assert {p.key: p.value for p in default.model.metadata_props}["onnxdgh.gptq_rounding"] == "true"
    new, old = _weights(default.model), _weights(plain.model)
    for name in ("dw", "pw", "fc", "mm"):
        assert np.array_equal(new[name][1], old[name][1])  # same grid
    assert not np.array_equal(new["dw"][0], old["dw"][0])
    assert np.array_equal(new["mm"][0], old["mm"][0])  # skipped: the plan's integers
    assert "gptq_s" in default.report["timings"]

    def error(q: onnx.ModelProto) -> float:
        return float(np.mean((run(q, x)[0] - run(model, x)[0]) ** 2))

    assert error(default.model) < error(plain.model)


def test_quantize_with_a_fixed_batch(tmp_path: Path) -> None:
    path = tmp_path / "fixed.onnx"
    onnx.save(_model(fixed_batch=True), str(path))
    result = quantize(path, images(10, (8, 8, 8), seed=6), QuantizeConfig(), progress=False)
    assert result.report["gptq"]["layers"] == 3


def test_config_defaults_and_conflicts() -> None:
    assert QuantizeConfig().gptq_enabled is True
    assert QuantizeConfig(weight_bits=4).gptq_enabled is False  # AdaRound chooses the integers
    assert QuantizeConfig(weight_bits=7).gptq_enabled is False
    assert QuantizeConfig(bias_correction=True).gptq_enabled is False
    assert QuantizeConfig(kernel_sum_rounding=True).gptq_enabled is False  # an explicit rounding choice stays
    assert QuantizeConfig(optimize_rounding=False, kernel_sum_rounding=False).gptq_enabled is False  # nearest
    assert QuantizeConfig(weight_bits=4, optimize_rounding=False, gptq_rounding=True).gptq_enabled is True
    with pytest.raises(InvalidInputError, match="rounding optimisation"):
        QuantizeConfig(optimize_rounding=True, gptq_rounding=True)
    with pytest.raises(InvalidInputError, match="bias-correction"):
        QuantizeConfig(bias_correction=True, gptq_rounding=True)
    with pytest.raises(InvalidInputError, match="gptq_rounding"):
        QuantizeConfig(gptq_rounding="yes")  # type: ignore[arg-type]


def test_cli_flags(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from onnxdgh.cli import main
    from onnxdgh.fileio import save_images_npz

    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    calib = save_images_npz(tmp_path / "c.npz", images(8, (8, 8, 8), seed=2), {"source": "test"})
    on = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calib-data", str(calib),
                                   "--no-validate"])
    assert on.exit_code == 0 and "rounding  GPTQ" in on.output, on.output
    off = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q2.onnx"), "--calib-data", str(calib),
                                    "--no-validate", "--no-gptq-rounding"])
    assert off.exit_code == 0 and "kernel-sum preserving" in off.output, off.output
    bad = CliRunner().invoke(main, ["quantize", str(path), "-o", str(tmp_path / "q3.onnx"), "--calib-data", str(calib),
                                    "--gptq-rounding", "--bias-correction"])
    assert bad.exit_code == 2 and "error:" in bad.output and "hint:" in bad.output
    assert not (tmp_path / "q3.onnx").exists()
