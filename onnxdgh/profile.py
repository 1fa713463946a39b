"""Constraint profiles: what a target accelerator accepts in a quantized ONNX QDQ model.

Contract:
* A :class:`Profile` is a frozen, versioned description of a hardware target (the idea of
  MCT's target-platform-capabilities schema): allowed weight and activation bit widths,
  whether per-channel weight scales are allowed, whether scales must be powers of two and
  zero points 0, allowed signedness, the int32 bias width, allowed op types, fused
  patterns (op chains the hardware runs as one op, so no Q/DQ between them), shared-scale
  groups and the accepted opset range. It is validated on construction: an invalid
  profile cannot exist.
* Profiles are JSON files following :data:`SCHEMA_VERSION`; :func:`load_profile` takes a
  built-in name (``onnxdgh/profiles/<name>.json``) or a path, and every problem (missing
  file, bad JSON, unknown or missing key, wrong type, unknown schema version, an op type
  ONNX does not define) is a :class:`~onnxdgh.errors.ProfileError` naming the file, the
  key and the fix.
* The quantizer reads a profile to decide what to emit; the validator reads the same
  profile to check the result, so the two agree on one source of truth.
* Schema 2 adds the numerical floors a usable result must reach on held-out images
  (``min_output_sqnr_db``, ``min_top1_agreement``; ``null`` = no floor). Schema 1 files
  are still read: they have no floors.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import onnx.defs

from .errors import ProfileError

__all__ = [
    "SCHEMA_VERSION",
    "SUPPORTED_SCHEMA_VERSIONS",
    "SIGNEDNESS",
    "DEFAULT_PROFILE",
    "Profile",
    "load_profile",
    "builtin_profiles",
    "builtin_profile_names",
    "profile_from_dict",
    "FLOOR_FIELDS",
]

_LOG = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""The schema version this release writes (it reads every :data:`SUPPORTED_SCHEMA_VERSIONS`)."""

SUPPORTED_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)

FLOOR_FIELDS: tuple[str, ...] = ("min_output_sqnr_db", "min_top1_agreement")
"""Fields schema 2 added; a schema 1 profile has none of them (no floors)."""

SIGNEDNESS: tuple[str, ...] = ("signed", "unsigned")

DEFAULT_PROFILE = "generic-pot-int8"
"""The built-in profile used when the user names none."""

# Bit widths a QDQ model can carry: 2..8 in int8/uint8 containers, up to 16 in int16.
_MIN_BITS, _MAX_BITS = 2, 16


