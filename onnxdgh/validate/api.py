"""The validation entry point: structure against a profile, numbers against the float model.

Contract:
* :func:`validate` takes a quantized QDQ model (path or ``ModelProto``), an optional
  float reference (``LoadedModel``, ``ModelProto`` or path), a constraint profile and
  optional images/labels and gates, and returns a frozen :class:`ValidationReport`.
* ``passed`` is True when there is no structural violation and every requested gate
  holds. A failing model is *reported*, never raised; bad input (unreadable models,
  images that do not fit, a gate that cannot apply) raises an
  :class:`~onnxdgh.errors.OnnxDghError` subclass (exit code 2 in the CLI).
* Without ``data``, the numerical report runs on seeded random images: uniform pixels
  mapped through the model's ``input_mean``/``input_std`` metadata when present,
  standard normal values otherwise. The report says which.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from ..errors import InvalidInputError
from ..fileio import check_images
from ..load import LoadedModel, load_model, load_model_proto
from ..profile import DEFAULT_PROFILE, Profile, builtin_profile_names, load_profile
from .checks import Violation, analyse, check_model
from .report import LayerMetrics, NumericReport, OutputMetrics, compare

__all__ = ["GateResult", "DataInfo", "ValidationReport", "validate", "REPORT_SCHEMA", "PROFILE_METADATA_KEY"]

_LOG = logging.getLogger(__name__)

PROFILE_METADATA_KEY = "onnxdgh.profile"
"""``metadata_props`` key where ``onnxdgh quantize`` records the profile it built for."""

REPORT_SCHEMA = "onnxdgh-validation-report/1"
"""Identifier of the JSON report layout (bumped when fields change meaning)."""


@dataclass(frozen=True)
class GateResult:
    """One ``--min-sqnr`` / ``--min-agreement`` comparison on one output."""

    gate: str
    output: str
    threshold: float
    value: float | None
    passed: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (an infinite SQNR is null)."""
        value = self.value if self.value is None or math.isfinite(self.value) else None
        return {"gate": self.gate, "output": self.output, "threshold": self.threshold, "value": value, "passed": self.passed}


@dataclass(frozen=True)
class DataInfo:
    """Which images the numbers were measured on."""

    source: str
    """``given`` (images passed in) or ``random`` (seeded, no data given)."""
    count: int
    labelled: bool
    description: str

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"source": self.source, "count": self.count, "labelled": self.labelled, "description": self.description}


