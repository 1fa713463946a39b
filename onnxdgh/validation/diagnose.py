"""Where the quantization error is *made*: each layer's SQNR drop against its inputs' SQNR.

Contract: :func:`input_sqnr` gives, for every compared float tensor, the SQNR of what its
producer reads: the lowest SQNR among the nearest compared tensors upstream of each of
the producer's data inputs (walking back through tensors that carry no quantizer, e.g.
the Conv output inside a fused Conv -> Relu), or None when the producer reads only the
graph input or constants that are not compared. :func:`diagnose` names the first layer
(in graph order) whose drop ``input SQNR - output SQNR`` is at least :data:`DROP_DB`
while its output is below :data:`QUIET_DB`, the layers with the largest drops, and the
options of ``onnxdgh quantize`` that address each kind of layer.

A drop is error the layer adds (weight rounding, its output grid) or amplifies (a
high-pass kernel turns small input noise into large output noise); a layer the error
only passes through keeps its input's SQNR. The SQNR rows themselves come from
:func:`onnxdgh.validation.report.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import onnx

from .. import graph as g
from ..ops import WEIGHTED

__all__ = ["DROP_DB", "QUIET_DB", "input_sqnr", "diagnose"]

DROP_DB = 3.0
"""A layer that lowers the SQNR by 3 dB at least doubles the relative noise power."""
QUIET_DB = 40.0
"""Above 40 dB (8-bit quantization of a well-spread tensor gives ~40-50 dB) a drop is harmless."""
_HINTS = {
    "weighted": "its weights' rounding: --optimize-rounding (reconstruction, also at W8A8; slow), "
                "--gptq-rounding (8-bit weights; the W8A8 default), --kernel-sum-rounding, --bias-correction (mean error), "
                "--equalize (channel ranges between consecutive convolutions)",
    "other": "its output grid: --threshold (mse clips, noclip covers the range), more --act-bits, "
             "or calibration images closer to the real inputs",
}


def _weighted_producer(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto], compared: set[str]) -> bool:
    """Whether ``node`` or an uncompared node feeding it (a fused Conv -> Relu) has a constant weight."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.op_type in WEIGHTED:
            return True
        stack += [producers[name] for name in current.input
                  if name and name not in compared and name in producers]
    return False


def input_sqnr(float_model: onnx.ModelProto, sqnr: dict[str, float]) -> dict[str, float | None]:
    """For each float tensor in ``sqnr`` (name -> output SQNR in dB), the SQNR of its producer's inputs."""
    graph = float_model.graph
    producers = g.producer_map(graph)
    inits = {init.name for init in graph.initializer}

    def reads(node: onnx.NodeProto, seen: set[str]) -> float | None:
        """The lowest SQNR of the nearest compared tensors upstream of ``node``'s data inputs."""
        known = [value for parent in node.input if parent and parent not in inits
                 if (value := upstream(parent, seen)) is not None]
        return min(known) if known else None

    def upstream(name: str, seen: set[str]) -> float | None:
        if name in sqnr:
            return sqnr[name]
        node = producers.get(name)
        if node is None or name in seen:
            return None
        seen.add(name)
        return reads(node, seen)

    # a compared graph input itself has no producer: None
    return {name: reads(node, set()) if (node := producers.get(name)) is not None else None
            for name in sqnr}


def diagnose(float_model: onnx.ModelProto, rows: Sequence[Any], *, top: int = 3) -> dict[str, Any] | None:
    """The first bad layer and the largest drops among ``rows`` (objects with ``tensor``,
    ``node``, ``op_type``, ``sqnr_db`` and ``input_sqnr_db``); None without any drop."""
    graph = float_model.graph
    producers = g.producer_map(graph)
    order = {id(node): index for index, node in enumerate(graph.node)}
    compared = {row.tensor for row in rows}
    candidates = []
    for row in rows:
        if row.input_sqnr_db is None or not math.isfinite(row.input_sqnr_db) or not math.isfinite(row.sqnr_db):
            continue
        node = producers.get(row.tensor)
        if node is None:
            continue
        kind = "weighted" if _weighted_producer(node, producers, compared) else "other"
        candidates.append((order[id(node)], row, row.input_sqnr_db - row.sqnr_db, kind))
    if not candidates:
        return None
    candidates.sort(key=lambda item: item[0])

    def entry(row: Any, drop: float, kind: str) -> dict[str, Any]:
        return {"node": row.node, "tensor": row.tensor, "op_type": row.op_type, "input_sqnr_db": round(row.input_sqnr_db, 3),
                "sqnr_db": round(row.sqnr_db, 3), "drop_db": round(drop, 3), "kind": kind, "options": _HINTS[kind]}

    first = next((item for item in candidates if item[2] >= DROP_DB and item[1].sqnr_db < QUIET_DB), None)
    largest = sorted(candidates, key=lambda item: -item[2])[:top]
    return {
        "rule": f"first layer in graph order whose SQNR drops by >= {DROP_DB:g} dB against its inputs "
                f"while below {QUIET_DB:g} dB",
        "first_bad_layer": entry(first[1], first[2], first[3]) if first is not None else None,
        "largest_drops": [entry(row, drop, kind) for _, row, drop, kind in largest],
    }