@dataclass(frozen=True)
class Profile:
    """What a target accepts; see the module docstring and ``docs/VALIDATE.md``.

    All sequence fields are tuples so a profile is hashable and cannot change after it
    was validated. ``fused_patterns`` are chains of op types (length >= 2): each op of a
    chain after the first may read its predecessor's output directly, without Q/DQ.
    ``shared_scale_ops``: every data input and the output of these ops carry one scale
    (e.g. Concat: the hardware copies integers). ``shared_input_scale_ops``: only the data
    inputs share one scale (e.g. Add on an integer adder without input rescaling).
    """

    schema_version: int
    name: str
    description: str
    weight_bits: tuple[int, ...]
    activation_bits: tuple[int, ...]
    per_channel_weights: bool
    power_of_two_scales: bool
    zero_point_zero: bool
    weight_signedness: tuple[str, ...]
    activation_signedness: tuple[str, ...]
    bias_bits: int
    allowed_ops: tuple[str, ...]
    fused_patterns: tuple[tuple[str, ...], ...]
    shared_scale_ops: tuple[str, ...]
    shared_input_scale_ops: tuple[str, ...]
    opset_min: int
    opset_max: int
    min_output_sqnr_db: float | None = None
    """Floor: least SQNR (dB) of every graph output against the float model, on images
    not used for calibration; None = no floor (docs/VALIDATE.md, "Floors")."""
    min_top1_agreement: float | None = None
    """Floor: least top-1 agreement (0..1) of every classifier-like output; None = no floor."""

    def __post_init__(self) -> None:
        # Python callers may pass lists; freeze them so the profile cannot change later.
        for spec in fields(self):
            if isinstance(value := getattr(self, spec.name), list):
                object.__setattr__(self, spec.name, tuple(value))
        if isinstance(self.fused_patterns, tuple):
            object.__setattr__(
                self, "fused_patterns", tuple(tuple(i) if isinstance(i, list) else i for i in self.fused_patterns)
            )
        where = f"profile {self.name!r}" if isinstance(self.name, str) and self.name else "profile"
        _check_type(where, "schema_version", self.schema_version, int)
        if self.schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ProfileError(
                f"{where} has schema_version {self.schema_version}; this onnxdgh reads "
                f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
                f'set "schema_version": {SCHEMA_VERSION} and follow docs/VALIDATE.md, or upgrade onnxdgh',
            )
        for key in ("name", "description"):
            _check_type(where, key, getattr(self, key), str)
        if not self.name.strip():
            raise ProfileError(f"{where} has an empty name", 'give it a "name", e.g. "my-npu-int8"')
        for key in ("weight_bits", "activation_bits"):
            value = _check_tuple(where, key, getattr(self, key), int, nonempty=True)
            bad = [bits for bits in value if not _MIN_BITS <= bits <= _MAX_BITS]
            if bad:
                raise ProfileError(
                    f"{where}: {key} {list(value)} holds {bad[0]}, outside {_MIN_BITS}..{_MAX_BITS}",
                    f"list bit widths between {_MIN_BITS} and {_MAX_BITS}, e.g. [8]",
                )
        for key in ("per_channel_weights", "power_of_two_scales", "zero_point_zero"):
            _check_type(where, key, getattr(self, key), bool)
        for key in ("weight_signedness", "activation_signedness"):
            value = _check_tuple(where, key, getattr(self, key), str, nonempty=True)
            bad_sign = [s for s in value if s not in SIGNEDNESS]
            if bad_sign:
                raise ProfileError(
                    f"{where}: {key} holds {bad_sign[0]!r}",
                    f'use "signed" and/or "unsigned", e.g. {key}: ["signed"]',
                )
        _check_type(where, "bias_bits", self.bias_bits, int)
        if not 8 <= self.bias_bits <= 32:
            raise ProfileError(
                f"{where}: bias_bits {self.bias_bits} is outside 8..32",
                "int32 biases are the QDQ convention: use 32",
            )
        ops = _check_tuple(where, "allowed_ops", self.allowed_ops, str, nonempty=True)
        _check_ops(where, "allowed_ops", ops)
        if not isinstance(self.fused_patterns, tuple):
            raise ProfileError(f"{where}: fused_patterns must be a list of op-type lists", 'e.g. [["Conv", "Relu"]]')
        for index, pattern in enumerate(self.fused_patterns):
            key = f"fused_patterns[{index}]"
            chain = _check_tuple(where, key, pattern, str, nonempty=True)
            if len(chain) < 2:
                raise ProfileError(f"{where}: {key} {list(chain)} has fewer than two ops", 'e.g. ["Conv", "Relu"]')
            _check_ops(where, key, chain)
            _check_listed(where, key, chain, ops)
        for key in ("shared_scale_ops", "shared_input_scale_ops"):
            value = _check_tuple(where, key, getattr(self, key), str, nonempty=False)
            _check_ops(where, key, value)
        for key in ("opset_min", "opset_max"):
            _check_type(where, key, getattr(self, key), int)
            if getattr(self, key) < 1:
                raise ProfileError(f"{where}: {key} must be a positive opset number", "e.g. 13")
        if self.opset_min > self.opset_max:
            raise ProfileError(
                f"{where}: opset_min {self.opset_min} is above opset_max {self.opset_max}",
                "swap them or widen the range",
            )
        if self.schema_version < 2 and (self.min_output_sqnr_db is not None or self.min_top1_agreement is not None):
            raise ProfileError(
                f"{where}: floors need schema_version 2, the profile says {self.schema_version}",
                f'set "schema_version": {SCHEMA_VERSION}',
            )
        _check_floor(where, "min_output_sqnr_db", self.min_output_sqnr_db, -100.0, 200.0, "e.g. 15 (dB)")
        _check_floor(where, "min_top1_agreement", self.min_top1_agreement, 0.0, 1.0, "e.g. 0.9 (share of images)")

    # ----------------------------------------------------------------- queries

    @property
    def max_weight_bits(self) -> int:
        """The widest weight width the target accepts."""
        return max(self.weight_bits)

    @property
    def max_activation_bits(self) -> int:
        """The widest activation width the target accepts."""
        return max(self.activation_bits)

    def allows_op(self, op_type: str) -> bool:
        """True when ``op_type`` may appear (QuantizeLinear/DequantizeLinear always may)."""
        return op_type in ("QuantizeLinear", "DequantizeLinear") or op_type in self.allowed_ops

    def is_fused(self, producer_op: str, consumer_op: str) -> bool:
        """True when ``consumer_op`` directly after ``producer_op`` is one hardware op."""
        return any(
            chain[i] == producer_op and chain[i + 1] == consumer_op
            for chain in self.fused_patterns
            for i in range(len(chain) - 1)
        )

    def summary(self) -> str:
        """One line: widths, granularity and scale rules (for ``--list-profiles``)."""
        weights = "/".join(map(str, self.weight_bits))
        acts = "/".join(map(str, self.activation_bits))
        granularity = "per-channel" if self.per_channel_weights else "per-tensor"
        scales = "power-of-two" if self.power_of_two_scales else "any"
        return (
            f"W{weights} A{acts}, {granularity} weights, {scales} scales, "
            f"{'zero-point 0, ' if self.zero_point_zero else ''}opset {self.opset_min}-{self.opset_max}, "
            f"{len(self.allowed_ops)} ops"
        )

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-ready data (the file format of its schema version)."""
        data = asdict(self)
        if self.schema_version < 2:
            for key in FLOOR_FIELDS:
                del data[key]
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = [list(item) if isinstance(item, tuple) else item for item in value]
        return data


def _check_type(where: str, key: str, value: object, kind: type) -> None:
    # bool is an int subclass: true/false must not pass as a bit width, nor 1 as a flag.
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        expected = {int: "an integer", str: "a string", bool: "true or false"}[kind]
        raise ProfileError(
            f"{where}: {key} must be {expected}, got {_shown(value, repr(value))}",
            f"fix {key!r} in the profile (docs/VALIDATE.md lists every field)",
        )


def _check_floor(where: str, key: str, value: object, low: float, high: float, example: str) -> None:
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not low <= value <= high:  # type: ignore[operator]
        raise ProfileError(
            f"{where}: {key} must be null or a number between {low:g} and {high:g}, "
            f"got {_shown(value, repr(value))}",
            f"fix {key!r} in the profile: {example}, or null for no floor",
        )


def _shown(value: object, fallback: str) -> str:
    """``value`` spelled as in a JSON file; ``fallback`` when it is no JSON value."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return fallback