@dataclass(frozen=True)
class ValidationReport:
    """Everything :func:`validate` found; :meth:`to_dict` is the JSON report."""

    model: str
    reference: str | None
    profile: Profile = field(repr=False)
    violations: tuple[Violation, ...]
    outputs: tuple[OutputMetrics, ...]
    layers: tuple[LayerMetrics, ...]
    """Per-layer metrics, lowest SQNR first."""
    unmatched_layers: tuple[str, ...]
    gates: tuple[GateResult, ...]
    data: DataInfo | None
    quantization: Mapping[str, Any]
    passed: bool
    diagnosis: Mapping[str, Any] | None = None
    """Where the error is made: the first layer whose SQNR drops against its inputs (validate.diagnose)."""

    @property
    def violation_counts(self) -> dict[str, int]:
        """Violations per rule id."""
        counts: dict[str, int] = {}
        for violation in self.violations:
            counts[violation.rule] = counts.get(violation.rule, 0) + 1
        return counts

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        """Gates that did not hold."""
        return tuple(gate for gate in self.gates if not gate.passed)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (layout :data:`REPORT_SCHEMA`)."""
        return {
            "schema": REPORT_SCHEMA,
            "passed": self.passed,
            "model": self.model,
            "reference": self.reference,
            "profile": {"name": self.profile.name, "summary": self.profile.summary()},
            "violation_counts": self.violation_counts,
            "violations": [violation.to_dict() for violation in self.violations],
            "gates": [gate.to_dict() for gate in self.gates],
            "data": self.data.to_dict() if self.data else None,
            "outputs": [output.to_dict() for output in self.outputs],
            "layers": [layer.to_dict() for layer in self.layers],
            "unmatched_layers": list(self.unmatched_layers),
            "diagnosis": dict(self.diagnosis) if self.diagnosis else None,
            "quantization": dict(self.quantization),
        }


# ---------------------------------------------------------------------- inputs


def _load(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str], what: str, input_shape: tuple[int, int, int] | None
) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return load_model_proto(model, source=f"<{what} in memory>", input_shape=input_shape)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, input_shape=input_shape)
    raise InvalidInputError(
        f"the {what} model is a {type(model).__name__}",
        "pass a path, an onnx.ModelProto or an onnxdgh.LoadedModel",
    )


def _check_gate(name: str, value: float | None, low: float, high: float) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise InvalidInputError(
            f"{name} is {value!r}; it must be a number between {low:g} and {high:g}",
            "e.g. --min-sqnr 25 (dB) or --min-agreement 0.95 (share of images)",
        )
    return float(value)


def _random_images(reference: LoadedModel, count: int, seed: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(seed)
    shape = (count, *reference.input_shape)
    norm = reference.input_normalization()
    if norm is not None:
        mean, std = norm
        pixels = rng.uniform(0.0, 1.0, shape).astype(np.float32)
        images = (pixels - mean.reshape(1, -1, 1, 1)) / std.reshape(1, -1, 1, 1)
        return images.astype(np.float32), f"{count} random images (uniform pixels through the model's mean/std, seed {seed})"
    return rng.standard_normal(shape).astype(np.float32), f"{count} random images (standard normal, seed {seed})"


def _check_labels(labels: np.ndarray, count: int) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != count:
        raise InvalidInputError(
            f"labels have shape {array.shape}; one label per image ({count}) is needed",
            "give a 1-D integer array with one class index per image, in the images' order",
        )
    if not np.issubdtype(array.dtype, np.integer):
        raise InvalidInputError(f"labels have dtype {array.dtype}, not integers", "store class indices as int64")
    return array.astype(np.int64)


def _output_pairs(reference: LoadedModel, quantized: LoadedModel) -> list[tuple[str, str]]:
    ref_names, q_names = list(reference.output_names), list(quantized.output_names)
    if set(ref_names) == set(q_names):
        return [(name, name) for name in ref_names]
    if len(ref_names) == len(q_names):
        _LOG.warning("output names differ (%s vs %s); matching them by position", ref_names, q_names)
        return list(zip(ref_names, q_names))
    raise InvalidInputError(
        f"the reference has outputs {', '.join(ref_names)} but the quantized model has {', '.join(q_names)}",
        "give the float model this quantized model was made from as --reference",
    )


def _batch_size(reference: LoadedModel, quantized: LoadedModel, wanted: int) -> int:
    fixed = {int(m.batch_dim) for m in (reference, quantized) if m.batch_fixed}  # type: ignore[arg-type]
    if len(fixed) > 1:
        raise InvalidInputError(
            f"the reference and the quantized model fix different batch sizes ({sorted(fixed)})",
            "export both with the same (or a dynamic) batch dimension",
        )
    return fixed.pop() if fixed else max(1, int(wanted))


def _profile_from_metadata(loaded: LoadedModel) -> str:
    recorded = loaded.metadata.get(PROFILE_METADATA_KEY)
    if recorded is None:
        return DEFAULT_PROFILE
    if recorded in builtin_profile_names():
        _LOG.info("checking against profile %s, recorded in the model's metadata", recorded)
        return recorded
    _LOG.warning(
        "the model was quantized for profile %r, which is not built in; checking against %s "
        "(pass the profile file with --profile)", recorded, DEFAULT_PROFILE,
    )
    return DEFAULT_PROFILE


# ------------------------------------------------------------------------- API


def validate(
    quantized: onnx.ModelProto | LoadedModel | str | os.PathLike[str],
    reference: LoadedModel | onnx.ModelProto | str | os.PathLike[str] | None = None,
    *,
    profile: Profile | str | os.PathLike[str] | None = None,
    data: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    min_sqnr: float | None = None,
    min_agreement: float | None = None,
    random_images: int = 64,
    seed: int = 0,
    batch_size: int = 32,
    input_shape: tuple[int, int, int] | None = None,
    progress: bool = False,
) -> ValidationReport:
    """Check ``quantized`` against ``profile`` and, given a ``reference``, measure it against the float model.

    Args:
        quantized: the QDQ model (path, ``ModelProto`` or ``LoadedModel``).
        reference: the float model it was made from; None skips the numerical report.
        profile: a :class:`~onnxdgh.profile.Profile`, a built-in name or a profile JSON path;
            None uses the built-in named in the model's ``onnxdgh.profile`` metadata (what
            ``onnxdgh quantize`` built it for), else ``generic-pot-int8``.
        data: N x C x H x W float images preprocessed for the model (calibration or real);
            None uses ``random_images`` seeded random images.
        labels: N class indices for ``data``; adds float and quantized accuracy.
        min_sqnr: gate: every output's SQNR (dB) must reach this.
        min_agreement: gate: every classifier-like output's top-1 agreement must reach this (0..1).
        random_images, seed: how many random images to use without ``data``, and their seed.
        batch_size: images per onnxruntime run (a fixed batch dimension overrides it).
        input_shape: C x H x W pinning symbolic input dimensions of both models.
        progress: show a progress bar on stderr.

    Raises:
        OnnxDghError: unreadable models or profile, images or labels that do not fit,
            or a gate without a reference to measure it.
    """
    chosen = load_profile(profile) if profile is not None else None
    min_sqnr = _check_gate("--min-sqnr", min_sqnr, -1000.0, 1000.0)
    min_agreement = _check_gate("--min-agreement", min_agreement, 0.0, 1.0)
    if reference is None and (min_sqnr is not None or min_agreement is not None or data is not None or labels is not None):
        raise InvalidInputError(
            "images, labels and --min-sqnr/--min-agreement need the float reference model",
            "give the float model with --reference model.onnx",
        )
    if labels is not None and data is None:
        raise InvalidInputError("labels were given without the images they label", "give the images with --data")
    loaded_q = _load(quantized, "quantized", input_shape)
    if chosen is None:
        chosen = load_profile(_profile_from_metadata(loaded_q))
    qgraph = analyse(loaded_q.model)
    violations = tuple(check_model(loaded_q.model, chosen, qgraph=qgraph))
    stats = {
        "quantize_nodes": sum(1 for p in qgraph.quantizers.values() if p.op_type == "QuantizeLinear"),
        "dequantize_nodes": sum(1 for p in qgraph.quantizers.values() if p.op_type == "DequantizeLinear"),
        "weights_by_bits": qgraph.weight_bits_summary(),
        "activations_by_bits": qgraph.activation_bits_summary(),
        "per_channel_weights": sum(
            1 for p in qgraph.quantizers.values() if p.op_type == "DequantizeLinear" and p.role == "weight" and not p.per_tensor
        ),
    }

    numeric: NumericReport | None = None
    data_info: DataInfo | None = None
    reference_source: str | None = None
    if reference is not None:
        loaded_ref = _load(reference, "reference", input_shape)
        reference_source = loaded_ref.source
        if tuple(loaded_ref.input_shape) != tuple(loaded_q.input_shape):
            raise InvalidInputError(
                f"the reference takes {'x'.join(map(str, loaded_ref.input_shape))} images but the quantized model "
                f"takes {'x'.join(map(str, loaded_q.input_shape))}",
                "give the float model this quantized model was made from as --reference",
            )
        if data is None:
            if random_images < 1:
                raise InvalidInputError(f"random image count {random_images} must be at least 1", "e.g. 64")
            images, description = _random_images(loaded_ref, random_images, seed)
            data_info = DataInfo("random", images.shape[0], False, description)
        else:
            images = check_images(data, what="validation images", input_shape=loaded_ref.input_shape)
            data_info = DataInfo("given", images.shape[0], labels is not None, f"{images.shape[0]} given images")
        checked_labels = _check_labels(labels, images.shape[0]) if labels is not None else None
        step = _batch_size(loaded_ref, loaded_q, batch_size)
        numeric = compare(
            loaded_ref.model,
            loaded_q.model,
            images,
            output_pairs=_output_pairs(loaded_ref, loaded_q),
            qgraph=qgraph,
            labels=checked_labels,
            batch_size=step,
            progress=progress,
        )

    gates: list[GateResult] = []
    if numeric is not None:
        if min_sqnr is not None:
            for out in numeric.outputs:
                gates.append(GateResult("min-sqnr", out.name, min_sqnr, out.sqnr_db, out.sqnr_db >= min_sqnr))
        if min_agreement is not None:
            classifiers = [out for out in numeric.outputs if out.classifier]
            if not classifiers:
                raise InvalidInputError(
                    "--min-agreement needs a classifier-like output (N x K scores), and this model has none",
                    "gate on --min-sqnr instead",
                )
            for out in classifiers:
                value = out.top1_agreement
                gates.append(GateResult("min-agreement", out.name, min_agreement, value, value is not None and value >= min_agreement))
    passed = not violations and all(gate.passed for gate in gates)
    report = ValidationReport(
        model=loaded_q.source,
        reference=reference_source,
        profile=chosen,
        violations=violations,
        outputs=numeric.outputs if numeric else (),
        layers=numeric.layers if numeric else (),
        unmatched_layers=numeric.unmatched if numeric else (),
        gates=tuple(gates),
        data=data_info,
        quantization=stats,
        passed=passed,
        diagnosis=numeric.diagnosis if numeric else None,
    )
    _LOG.info(
        "validation of %s against %s: %s (%d violations, %d failed gates)",
        loaded_q.source, chosen.name, "pass" if passed else "fail", len(violations), len(report.failed_gates),
    )
    return report

