"""Numerical comparison of a quantized QDQ model with its float reference, in onnxruntime.

Contract:
* :func:`compare` runs both models on the same images, batch by batch, and returns
  per-output metrics (SQNR, cosine similarity, the output's agreement metric
  (:mod:`~onnxdgh.validation.metrics`) and accuracies, the SQNR between onnxruntime's
  optimised and unoptimised runs of the quantized graph) and per-layer SQNR between
  matching float and quantized intermediate tensors, sorted worst first.
* Memory is bounded by one batch: only running sums (and arg-max indices of
  classifier outputs) are kept across batches.
* Matching is structural: a quantized activation's DequantizeLinear output is compared
  with the float tensor its QuantizeLinear stands for (``checks.QParams.source``), found
  in the reference by name. When that float tensor only feeds a BatchNormalization
  that the quantized graph no longer has, the BN's output is compared instead: after BN
  folding, the Conv output carries the BN output's values.

Definitions (x float, y quantized, sums over all elements of all images):
  SQNR = 10 log10( sum x^2 / sum (x - y)^2 ) dB (infinite when y == x exactly);
  cosine = mean over images of <x_i, y_i> / (|x_i| |y_i|).

Each layer row also carries the SQNR of what its producer reads (``input_sqnr_db``) and
the drop against it; :mod:`onnxdgh.validation.diagnose` names the first layer where the
error is made from these rows (``NumericReport.diagnosis``).

When onnxruntime cannot load or run the quantized model, that is the model failing a
check (:class:`~onnxdgh.errors.CheckFailedError`, exit 1); for the reference it is bad
input (:class:`~onnxdgh.errors.InvalidInputError`, exit 2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np
import onnx
from ..progress import progress_bar

from .. import graph as g
from ..errors import CheckFailedError, InvalidInputError, exception_line
from ..runtime import make_session, with_extra_outputs
from .checks import QuantGraph
from .diagnose import diagnose, input_sqnr
from .metrics import DEFAULT_IOU_THRESHOLD, IouAccumulator, SequenceAccumulator, fits

__all__ = ["OutputMetrics", "LayerMetrics", "NumericReport", "compare", "match_layers", "sqnr_db"]

_LOG = logging.getLogger(__name__)


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): +inf for zero noise, -inf for zero signal with noise."""
    if noise <= 0.0:
        return math.inf
    if signal <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _json_db(value: float) -> float | None:
    # JSON has no infinity: an exact match is written as null with "exact": true.
    return round(value, 3) if math.isfinite(value) else None


@dataclass(frozen=True)
class OutputMetrics:
    """How one graph output of the quantized model compares with the float model's."""

    name: str
    sqnr_db: float
    cosine: float
    max_abs_error: float
    top1_agreement: float | None
    float_accuracy: float | None
    quantized_accuracy: float | None
    runtime_sqnr_db: float
    """Optimised (what ships) vs unoptimised (exact QDQ simulation) onnxruntime results."""
    runtime_top1_agreement: float | None = None
    """Share of images whose arg-max class the optimised run and the exact simulation agree on
    (classifier-like outputs only)."""
    metric: str | None = None
    """The agreement metric of this output (``top1``, ``iou``, ``sequence``) or None."""
    iou: float | None = None
    """Pooled IoU of the thresholded float and quantized maps (``iou`` outputs)."""
    iou_threshold: float | None = None
    """Where the maps were cut (``iou`` outputs)."""
    sequence_agreement: float | None = None
    """1 - edits / characters between the greedy-CTC decodings (``sequence`` outputs)."""
    sequence_exact: float | None = None
    """Share of images decoded to the identical sequence (``sequence`` outputs)."""

    @property
    def agreement(self) -> float | None:
        """The value of this output's agreement metric (None without one)."""
        return {"top1": self.top1_agreement, "iou": self.iou, "sequence": self.sequence_agreement}.get(
            self.metric or "")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (infinite SQNR is null with ``exact`` true)."""
        return {
            "name": self.name,
            "sqnr_db": _json_db(self.sqnr_db),
            "exact": self.sqnr_db == math.inf,
            "cosine": round(self.cosine, 6),
            "max_abs_error": float(self.max_abs_error),
            "top1_agreement": self.top1_agreement,
            "float_accuracy": self.float_accuracy,
            "quantized_accuracy": self.quantized_accuracy,
            "runtime_sqnr_db": _json_db(self.runtime_sqnr_db),
            "runtime_exact": self.runtime_sqnr_db == math.inf,
            "runtime_top1_agreement": self.runtime_top1_agreement,
            "metric": self.metric,
            "agreement": self.agreement,
            "iou": self.iou,
            "iou_threshold": self.iou_threshold,
            "sequence_agreement": self.sequence_agreement,
            "sequence_exact": self.sequence_exact,
        }


@dataclass(frozen=True)
class LayerMetrics:
    """How one quantized intermediate tensor compares with its float counterpart."""

    tensor: str
    quantized_tensor: str
    node: str
    op_type: str
    bits: int | None
    sqnr_db: float
    cosine: float
    input_sqnr_db: float | None = None
    """SQNR of the tensors the producer reads (:func:`~onnxdgh.validation.diagnose.input_sqnr`)."""

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (infinite SQNR is null with ``exact`` true)."""
        drop = None
        if self.input_sqnr_db is not None and math.isfinite(self.input_sqnr_db) and math.isfinite(self.sqnr_db):
            drop = round(self.input_sqnr_db - self.sqnr_db, 3)
        return {
            "tensor": self.tensor,
            "quantized_tensor": self.quantized_tensor,
            "node": self.node,
            "op_type": self.op_type,
            "bits": self.bits,
            "sqnr_db": _json_db(self.sqnr_db),
            "exact": self.sqnr_db == math.inf,
            "cosine": round(self.cosine, 6),
            "input_sqnr_db": _json_db(self.input_sqnr_db) if self.input_sqnr_db is not None else None,
            "sqnr_drop_db": drop,
        }


