"""The quantized output in the runtimes that consume QDQ (issue 18), measured against
onnxruntime's exact simulation (graph optimisations off).

OpenVINO tests are skipped where it is not installed (``pip install -e ".[runtimes]"``);
the onnxruntime shipping-path tests always run. The runtime adapters are
``tools/runtimes.py`` (shared with ``tools/bench_runtimes.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxdgh import QuantizeConfig, load_model, quantize

from .helpers_quantize import conv_weight, make_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import runtimes  # noqa: E402

# OpenVINO requantizes in its own order (FakeQuantize), so its outputs are within a step or
# two of the simulation, not identical: measured 35-36 dB on the samples (docs/BENCHMARKS.md).
OPENVINO_MIN_SQNR_DB = 25.0


def _images(count: int, seed: int, shape: tuple[int, ...] = (3, 12, 12)) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((count, *shape)) * 1.5).astype(np.float32)


def _save_quantized(source: Path | onnx.ModelProto, tmp_path: Path, name: str, **settings: object) -> Path:
    if isinstance(source, onnx.ModelProto):
        onnx.save(source, str(tmp_path / f"{name}_float.onnx"))
        source = tmp_path / f"{name}_float.onnx"
    loaded = load_model(source)
    calibration = _images(24, 0, tuple(loaded.input_shape))
    model = quantize(loaded, calibration, QuantizeConfig(**settings), progress=False).model  # type: ignore[arg-type]
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _openvino() -> None:
    pytest.importorskip("openvino", reason="OpenVINO not installed (pip install -e \".[runtimes]\")")


def _conv_add_model() -> onnx.ModelProto:
    """Conv -> Add(per-channel constant) -> Relu -> pool: the constant is large next to the Conv
    output, so a runtime that drops it (OpenVINO did, on Conv -> Q/DQ -> Add) is far off."""
    channels = 6
    offset = np.linspace(-3.0, 4.0, channels, dtype=np.float32).reshape(1, channels, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Add", ["c", "offset"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["y"], name="flatten"),
    ]
    inits = {"w": conv_weight(channels, 3), "b": np.full(channels, 0.1, np.float32), "offset": offset}
    return make_model(nodes, inits, input_shape=("batch", 3, 12, 12))


# ------------------------------------------------------------------- onnxruntime


def test_onnxruntime_shipping_path_runs_integer_convolutions(tiny_model_path: Path, tmp_path: Path) -> None:
    path = _save_quantized(tiny_model_path, tmp_path, "w8")
    x = _images(32, 7)
    exact = runtimes.run("ort-exact", path, x)
    shipped = runtimes.run("ort-shipping", path, x)
    assert exact.kernels.integer == 0 and exact.kernels.total == 3  # the simulation computes in float
    assert shipped.kernels.precisions.get("QLinearConv", 0) >= 1 and shipped.kernels.integer >= 2
    assert runtimes.agreement(exact.outputs, shipped.outputs) == 1.0
    assert runtimes.sqnr_db(exact.outputs, shipped.outputs) >= 40.0


def test_runtime_adapter_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown runtime"):
        runtimes.missing("tflite")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(runtimes.RuntimeFailure):
        runtimes.run("ort-exact", broken, _images(1, 0))


# ---------------------------------------------------------------------- OpenVINO


def test_openvino_runs_the_quantized_model_on_integer_kernels(tiny_model_path: Path, tmp_path: Path) -> None:
    _openvino()
    path = _save_quantized(tiny_model_path, tmp_path, "w8")
    x = _images(64, 7)
    exact = runtimes.run("ort-exact", path, x)
    vino = runtimes.run("openvino-cpu", path, x)
    assert vino.kernels.all_integer, vino.kernels.summary()  # read from OpenVINO's execution graph
    assert vino.outputs.shape == exact.outputs.shape
    assert runtimes.agreement(exact.outputs, vino.outputs) >= 0.95
    assert runtimes.sqnr_db(exact.outputs, vino.outputs) >= OPENVINO_MIN_SQNR_DB


def test_conv_add_constant_reaches_openvino_folded(tmp_path: Path) -> None:
    """Regression (issues 12, 18): OpenVINO 2026.4 dropped the constant of Conv -> Q/DQ -> Add(quantized
    constant) in PP-OCR's detector. The quantizer now folds the Add into the Conv, so the pattern never
    reaches a runtime. (This tiny Conv -> Add did not trip OpenVINO 2026.4.1 even unfolded, so the
    fold itself is asserted, and OpenVINO's result on the folded graph.)"""
    _openvino()
    path = _save_quantized(_conv_add_model(), tmp_path, "conv_add")
    model = onnx.load(str(path))
    assert "Add" not in {node.op_type for node in model.graph.node}  # folded into the Conv's bias
    x = _images(32, 3)
    exact = runtimes.run("ort-exact", path, x)
    vino = runtimes.run("openvino-cpu", path, x)
    assert vino.kernels.all_integer, vino.kernels.summary()
    assert runtimes.sqnr_db(exact.outputs, vino.outputs) >= OPENVINO_MIN_SQNR_DB


def test_weights_as_float_runs_in_openvino_in_float(tiny_model_path: Path, tmp_path: Path) -> None:
    _openvino()
    path = _save_quantized(tiny_model_path, tmp_path, "flat", weights_as_float=True)
    x = _images(32, 7)
    exact = runtimes.run("ort-exact", path, x)
    vino = runtimes.run("openvino-cpu", path, x)
    # Float weights give OpenVINO nothing to run on integers: the flavour is for converters.
    assert vino.kernels.integer == 0 and vino.kernels.total == 3
    assert runtimes.sqnr_db(exact.outputs, vino.outputs) >= OPENVINO_MIN_SQNR_DB


def test_int4_types_make_openvino_convolutions_float(tiny_model_path: Path, tmp_path: Path) -> None:
    """docs/QUANTIZE.md: INT4 Q/DQ types cost the integer kernels in OpenVINO; int8 containers keep them."""
    _openvino()
    x = _images(16, 7)
    int4 = runtimes.run("openvino-cpu", _save_quantized(tiny_model_path, tmp_path, "int4", weight_bits=4,
                                                        int4_types=True, optimize_rounding=False), x)
    boxed = runtimes.run("openvino-cpu", _save_quantized(tiny_model_path, tmp_path, "w4", weight_bits=4,
                                                         optimize_rounding=False), x)
    assert int4.kernels.integer == 0 and int4.kernels.total == 3, int4.kernels.summary()
    assert boxed.kernels.all_integer, boxed.kernels.summary()


def test_bench_runtimes_smoke(tmp_path: Path) -> None:
    """tools/bench_runtimes.py --smoke: the harness of docs/BENCHMARKS.md ("Runtimes") cannot rot."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    proc = subprocess.run([sys.executable, str(repo / "tools" / "bench_runtimes.py"), "--smoke", "-q", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=repo, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| tiny | W8A8 | ort-shipping | yes |" in text and "| tiny | W7A8 ort-x86-avx2 | ort-exact | yes |" in text
    vino = "| tiny | W8A8 | openvino-cpu | yes |" if runtimes.missing("openvino-cpu") is None else "not run: openvino"
    assert vino in text
