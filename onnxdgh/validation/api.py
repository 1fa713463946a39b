"""The validation entry point: structure against a profile, numbers against the float model.

Contract:
* :func:`validate` takes a quantized QDQ model (path or ``ModelProto``), an optional
  float reference, a :class:`ValidateConfig` and optional images/labels, and returns a
  frozen :class:`ValidationReport`. A failing model is *reported*, never raised; bad input
  (unreadable models, images that do not fit, a gate that cannot apply) raises an
  :class:`~onnxdgh.errors.OnnxDghError` subclass (exit code 2 in the CLI).
* ``passed``: no structural violation, every gate holds and, with a reference,
  onnxruntime's optimised session (what ships) stays within :data:`RUNTIME_MIN_AGREEMENT` /
  :data:`RUNTIME_MIN_SQNR_DB` of the exact QDQ simulation (the ``runtime-*`` checks, whose
  hint names the fix; not for ``--weights-as-float`` models, which onnxruntime re-quantizes
  its own way). With a reference the gates are the profile's floors, or the
  :class:`ValidateConfig` gates that replace them (docs/VALIDATE.md, "Floors").
* A ``--weights-as-float`` model (:mod:`onnxdgh.quantization.float_weights`) is checked as
  the integer + DequantizeLinear model its grid record describes; a constant off its grid
  is a ``weight-off-grid`` violation.
* Without ``data``, the numerical report runs on seeded random images: uniform pixels
  mapped through the model's ``input_mean``/``input_std`` metadata when present,
  standard normal values otherwise. The report says which, and records the sha256 of
  the quantized and the reference model files it judged.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import InvalidInputError
from ..fileio import check_images
from ..load import LoadedModel, load_model, load_model_proto
from ..profile import DEFAULT_PROFILE, Profile, builtin_profile_names, load_profile
from ..quantization.float_weights import WEIGHT_FORMAT_KEY
from .checks import Violation, analyse, check_model
from .metrics import (
    DEFAULT_IOU_THRESHOLD, METRIC_NAMES, TASK_METRICS, check_metric, check_threshold,
)
from .report import LayerMetrics, NumericReport, OutputMetrics, compare

__all__ = [
    "GateResult",
    "DataInfo",
    "ValidationReport",
    "ValidateConfig",
    "validate",
    "REPORT_SCHEMA",
    "PROFILE_METADATA_KEY",
    "RUNTIME_MIN_AGREEMENT",
    "RUNTIME_MIN_SQNR_DB",
    "RUNTIME_HINT",
]

_LOG = logging.getLogger(__name__)

PROFILE_METADATA_KEY = "onnxdgh.profile"
"""``metadata_props`` key where ``onnxdgh quantize`` records the profile it built for."""

REPORT_SCHEMA = "onnxdgh-validation-report/3"
"""Identifier of the JSON report layout (bumped when fields change meaning)."""


RUNTIME_MIN_AGREEMENT = 0.995
"""Floor of the ``runtime-agreement`` check: top-1 agreement between onnxruntime's optimised
session (what ships) and its exact QDQ simulation, on the validation images."""
RUNTIME_MIN_SQNR_DB = 40.0
"""Floor of the ``runtime-sqnr`` check (dB, optimised session against the exact simulation).
Measured (docs/BENCHMARKS.md, "Runtimes"): identical wherever the integer kernels cannot
overflow (VNNI CPUs; 7-bit weights on AVX2); on AVX2 without VNNI, W8A8 gives 35.6-42.3 dB
on the samples, 21.4 dB with DGH calibration (issue 18), 61.5 dB on the tests' tiny model."""
RUNTIME_HINT = (
    "onnxruntime's optimised (shipping) path departs from the exact QDQ simulation on this CPU; on x86 "
    "without VNNI its u8 x s8 kernels saturate: quantize with --profile ort-x86-avx2 (7-bit weights)"
)