@dataclass(frozen=True)
class NumericReport:
    """Per-output and per-layer (worst first) metrics over ``images`` images."""

    images: int
    outputs: tuple[OutputMetrics, ...]
    layers: tuple[LayerMetrics, ...]
    unmatched: tuple[str, ...]
    """Quantized activation tensors with no float counterpart (not in ``layers``)."""
    diagnosis: dict[str, object] | None = None
    """Where the error is made (:func:`~onnxdgh.validation.diagnose.diagnose`)."""


@dataclass(frozen=True)
class _Pair:
    float_tensor: str
    quant_tensor: str
    node: str
    op_type: str
    bits: int | None


def match_layers(float_model: onnx.ModelProto, qgraph: QuantGraph) -> tuple[list[_Pair], list[str]]:
    """Pairs (float tensor, quantized DQ output) for every quantized activation, and the unmatched."""
    fgraph = float_model.graph
    producers = g.producer_map(fgraph)
    consumers = g.consumer_map(fgraph)
    float_names = set(producers) | set(g.graph_input_names(fgraph))
    quant_has_bn = any(node.op_type == "BatchNormalization" for node in qgraph.graph.node)
    graph_outputs = set(g.graph_output_names(qgraph.graph))
    pairs: list[_Pair] = []
    unmatched: list[str] = []
    for dq in qgraph.activation_dequantizers():
        if dq.output in graph_outputs:
            continue  # graph outputs are reported as outputs
        candidates = [name for name in (dq.source, dq.output) if name]
        if dq.source and dq.source.endswith("_prequant"):
            candidates.append(dq.source[: -len("_prequant")])
        found = next((name for name in candidates if name in float_names), None)
        if found is None:
            unmatched.append(dq.output)
            continue
        users = consumers.get(found, [])
        if not quant_has_bn and len(users) == 1 and users[0].op_type == "BatchNormalization":
            found = users[0].output[0]
        producer = producers.get(found)
        node_name = (producer.name or found) if producer is not None else "(graph input)"
        op_type = producer.op_type if producer is not None else "Input"
        pairs.append(_Pair(found, dq.output, node_name, op_type, dq.bits))
    return pairs, unmatched


_T = TypeVar("_T")


def _guard(action: Callable[[], _T], reference: bool) -> _T:
    """Run an onnxruntime call; its failure is bad input for the reference, a failed check for the quantized model."""
    try:
        return action()
    except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
        first = exception_line(exc, limit=400)
        if reference:
            raise InvalidInputError(
                f"onnxruntime cannot run the reference model: {first}",
                "give a float model that onnxruntime runs (onnxdgh inspect shows what is wrong)",
            ) from exc
        raise CheckFailedError(
            f"onnxruntime cannot run the quantized model: {first}",
            "the QDQ graph is not runnable; re-quantize it, or run onnxdgh validate without --reference for the structural checks",
        ) from exc