def _check_tuple(where: str, key: str, value: object, kind: type, *, nonempty: bool) -> tuple[Any, ...]:
    if not isinstance(value, tuple):
        raise ProfileError(
            f"{where}: {key} must be a list, got {_shown(value, type(value).__name__)}",
            f"write {key} as a JSON list",
        )
    if nonempty and not value:
        raise ProfileError(f"{where}: {key} is empty", f"list at least one entry in {key}")
    for item in value:
        _check_type(where, f"{key} entry", item, kind)
    if len(set(value)) != len(value):
        raise ProfileError(f"{where}: {key} lists an entry twice", f"remove the duplicate from {key}")
    return value


def _check_ops(where: str, key: str, ops: tuple[str, ...]) -> None:
    # Only the default ONNX domain: custom-domain ops are not portable to a target.
    unknown = [op for op in ops if not onnx.defs.has(op)]
    if unknown:
        raise ProfileError(
            f"{where}: {key} names {unknown[0]!r}, which is not an ONNX operator",
            "use ONNX op type names as in the model (case matters), e.g. Conv, Relu, HardSwish",
        )


def _check_listed(where: str, key: str, ops: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    missing = [op for op in ops if op not in allowed]
    if missing:
        raise ProfileError(
            f"{where}: {key} uses {missing[0]!r}, which allowed_ops does not list",
            f"add {missing[0]!r} to allowed_ops or remove the pattern",
        )


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Profile))


