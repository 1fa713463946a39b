"""Run a quantized ONNX QDQ model in the runtimes that consume it, and read which kernels they chose.

Contract:

- :data:`RUNTIMES` names the runtimes: ``ort-exact`` (onnxruntime with graph
  optimisations off: every QuantizeLinear/DequantizeLinear runs as written, the exact QDQ
  simulation every comparison is made against), ``ort-shipping`` (onnxruntime with all
  optimisations: Q/DQ fused into integer kernels, what a deployment runs) and
  ``openvino-cpu`` (OpenVINO's CPU plugin, which reads Q/DQ as FakeQuantize).
- :func:`missing` says why a runtime cannot run here (its package is absent), else None.
- :func:`run` returns a :class:`RuntimeRun`: the first output on all images, and a
  :class:`Kernels` count read from the runtime's *own* execution graph: for onnxruntime
  the optimised model it saves (``SessionOptions.optimized_model_filepath``), for OpenVINO
  the compiled model's runtime graph (``layerType`` / ``runtimePrecision`` of each layer).
  A runtime that fails to load or run the model raises :class:`RuntimeFailure` with its
  first error line.
- :func:`agreement` and :func:`sqnr_db` compare two runs' outputs.

Every runtime uses one thread (the machines these run on are shared). This module needs
only numpy and onnxruntime; OpenVINO is imported when used (``pip install -e ".[runtimes]"``).
TVM's Relax frontend and onnx2tf/LiteRT are not driven here: see docs/BENCHMARKS.md
("Runtimes") for why and what was measured with them.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["RUNTIMES", "Kernels", "RuntimeRun", "RuntimeFailure", "missing", "run", "agreement", "sqnr_db"]

RUNTIMES: tuple[str, ...] = ("ort-exact", "ort-shipping", "openvino-cpu")

# onnxruntime ops that compute on integers (after its QDQ fusion) and their float counterparts.
_ORT_INTEGER = frozenset({"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "QGemm", "DynamicQuantizeMatMul",
                          "MatMulIntegerToFloat", "QLinearConvTranspose"})
_ORT_FLOAT = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose", "Gemm", "MatMul", "FusedMatMul",
                        "FusedGemm"})
# OpenVINO CPU layer types that carry a model's convolutions and matrix products.
_OV_COMPUTE = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul"})
# OpenVINO reports a layer's input (activation) precision; "i4"/"u4" on a FullyConnected is
# weight-only decompression into float arithmetic, not an integer kernel.
_INTEGER_PRECISIONS = frozenset({"u8", "i8"})


class RuntimeFailure(RuntimeError):
    """A runtime could not load or run the model (the message is its first error line)."""


@dataclass(frozen=True)
class Kernels:
    """Convolution / matrix-product kernels of an execution graph, by the precision they run in."""

    precisions: dict[str, int] = field(default_factory=dict)
    """``{"u8": 20, "f32": 1}`` (OpenVINO) or ``{"QLinearConv": 20, "Gemm": 1}`` (onnxruntime)."""
    integer: int = 0
    total: int = 0

    @property
    def all_integer(self) -> bool:
        """True when every convolution / matrix product runs on integers (and there is one)."""
        return self.total > 0 and self.integer == self.total

    def summary(self) -> str:
        """``20/21 integer (u8 20, f32 1)``."""
        detail = ", ".join(f"{name} {count}" for name, count in sorted(self.precisions.items()))
        return f"{self.integer}/{self.total} integer ({detail})"


@dataclass(frozen=True)
class RuntimeRun:
    """One runtime's first output on every image and the kernels it chose."""

    runtime: str
    outputs: np.ndarray
    kernels: Kernels


def missing(runtime: str) -> str | None:
    """Why ``runtime`` cannot run here (``"openvino not installed"``), or None."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    package = {"openvino-cpu": "openvino"}.get(runtime, "onnxruntime")
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        return f"{package} not installed (pip install -e \".[runtimes]\")"
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    return [np.ascontiguousarray(images[i:i + batch], dtype=np.float32) for i in range(0, images.shape[0], batch)]


def _ort(model: Path, images: np.ndarray, optimize: bool, batch: int) -> RuntimeRun:
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        saved = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(saved)
        try:
            session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            outputs = np.concatenate([session.run(None, {name: part})[0] for part in _batches(images, batch)])
        except Exception as exc:  # onnxruntime's own exception types derive from Exception only
            raise RuntimeFailure(_first_line(exc)) from exc
        ops = Counter(node.op_type for node in onnx.load(str(saved)).graph.node)
    counted = {op: n for op, n in ops.items() if op in _ORT_INTEGER or op in _ORT_FLOAT}
    integer = sum(n for op, n in counted.items() if op in _ORT_INTEGER)
    kernels = Kernels(counted, integer, sum(counted.values()))
    return RuntimeRun("ort-shipping" if optimize else "ort-exact", outputs, kernels)


def _openvino(model: Path, images: np.ndarray, batch: int) -> RuntimeRun:
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(str(model), "CPU", {"INFERENCE_NUM_THREADS": 1})
        outputs = np.concatenate([compiled([part])[0] for part in _batches(images, batch)])
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types
        raise RuntimeFailure(_first_line(exc)) from exc
    precisions: Counter[str] = Counter()
    integer = 0
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) not in _OV_COMPUTE:
            continue
        precision = info["runtimePrecision"].astype(str)
        precisions[precision] += 1
        integer += precision in _INTEGER_PRECISIONS
    return RuntimeRun("openvino-cpu", outputs, Kernels(dict(precisions), integer, sum(precisions.values())))


def run(runtime: str, model: str | os.PathLike[str], images: np.ndarray, *, batch: int = 250) -> RuntimeRun:
    """Run ``model`` (an .onnx path) on ``images`` (N x C x H x W float32) in ``runtime``.

    Raises:
        ValueError: unknown runtime; ImportError: its package is absent (see :func:`missing`);
        RuntimeFailure: the runtime cannot load or run the model.
    """
    reason = missing(runtime)
    if reason is not None:
        raise ImportError(reason)
    path = Path(model)
    if runtime == "openvino-cpu":
        return _openvino(path, images, batch)
    return _ort(path, images, runtime == "ort-shipping", batch)


def agreement(reference: np.ndarray, other: np.ndarray) -> float:
    """Share of rows whose arg-max class is the same."""
    return float(np.mean(reference.reshape(reference.shape[0], -1).argmax(1) == other.reshape(other.shape[0], -1).argmax(1)))


def sqnr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """10 log10(sum ref^2 / sum (ref - other)^2) (the validator's definition); +inf when identical."""
    from onnxdgh.validation.report import sqnr_db as ratio_db

    ref = np.asarray(reference, np.float64)
    return ratio_db(float(np.sum(ref * ref)), float(np.sum((ref - np.asarray(other, np.float64)) ** 2)))
