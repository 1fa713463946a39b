"""onnxruntime helpers shared by conversion checks, calibration and validation.

Contract: build CPU inference sessions from in-memory models (optionally exposing
intermediate tensors as outputs), and run image sets through them in batches, falling
back to one image at a time when the graph fixes its batch dimension. A model holding an
op onnxruntime does not know (a custom domain) is refused by :func:`make_session` with an
:class:`~onnxdgh.errors.UnsupportedModelError` naming the node and the domain.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .errors import UnsupportedModelError

__all__ = ["describe_nodes", "make_session", "run_batched", "unknown_runtime_ops", "with_extra_outputs"]

_ONNX_DOMAINS = ("", "ai.onnx")


@functools.lru_cache(maxsize=1)
def _runtime_ops() -> frozenset[tuple[str, str]]:
    """(domain, op type) of every op onnxruntime registers outside the ONNX domain."""
    schemas = ort.capi._pybind_state.get_all_operator_schema()
    return frozenset((schema.domain, schema.name) for schema in schemas)


def unknown_runtime_ops(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes of a custom domain that onnxruntime cannot run (no kernel, no model-local function).

    Default-domain ops are left to the ONNX checker, which :func:`~onnxdgh.load.load_model`
    runs; this finds what the checker lets through: ops of domains it does not know.
    """
    functions = {(function.domain, function.name) for function in model.functions}
    known = _runtime_ops() | functions
    return [
        node for node in model.graph.node
        if node.domain not in _ONNX_DOMAINS and (node.domain, node.op_type) not in known
    ]


def describe_nodes(nodes: Sequence[onnx.NodeProto], limit: int = 3) -> str:
    """``node 'a' (com.example:MyOp), node 'b' (...) and 2 more`` for messages."""
    parts = [f"node {node.name!r} ({node.domain}:{node.op_type})" for node in nodes[:limit]]
    more = f" and {len(nodes) - limit} more" if len(nodes) > limit else ""
    return ", ".join(parts) + more


def with_extra_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (types left for ORT to infer)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {value.name for value in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return out


def make_session(
    model: onnx.ModelProto, *, optimize: bool = True, threads: int | None = None
) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for ``model``; ``optimize=False`` disables graph optimisations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's errors (Fail, InvalidGraph, ...) derive from Exception only
        unknown = unknown_runtime_ops(model)
        if not unknown:
            raise
        raise UnsupportedModelError(
            f"onnxruntime cannot run {describe_nodes(unknown)}: custom-domain ops have no kernel, "
            "so onnxdgh can neither calibrate nor quantize this model",
            "replace the op with standard ONNX ops at export time (or ship it as a model-local ONNX function)",
        ) from exc


def run_batched(
    session: ort.InferenceSession,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    outputs: Sequence[str] | None = None,
    fixed_batch: int | None = None,
) -> list[np.ndarray]:
    """Run ``images`` (N x C x H x W) through ``session``; return each output concatenated over N.

    ``fixed_batch`` is the graph's fixed batch size, if any: batches are then cut to it.
    """
    input_name = session.get_inputs()[0].name
    step = fixed_batch if fixed_batch else max(1, batch_size)
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = [[] for _ in names]
    for start in range(0, images.shape[0], step):
        batch = np.ascontiguousarray(images[start : start + step], dtype=np.float32)
        # A short last batch on a fixed-batch graph: run the images one by one.
        short = fixed_batch and batch.shape[0] != fixed_batch
        for part in [batch[i : i + 1] for i in range(batch.shape[0])] if short else [batch]:
            for index, value in enumerate(session.run(names, {input_name: part})):
                chunks[index].append(value)
    return [np.concatenate(parts, axis=0) if parts else np.zeros(0, np.float32) for parts in chunks]