@dataclass
class _Accumulator:
    """Running sums for SQNR, cosine and max error of one tensor pair."""

    signal: float = 0.0
    noise: float = 0.0
    cosine_sum: float = 0.0
    count: int = 0
    max_abs: float = 0.0

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        x64 = np.asarray(x, np.float64).reshape(x.shape[0], -1)
        y64 = np.asarray(y, np.float64).reshape(y.shape[0], -1)
        diff = x64 - y64
        self.signal += float(np.sum(x64 * x64))
        self.noise += float(np.sum(diff * diff))
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(np.abs(diff))))
        x_norm, y_norm = np.linalg.norm(x64, axis=1), np.linalg.norm(y64, axis=1)
        norms = x_norm * y_norm
        dots = np.sum(x64 * y64, axis=1)
        # Two all-zero vectors agree perfectly; one zero vector against a non-zero one does not.
        both_zero = (x_norm == 0) & (y_norm == 0)
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
        self.cosine_sum += float(np.sum(cos))
        self.count += x64.shape[0]

    @property
    def sqnr(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        return self.cosine_sum / self.count if self.count else float("nan")


def compare(
    float_model: onnx.ModelProto,
    quant_model: onnx.ModelProto,
    images: np.ndarray,
    *,
    output_pairs: Sequence[tuple[str, str]],
    qgraph: QuantGraph,
    labels: np.ndarray | None = None,
    batch_size: int = 32,
    progress: bool = False,
    metric: str = "auto",
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
) -> NumericReport:
    """Run both models on ``images`` and measure how far the quantized one strays.

    ``output_pairs`` maps float output names to quantized output names. ``batch_size``
    must already respect a fixed batch dimension of either graph. ``metric`` (one of
    :data:`~onnxdgh.validation.metrics.METRICS`) chooses each output's agreement metric
    by the rule of :mod:`onnxdgh.validation.metrics`; ``iou_threshold`` cuts probability maps.

    Raises:
        InvalidInputError: ``metric`` names a metric that no output's shape fits.
    """
    pairs, unmatched = match_layers(float_model, qgraph)
    quant_outputs = [q for _, q in output_pairs]
    float_layer_names = list(dict.fromkeys(p.float_tensor for p in pairs))
    quant_layer_names = [p.quant_tensor for p in pairs]

    float_session = _guard(lambda: make_session(with_extra_outputs(float_model, float_layer_names), optimize=False), True)
    sim_session = _guard(lambda: make_session(with_extra_outputs(quant_model, quant_layer_names), optimize=False), False)
    ship_session = _guard(lambda: make_session(quant_model, optimize=True), False)
    # the outputs first, then the layers that are not outputs (each tensor once)
    f_fetch = list(dict.fromkeys([*(f for f, _ in output_pairs), *float_layer_names]))
    q_fetch = list(dict.fromkeys([*quant_outputs, *quant_layer_names]))
    f_input = float_session.get_inputs()[0].name
    q_input = sim_session.get_inputs()[0].name

    out_acc = [_Accumulator() for _ in output_pairs]
    runtime_acc = [_Accumulator() for _ in output_pairs]
    layer_acc = [_Accumulator() for _ in pairs]
    skipped: set[int] = set()
    # per top-1 output and batch: the arg-max classes of the float, shipped and simulated runs
    argmax: list[list[tuple[np.ndarray, ...]]] = [[] for _ in output_pairs]
    kinds: list[str | None] | None = None  # each output's metric, from the first batch's shapes
    task_acc: list[IouAccumulator | SequenceAccumulator | None] = [None for _ in output_pairs]

    steps = range(0, images.shape[0], batch_size)
    for start in progress_bar(steps, enabled=progress, desc="validate", unit="batch"):
        batch = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
        f_values = dict(zip(f_fetch, _guard(lambda: float_session.run(f_fetch, {f_input: batch}), True)))
        q_values = dict(zip(q_fetch, _guard(lambda: sim_session.run(q_fetch, {q_input: batch}), False)))
        shipped = _guard(lambda: ship_session.run(quant_outputs, {q_input: batch}), False)
        if kinds is None:
            kinds = _choose_metrics(metric, [(q, f_values[f].shape) for f, q in output_pairs])
            task_acc = [IouAccumulator(iou_threshold) if kind == "iou" else SequenceAccumulator() if kind == "sequence"
                        else None for kind in kinds]
        for index, (f_name, q_name) in enumerate(output_pairs):
            x, y_sim, y = f_values[f_name], q_values[q_name], shipped[index]
            out_acc[index].add(x, y)
            runtime_acc[index].add(y_sim, y)
            if kinds[index] == "top1":
                argmax[index].append(tuple(np.argmax(v, axis=1) for v in (x, y, y_sim)))
            accumulator = task_acc[index]
            if accumulator is not None:
                accumulator.add(x, y)
        for index, pair in enumerate(pairs):
            x, y = f_values[pair.float_tensor], q_values[pair.quant_tensor]
            if x.shape == y.shape:
                layer_acc[index].add(x, y)
            elif index not in skipped:
                _LOG.info("layer %s: float shape %s vs quantized %s; not compared",
                          pair.float_tensor, x.shape, y.shape)
                skipped.add(index)

    outputs = []
    for index, (f_name, q_name) in enumerate(output_pairs):
        agreement = f_acc = q_acc = runtime_agreement = None
        kind = kinds[index] if kinds else None
        task: dict[str, float | str | None] = {}
        accumulator = task_acc[index]
        if isinstance(accumulator, IouAccumulator):
            if metric == "auto" and not accumulator.probability_map:
                _LOG.info("output %s is N x 1 x H x W but its float values span %.3g..%.3g, not a probability map: "
                          "no IoU (--metric iou measures it anyway)", q_name, accumulator.low, accumulator.high)
                kind = None
            else:
                task = {"iou": accumulator.value, "iou_threshold": accumulator.threshold}
        elif isinstance(accumulator, SequenceAccumulator):
            task = {"sequence_agreement": accumulator.value, "sequence_exact": accumulator.exact_share}
        if kind == "top1" and argmax[index]:
            top_f, top_q, top_sim = (np.concatenate(runs) for runs in zip(*argmax[index]))
            agreement = float(np.mean(top_f == top_q))
            runtime_agreement = float(np.mean(top_sim == top_q))
            if labels is not None:
                f_acc = float(np.mean(top_f == labels))
                q_acc = float(np.mean(top_q == labels))
        outputs.append(
            OutputMetrics(q_name, out_acc[index].sqnr, out_acc[index].cosine, out_acc[index].max_abs, agreement,
                          f_acc, q_acc, runtime_acc[index].sqnr, runtime_agreement, metric=kind, **task)  # type: ignore[arg-type]
        )
    layers = [
        LayerMetrics(pair.float_tensor, pair.quant_tensor, pair.node, pair.op_type, pair.bits,
                     layer_acc[index].sqnr, layer_acc[index].cosine)
        for index, pair in enumerate(pairs)
        if index not in skipped
    ]
    upstream = input_sqnr(float_model, {layer.tensor: layer.sqnr_db for layer in layers})
    layers = [replace(layer, input_sqnr_db=upstream.get(layer.tensor)) for layer in layers]
    layers.sort(key=lambda item: item.sqnr_db)
    unmatched_all = tuple(unmatched) + tuple(pairs[index].quant_tensor for index in sorted(skipped))
    return NumericReport(int(images.shape[0]), tuple(outputs), tuple(layers), unmatched_all,
                         diagnose(float_model, layers))


def _choose_metrics(metric: str, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> list[str | None]:
    """Each output's metric from its float shape (the rule of :mod:`onnxdgh.validation.metrics`);
    ``iou`` under ``auto`` is still subject to the value-range check at the end."""
    if metric == "auto":
        return [next((kind for kind in ("top1", "sequence", "iou") if fits(kind, shape)), None) for _, shape in shapes]
    chosen = [metric if fits(metric, shape) else None for _, shape in shapes]
    if not any(chosen):
        layouts = {"top1": "N x K class scores", "iou": "an N x 1 x H x W map", "sequence": "N x T x C step scores"}
        found = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes)
        raise InvalidInputError(
            f"--metric {metric} reads {layouts[metric]}, and no output has that shape ({found})",
            "use --metric auto, or the metric that fits the model's output",
        )
    return chosen
