"""Settings of synthetic image generation, validated on construction.

Contract: :class:`GenerateConfig` is frozen; every field is one CLI option of
``onnxdgh generate``; an invalid value raises :class:`~onnxdgh.errors.InvalidInputError`
naming the option. ``sas``/``prep``/``odsl`` left as ``None`` take the method's default
(all on for ``dgh``, all off for ``bns``); setting them explicitly gives the ablations of
the DGH paper's Table 4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidInputError
from ..normalization import PRESETS

__all__ = ["AUTO_SCHEDULE", "GenerateConfig", "METHODS", "OPTIMIZERS", "SCHEDULERS", "STATS_REFRESH",
           "generation_defaults", "parse_schedule"]

METHODS = ("auto", "dgh", "bns", "noise", "procedural", "mixed", "actreg")
_NOT_OPTIMISED = ("noise", "procedural")
OPTIMIZERS = ("radam", "adam")
SCHEDULERS = ("plateau", "none")
STATS_REFRESH = ("reuse", "rerun")

# CPU-practical defaults, chosen by measurement on samples/fmnist_resnet8.onnx: at 256
# images in batches of 64 the whole-set BN loss (seed 0, lambda 0.002) went 31.2 (noise)
# -> 10.4 (15 iterations) -> 0.72 (60) -> 0.44 (90) -> 0.38 (150) -> 0.35 (300): flat
# after ~150, so 200 iterations; more iterations mostly stretch the outputs further.
# 256 x 200 took 146-155 s on this 2-core machine while 3-4 other heavy jobs ran (330-350
# image-iterations/s). The paper's 1024 x 1000 is --images 1024 --iterations 1000.
_DEFAULT_IMAGES = 256
_DEFAULT_ITERATIONS = 200
_DEFAULT_BATCH = 64


@dataclass(frozen=True)
class GenerateConfig:
    """How many images to make and how (DGH paper Section 5, Algorithm 1, Appendix A.1).

    Attributes:
        images: number of images |D|.
        iterations: optimisation passes T over all batches.
        batch_size: images optimised together (memory grows with this, never with |D|).
        seed: seeds every random draw (initial noise, flips, crops).
        device: ``"cpu"`` or ``"cuda"``.
        method: ``"auto"`` (:func:`onnxdgh.generation.method.choose_method`),
            ``"dgh"``, ``"bns"`` (BN matching per batch, no prep, no ODSL: the
            ZeroQ/DeepInversion family), ``"noise"`` (Gaussian N(0, 1) images),
            ``"procedural"`` (:mod:`onnxdgh.generation.procedural`), ``"mixed"`` (half DGH,
            half procedural) or ``"actreg"`` (:mod:`onnxdgh.generation.activation`).
        sas: statistics aggregation over the whole image set (Eq. 4-5); None = method default.
        prep: phi_prep augmentation + smoothing every step (Section 5.2); None = method default.
        odsl: output distribution stretching loss (Eq. 7-8); None = method default.
        odsl_lambda: lambda of Eq. 8.
        odsl_delta: delta of Eq. 7 (allowed squared deviation of one image's per-channel
            mean/std from the last BN layer's targets); None = 0.5 * ||sigma_L||^2.
        lr: initial learning rate (paper: 16).
        optimizer: ``"radam"`` (paper) or ``"adam"``.
        scheduler: ``"plateau"`` (reduce-on-plateau, paper) or ``"none"``.
        patience: plateau patience in iterations; None = max(1, iterations // 50).
        factor: plateau reduction factor.
        min_lr: plateau floor.
        crop_margin: extra pixels of the optimised canvas per side pair (paper: 32 for
            224-px inputs); None = max(2, round(min(H, W) / 7)).
        smoothing_sigma: sigma of the 3x3 Gaussian smoothing prior.
        mean, std: per-channel input normalization (pixels in [0, 1] -> model input
            ``(pixel - mean) / std``); override the model's metadata. Give both or neither.
        preprocess: a named normalization (``imagenet``, ``unit``, ``symmetric``,
            ``raw255``; :data:`onnxdgh.normalization.PRESETS`) instead of ``mean``/``std``.
            With neither, the model's metadata is read, else the normalization is inferred
            from the first BN-ed layer (:mod:`onnxdgh.normalization`).
        stats_refresh: after a batch's step, ``"reuse"`` its pre-step statistics (MCT) or
            ``"rerun"`` the model to refresh them (Algorithm 1, lines 14-15).
        allow_no_bn: run DGH on a model without usable BN statistics (prep + ODSL only).
        checkpoint: file for periodic atomic checkpoints (None = no checkpoints).
        checkpoint_every: iterations between checkpoints.
        resume: continue from ``checkpoint`` when it exists.
        channels_last: run the model on channels-last (NHWC) tensors; the same
            computation in another memory layout (results agree to float rounding).
        distributed: split the batches over the processes of a ``torchrun`` launch
            (:mod:`onnxdgh.generation.distributed`); the images equal one process's.
        plateau_stop: stop before ``iterations`` once the whole-set BN loss (Eq. 4 over
            all images, after each iteration) has not fallen below (1 - 1%) of its best
            for this many iterations; None = always run ``iterations``. With
            ``coarse_to_fine`` it counts in the full-size stage only.
        coarse_to_fine: a resolution schedule ``((scale, until), ...)`` or its text
            (:func:`parse_schedule`): optimise at ``scale`` x the input size until ``until``
            x ``iterations``, then at the next stage's scale, and at full size from the last
            ``until`` on (:mod:`onnxdgh.generation.core`); None = full size throughout;
            ``"auto"`` = :data:`AUTO_SCHEDULE` when the model runs at its smaller size, else
            full size with a warning (an explicit schedule the model cannot run is an error).
    """

    images: int = _DEFAULT_IMAGES
    iterations: int = _DEFAULT_ITERATIONS
    batch_size: int = _DEFAULT_BATCH
    seed: int = 0
    device: str = "cpu"
    method: str = "auto"
    sas: bool | None = None
    prep: bool | None = None
    odsl: bool | None = None
    # lambda of Eq. 8, measured on samples/fmnist_resnet8.onnx (128 images x 100
    # iterations, batch 64, seed 0) against 1024 real test images (per-image logit range
    # mean 13.1, min 5.8, max 23.2; logits -7.3 .. 16.5; BN loss 0.057):
    #   lambda   BN loss   range mean (min..max)   logits          W8A8 / W4A8 agreement
    #   0        0.32      7.2 (2.9..16.6)         -6.4 .. 11.9    99.4 / 96.3
    #   0.001    0.34      8.9 (2.3..29.5)         -11.1 .. 18.4   99.6 / 96.0
    #   0.002    0.39      11.1 (3.6..27.3)        -10.0 .. 19.5   99.6 / 95.9
    #   0.005    0.88      16.2 (3.8..46.6)        -15.2 .. 31.6   99.6 / 95.9
    #   0.01     3.86      23.8 (4.9..54.1)        -17.6 .. 36.5   99.0 / 95.0
    #   (real data as calibration set: 99.7 / 95.9)
    # samples/fmnist_mobilenetv2.onnx, same settings (real: range mean 12.7, 4.9..20.0;
    # logits -6.8 .. 15.5; BN loss 0.43; real calibration 99.4 / 96.1; noise 98.1 / 95.3):
    #   0        2.83      7.9 (2.7..14.2)         -5.7 .. 10.6    99.3 / 96.0
    #   0.002    2.87      8.4 (2.4..14.8)         -5.9 .. 9.9     99.5 / 96.1
    #   0.005    2.88      9.0 (3.3..16.3)         -6.1 .. 12.7    99.4 / 96.2
    # At the default 256 images x 200 iterations (resnet8; W8A8 mse / W4A8 mse / W8A8 noclip):
    #   0.001    0.25      10.4 (2.4..26.5)        -12.5 .. 18.0   99.6 / 98.9 / 99.3
    #   0.002    0.33      13.0 (3.2..45.1)        -13.8 .. 31.3   99.6 / 98.7 / 99.2
    #   (300 iterations at 0.002: 0.32, 13.7 (2.9..49.7), -14.9 .. 34.9, 99.5 / 98.4 / 99.4)
    # The quantized agreement is the same within noise (2000 test images: +-0.4 point)
    # across lambda <= 0.005 on both models, so the choice rests on the distributions:
    # from 0.005 resnet8's range overshoots and its BN match suffers (from 0.01 its
    # agreement too); at 256 x 200, 0.001 matches real data's extremes best (largest
    # per-image range 26.5 vs 23.2, largest logit 18.0 vs 16.5, the same power-of-two
    # threshold) with the lowest BN loss, while 0.002 doubles the largest logit.
    # On mobilenetv2 the stretch is weaker at these lambdas.
    odsl_lambda: float = 0.001
    # delta of Eq. 7. An absolute default cannot fit every model: the squared deviation
    # of real images from the last BN's targets scales with its width and activations.
    # Measured on 512 real Fashion-MNIST test images, relative to ||sigma_L||^2:
    #   resnet8 (64 ch, ||sigma_L||^2 = 2.2): mean term median 0.32, 90th pct 0.48;
    #                                          std term median 0.11, 90th pct 0.18
    #   mobilenetv2 (128 ch, ||sigma_L||^2 = 66): mean term median 0.53, 90th pct 0.79;
    #                                          std term median 0.16, 90th pct 0.22
    # None therefore means delta = 0.5 * ||sigma_L||^2: typical real images are within
    # the margin and only clearly atypical ones are pulled back (an absolute 1.0 would
    # sit at resnet8's 90th percentile but below every real image of mobilenetv2).
    odsl_delta: float | None = None
    lr: float = 16.0
    optimizer: str = "radam"
    scheduler: str = "plateau"
    patience: int | None = None
    factor: float = 0.5
    min_lr: float = 1e-4
    crop_margin: int | None = None
    smoothing_sigma: float = 1.25
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    preprocess: str | None = None
    stats_refresh: str = "reuse"
    allow_no_bn: bool = False
    checkpoint: str | None = None
    checkpoint_every: int = 25
    resume: bool = False
    # Measured in one process, alternating, 128 images, batch 64, 2 threads under load ~5:
    # best step fmnist_mobilenetv2 256.4 -> 217.2 ms (-15%), fmnist_resnet8 107.7 -> 107.5
    # ms (no change); oneDNN convolutions skip their NCHW <-> blocked reorders.
    channels_last: bool = True
    distributed: bool = False
    plateau_stop: int | None = None
    coarse_to_fine: tuple[tuple[float, float], ...] | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "coarse_to_fine", parse_schedule(self.coarse_to_fine))
        for option, count in (("--images", self.images), ("--iterations", self.iterations),
                              ("--batch-size", self.batch_size),
                              ("--checkpoint-every", self.checkpoint_every)):
            _positive_int(option, count)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63:
            raise InvalidInputError(f"--seed {self.seed!r} is not an integer in [0, 2^63)", "give e.g. --seed 0")
        _choice("--method", self.method, METHODS)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _choice("--scheduler", self.scheduler, SCHEDULERS)
        _choice("--stats-refresh", self.stats_refresh, STATS_REFRESH)
        _choice("--device", self.device, ("cpu", "cuda"))
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InvalidInputError(
                    "--device cuda was requested but torch sees no CUDA device",
                    "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU",
                )
        _finite("--odsl-lambda", self.odsl_lambda, minimum=0.0)
        if self.odsl_delta is not None:
            _finite("--odsl-delta", self.odsl_delta, minimum=0.0)
        _finite("--lr", self.lr, minimum=0.0, strict=True)
        _finite("--min-lr", self.min_lr, minimum=0.0)
        _finite("--smoothing-sigma", self.smoothing_sigma, minimum=0.0, strict=True)
        if not 0.0 < float(self.factor) < 1.0:
            raise InvalidInputError(f"--factor {self.factor} must lie strictly between 0 and 1", "the paper uses 0.5")
        for option, count in (("--patience", self.patience), ("--plateau-stop", self.plateau_stop)):
            if count is not None:
                _positive_int(option, count)
        if self.crop_margin is not None:
            if not isinstance(self.crop_margin, int) or isinstance(self.crop_margin, bool) or self.crop_margin < 0:
                raise InvalidInputError(f"--crop-margin {self.crop_margin!r} is not a non-negative integer", "give e.g. --crop-margin 4")
        if (self.mean is None) != (self.std is None):
            raise InvalidInputError("--mean and --std must be given together", "give both, e.g. --mean 0.286 --std 0.353")
        if self.mean is not None and self.std is not None:
            object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
            object.__setattr__(self, "std", tuple(float(v) for v in self.std))
            if not self.mean or not all(math.isfinite(v) for v in self.mean):
                raise InvalidInputError(f"--mean {self.mean} must be finite numbers", "give e.g. --mean 0.485,0.456,0.406")
            if not self.std or not all(math.isfinite(v) and v > 0 for v in self.std):
                raise InvalidInputError(f"--std {self.std} must be positive numbers", "give e.g. --std 0.229,0.224,0.225")
        if self.preprocess is not None:
            _choice("--preprocess", self.preprocess, tuple(PRESETS))
            if self.mean is not None or self.std is not None:
                raise InvalidInputError(
                    "--preprocess and --mean/--std exclude each other (both say how pixels map to the input)",
                    "give either --preprocess NAME or --mean/--std",
                )
        if self.resume and not self.checkpoint:
            raise InvalidInputError("--resume needs --checkpoint PATH", "give the checkpoint file of the interrupted run")

        # a parsed schedule is None or truthy
        for name in ("sas", "prep", "odsl", "coarse_to_fine"):
            if self.method in _NOT_OPTIMISED and getattr(self, name):
                raise InvalidInputError(
                    f"--{name.replace('_', '-')} has no effect with --method {self.method} "
                    "(no optimisation runs)",
                    "drop the option, or use --method dgh / bns",
                )

    @property
    def use_sas(self) -> bool:
        """Statistics aggregation over the whole set (explicit value, else on for ``dgh``, ``auto`` and ``mixed``)."""
        return self.method in ("dgh", "auto", "mixed") if self.sas is None else bool(self.sas)

    @property
    def use_prep(self) -> bool:
        """phi_prep every step (explicit value, else on for ``dgh``, ``auto`` and ``mixed``)."""
        return self.method in ("dgh", "auto", "mixed", "actreg") if self.prep is None else bool(self.prep)

    @property
    def use_odsl(self) -> bool:
        """Output distribution stretching loss (explicit value, else on for ``dgh``, ``auto`` and ``mixed``)."""
        return self.method in ("dgh", "auto", "mixed", "actreg") if self.odsl is None else bool(self.odsl)

    @property
    def effective_patience(self) -> int:
        """Plateau patience in iterations (paper setting ~ iterations / 50)."""
        return self.patience if self.patience is not None else max(1, self.iterations // 50)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        data = asdict(self)
        data["patience"] = self.effective_patience
        data["sas"], data["prep"], data["odsl"] = self.use_sas, self.use_prep, self.use_odsl
        for key in ("mean", "std"):
            if data[key] is not None:
                data[key] = list(data[key])
        if isinstance(data["coarse_to_fine"], tuple):
            data["coarse_to_fine"] = [list(stage) for stage in data["coarse_to_fine"]]
        return data


# What `onnxdgh quantize` generates when it makes its own images, by target bit width.
# docs/BENCHMARKS.md "Generation budget by bit width" (top-1 on the 10,000 Fashion-MNIST
# test images against today's generate defaults, 256 x 200 at full size): at W8A8 every
# budget down to 64 images x 25 iterations stays within 0.1 point on fmnist_resnet8, with
# or without coarse-to-fine; W4A8 (AdaRound) loses up to 0.6 point at 64 x 25 full size.
# So W8A8 gets 64 x 50 (1/16 of the work of 256 x 200); lower bit widths keep generate's
# defaults. No coarse-to-fine: on EfficientNet-Lite0 (224 px) the images optimised at
# 112 px lose their BN match when upsampled (whole-set loss back at its start, "Default
# `onnxdgh quantize` on a 224x224 classifier"), while at 28 px it carries over.
def generation_defaults(weight_bits: int, act_bits: int) -> dict[str, Any]:
    """The generation settings ``onnxdgh quantize`` uses by default for a target bit width.

    GenerateConfig keyword arguments (e.g. ``images``, ``iterations``, ``coarse_to_fine``);
    an empty dict means :class:`GenerateConfig`'s own defaults. Settings the caller gives
    explicitly win: ``GenerateConfig(**{**generation_defaults(w, a), **given})``.
    """
    return {"images": 64, "iterations": 50} if weight_bits >= 8 and act_bits >= 8 else {}


_SCHEDULE_HINT = ("give SCALE:UNTIL pairs with both strictly increasing in (0, 1), e.g. --coarse-to-fine 0.5:0.75, "
                  "or auto, or off")

AUTO_SCHEDULE: tuple[tuple[float, float], ...] = ((0.5, 0.75),)
"""The schedule ``coarse_to_fine="auto"`` runs: half the input size for the first 3/4 of the iterations."""


def parse_schedule(value: object) -> tuple[tuple[float, float], ...] | str | None:
    """A ``coarse_to_fine`` schedule as ``((scale, until), ...)``, ``"auto"``, or None for full size throughout.

    Accepts None, a sequence of (scale, until) pairs, or the CLI's text ``"SCALE:UNTIL[,SCALE:UNTIL...]"``
    (``"off"``/``"none"``/``""`` = None, ``"auto"`` kept as is).

    Raises:
        InvalidInputError: unparseable text, or scales/untils not strictly increasing in (0, 1).
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "off", "none"):
            return None
        if text == "auto":
            return "auto"
        try:
            parts = [part.split(":") for part in text.split(",")]
            value = [(float(scale), float(until)) for scale, until in parts]
        except ValueError:
            raise InvalidInputError(f"--coarse-to-fine {value!r} is not a schedule", _SCHEDULE_HINT) from None
    try:
        stages = tuple((float(scale), float(until)) for scale, until in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidInputError(f"--coarse-to-fine {value!r} is not a schedule", _SCHEDULE_HINT) from None
    if not stages:
        return None
    for column in (0, 1):
        numbers = [stage[column] for stage in stages]
        if not all(math.isfinite(v) and 0.0 < v < 1.0 for v in numbers) or any(b <= a for a, b in zip(numbers, numbers[1:])):
            raise InvalidInputError(f"--coarse-to-fine {value!r}: scales and untils must rise strictly within (0, 1)",
                                    _SCHEDULE_HINT)
    return stages


def _positive_int(option: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidInputError(f"{option} {value!r} is not a positive integer", f"give e.g. {option} 1 or more")


def _choice(option: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InvalidInputError(f"{option} {value!r} is not one of {', '.join(choices)}", f"use one of: {', '.join(choices)}")


def _finite(option: str, value: object, *, minimum: float, strict: bool = False) -> None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if not math.isfinite(number) or number < minimum or (strict and number == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise InvalidInputError(f"{option} {value!r} must be a finite number {bound}", f"give e.g. {option} 1")