@dataclass(frozen=True)
class ValidateConfig:
    """Validation settings; one ``onnxdgh validate`` option per field, validated on construction.

    Attributes:
        profile: a :class:`~onnxdgh.profile.Profile`, a built-in name or a profile JSON path
            (``--profile``); None uses the built-in named in the model's ``onnxdgh.profile``
            metadata (what ``onnxdgh quantize`` built it for), else ``generic-pot-int8``.
        min_sqnr: gate: every output's SQNR (dB) must reach this (``--min-sqnr``); replaces
            the profile's ``min_output_sqnr_db`` floor. None: the floor applies.
        min_agreement: gate, 0..1: every output's agreement metric (top-1, IoU or sequence
            agreement) must reach this (``--min-agreement``); replaces the profile's
            ``min_top1_agreement`` floor, which applies to top-1 outputs and, on given
            images, to IoU and sequence outputs in place of their SQNR floor.
        metric: ``auto``, ``top1``, ``iou`` or ``sequence`` (``--metric``): each output's
            agreement metric, by the rule of :mod:`onnxdgh.validation.metrics`.
        iou_threshold: where probability maps are cut for ``iou`` (``--iou-threshold``).
        random_images: how many seeded random images to use without data (``--random-images``).
        seed: their seed (``--seed``).
        batch_size: images per onnxruntime run (``--batch-size``; a fixed batch dimension
            overrides it).
        input_shape: C x H x W pinning symbolic input dimensions of both models (``--input-shape``).
    """

    profile: Profile | str | os.PathLike[str] | None = None
    min_sqnr: float | None = None
    min_agreement: float | None = None
    metric: str = "auto"
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    random_images: int = 64
    seed: int = 0
    batch_size: int = 32
    input_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for name, low, high in (("min_sqnr", -1000.0, 1000.0), ("min_agreement", 0.0, 1.0)):
            option = "--" + name.replace("_", "-")
            object.__setattr__(self, name, _check_gate(option, getattr(self, name), low, high))
        object.__setattr__(self, "metric", check_metric(self.metric))
        object.__setattr__(self, "iou_threshold", check_threshold(self.iou_threshold))
        for name, low in (("random_images", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                option = "--" + name.replace("_", "-")
                raise InvalidInputError(f"{option} {value!r} is not an integer >= {low}", f"give e.g. {option} {max(low, 8)}")
        shape = self.input_shape
        if shape is not None and (not isinstance(shape, tuple) or len(shape) != 3 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
            raise InvalidInputError(f"--input-shape {shape!r} is not three positive integers", "give e.g. --input-shape 3x48x192")
        if self.profile is not None and not isinstance(self.profile, (Profile, str, os.PathLike)):
            raise InvalidInputError(f"profile {self.profile!r} is not a Profile, a name or a path",
                                    "give a built-in name (onnxdgh validate --list-profiles) or a .json path")
        if isinstance(self.profile, str) and not self.profile.strip():
            raise InvalidInputError("--profile is empty", "give a built-in name or a .json path")


@dataclass(frozen=True)
class GateResult:
    """One ``--min-sqnr`` / ``--min-agreement`` comparison, or a ``runtime-*`` drift check, on one output."""

    gate: str
    output: str
    threshold: float
    value: float | None
    passed: bool
    origin: str = "option"
    """``option`` (``--min-sqnr``/``--min-agreement``), ``profile`` (the profile's floor) or
    ``runtime`` (a ``runtime-*`` drift check)."""
    hint: str | None = None
    """What to do when the check fails (set for the ``runtime-*`` checks)."""
    metric: str | None = None
    """The agreement metric an ``*-agreement`` gate reads (``top1``, ``iou``, ``sequence``)."""

    @property
    def measure(self) -> str:
        """What the gate compares: ``SQNR``, ``top-1 agreement``, ``IoU`` or ``sequence agreement``."""
        return "SQNR" if self.gate.endswith("-sqnr") else METRIC_NAMES[self.metric or "top1"]

    def describe(self, profile: str) -> str:
        """One phrase: the figure, the threshold and where it comes from."""
        source = {"profile": f"the floor of profile {profile}",
                  "runtime": "onnxruntime's optimised session against the exact QDQ simulation"}.get(
            self.origin, f"--{self.gate}")
        if self.gate.endswith("-sqnr"):
            value = "nan" if self.value is None else f"{self.value:.2f}"
            return f"output {self.output!r} has SQNR {value} dB, below {self.threshold:g} dB ({source})"
        value = "-" if self.value is None else f"{100 * self.value:.2f} %"
        return f"output {self.output!r} has {self.measure} {value}, below {100 * self.threshold:g} % ({source})"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (an infinite or NaN SQNR is null; ``hint`` only when set)."""
        value = self.value if self.value is None or math.isfinite(self.value) else None
        data: dict[str, object] = {"gate": self.gate, "output": self.output, "threshold": self.threshold,
                                   "value": value, "passed": self.passed, "origin": self.origin}
        if self.metric is not None:
            data["metric"] = self.metric
        if self.hint is not None:
            data["hint"] = self.hint
        return data


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
        return asdict(self)


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
    runtime_checks: tuple[GateResult, ...] = ()
    """The ``runtime-agreement`` / ``runtime-sqnr`` drift checks (with a reference; part of ``passed``)."""
    model_sha256: str | None = None
    """sha256 of the quantized model file judged (of its serialized bytes when given in memory)."""
    reference_sha256: str | None = None
    """sha256 of the reference model file (None without a reference)."""
    diagnosis: Mapping[str, Any] | None = None
    """Where the error is made: the first layer whose SQNR drops against its inputs (validate.diagnose)."""

    @property
    def violation_counts(self) -> dict[str, int]:
        """Violations per rule id."""
        return dict(Counter(violation.rule for violation in self.violations))

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        """Gates that did not hold."""
        return tuple(gate for gate in self.gates if not gate.passed)

    @property
    def failed_runtime_checks(self) -> tuple[GateResult, ...]:
        """Runtime drift checks that did not hold."""
        return tuple(check for check in self.runtime_checks if not check.passed)

    def failure_lines(self, worst: int = 3) -> list[str]:
        """Why the model fails, one line per problem: the violations by rule, then each
        failed gate with its figure, threshold, the images and the ``worst`` lowest-SQNR layers."""
        lines: list[str] = []
        if self.violations:
            counts = ", ".join(f"{rule} {n}" for rule, n in sorted(self.violation_counts.items()))
            lines.append(f"{len(self.violations)} violation(s) of profile {self.profile.name}: {counts}")
        layers = ", ".join(
            f"{m.tensor} ({m.sqnr_db:.1f} dB)" if math.isfinite(m.sqnr_db) else f"{m.tensor} ({m.sqnr_db})"
            for m in self.layers[: max(0, worst)]
        )
        where = f" on {self.data.description}" if self.data else ""
        for gate in self.failed_gates:
            lines.append(gate.describe(self.profile.name) + where + (f"; worst layers: {layers}" if layers else ""))
        for check in self.failed_runtime_checks:
            lines.append(check.describe(self.profile.name) + where)
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (layout :data:`REPORT_SCHEMA`)."""
        return {
            "schema": REPORT_SCHEMA,
            "passed": self.passed,
            "model": self.model,
            "reference": self.reference,
            "model_sha256": self.model_sha256,
            "reference_sha256": self.reference_sha256,
            "profile": {
                "name": self.profile.name,
                "summary": self.profile.summary(),
                "min_output_sqnr_db": self.profile.min_output_sqnr_db,
                "min_top1_agreement": self.profile.min_top1_agreement,
            },
            "violation_counts": self.violation_counts,
            "violations": [violation.to_dict() for violation in self.violations],
            "gates": [gate.to_dict() for gate in self.gates],
            "runtime_checks": [check.to_dict() for check in self.runtime_checks],
            "data": self.data.to_dict() if self.data else None,
            "outputs": [output.to_dict() for output in self.outputs],
            "layers": [layer.to_dict() for layer in self.layers],
            "unmatched_layers": list(self.unmatched_layers),
            "diagnosis": dict(self.diagnosis) if self.diagnosis else None,
            "quantization": dict(self.quantization),
        }


# ---------------------------------------------------------------------- inputs


def _load(
    model: LoadedModel | onnx.ModelProto | str | os.PathLike[str], what: str, input_shape: tuple[int, int, int] | None,
    shipped: bool = False,
) -> LoadedModel:
    """``model`` loaded; ``shipped``: keep it as written too (the quantized model, whose file the rules check)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, onnx.ModelProto):
        return load_model_proto(model, source=f"<{what} in memory>", input_shape=input_shape, keep_as_written=shipped)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, input_shape=input_shape, keep_as_written=shipped)
    raise InvalidInputError(
        f"the {what} model is a {type(model).__name__}",
        "pass a path, an onnx.ModelProto or an onnxdgh.LoadedModel",
    )


def _sha256(model: object) -> str:
    """sha256 of the file a model came from, else of its serialized bytes."""
    if isinstance(model, LoadedModel):
        model = Path(model.source) if Path(model.source).is_file() else model.model
    if isinstance(model, onnx.ModelProto):
        return hashlib.sha256(model.SerializeToString()).hexdigest()
    digest = hashlib.sha256()
    with open(model, "rb") as handle:  # type: ignore[call-overload]
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        "give the float model this quantized model was made from: onnxdgh validate MODEL --reference FLOAT.onnx",
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


def _runtime_checks(numeric: NumericReport) -> list[GateResult]:
    """The drift checks: onnxruntime's optimised session must compute what the exact QDQ simulation does."""
    checks = []
    for out in numeric.outputs:
        if out.runtime_top1_agreement is not None:
            value = out.runtime_top1_agreement
            checks.append(GateResult("runtime-agreement", out.name, RUNTIME_MIN_AGREEMENT, value,
                                     value >= RUNTIME_MIN_AGREEMENT, origin="runtime", hint=RUNTIME_HINT, metric="top1"))
        checks.append(GateResult("runtime-sqnr", out.name, RUNTIME_MIN_SQNR_DB, out.runtime_sqnr_db,
                                 out.runtime_sqnr_db >= RUNTIME_MIN_SQNR_DB, origin="runtime", hint=RUNTIME_HINT))
    return checks


# ------------------------------------------------------------------------- API


def validate(
    quantized: onnx.ModelProto | LoadedModel | str | os.PathLike[str],
    reference: LoadedModel | onnx.ModelProto | str | os.PathLike[str] | None = None,
    config: ValidateConfig = ValidateConfig(),
    *,
    data: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    progress: bool = False,
    data_description: str | None = None,
) -> ValidationReport:
    """Check ``quantized`` against a profile and, given a ``reference``, measure it against the float model.

    Args:
        reference: the float model ``quantized`` was made from; None skips the numerical report.
        data: N x C x H x W float images preprocessed for the model (calibration or real);
            None uses ``config.random_images`` seeded random images.
        labels: N class indices for ``data``; adds float and quantized accuracy (top-1 outputs).
        data_description: what ``data`` is, for the report (e.g. "51 held-out synthetic
            images"); default "N given images".

    Raises:
        OnnxDghError: unreadable models or profile, images or labels that do not fit,
            a gate without a reference to measure it, or a metric no output fits.
    """
    if not isinstance(config, ValidateConfig):
        raise InvalidInputError(f"config is a {type(config).__name__}", "pass an onnxdgh.validation.ValidateConfig")
    chosen = load_profile(config.profile) if config.profile is not None else None
    min_sqnr, min_agreement, input_shape = config.min_sqnr, config.min_agreement, config.input_shape
    if reference is None and (min_sqnr is not None or min_agreement is not None or data is not None or labels is not None):
        raise InvalidInputError(
            "images, labels and --min-sqnr/--min-agreement need the float reference model",
            "give the float model: onnxdgh validate MODEL --reference FLOAT.onnx",
        )
    if labels is not None and data is None:
        raise InvalidInputError("labels were given without the images they label", "give the images too: onnxdgh validate MODEL --data images.npz --labels labels.npy")
    loaded_q = _load(quantized, "quantized", input_shape, shipped=True)
    if chosen is None:
        chosen = load_profile(_profile_from_metadata(loaded_q))
    # The rules read the file as written: canonicalisation would remove an Identity or lift
    # a Constant that the shipped graph still runs in float.
    shipped = loaded_q.as_written if loaded_q.as_written is not None else loaded_q.model
    qgraph = analyse(shipped)
    violations = tuple(check_model(shipped, chosen, qgraph=qgraph))
    quantizers = qgraph.quantizers.values()
    stats = {
        "quantize_nodes": sum(p.op_type == "QuantizeLinear" for p in quantizers),
        "dequantize_nodes": sum(p.op_type == "DequantizeLinear" for p in quantizers),
        "weights_by_bits": qgraph.weight_bits_summary(),
        "activations_by_bits": qgraph.activation_bits_summary(),
        "per_channel_weights": sum(
            p.op_type == "DequantizeLinear" and p.role == "weight" and not p.per_tensor
            for p in quantizers
        ),
    }

    numeric: NumericReport | None = None
    data_info: DataInfo | None = None
    reference_source: str | None = None
    loaded_ref: LoadedModel | None = None
    if reference is not None:
        loaded_ref = _load(reference, "reference", input_shape)
        reference_source = loaded_ref.source
        if tuple(loaded_ref.input_shape) != tuple(loaded_q.input_shape):
            raise InvalidInputError(
                f"the reference takes {'x'.join(map(str, loaded_ref.input_shape))} images but the quantized model "
                f"takes {'x'.join(map(str, loaded_q.input_shape))}",
                "give the float model this quantized model was made from: onnxdgh validate MODEL --reference FLOAT.onnx",
            )
        if data is None:
            images, description = _random_images(loaded_ref, config.random_images, config.seed)
        else:
            images = check_images(data, what="validation images", input_shape=loaded_ref.input_shape)
            description = data_description or f"{images.shape[0]} given images"
        # labels come only with data (checked above)
        source = "given" if data is not None else "random"
        data_info = DataInfo(source, images.shape[0], labels is not None, description)
        numeric = compare(
            loaded_ref.model,
            loaded_q.model,
            images,
            output_pairs=_output_pairs(loaded_ref, loaded_q),
            qgraph=qgraph,
            labels=_check_labels(labels, images.shape[0]) if labels is not None else None,
            batch_size=_batch_size(loaded_ref, loaded_q, config.batch_size),
            progress=progress,
            metric=config.metric,
            iou_threshold=config.iou_threshold,
        )

    gates: list[GateResult] = []
    runtime_checks: list[GateResult] = []
    if numeric is not None:
        measured = [out for out in numeric.outputs if out.metric is not None]
        # The agreement floor needs images the model was made for: on random images a good
        # W4A4 fmnist_resnet8 agrees on 39 % of the scores (84 % on held-out synthetic
        # images, 93 % on real ones; docs/VALIDATE.md, "Floors"). Its SQNR floor still holds there.
        profile_agreement = chosen.min_top1_agreement if data is not None else None
        agree_floor = min_agreement if min_agreement is not None else profile_agreement
        # A probability map or a recogniser's per-step scores is read through its task metric,
        # which is then the verdict instead of the profile's SQNR floor: SQNR weighs every value
        # alike, not the cut or the arg-max that is read (docs/VALIDATE.md, "Task metrics").
        sqnr_floor, sqnr_origin = (min_sqnr, "option") if min_sqnr is not None else (chosen.min_output_sqnr_db, "profile")
        if sqnr_floor is not None:
            # NaN (a quantized output that is not a number) compares False: it fails.
            gates += [
                GateResult("min-sqnr", out.name, sqnr_floor, out.sqnr_db, out.sqnr_db >= sqnr_floor,
                           sqnr_origin)
                for out in numeric.outputs
                if sqnr_origin == "option" or agree_floor is None or out.metric not in TASK_METRICS
            ]
        if min_agreement is not None and not measured:
            raise InvalidInputError(
                "--min-agreement needs an output with an agreement metric (N x K class scores, an N x 1 x H x W "
                "probability map or N x T x C sequence scores), and this model has none",
                "gate on --min-sqnr instead",
            )
        # Every measured output (top1 or a task metric) is gated on agreement once a floor is set.
        agree_origin = "option" if min_agreement is not None else "profile"
        if agree_floor is not None:
            gates += [GateResult("min-agreement", out.name, agree_floor, out.agreement,
                                 out.agreement is not None and out.agreement >= agree_floor,
                                 agree_origin, metric=out.metric) for out in measured]
        if WEIGHT_FORMAT_KEY not in loaded_q.metadata:
            # A --weights-as-float model is for converters, not onnxruntime: its optimised session
            # re-quantizes the float weights its own way, so its gap says nothing about this CPU.
            runtime_checks = _runtime_checks(numeric)
    passed = not violations and all(gate.passed for gate in [*gates, *runtime_checks])
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
        runtime_checks=tuple(runtime_checks),
        model_sha256=_sha256(quantized),
        reference_sha256=_sha256(reference) if reference is not None else None,
        diagnosis=numeric.diagnosis if numeric else None,
    )
    _LOG.info(
        "validation of %s against %s: %s (%d violations, %d failed gates)",
        loaded_q.source, chosen.name, "pass" if passed else "fail", len(violations), len(report.failed_gates),
    )
    return report

