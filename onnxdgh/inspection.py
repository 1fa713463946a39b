"""Readiness report for zero-shot quantization (``onnxdgh inspect``).

Contract: :func:`inspect_model` looks at a loaded, canonical model without running it
and says whether DGH can work on it: inputs/outputs, opset, op histogram, every
BatchNormalization node and whether its statistics are usable, whether BN looks folded
away (and the re-export recipe), which generation method ``--method auto`` will use and
the quality to expect (a model without BN statistics is ready: it gets procedural images),
the ops onnx2torch cannot convert, the custom ops onnxruntime cannot run, whether
generation with the default settings fits in memory, and a verdict.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from .load import REEXPORT_RECIPE, LoadedModel
from .memory import estimate_run_memory, memory_advice
from .runtime import describe_nodes, unknown_runtime_ops

__all__ = ["InspectionReport", "inspect_model", "unconvertible_ops"]


@dataclass(frozen=True)
class InspectionReport:
    """What ``onnxdgh inspect`` reports; :meth:`to_dict` is its JSON form."""

    source: str
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    batch_fixed: bool
    op_histogram: dict[str, int]
    batch_norms: list[dict[str, Any]]
    bn_folded: bool
    unconvertible_ops: list[dict[str, Any]]
    canonicalisation: dict[str, int]
    metadata: dict[str, str]
    ready: bool
    generation: str = ""
    reasons: list[str] = field(default_factory=list)
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)


def _shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    dims: list[int | str | None] = []
    if value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape"):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif dim.dim_param:
                dims.append(dim.dim_param)
            else:
                dims.append(None)
    return dims


def _dtype(value: onnx.ValueInfoProto) -> str:
    if value.type.HasField("tensor_type"):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return "unknown"


def unconvertible_ops(model: onnx.ModelProto, opset: int) -> list[dict[str, Any]]:
    """Nodes whose (op type, opset) has no onnx2torch converter, one entry per op type."""
    from onnx2torch.node_converters.registry import get_converter

    import onnx2torch  # noqa: F401  (registers the converters)

    domains = {entry.domain: int(entry.version) for entry in model.opset_import}
    missing: dict[tuple[str, str], dict[str, Any]] = {}
    for node in model.graph.node:
        domain = node.domain or ""
        version = domains.get(domain, opset) if domain else opset
        key = (domain, node.op_type)
        if key in missing:
            missing[key]["nodes"].append(node.name)
            continue
        try:
            get_converter(node.op_type, version, domain or onnx.defs.ONNX_DOMAIN)
        except NotImplementedError:
            missing[key] = {"op_type": node.op_type, "domain": domain, "version": version, "nodes": [node.name]}
    return list(missing.values())


def inspect_model(loaded: LoadedModel) -> InspectionReport:
    """Build the readiness report for ``loaded``."""
    graph = loaded.model.graph
    inits = {init.name for init in graph.initializer}
    histogram = Counter(node.op_type for node in graph.node)
    bns = [
        {
            "node": bn.node_name,
            "input": bn.input_name,
            "channels": bn.channels,
            "usable": bn.usable,
            "problem": bn.problem,
        }
        for bn in loaded.bn_nodes
    ]
    convs_with_bias = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 2 and n.input[2]]
    has_conv = any(n.op_type in ("Conv", "ConvTranspose") for n in graph.node)
    bn_folded = not loaded.bn_nodes and bool(convs_with_bias)
    missing = unconvertible_ops(loaded.model, loaded.opset)

    reasons: list[str] = []
    advice: list[str] = []
    if not loaded.usable_bn_nodes:  # ready all the same: --method auto falls back to procedural images
        advice.append(f"for full DGH quality, re-export a trained model in eval mode with BN kept: {REEXPORT_RECIPE}")
        if loaded.input_normalization() is None:
            advice.append("without BN the input normalisation cannot be inferred: give --preprocess NAME or "
                          "--mean/--std (or store it in the model's metadata)")
    unrunnable = unknown_runtime_ops(loaded.model)
    if unrunnable:
        reasons.append(f"onnxruntime cannot run {describe_nodes(unrunnable)}: nothing can be calibrated or quantized")
        advice.append("replace the custom ops with standard ONNX ops at export time")
    if missing:
        ops = ", ".join(f"{m['op_type']} (opset {m['version']}, e.g. node {m['nodes'][0]!r})" for m in missing)
        reasons.append(f"onnx2torch cannot convert: {ops}")
        if not unrunnable:  # --calib-data skips the conversion, not onnxruntime
            advice.append("replace these ops at export time, or calibrate with your own images: onnxdgh quantize --calib-data")
    from .generate.config import GenerateConfig  # torch comes with it, as with unconvertible_ops
    from .generate.method import expected_quality

    defaults = GenerateConfig()  # the verdict is for `onnxdgh generate`'s default images and batch size
    memory = estimate_run_memory(loaded, images=defaults.images, batch_size=defaults.batch_size)
    if not memory.fits:
        reasons.append(f"generation with the default settings: {memory.describe()}")
        advice.append(memory_advice(loaded, memory))
    if not has_conv and not any(n.op_type in ("Gemm", "MatMul") for n in graph.node):
        reasons.append("the graph has no Conv, Gemm or MatMul: nothing to quantize")

    inputs = [
        {"name": v.name, "shape": _shape(v), "dtype": _dtype(v)} for v in graph.input if v.name not in inits
    ]
    outputs = [{"name": v.name, "shape": _shape(v), "dtype": _dtype(v)} for v in graph.output]
    return InspectionReport(
        source=loaded.source,
        opset=loaded.opset,
        inputs=inputs,
        outputs=outputs,
        batch_fixed=loaded.batch_fixed,
        op_histogram=dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        batch_norms=bns,
        bn_folded=bn_folded,
        unconvertible_ops=missing,
        canonicalisation=dict(loaded.canonicalisation),
        metadata=dict(loaded.metadata),
        ready=not reasons,
        generation=expected_quality(loaded),
        reasons=reasons,
        advice=advice,
    )