def profile_from_dict(data: object, source: str = "<dict>") -> Profile:
    """Build a :class:`Profile` from parsed JSON, checking keys before types.

    Raises:
        ProfileError: not an object, unknown schema version, unknown or missing keys, or
            any field failing :class:`Profile`'s validation.
    """
    if not isinstance(data, dict):
        raise ProfileError(f"profile {source} is not a JSON object", "the file must hold one {...} object")
    version = data.get("schema_version")
    if version is None:
        raise ProfileError(
            f"profile {source} has no schema_version",
            f'add "schema_version": {SCHEMA_VERSION} (docs/VALIDATE.md)',
        )
    if isinstance(version, bool) or not isinstance(version, int) or version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ProfileError(
            f"profile {source} has schema_version {json.dumps(version)}; this onnxdgh reads "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}",
            f'set "schema_version": {SCHEMA_VERSION} and follow docs/VALIDATE.md, or upgrade onnxdgh',
        )
    keys = _FIELDS if version >= 2 else tuple(name for name in _FIELDS if name not in FLOOR_FIELDS)
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ProfileError(
            f"profile {source} has unknown key {unknown[0]!r}",
            f"remove it; the schema {version} keys are: {', '.join(keys)}",
        )
    missing = [name for name in keys if name not in data]
    if missing:
        raise ProfileError(
            f"profile {source} lacks {', '.join(missing)}",
            "every schema field is required; copy a built-in (onnxdgh validate --list-profiles) and edit it",
        )
    try:
        return Profile(**{name: data[name] for name in keys})
    except ProfileError as exc:
        if source != "<dict>" and source not in exc.message:
            raise ProfileError(f"{exc.message} (in {source})", exc.hint) from None
        raise


def builtin_profile_names() -> tuple[str, ...]:
    """Names of the profiles shipped in ``onnxdgh/profiles``, sorted."""
    folder = resources.files("onnxdgh").joinpath("profiles")
    return tuple(sorted(entry.name[: -len(".json")] for entry in folder.iterdir() if entry.name.endswith(".json")))


def _load_builtin(name: str) -> Profile:
    text = resources.files("onnxdgh").joinpath("profiles", f"{name}.json").read_text(encoding="utf-8")
    profile = _parse(text, f"built-in {name}")
    if profile.name != name:  # a packaging mistake, not a user error
        raise ValueError(f"built-in profile file {name}.json names itself {profile.name!r}")
    return profile


def builtin_profiles() -> dict[str, Profile]:
    """Every built-in profile by name."""
    return {name: _load_builtin(name) for name in builtin_profile_names()}


def _parse(text: str, source: str) -> Profile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(
            f"profile {source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "fix the JSON syntax (a trailing comma or a missing quote is the usual cause)",
        ) from None
    return profile_from_dict(data, source)


def load_profile(name_or_path: str | os.PathLike[str] | Profile) -> Profile:
    """A built-in profile by name, or a profile JSON file by path (a Profile is returned as is).

    Raises:
        ProfileError: unknown name, missing or unreadable file, or an invalid profile.
    """
    if isinstance(name_or_path, Profile):
        return name_or_path
    text_name = os.fspath(name_or_path)
    names = builtin_profile_names()
    if text_name in names:
        return _load_builtin(text_name)
    path = Path(text_name)
    looks_like_path = path.suffix.lower() == ".json" or os.sep in text_name or path.exists()
    if not looks_like_path:
        raise ProfileError(
            f"unknown profile {text_name!r}",
            f"use a built-in ({', '.join(names)}) or a path to a profile .json file",
        )
    if not path.exists():
        raise ProfileError(f"profile file {path} does not exist", f"check the path, or use a built-in: {', '.join(names)}")
    if path.is_dir():
        raise ProfileError(f"profile path {path} is a folder", "give the path of a profile .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile file {path} cannot be read: {exc}", "check the file and its permissions") from None
    profile = _parse(text, str(path))
    _LOG.info("loaded profile %s from %s", profile.name, path)
    return profile
