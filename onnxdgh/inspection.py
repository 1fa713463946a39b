"""Readiness report for zero-shot quantization (``onnxdgh inspect``).

Contract: :func:`inspect_model` looks at a loaded, canonical model without running it
and says whether DGH can work on it: inputs/outputs, opset, op histogram, every
BatchNormalization node and whether its statistics are usable, whether BN looks folded
away (and the re-export recipe), which generation method ``--method auto`` will use and
the quality to expect (a model without BN statistics is ready: it gets procedural images),
the ops onnx2torch cannot convert, the custom ops onnxruntime cannot run, whether
generation with the default settings fits in memory, and a verdict. The verdict includes
a dry run of the quantizer (:func:`onnxdgh.quantization.api.dry_run`: the same profile check,
BN folding and marking ``quantize`` does before it needs images), so a model ``quantize``
would refuse -- an op without a quantization rule, an op the profile forbids -- is NOT
READY, naming the node. :func:`symbolic_shape_report` gives the verdict for a model whose
image size is symbolic (not ready until ``--input-shape`` pins it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import onnx

from . import graph as g
from .load import REEXPORT_RECIPE, LoadedModel
from .memory import estimate_run_memory, memory_advice
from .ops import WEIGHTED
from .runtime import describe_nodes, unknown_runtime_ops

__all__ = ["InspectionReport", "inspect_model", "unconvertible_ops", "symbolic_shape_report"]


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
    quantizer: dict[str, Any] = field(default_factory=dict)
    """The quantizer's dry run: ``profile``, ``ok`` and either the plan's counts or the ``error``."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dictionary."""
        return asdict(self)


def _shape(value: onnx.ValueInfoProto) -> list[int | str | None]:
    if not (value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")):
        return []
    return [int(dim.dim_value) if dim.HasField("dim_value") else dim.dim_param or None
            for dim in value.type.tensor_type.shape.dim]


def _dtype(value: onnx.ValueInfoProto) -> str:
    if value.type.HasField("tensor_type"):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
    return "unknown"


def _tensors(
    values: Iterable[onnx.ValueInfoProto], skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Name, shape and dtype of each of ``values`` not named in ``skip``."""
    skipped = set(skip)
    return [{"name": v.name, "shape": _shape(v), "dtype": _dtype(v)}
            for v in values if v.name not in skipped]


def _histogram(graph: onnx.GraphProto) -> dict[str, int]:
    """Op type -> node count, most frequent first."""
    counts = Counter(node.op_type for node in graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


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


def _dry_run(loaded: LoadedModel, profile: str | None) -> tuple[dict[str, Any], str | None, str | None]:
    """(dry-run summary, reason, advice): what ``quantize`` at the profile's widest bits would say."""
    from .errors import OnnxDghError
    from .profile import DEFAULT_PROFILE, load_profile
    from .quantization.api import dry_run

    chosen = load_profile(profile or DEFAULT_PROFILE)
    summary: dict[str, Any] = {"profile": chosen.name}
    try:
        plan = dry_run(loaded, chosen)
    except OnnxDghError as exc:
        summary.update(ok=False, error=exc.message)
        return summary, f"the quantizer would refuse the model: {exc.message}", exc.hint
    summary.update(ok=True, weight_bits=plan.weight_bits, act_bits=plan.act_bits,
                   activations=len(plan.activations), params=len(plan.params))
    return summary, None, None


def inspect_model(loaded: LoadedModel, *, profile: str | None = None) -> InspectionReport:
    """Build the readiness report for ``loaded``; the quantizer's dry run uses ``profile``
    (built-in name or path; default ``generic-pot-int8``) at its widest bit widths."""
    graph = loaded.model.graph
    bns = [{"node": bn.node_name, "input": bn.input_name, "channels": bn.channels,
            "usable": bn.usable, "problem": bn.problem} for bn in loaded.bn_nodes]
    convs_with_bias = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 2 and n.input[2]]
    bn_folded = not loaded.bn_nodes and bool(convs_with_bias)
    missing = unconvertible_ops(loaded.model, loaded.opset)

    reasons: list[str] = []
    advice: list[str] = []
    if not loaded.usable_bn_nodes:  # ready all the same: --method auto falls back to procedural images
        advice.append(f"for full DGH quality, re-export a trained model in eval mode with BN kept: {REEXPORT_RECIPE}")
        if loaded.input_normalization() is None:
            advice.append("without BN the input normalisation cannot be inferred: run onnxdgh quantize with "
                          "--preprocess NAME or --mean/--std (or store it in the model's metadata)")
    unrunnable = unknown_runtime_ops(loaded.model)
    if unrunnable:
        reasons.append(f"onnxruntime cannot run {describe_nodes(unrunnable)}: nothing can be calibrated or quantized")
        advice.append("replace the custom ops with standard ONNX ops at export time")
    if missing:
        ops = ", ".join(f"{m['op_type']} (opset {m['version']}, e.g. node {m['nodes'][0]!r})" for m in missing)
        reasons.append(f"onnx2torch cannot convert: {ops}")
        if not unrunnable:  # --calib-data skips the conversion, not onnxruntime
            advice.append("replace these ops at export time, or calibrate with your own images: onnxdgh quantize --calib-data")
    from .generation.config import GenerateConfig  # torch comes with it, as with unconvertible_ops
    from .generation.method import expected_quality

    defaults = GenerateConfig()  # the verdict is for `onnxdgh generate`'s default images and batch size
    memory = estimate_run_memory(loaded, images=defaults.images, batch_size=defaults.batch_size)
    if not memory.fits:
        reasons.append(f"generation with the default settings: {memory.describe()}")
        advice.append(memory_advice(loaded, memory))
    if not any(n.op_type in WEIGHTED for n in graph.node):
        reasons.append("the graph has no Conv, Gemm or MatMul: nothing to quantize")
    quantizer, refusal, fix = _dry_run(loaded, profile)
    if refusal:
        reasons.append(refusal)
        if fix:
            advice.append(fix)
    return InspectionReport(
        source=loaded.source,
        opset=loaded.opset,
        inputs=_tensors(graph.input, skip=(init.name for init in graph.initializer)),
        outputs=_tensors(graph.output),
        batch_fixed=loaded.batch_fixed,
        op_histogram=_histogram(graph),
        batch_norms=bns,
        bn_folded=bn_folded,
        unconvertible_ops=missing,
        canonicalisation=dict(loaded.canonicalisation),
        metadata=dict(loaded.metadata),
        ready=not reasons,
        generation=expected_quality(loaded),
        reasons=reasons,
        advice=advice,
        quantizer=quantizer,
    )


def symbolic_shape_report(path: str, problem: str) -> InspectionReport:
    """NOT READY for a model the loader refused because its image size is symbolic.

    ``problem`` is the loader's message; the report lists what the raw file shows
    (opset, inputs, outputs, ops) and asks for ``--input-shape``.
    """
    model = onnx.load(path, load_external_data=False)
    graph = model.graph
    return InspectionReport(
        source=path,
        opset=g.opset_version(model) or 0,
        inputs=_tensors(graph.input, skip=(init.name for init in graph.initializer)),
        outputs=_tensors(graph.output),
        batch_fixed=False,
        op_histogram=_histogram(graph),
        batch_norms=[],
        bn_folded=False,
        unconvertible_ops=[],
        canonicalisation={},
        metadata={prop.key: prop.value for prop in model.metadata_props},
        ready=False,
        reasons=[f"{problem}: the generator and the quantizer need a fixed image size"],
        advice=[f"pin it: onnxdgh inspect {path} --input-shape CxHxW (e.g. 3x48x192, the size you will run it at)"],
    )
