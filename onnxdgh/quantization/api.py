"""``onnxdgh.quantize``: float ONNX classifier -> fully quantized power-of-two QDQ model (HPTQ).

Contract: :func:`quantize` takes a model (path or :class:`~onnxdgh.load.LoadedModel`),
calibration images (or ``None``: DGH images are generated with ``generate_config``) and
a :class:`QuantizeConfig`, and returns a :class:`QuantizeResult` whose ``model`` is a
QDQ ModelProto in which every tensor is quantized (uniform, symmetric, zero point 0,
power-of-two scales) and whose ``report`` lists every threshold, bit width and timing.
Every check that can fail on user input (options, profile, ops, calibration shape)
runs before the long work (generation, calibration). The input model is never modified.

Stages: ``fold.prepare`` -> (``equalize``) ``equalize.equalize`` -> ``plan.mark`` -> images ->
``calibrate.collect_statistics`` -> (below 8-bit activations) ``shift.choose_shifts`` /
``shift.apply_shifts`` and ``plan.mark`` again on the shifted float model -> ``plan.resolve``
(+ ``shift.compensate``) -> ``emit.emit`` -> (below 8 bits) ``rounding.optimize_rounding`` with
bias correction, which only changes stored integers, never scales or structure.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx

from .. import __version__
from .. import graph as g
from ..errors import CalibrationDataError, InvalidInputError, ProfileError, QuantizationError, UnsupportedModelError
from ..fileio import check_images
from ..load import LoadedModel, canonicalise, convert_opset, load_model, make_batch_dynamic
from ..profile import Profile, load_profile
from .calibrate import DEFAULT_BINS, collect_statistics
from .emit import emit
from .equalize import equalize as equalize_layers
from .equalize import input_bounds_from_normalization
from .float_weights import store_weights_as_float
from .fold import FoldReport, prepare
from .plan import QuantPlan, default_threshold, mark, resolve
from .shift import Shift, apply_shifts, choose_shifts, compensate, shifted_statistics, supports_shift

if TYPE_CHECKING:  # the generator is imported lazily: it pulls in torch
    from ..generation import GenerateConfig

__all__ = [
    "QuantizeConfig", "QuantizeResult", "quantize", "default_profile_name", "holdout_size",
    "dry_run", "refuse_recurrent", "rounding_inputs", "THRESHOLD_METHODS", "HOLDOUT_FRACTION",
    "MIN_HOLDOUT_IMAGES",
]

_LOG = logging.getLogger(__name__)

THRESHOLD_METHODS = ("mse", "lp", "noclip")
CALIBRATION_MEMORY_BYTES = 512 * 2**20
"""Budget for the activations one calibration run holds (every quantized tensor is exposed)."""
WEIGHT_BITS = (8, 7, 4, 2)
ACT_BITS = (8, 4)
HOLDOUT_FRACTION = 0.2
"""Share of the images ``onnxdgh quantize`` holds back from calibration to judge the result on."""
MIN_HOLDOUT_IMAGES = 4
"""Fewest held-back images: below this an SQNR or agreement figure says little."""
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
"""Out of scope (issue 14): their gates and state would each need a quantizer, and DGH has no statistics for them."""


def refuse_recurrent(model: onnx.ModelProto) -> None:
    """Raise :class:`UnsupportedModelError` naming the first LSTM/GRU/RNN node of ``model``, if any.

    Called before any other model check (``onnxdgh quantize`` runs it before the input
    normalisation is resolved), so a recurrent model gets this one reason, not a chain of fixes.
    """
    node = next((n for n in model.graph.node if n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx")), None)
    if node is not None:
        raise UnsupportedModelError(
            f"node {node.name or node.output[0]!r} is {'a' if node.op_type == 'GRU' else 'an'} {node.op_type}: recurrent layers (LSTM, GRU, RNN) are out of "
            "onnxdgh's scope",
            "quantize the part before it alone (cut the graph at its input, e.g. onnx.utils.extract_model) and run the "
            "recurrent part in float",
        )


@dataclass(frozen=True)
class QuantizeConfig:
    """Quantization settings; one CLI option per field, validated on construction.

    The measurements behind each automatic choice are in docs/QUANTIZE.md (thresholds,
    kernel-sum and GPTQ rounding, equalization, shift negative correction), docs/ROUNDING.md
    and docs/BENCHMARKS.md.

    Attributes:
        weight_bits: 8, 7, 4 or 2 (``--weight-bits``); weights are signed, symmetric. 7 bits
            (integers in [-64, 63] in int8 containers, as onnxruntime's ``reduce_range``) is
            for x86 CPUs with AVX2 but without VNNI, whose u8 x s8 kernels saturate int16
            pair sums at 8 bits (profile ``ort-x86-avx2``).
        act_bits: 8 or 4 (``--act-bits``); every activation, the model input included.
        threshold: ``"mse"`` (HPTQ's error-minimising power-of-two search), ``"lp"``
            (the same search on the cube of the error, :data:`~.thresholds.LP_POWER`),
            ``"noclip"`` (smallest power of two covering the observed range), or None:
            :func:`~.plan.default_threshold` of the model.
        per_channel: weights per output channel (``--per-tensor-weights`` sets False);
            a profile without per-channel weights forces per tensor.
        profile: built-in profile name or path (``--profile``); None:
            :func:`default_profile_name` of the bit widths.
        int4_types: carry <= 4-bit values in INT4/UINT4 Q/DQ types (opset 21) instead of
            range-restricted int8/uint8 containers (``--int4-types``).
        weights_as_float: store every quantized constant as the float32 value its
            DequantizeLinear would produce, without that node (``--weights-as-float``,
            :mod:`onnxdgh.quantization.float_weights`), for converters that cannot read
            integer weights. Activations keep Q/DQ.
        seed: seeds the DGH generation when no calibration images are given, and the
            batch sampling of the rounding optimisation.
        optimize_rounding: choose the stored weight integers (and int32 biases) by
            AdaRound/BRECQ-style block reconstruction (``--optimize-rounding``,
            ``rounding.optimize_rounding``). None: on below 7-bit weights or 8-bit
            activations (fmnist_resnet8 W4A4 50.1 -> 89.1 %; within 0.1 point at W8A8/W7A8).
        bias_correction: shift int32 biases so each layer's per-channel mean output
            matches the float model (``--bias-correction``). None: off (it undoes the
            rounding optimisation's learned biases and costs 1.3 dB after kernel-sum rounding).
        rounding_iterations: AdaRound steps per layer.
        kernel_sum_rounding: store each output channel's weight integers so that their sum
            is the nearest integer of the float sum (``--kernel-sum-rounding``,
            :func:`~.thresholds.quantize_preserving_sums`). None: on for 8-bit weights
            when the rounding optimisation is off (both together are an error).
        gptq_rounding: re-round the per-channel weights of 2-D Conv and Gemm layers so that
            each layer's output error on the calibration images is smallest, scales fixed
            (``--gptq-rounding``, :mod:`onnxdgh.quantization.gptq`). None: on for 8-bit
            weights when neither the rounding optimisation nor the bias correction runs
            (either together with it is an error) and ``kernel_sum_rounding`` is None (an
            explicit kernel-sum or nearest choice is kept).
        equalize: cross-layer equalization of consecutive convolutions (``--equalize``,
            :mod:`onnxdgh.quantization.equalize`). None: off (EfficientNet-Lite0 W8A8:
            -0.7 dB with kernel-sum rounding).
        shift_negative: HPTQ's shift negative correction (``--shift-negative``,
            :mod:`onnxdgh.quantization.shift`) of activations with a small negative tail
            read only by Conv/Gemm. Needs a profile that fuses the activation with ``Add``.
            None: on below 8-bit activations where the profile allows it.
        calibration_batch_size: images per onnxruntime run while collecting statistics
            (lowered so one run's exposed activations stay within
            :data:`CALIBRATION_MEMORY_BYTES`).
        histogram_bins: bins of each activation histogram (a power of two).
    """

    weight_bits: int = 8
    act_bits: int = 8
    threshold: Literal["mse", "lp", "noclip"] | None = None
    per_channel: bool = True
    profile: str | None = None
    int4_types: bool = False
    weights_as_float: bool = False
    seed: int = 0
    calibration_batch_size: int = 64
    histogram_bins: int = DEFAULT_BINS
    optimize_rounding: bool | None = None
    bias_correction: bool | None = None
    rounding_iterations: int = 300
    shift_negative: bool | None = None
    equalize: bool | None = None
    kernel_sum_rounding: bool | None = None
    gptq_rounding: bool | None = None

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS or isinstance(self.weight_bits, bool):
            raise InvalidInputError(
                f"--weight-bits {self.weight_bits!r} is not supported", "use --weight-bits 8, 7, 4 or 2"
            )
        if self.act_bits not in ACT_BITS or isinstance(self.act_bits, bool):
            raise InvalidInputError(f"--act-bits {self.act_bits!r} is not supported", "use --act-bits 8 or 4")
        if self.threshold is not None and self.threshold not in THRESHOLD_METHODS:
            raise InvalidInputError(
                f"--threshold {self.threshold!r} is not one of {', '.join(THRESHOLD_METHODS)}",
                "use --threshold mse (error-minimising), lp (error^3: clips less) or noclip "
                "(min/max)",
            )
        for name in ("per_channel", "int4_types", "weights_as_float"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False, got {getattr(self, name)!r}", "pass a bool")
        for name in ("optimize_rounding", "bias_correction", "shift_negative", "equalize",
                     "kernel_sum_rounding", "gptq_rounding"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidInputError(
                    f"{name} must be True, False or None (automatic), got {getattr(self, name)!r}", "pass a bool or None"
                )
        for name in ("kernel_sum_rounding", "gptq_rounding"):
            if getattr(self, name) and self.rounding_enabled:
                option = "--" + name.replace("_", "-")
                raise InvalidInputError(
                    f"{option} chooses the stored weight integers, "
                    "and so does the rounding optimisation",
                    f"add --no-optimize-rounding, or drop {option}",
                )
        if self.gptq_rounding and self.bias_correction:
            raise InvalidInputError(
                "--bias-correction measures the error of nearest or kernel-sum rounding, not of --gptq-rounding "
                "(whose objective already includes each channel's mean error)",
                "drop one of --gptq-rounding and --bias-correction",
            )
        if not _is_int(self.rounding_iterations) or self.rounding_iterations < 1:
            raise InvalidInputError(
                f"--rounding-iterations {self.rounding_iterations!r} is not a positive integer",
                "give e.g. --rounding-iterations 300",
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"--seed {self.seed!r} is not an integer in [0, 2^63)", "give e.g. --seed 0")
        if not isinstance(self.calibration_batch_size, int) or self.calibration_batch_size < 1:
            raise InvalidInputError(
                f"calibration batch size {self.calibration_batch_size!r} is not a positive integer", "give e.g. 32"
            )
        bins = self.histogram_bins
        if not isinstance(bins, int) or bins < 64 or bins & (bins - 1):
            raise InvalidInputError(f"histogram_bins {bins!r} is not a power of two >= 64", "give e.g. 2048")
        if self.profile is not None and (not isinstance(self.profile, str) or not self.profile.strip()):
            raise InvalidInputError(f"--profile {self.profile!r} is empty", "give a built-in name or a .json path")

    @property
    def rounding_enabled(self) -> bool:
        """Whether AdaRound runs."""
        if self.optimize_rounding is not None:
            return self.optimize_rounding
        return self.weight_bits < 7 or self.act_bits < 8

    @property
    def bias_correction_enabled(self) -> bool:
        """Whether biases are corrected."""
        return bool(self.bias_correction)

    @property
    def kernel_sum_rounding_enabled(self) -> bool:
        """Whether weights are stored by kernel-sum-preserving rounding (``optimize_rounding=False``
        below 8 bits stays nearest rounding, the input ``rounding.optimize_rounding`` expects)."""
        if self.kernel_sum_rounding is not None:
            return self.kernel_sum_rounding
        return self.weight_bits == 8 and not self.rounding_enabled

    @property
    def gptq_enabled(self) -> bool:
        """Whether GPTQ re-rounds the weights."""
        if self.gptq_rounding is not None:
            return self.gptq_rounding
        return (self.weight_bits == 8 and not self.rounding_enabled and not self.bias_correction_enabled
                and self.kernel_sum_rounding is None)

    @property
    def equalize_enabled(self) -> bool:
        """Whether cross-layer equalization runs."""
        return bool(self.equalize)

    def shift_enabled(self, profile: Profile) -> bool:
        """Whether the shift negative correction runs under ``profile``."""
        if self.shift_negative is not None:
            return self.shift_negative
        return self.act_bits < 8 and supports_shift(profile)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the automatic choices resolved, except ``shift_negative``,
        which depends on the profile: see :meth:`shift_enabled`)."""
        return {
            **asdict(self),
            "optimize_rounding": self.rounding_enabled,
            "bias_correction": self.bias_correction_enabled,
            "equalize": self.equalize_enabled,
            "kernel_sum_rounding": self.kernel_sum_rounding_enabled,
            "gptq_rounding": self.gptq_enabled,
        }


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized model and what was done to make it."""

    model: onnx.ModelProto = field(repr=False)
    report: dict[str, Any]
    calibration: np.ndarray | None = field(default=None, repr=False)
    """The images the thresholds were chosen on (given or generated), for validation."""
    holdout: np.ndarray | None = field(default=None, repr=False)
    """The images held back from calibration (``holdout`` of :func:`quantize`): nothing
    about the model was chosen on them, so figures measured on them are honest."""
    _rounding_inputs: tuple[onnx.ModelProto, dict[str, float]] | None = field(default=None, repr=False, compare=False)
    """Not public: what :func:`rounding_inputs` returns."""


def rounding_inputs(result: QuantizeResult) -> tuple[onnx.ModelProto, dict[str, float]]:
    """(float model, input shifts) for a separate ``rounding.optimize_rounding`` run on
    ``result.model`` (tools/bench_rounding.py): the BN-folded model that ``result.model``
    quantizes node for node, and ``optimize_rounding``'s ``input_shifts``.

    Raises:
        InvalidInputError: ``result`` was not made by :func:`quantize`.
    """
    if result._rounding_inputs is None:
        raise InvalidInputError("this QuantizeResult was not made by onnxdgh.quantize", "quantize the model first")
    return result._rounding_inputs


def holdout_size(images: int) -> int:
    """How many of ``images`` to hold back for validation: :data:`HOLDOUT_FRACTION`, at least
    :data:`MIN_HOLDOUT_IMAGES`, and never more than calibration keeps.

    Raises:
        CalibrationDataError: fewer than ``2 * MIN_HOLDOUT_IMAGES`` images.
    """
    held = max(MIN_HOLDOUT_IMAGES, int(round(HOLDOUT_FRACTION * images)))
    if images - held < held:
        raise CalibrationDataError(
            f"{images} images are too few to hold {MIN_HOLDOUT_IMAGES} back for validation and calibrate on the rest",
            f"use at least {2 * MIN_HOLDOUT_IMAGES} images (--images, or more in --calib-data), "
            "or skip the check with --no-validate",
        )
    return held


def _split_holdout(images: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(calibration, held-out, held-out indices): a seeded random ``count`` images held back, order kept."""
    order = np.random.default_rng(seed).permutation(images.shape[0])
    held = np.sort(order[:count])
    keep = np.setdiff1d(np.arange(images.shape[0]), held)
    return images[keep], images[held], [int(i) for i in held]


def default_profile_name(weight_bits: int, act_bits: int) -> str:
    """The built-in profile that fits the bit widths (the ``--profile`` default)."""
    defaults = {(8, 8): "generic-pot-int8", (4, 8): "pot-w4a8", (7, 8): "ort-x86-avx2"}
    return defaults.get((weight_bits, act_bits), "pot-lowbit")


def _profile(config: QuantizeConfig) -> Profile:
    profile = load_profile(config.profile or default_profile_name(config.weight_bits, config.act_bits))
    if config.weight_bits not in profile.weight_bits:
        raise ProfileError(
            f"profile {profile.name!r} allows weight bits {list(profile.weight_bits)}, not {config.weight_bits}",
            f"use --weight-bits {profile.max_weight_bits}, or a profile that allows {config.weight_bits}-bit weights",
        )
    if config.act_bits not in profile.activation_bits:
        raise ProfileError(
            f"profile {profile.name!r} allows activation bits {list(profile.activation_bits)}, not {config.act_bits}",
            f"use --act-bits {profile.max_activation_bits}, or a profile that allows {config.act_bits}-bit activations",
        )
    if config.shift_negative and not supports_shift(profile):
        raise ProfileError(
            f"--shift-negative needs a profile with unsigned activations that fuses an activation "
            f"(Mul, HardSwish, LeakyRelu, PRelu, Elu, Selu) with Add; {profile.name!r} does not",
            "drop --shift-negative, or use --profile pot-lowbit (or a profile listing e.g. [\"Mul\", \"Add\"])",
        )
    if config.int4_types and profile.opset_max < 21:
        raise ProfileError(
            f"--int4-types needs opset 21 but profile {profile.name!r} accepts opsets up to {profile.opset_max}",
            "drop --int4-types (4-bit values then travel in int8 containers) or choose another profile",
        )
    return profile


def _structure(
    loaded: LoadedModel, profile: Profile, *, weight_bits: int, act_bits: int, per_channel: bool,
    int4_types: bool, equalize: bool = False,
    input_bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, FoldReport, QuantPlan, Any]:
    """Opset upgrade, BN folding, cross-layer equalization (with ``equalize``, within the
    model input's ``input_bounds`` when known) and marking: (folded float model, fold
    report, plan, equalization report or None)."""
    refuse_recurrent(loaded.model)
    float_model = loaded.model
    if int4_types and loaded.opset < 21:
        float_model = _convert_opset(float_model, 21, "INT4 Q/DQ types")
    elif loaded.opset < 13:
        float_model = _convert_opset(float_model, 13, "per-axis DequantizeLinear")
    folded, fold_report = prepare(float_model)
    equalize_report = None
    if equalize:
        folded, equalize_report = equalize_layers(folded, input_bounds=input_bounds)
    opset = g.opset_version(folded) or loaded.opset
    if not profile.opset_min <= opset <= profile.opset_max:
        raise ProfileError(
            f"the model's opset {opset} is outside profile {profile.name!r}'s range {profile.opset_min}..{profile.opset_max}",
            f"re-export the model at an opset between {profile.opset_min} and {profile.opset_max}",
        )
    plan = mark(folded, profile, weight_bits=weight_bits, act_bits=act_bits, per_channel=per_channel)
    return folded, fold_report, plan, equalize_report


def dry_run(loaded: LoadedModel, profile: Profile | str) -> QuantPlan:
    """The plan (which tensors get which quantizer) of ``loaded`` at ``profile``'s widest bit
    widths: the checks :func:`quantize` makes before any images exist (opset conversion, BN
    folding, marking), without calibrating.

    Raises:
        QuantizationError / ProfileError / UnsupportedModelError: what :func:`quantize`
        would raise on ``loaded`` before generating or calibrating.
    """
    chosen = load_profile(profile)
    _check_float32(loaded)
    weight_bits = max((b for b in chosen.weight_bits if b in WEIGHT_BITS), default=max(WEIGHT_BITS))
    act_bits = max((b for b in chosen.activation_bits if b in ACT_BITS), default=max(ACT_BITS))
    return _structure(loaded, chosen, weight_bits=weight_bits, act_bits=act_bits, per_channel=True,
                      int4_types=False)[2]


def _check_float32(loaded: LoadedModel) -> None:
    if loaded.input_dtype != "float32":
        raise UnsupportedModelError(
            f"input {loaded.input_name!r} of {loaded.source} is {loaded.input_dtype}; the quantizer needs a float32 model",
            "convert the model to float32 first (onnxconverter_common.float16.convert_float16_to_float32)",
        )


def _check_images(images: object, loaded: LoadedModel) -> np.ndarray:
    return check_images(images, input_shape=loaded.input_shape, input_name=loaded.input_name)


def _convert_opset(model: onnx.ModelProto, version: int, reason: str) -> onnx.ModelProto:
    """``model`` at opset ``version``, canonical again.

    The converter's adapters may add shape computations (Softmax before opset 13 becomes
    ``Shape``, ``Flatten``, ``Softmax``, ``Reshape``); canonicalising folds them as the
    loader did for the exported ones.
    """
    return canonicalise(convert_opset(model, version, reason))[0]


def _input_bounds(loaded: LoadedModel, generate_config: GenerateConfig | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The model input's per-channel range from its normalisation (pixels in [0, 1]), if known.

    The generation settings' ``mean``/``std`` win over the model's metadata, as in the generator.
    """
    if generate_config is not None and generate_config.mean is not None and generate_config.std is not None:
        normalization = (generate_config.mean, generate_config.std)
    else:
        normalization = loaded.input_normalization()
        if normalization is None:
            return None
    channels = loaded.input_shape[0]
    mean, std = (np.broadcast_to(np.asarray(v, np.float64), (channels,)) for v in normalization)
    return input_bounds_from_normalization(mean, std)


def _calibration_chunk(model: onnx.ModelProto, tensors: list[str], requested: int) -> int:
    """Images per calibration run so that the exposed activations fit the memory budget."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shapes only size the chunk; without them keep the requested size
        return requested
    wanted = set(tensors)
    per_image = 0
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if value.name not in wanted:
            continue
        dims = value.type.tensor_type.shape.dim[1:]
        if all(dim.HasField("dim_value") for dim in dims):
            per_image += 4 * int(np.prod([dim.dim_value for dim in dims], dtype=np.int64))
    if per_image == 0:
        return requested
    return int(max(1, min(requested, CALIBRATION_MEMORY_BYTES // per_image)))


def quantize(
    model: LoadedModel | str | os.PathLike[str],
    calibration: np.ndarray | None = None,
    config: QuantizeConfig = QuantizeConfig(),
    *,
    generate_config: GenerateConfig | None = None,
    progress: bool = True,
    calibration_source: str | None = None,
    holdout: int = 0,
) -> QuantizeResult:
    """Quantize ``model`` fully to power-of-two QDQ (HPTQ), calibrated on ``calibration``.

    Args:
        model: an ``.onnx`` path or a :class:`LoadedModel`.
        calibration: float images N x C x H x W in the model's input space; ``None``
            generates DGH images with ``generate_config`` (default: seeded with
            ``config.seed``, :func:`~onnxdgh.generation.config.generation_defaults`).
        calibration_source: how to describe the images in the metadata (e.g. a file name).
        holdout: how many of the images to hold back, chosen at random with ``config.seed``:
            nothing is chosen on them, and ``result.holdout`` carries them for an
            independent check (:func:`holdout_size` is the CLI's choice). 0 uses them all.

    Raises:
        InvalidInputError / ProfileError / CalibrationDataError / QuantizationError /
        UnsupportedModelError: see the messages; nothing is half-done.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with _timed(timings, "load_s"):
        loaded = model if isinstance(model, LoadedModel) else load_model(model)
    _check_float32(loaded)
    if config.threshold is None:
        config = replace(
            config,
            threshold=default_threshold(loaded.model, config.act_bits),  # type: ignore[arg-type]
        )
    profile = _profile(config)
    if isinstance(holdout, bool) or not isinstance(holdout, int) or holdout < 0:
        raise InvalidInputError(f"holdout {holdout!r} is not a non-negative image count", "give e.g. holdout=8")
    if calibration is not None:
        calibration = _check_images(calibration, loaded)
        if holdout and calibration.shape[0] - holdout < 1:
            raise CalibrationDataError(
                f"holding {holdout} of {calibration.shape[0]} images back leaves none to calibrate on",
                f"give more images, or hold back fewer (holdout_size({calibration.shape[0]}))",
            )
    if calibration is not None and generate_config is not None:
        raise InvalidInputError(
            "calibration images were given together with generation settings",
            "give either --calib-data or generation options, not both",
        )

    # Cheap structural work first: every error about the graph comes before generation.
    with _timed(timings, "fold_s"):
        folded, fold_report, plan, equalize_report = _structure(
            loaded, profile, weight_bits=config.weight_bits, act_bits=config.act_bits,
            per_channel=config.per_channel, int4_types=config.int4_types,
            equalize=config.equalize_enabled,
            input_bounds=(_input_bounds(loaded, generate_config) if config.equalize_enabled
                          else None),
        )

    generation_report: dict[str, Any] | None = None
    data_settings: dict[str, Any] = {}
    if calibration is None:
        from ..generation import GenerateConfig as _GenerateConfig
        from ..generation import generate
        from ..generation.config import generation_defaults

        gen_config = generate_config if generate_config is not None else _GenerateConfig(
            seed=config.seed, **generation_defaults(config.weight_bits, config.act_bits))
        with _timed(timings, "generate_s"):
            result = generate(loaded, gen_config, progress=progress)
        calibration = _check_images(result.images, loaded)
        generation_report = result.report
        source = calibration_source or f"dgh:{result.report['method']}"  # "auto" resolved
        data_settings["generation"] = {**gen_config.to_dict(), "method": result.report["method"]}
    else:
        source = calibration_source or "array"
    held_out: np.ndarray | None = None
    holdout_report: dict[str, Any] | None = None
    if holdout:
        if calibration.shape[0] - holdout < 1:  # generated: the count was not known before
            raise CalibrationDataError(
                f"holding {holdout} of {calibration.shape[0]} generated images back leaves none to calibrate on",
                "generate more images (--images)",
            )
        calibration, held_out, held_indices = _split_holdout(calibration, holdout, config.seed)
        holdout_report = {"images": holdout, "indices": held_indices, "seed": config.seed}
        _LOG.info("holding %d of %d images back for validation", holdout, holdout + calibration.shape[0])

    with _timed(timings, "calibrate_s"):
        calib_model, fixed_batch = _batch_dynamic(loaded, folded)
        batch_size = _calibration_chunk(folded, plan.stat_tensors(), config.calibration_batch_size)
        try:
            stats = collect_statistics(
                calib_model, calibration, plan.stat_tensors(), input_name=loaded.input_name,
                batch_size=batch_size, fixed_batch=fixed_batch, bins=config.histogram_bins,
                progress=progress,
            )
        except ValueError as exc:
            raise CalibrationDataError(
                f"tensor {exc} becomes NaN or infinite on the calibration images",
                "check the images are normalized as the model expects",
            ) from exc

    shift_report: dict[str, Any] | None = None
    shifts: list[Shift] = []
    with _timed(timings, "thresholds_s"):
        if config.shift_enabled(profile):
            shifts, unshifted = choose_shifts(folded, plan, stats, profile, method=config.threshold)
            if shifts:
                # The shifted float model computes the same function; from here on it is
                # *the* float model (rounding's targets included), so names and values agree.
                folded, grid_pads = apply_shifts(folded, shifts)
                plan = mark(
                    folded, profile, weight_bits=config.weight_bits, act_bits=config.act_bits,
                    per_channel=config.per_channel, grid_pads=grid_pads,
                )
                stats = shifted_statistics(stats, shifts)
            shift_report = {"shifted": [item.to_dict() for item in shifts], "left": unshifted}
        resolved = resolve(
            plan, stats, folded, method=config.threshold, int4_types=config.int4_types,
            sum_rounding=config.kernel_sum_rounding_enabled,
        )
    gptq_report: dict[str, Any] | None = None
    if config.gptq_enabled:
        from .gptq import gptq_rounding  # torch: imported when used

        with _timed(timings, "gptq_s"):
            # Before the shift compensation: it reads the stored integers (b - c sum(W_q)). The
            # calibration's batch-dynamic copy, unless the shift correction changed the model since.
            if shifts and fixed_batch is None:
                moments_model, moments_batch = _batch_dynamic(loaded, folded)
            else:
                moments_model, moments_batch = (folded if shifts else calib_model), fixed_batch
            resolved, gptq_report = gptq_rounding(
                resolved, moments_model, calibration, input_name=loaded.input_name,
                fixed_batch=moments_batch,
            )
    if shifts:
        with _timed(timings, "thresholds_s"):
            resolved = compensate(resolved, folded, shifts)

    with _timed(timings, "emit_s"):
        quantized = emit(folded, resolved)

    input_shifts = {label: item.shift for item in shifts for label in item.consumers}
    rounding_report: dict[str, Any] | None = None
    if config.rounding_enabled or config.bias_correction_enabled:
        from .rounding import RoundingConfig, bias_correction, optimize_rounding  # torch: imported when used

        with _timed(timings, "rounding_s"):
            if config.rounding_enabled:
                settings = RoundingConfig(
                    weight_bits=config.weight_bits, iterations=config.rounding_iterations,
                    bias_correction=config.bias_correction_enabled, seed=config.seed,
                )
                quantized, rounding_report = optimize_rounding(
                    quantized, folded, calibration, settings, progress=progress,
                    input_shifts=input_shifts,
                )
            else:
                quantized, rounding_report = bias_correction(
                    quantized, folded, calibration, progress=progress,
                    sum_rounded=config.kernel_sum_rounding_enabled,
                )

    with _timed(timings, "emit_s"):
        _write_metadata(quantized, loaded, config, profile, source, calibration.shape[0],
                        data_settings, len(shifts), holdout)
        if config.weights_as_float:
            quantized = store_weights_as_float(quantized)
        try:
            onnx.checker.check_model(quantized)
        except onnx.checker.ValidationError as exc:  # a bug, but say which model part
            raise QuantizationError(
                f"the quantized model fails the ONNX checker: {str(exc).splitlines()[0]}",
                "report this model to the onnxdgh developers",
            ) from exc
    timings["quantize_s"] = sum(
        timings.get(k, 0.0) for k in ("fold_s", "calibrate_s", "thresholds_s", "gptq_s", "emit_s", "rounding_s")
    )
    timings["total_s"] = time.perf_counter() - started

    summary = resolved.summary()
    params = summary["params"]
    roles = Counter(p["role"] for p in params)
    report: dict[str, Any] = {
        "model": loaded.source,
        "tool_version": __version__,
        "config": {**config.to_dict(), "shift_negative": config.shift_enabled(profile)},
        "profile": profile.name,
        "calibration": {"source": source, "images": int(calibration.shape[0]), **data_settings},
        "opset": g.opset_version(quantized),
        "fold": fold_report.to_dict(),
        "counts": {
            "activations": len(summary["activations"]),
            "weights": roles["weight"],
            "biases": roles["bias"],
            "constants": roles["constant"],
            "fused_pairs": len(summary["fused"]),
            "bias_values_clipped": sum(p["clipped"] for p in params if p["role"] == "bias"),
            "weight_scales_raised_for_bias": sum(
                p["raised_for_bias"] for p in params if p["role"] == "weight"
            ),
        },
        "tensors": summary,
        "statistics": {name: item.to_dict() for name, item in stats.items()},
        "timings": {key: round(value, 4) for key, value in timings.items()},
    }
    sections = {
        "holdout": holdout_report,
        "generation": generation_report,
        "rounding": rounding_report,
        "shift_negative": shift_report,
        "gptq": gptq_report,
        "equalize": equalize_report.to_dict() if equalize_report is not None else None,
    }
    report.update({key: value for key, value in sections.items() if value is not None})
    _LOG.info(
        "quantized %s: %d activations, %d weights, %d biases, %d constants in %.2f s",
        loaded.source, report["counts"]["activations"], report["counts"]["weights"],
        report["counts"]["biases"], report["counts"]["constants"], timings["quantize_s"],
    )
    return QuantizeResult(model=quantized, report=report, calibration=calibration, holdout=held_out,
                          _rounding_inputs=(folded, input_shifts))


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the ``with`` block to ``timings[key]``."""
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _batch_dynamic(
    loaded: LoadedModel, model: onnx.ModelProto
) -> tuple[onnx.ModelProto, int | None]:
    """(model to run on image chunks, its fixed batch size or None): a batch-dynamic copy of
    ``model`` when ``loaded`` fixes the batch and the copy can be made."""
    if not loaded.batch_fixed:
        return model, None
    dynamic = make_batch_dynamic(replace(loaded, model=model))
    if dynamic is None:
        return model, int(loaded.batch_dim)  # type: ignore[arg-type]
    return dynamic, None


def _write_metadata(
    model: onnx.ModelProto,
    loaded: LoadedModel,
    config: QuantizeConfig,
    profile: Profile,
    source: str,
    images: int,
    data_settings: dict[str, Any],
    shifted: int,
    held_out: int,
) -> None:
    values: dict[str, object] = {
        "version": __version__,
        "quantizer": "hptq-pot-qdq",
        "weight_bits": config.weight_bits,
        "act_bits": config.act_bits,
        "threshold": config.threshold,
        "per_channel": config.per_channel and profile.per_channel_weights,
        "int4_types": config.int4_types,
        "weights_as_float": config.weights_as_float,
        "optimize_rounding": config.rounding_enabled,
        "bias_correction": config.bias_correction_enabled,
        "shift_negative": shifted,
        "equalize": config.equalize_enabled,
        "kernel_sum_rounding": config.kernel_sum_rounding_enabled,
        "gptq_rounding": config.gptq_enabled,
        "profile": profile.name,
        "seed": config.seed,
        "calibration_source": source,
        "calibration_images": images,
        "holdout_images": held_out,
        "source_model": loaded.source,
    }
    entries = dict(loaded.metadata)  # the input model's own metadata (input_mean, class names...)
    entries.update({f"onnxdgh.{key}": str(value).lower() if isinstance(value, bool) else str(value)
                    for key, value in values.items()})
    if data_settings:
        entries["onnxdgh.generation"] = json.dumps(data_settings["generation"], sort_keys=True)
    onnx.helper.set_model_props(model, entries)
