"""DGH image generation: stage 3 of the pipeline (paper Section 5, Algorithm 1, Appendix A.1).

Contract: :func:`generate` takes a model (path or :class:`~onnxdgh.load.LoadedModel`) and
a :class:`~onnxdgh.generation.config.GenerateConfig` and returns float32 N x C x H x W
images in the model's (normalized) input space plus a JSON-serialisable report. With a
fixed seed the images are identical on rerun on the same machine, and a run resumed from
a checkpoint ends with exactly the images of an uninterrupted run. With ``distributed``
the batches are split over the ranks of a torchrun launch and the images equal one
process's (:mod:`onnxdgh.generation.distributed`); every random draw is keyed by the image's
global index (:func:`~onnxdgh.generation.prep.view_draws`) so that this can hold.

Algorithm (``method="dgh"``): the images start as N(0, 1) noise on a canvas larger than
the input (phi_prep's crop margin) and are split into batches, each with its own
optimiser and plateau scheduler. Before the loop every batch is run once to store its BN
input statistics (Algorithm 1, lines 2-5). Then, for every iteration and every batch:
phi_prep -> forward -> the batch's per-channel moments at every BN input -> whole-set
moments by SAS (Eq. 5, the other batches' stored moments as constants) -> L_BNS (Eq. 4)
+ lambda * L_ODSL (Eq. 7-8) -> backward into this batch's pixels only -> optimiser and
scheduler step -> refresh this batch's stored moments. Weights never get gradients.

L_ODSL over the set is (1/|D|) sum_k l(x_k); the other batches' terms are constants, so a
batch contributes sum_{k in B_n} l(x_k) / |D|. Dividing by |D| rather than by the batch
size keeps lambda's meaning independent of how many batches the set is cut into: the
BNS gradient on one image also scales with 1/|D| under SAS. Without SAS (per-batch
scope) the scope is the batch and the divisor is its size.

Coarse to fine (``coarse_to_fine``): the first stages optimise smaller canvases (BN
statistics are per-channel moments over positions, defined at any size for a
convolutional net), then every canvas is upsampled (bilinear), gets a new optimiser at the
learning rate it had reached, and the SAS store is refilled at the new size. Off by
default: it pays on 28-px inputs but not at 224 px (README "Generation time on a CPU";
docs/BENCHMARKS.md, "generation-budget" and "quantize-224").

Refreshing the stored moments after a step (``stats_refresh``): the paper re-runs the
model on a fresh phi_prep view (Algorithm 1, lines 14-15); MCT stores the pre-step
moments, which costs nothing. Measured on samples/fmnist_resnet8.onnx (128 images,
batch 64, seed 0; whole-set BN loss of the exported images; real Fashion-MNIST test
images score 0.057): rerun, 100 iterations -> 0.379; reuse, 100 iterations -> 0.388;
reuse, 133 iterations (the same compute as rerun's 100: one extra no-grad forward per
step) -> 0.366. W8A8/W4A8 agreement with the float model after quantizing with each set
was the same within 0.1 point. Rerunning buys nothing for its cost, so "reuse" is the
default and "rerun" (the paper's algorithm) an option.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..convert import TorchModel, fold_bn_taps, to_torch
from ..errors import ConversionError, GenerationDivergedError, InvalidInputError, UnsupportedModelError
from ..fileio import check_output_path
from ..memory import check_run_memory
from ..load import REEXPORT_RECIPE, LoadedModel, load_model
from ..progress import progress_bar
from ..normalization import Normalization, describe
from ..normalization import resolve_normalization as resolve_input_normalization
from .checkpoint import load_checkpoint, rank_path, save_checkpoint
from .config import AUTO_SCHEDULE, GenerateConfig
from .distributed import SINGLE, Shard, close_shard, open_shard
from .activation import generate_actreg
from .losses import (
    StatsStore, batch_moments, bns_loss, flat_batch_moments, odsl_per_image, per_image_range,
)
from .method import bn_coverage, generate_mixed, resolve_method
from .prep import Preprocessor, auto_margin, image_noise, view_draws
from .procedural import procedural_images

__all__ = ["GenerationResult", "StepInfo", "generate", "evaluate_images", "resolve_normalization"]

_LOG = logging.getLogger(__name__)

AUTO_DELTA_RATIO = 0.5
"""Default ODSL delta as a fraction of ||sigma_L||^2 (evidence in config.py)."""

# Measured (64 images x 60 iterations, defaults otherwise): the largest whole-set BN loss
# after any iteration, and the largest SAS-scoped loss of any step, relative to the start:
# samples fmnist_resnet8 0.94 / 1.00 (metadata) and 0.68 / 1.00 (inferred range),
# fmnist_mobilenetv2 0.75 / 1.00 and 0.74 / 1.00, the tests' consistent tiny model
# 0.99 / 1.00 (seeds 0 and 1), a tiny model with unsettled BN 0.99 / 1.00. A healthy run
# never rose above its start; 4x leaves room for transients and still stops early.
DIVERGED_RISE = 4.0
"""A whole-set BN loss above this multiple of its start stops the run as diverged (see ``_Run._check``)."""

PLATEAU_TOLERANCE = 0.01
"""``plateau_stop``: an improvement of the whole-set BN loss smaller than this fraction of its best is none."""

# Methods that need no BN statistics: nothing optimised, or activation.py's own loop.
_NO_BN_TARGETS = ("noise", "procedural", "actreg")

# Settings that do not change the images: a checkpoint stays valid when they change.
_NON_SEMANTIC = ("checkpoint", "checkpoint_every", "resume", "device", "channels_last", "distributed")


@dataclass(frozen=True)
class GenerationResult:
    """Generated images (float32 N x C x H x W, model input space) and the run's report.

    ``rank``: this process's rank in a ``distributed`` run (every rank gets all images and
    the same report; only rank 0 should write them), else 0.
    """

    images: np.ndarray = field(repr=False)
    report: dict[str, Any]
    rank: int = 0


@dataclass(frozen=True)
class StepInfo:
    """Passed to a ``callback`` after every optimisation step of one batch."""

    iteration: int
    batch: int
    loss: float
    bns_loss: float
    output_range: float
    lr: float


# ------------------------------------------------------------------ normalization


def resolve_normalization(loaded: LoadedModel, config: GenerateConfig) -> Normalization:
    """The input normalization ``config`` asks for: --mean/--std, --preprocess, metadata, else inferred.

    A BN-matching method first checks the model has BN targets: a folded export is the
    problem to fix first (its hint is the re-export recipe), and inference needs BN too.
    ``method="auto"`` is resolved first (:func:`~onnxdgh.generation.method.resolve_method`):
    on a model without BN statistics it picks a method that needs none.

    Raises:
        UnsupportedModelError / InvalidInputError: no usable BN targets (see :func:`generate`).
        InvalidInputError: bad values, or nothing decided (see
            :func:`onnxdgh.normalization.resolve_normalization`).
    """
    config = resolve_method(loaded, config)
    if config.method not in _NO_BN_TARGETS:
        _check_bn_targets(loaded, config)
    return resolve_input_normalization(loaded, mean=config.mean, std=config.std, preprocess=config.preprocess)


# ----------------------------------------------------------------------- generate


def generate(
    model: LoadedModel | str | os.PathLike[str],
    config: GenerateConfig = GenerateConfig(),
    *,
    progress: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
) -> GenerationResult:
    """Generate synthetic calibration images for ``model`` (DGH, or a baseline by ``config.method``).

    ``callback`` is called after every batch step (a ``KeyboardInterrupt`` raised there,
    or a Ctrl-C, stops the run after writing a checkpoint when one is configured).

    The input normalization comes from ``config`` (--mean/--std, --preprocess), else the
    model's metadata, else it is inferred from the first BN-ed layer
    (:mod:`onnxdgh.normalization`); images are kept in its valid range throughout.

    Raises:
        UnsupportedModelError: no usable BN statistics (unless ``method="noise"`` or
            ``allow_no_bn``).
        ConversionError: the model cannot be converted to torch.
        InvalidInputError: bad normalization values, a normalization that cannot be
            decided, or a checkpoint that does not match.
        GenerationDivergedError: the optimisation diverged (exit 1; see ``_Run``).
        OutputPathError: the checkpoint path cannot be written.
        ResourceError: the images and one batch through the model exceed the machine's memory.
    """
    started = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    load_s = time.perf_counter() - started
    requested = config.method
    config = resolve_method(loaded, config)
    if config.method == "mixed":
        mixed = generate_mixed(loaded, config, generate, progress=progress, callback=callback)
        return replace(mixed, report={**mixed.report, "method_requested": requested})
    if config.checkpoint:
        check_output_path(config.checkpoint, inputs=[loaded.source], option="--checkpoint")
    check_run_memory(loaded, images=config.images, batch_size=config.batch_size)
    for bn in loaded.bn_nodes:
        if not bn.usable:
            _LOG.warning("BN node %s is not used as a target: %s", bn.node_name, bn.problem)
    norm = resolve_normalization(loaded, config)
    if norm.inference is not None:
        _LOG.info("%s", describe(norm))
    report: dict[str, Any] = {
        "model": loaded.source,
        "method": config.method,
        "method_requested": requested,
        "seed": config.seed,
        "settings": config.to_dict(),
        "input_name": loaded.input_name,
        "input_shape": list(loaded.input_shape),
        "normalization": norm.to_dict(),
        # What `auto` decided from: usable BN layers per convolution (generation.method).
        "bn_available": len(loaded.usable_bn_nodes),
        "bn_coverage": round(bn_coverage(loaded), 4),
    }
    shard = open_shard(config.device) if config.distributed else SINGLE
    if config.method in _NO_BN_TARGETS:  # nothing to split: every rank draws the same set, rank 0 writes it
        close_shard(shard)
        if config.method == "actreg":
            images, report["actreg"] = generate_actreg(loaded, config, norm)
            report["final"] = {}
        else:
            images = _noise(loaded, config, norm, report)
        report["timings"] = {"load_s": round(load_s, 3),
                             "total_s": round(time.perf_counter() - started, 3)}
        return GenerationResult(images=images, report=report, rank=shard.rank)

    try:
        convert_started = time.perf_counter()
        torch_model = to_torch(loaded, device=config.device)
        convert_s = time.perf_counter() - convert_started
        run = _Run(torch_model, config, torch.from_numpy(norm.low), torch.from_numpy(norm.high),
                   shard)
        images, run_report = run.execute(progress=progress and shard.rank == 0, callback=callback,
                                         model_sha256=_model_sha256(loaded))
    finally:
        close_shard(shard)
    # Every rank holds all images and evaluates them (the same numbers on each): one
    # forward pass over the set, small against the iterations.
    evaluate_started = time.perf_counter()
    evaluation = evaluate_images(torch_model, images, batch_size=config.batch_size)
    evaluate_s = time.perf_counter() - evaluate_started
    run_final = run_report.pop("final")
    run_timings = run_report.pop("timings")
    report["normalization"]["clamped_fraction"] = run_report.pop("clamped_fraction")
    report.update(run_report)
    report["final"] = {**evaluation, **run_final}
    report["timings"] = {
        "load_s": round(load_s, 3),
        "convert_s": round(convert_s, 3),
        **run_timings,
        "evaluate_s": round(evaluate_s, 3),
        "total_s": round(time.perf_counter() - started, 3),
    }
    return GenerationResult(images=images, report=report, rank=shard.rank)


def _check_bn_targets(loaded: LoadedModel, config: GenerateConfig) -> None:
    """Refuse a BN-matching run without usable BN statistics (unless ``allow_no_bn`` and ODSL)."""
    usable = loaded.usable_bn_nodes
    if not usable and not config.allow_no_bn:
        problem = "has no BatchNormalization nodes" if not loaded.bn_nodes else "has no BatchNormalization node with usable statistics"
        raise UnsupportedModelError(
            f"{loaded.source} {problem}; DGH needs them as targets (the export probably folded BN into Conv)",
            f"re-export keeping BN: {REEXPORT_RECIPE}; or use --method procedural (what --method auto picks), "
            "or --allow-no-bn for DGH without BN terms",
        )
    if not usable and config.method == "bns":
        raise InvalidInputError(
            f"--method bns has nothing to match: {loaded.source} has no usable BN statistics",
            "use --method procedural, or --method dgh --allow-no-bn",
        )
    if not usable and not config.use_odsl:
        raise InvalidInputError(
            f"nothing to optimise: {loaded.source} has no usable BN statistics and ODSL is off",
            "drop --no-odsl, or use --method procedural",
        )


def _model_sha256(loaded: LoadedModel) -> str:
    return hashlib.sha256(loaded.model.SerializeToString(deterministic=True)).hexdigest()


def _noise(
    loaded: LoadedModel, config: GenerateConfig, norm: Normalization, report: dict[str, Any]
) -> np.ndarray:
    """The methods that run nothing through the model: Gaussian noise or procedural images.

    Adds the clamped fraction and the evaluation (``final``) to ``report``.
    """
    if config.method == "procedural":
        images = torch.from_numpy(procedural_images(config.images, loaded.input_shape, config.seed, norm.mean, norm.std))
    else:
        images = torch.randn((config.images, *loaded.input_shape), generator=torch.Generator().manual_seed(config.seed))
    lo, hi = torch.from_numpy(norm.low).view(1, -1, 1, 1), torch.from_numpy(norm.high).view(1, -1, 1, 1)
    report["normalization"]["clamped_fraction"] = float(
        ((images < lo) | (images > hi)).float().mean())
    array = torch.maximum(torch.minimum(images, hi), lo).numpy().astype(np.float32)
    report["final"] = {}
    if loaded.usable_bn_nodes:
        try:
            report["final"] = evaluate_images(to_torch(loaded, device=config.device), array,
                                              batch_size=config.batch_size)
        except ConversionError as exc:
            report["final"] = {"note": f"not evaluated: {exc.message}"}
    return array


# ---------------------------------------------------------------------- the run


class _Run:
    """One generation run: state (images, optimisers, stored moments) and the loop.

    With a :class:`~onnxdgh.generation.distributed.Shard` of several ranks this process
    holds only its own batches' canvases, optimisers and schedulers (batch b on rank
    b % world) and the SAS store of every batch; the loop steps one round of ``world``
    batches at a time (see :mod:`onnxdgh.generation.distributed` for why the images equal
    one process's).
    """

    def __init__(self, model: TorchModel, config: GenerateConfig, low: torch.Tensor | None, high: torch.Tensor | None,
                 shard: Shard = SINGLE):
        if shard.world > 1 and config.stats_refresh == "rerun":
            raise InvalidInputError(
                "--stats-refresh rerun cannot be split over processes (a batch's refreshed statistics "
                "come after its step, which the other ranks would need in the same round)",
                "use --stats-refresh reuse (the default), or run in one process",
            )
        self.shard = shard
        self.channels_last = config.channels_last and len(model.loaded.input_shape) == 3
        model = fold_bn_taps(model)  # a private copy when anything folds
        if self.channels_last:
            # a private copy: the caller's module keeps its layout
            model = replace(
                model, _probe=copy.deepcopy(model._probe).to(memory_format=torch.channels_last)
            )
        self.model = model
        self.config = config
        self.device = torch.device(config.device)
        channels, height, width = model.loaded.input_shape
        margin = config.crop_margin if config.crop_margin is not None else auto_margin(height, width)
        schedule = AUTO_SCHEDULE if config.coarse_to_fine == "auto" else config.coarse_to_fine
        self.stages = _stages(schedule, config.iterations, height, width, margin)  # type: ignore[arg-type]
        self.stage = 0
        self.layers = model.bn_layers
        unfit = self._unfit_stage()
        if unfit is not None:
            what = (f"the model does not run at {unfit.height}x{unfit.width} (scale {unfit.scale:g} of "
                    f"{height}x{width}); its graph fixes the input size")
            if config.coarse_to_fine != "auto":
                raise InvalidInputError(f"--coarse-to-fine: {what}", "drop --coarse-to-fine (or give --coarse-to-fine off)")
            _LOG.warning("coarse-to-fine schedule skipped: %s; optimising at full size throughout", what)
            self.stages = _stages(None, config.iterations, height, width, margin)
        self.preps = [
            Preprocessor(channels, stage.height, stage.width, margin=stage.margin, sigma=config.smoothing_sigma,
                         enabled=config.use_prep, low=low, high=high, device=self.device)
            for stage in self.stages
        ]
        self.starts = list(range(0, config.images, config.batch_size))
        self.sizes = [min(config.batch_size, config.images - start) for start in self.starts]
        self.local = [batch for batch in range(len(self.sizes)) if shard.owns(batch)]
        self.targets = [(layer.mean, layer.std) for layer in self.layers]
        # Eq. 6 constrains per-image statistics at the last BN layer: the deepest one (a
        # shortcut's BN may come later in the node list but sees shallower features). A BN
        # on an N x C tensor has no per-image spread, so spatial BNs are preferred.
        ranked = sorted(range(len(self.layers)), key=lambda i: (self.layers[i].spatial, self.layers[i].depth, i))
        self.last_bn: int | None = ranked[-1] if ranked else None
        if config.odsl_delta is not None:
            self.delta = float(config.odsl_delta)
        elif self.last_bn is not None:
            self.delta = AUTO_DELTA_RATIO * float((self.layers[self.last_bn].std ** 2).sum())
        else:
            self.delta = 0.0
        # Each image's noise and view draws are keyed by its global index (prep.py), so
        # they do not depend on the batch order or on the rank that steps the image.
        self.canvases: dict[int, torch.Tensor] = {}
        self.optimizers: dict[int, torch.optim.Optimizer] = {}
        self.schedulers: dict[int, torch.optim.lr_scheduler.ReduceLROnPlateau | None] = {}
        for batch in self.local:
            self._start_batch(batch, image_noise(config.seed, self._indices(batch),
                                                 self.prep.canvas_shape))
        self._project()
        # All BN layers' channels as one vector (Eq. 4-5 are sums/maps over channels, so
        # concatenating layers changes nothing): the per-layer SAS and loss arithmetic on
        # small vectors ran ~20 tiny ops per layer per step, forward and backward.
        self.channels = [layer.channels for layer in self.layers]
        self.flat_targets = ([tuple(torch.cat(part) for part in zip(*self.targets))]
                             if self.layers else [])
        # Folded BN layers (fold_bn_taps) expose their output y = a x + c; map the moments back.
        self.taps = model.bn_taps or (None,) * len(self.layers)
        self.tap_scale = self.tap_shift = None
        if any(tap is not None for tap in self.taps):
            pairs = [tap if tap is not None
                     else (torch.ones(size, device=self.device),
                           torch.zeros(size, device=self.device))
                     for tap, size in zip(self.taps, self.channels)]
            self.tap_scale, self.tap_shift = (torch.cat(part) for part in zip(*pairs))
        self.store = StatsStore(self.sizes, [sum(self.channels)] if self.layers else [], self.device)
        self.history: list[float] = []
        self.initial_bns: float | None = None
        # the divergence check's reference: the start, or the loss right after a resolution
        # switch when that is higher (the upsampled images are a new start at the new size)
        self.check_base: float | None = None
        self.position = (0, 0)  # next (iteration, batch) to run; batch is a round's first
        self.elapsed = 0.0
        self.last_step: dict[str, float] = {}

    @property
    def prep(self) -> Preprocessor:
        """phi_prep of the current resolution stage."""
        return self.preps[self.stage]

    def _unfit_stage(self) -> _Stage | None:
        """The first coarse stage the model cannot run (an input size its graph rejects, or BN layers lost), else None."""
        channels = self.model.loaded.input_shape[0]
        for stage in self.stages[:-1]:
            try:
                with torch.no_grad():
                    probe = self.model.probe(torch.zeros((1, channels, stage.height, stage.width), device=self.device))
                if len(probe.bn_inputs) == len(self.layers):
                    continue
            except Exception as exc:  # noqa: BLE001 - any failure of the converted graph at this size means the same
                _LOG.debug("probe at %dx%d failed: %r", stage.height, stage.width, exc)
            return stage
        return None

    def _advance_stage(self) -> None:
        """Move to the next resolution stage: upsample every canvas, new optimisers, fresh SAS statistics.

        Bilinear upsampling of the whole canvas keeps its field of view (the margins scale
        with the side). Each batch's optimiser and scheduler restart on the new canvas at
        the learning rate the batch had reached: a restart at the initial rate (16, in
        pixel units) would throw the warm-started pixels back to the range's bounds.
        The stored moments came from the smaller views; one forward pass at the new size
        replaces them so the whole-set loss (Eq. 4-5) compares like with like.
        """
        self.stage += 1
        shape = self.prep.canvas_shape
        with torch.no_grad():
            for batch, canvas in self.canvases.items():
                lr = float(self.optimizers[batch].param_groups[0]["lr"])
                fine = torch.nn.functional.interpolate(canvas.detach(), size=shape[1:], mode="bilinear", align_corners=False)
                self._start_batch(batch, self.prep.clamp(fine), lr)
        self._fill_store()
        switched = self._set_bns()
        self._check(switched, f"after upsampling to {self.prep.height}x{self.prep.width}")
        self.check_base = max(self.check_base or 0.0, switched)

    def _indices(self, batch: int) -> range:
        """Global indices of the images of ``batch``."""
        return range(self.starts[batch], self.starts[batch] + self.sizes[batch])

    def _project(self, index: int | None = None) -> None:
        """Keep canvas pixels in the valid range (projected gradient descent).

        The paper clamps only the final images. Measured on samples/fmnist_resnet8.onnx
        (64 images, 100 iterations, ODSL off): optimising unconstrained left 18% of the
        pixels outside [0, 1], and clamping them at the end raised the whole-set BN loss
        of the exported images from 1.6 (as optimised) to 5.0; projecting after every
        step gave 0.34 with nothing left to clamp. Smoothing is a convex combination with
        zero padding (the mean pixel), so final images stay in range.
        """
        if self.prep.low is None:
            return
        with torch.no_grad():
            for canvas in self.canvases.values() if index is None else [self.canvases[index]]:
                canvas.copy_(self.prep.clamp(canvas))

    def _start_batch(self, batch: int, canvas: torch.Tensor, lr: float | None = None) -> None:
        """Optimise ``canvas`` as ``batch``'s images, with a new optimiser (at ``lr``, else the
        initial rate) and scheduler."""
        config = self.config
        canvas = self.canvases[batch] = canvas.to(self.device).requires_grad_(True)
        optimizer_type = torch.optim.RAdam if config.optimizer == "radam" else torch.optim.Adam
        optimizer = self.optimizers[batch] = optimizer_type(
            [canvas], lr=config.lr if lr is None else lr)
        self.schedulers[batch] = (
            None if config.scheduler == "none" else torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=config.factor, patience=config.effective_patience,
                min_lr=config.min_lr))

    # -- state ----------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {key: value for key, value in self.config.to_dict().items()
                if key not in _NON_SEMANTIC}

    def _checkpoint_path(self) -> str:
        assert self.config.checkpoint is not None
        return rank_path(self.config.checkpoint, self.shard.rank, self.shard.world)

    def _state(self, model_sha256: str) -> dict[str, Any]:
        return {
            "model_sha256": model_sha256,
            "settings": json.dumps(self._settings(), sort_keys=True),
            "rank": self.shard.rank,
            "world": self.shard.world,
            "iteration": self.position[0],
            "batch": self.position[1],
            "stage": self.stage,
            "canvases": [self.canvases[batch].detach().cpu() for batch in self.local],
            "optimizers": [self.optimizers[batch].state_dict() for batch in self.local],
            "schedulers": [s.state_dict() if (s := self.schedulers[batch]) is not None else {} for batch in self.local],
            "stats": self._layer_stats(),
            "history": list(self.history),
            "initial_bns": self.initial_bns if self.initial_bns is not None else float("nan"),
            "check_base": self.check_base if self.check_base is not None else float("nan"),
            "elapsed_s": self.elapsed,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if (int(state.get("rank", 0)), int(state.get("world", 1))) != (self.shard.rank, self.shard.world):
            raise InvalidInputError(
                f"checkpoint {self._checkpoint_path()} belongs to rank {state.get('rank', 0)} of "
                f"{state.get('world', 1)} processes, this is rank {self.shard.rank} of {self.shard.world}",
                "resume with as many processes as the interrupted run, or delete the checkpoints",
            )
        stage = int(state.get("stage", 0))
        if len(state["canvases"]) != len(self.local) or not 0 <= stage < len(self.stages):
            raise InvalidInputError("checkpoint images do not match the settings", "delete the checkpoint")
        if stage != self.stage:  # interrupted after a resolution switch: the canvases of that size
            self.stage = stage
            for batch in self.local:
                self._start_batch(batch, torch.zeros((self.sizes[batch], *self.prep.canvas_shape)))
        with torch.no_grad():
            for batch, saved in zip(self.local, state["canvases"]):
                canvas = self.canvases[batch]
                if canvas.shape != saved.shape:
                    raise InvalidInputError("checkpoint images do not match the settings", "delete the checkpoint")
                canvas.copy_(saved.to(self.device))
        for batch, optimizer, scheduler in zip(self.local, state["optimizers"],
                                               state["schedulers"]):
            self.optimizers[batch].load_state_dict(optimizer)
            if self.schedulers[batch] is not None:
                self.schedulers[batch].load_state_dict(scheduler)
        stats = state["stats"]
        if self.layers:
            if len(stats["means"]) != len(self.layers):
                raise InvalidInputError("checkpoint statistics do not match the model's BN layers", "delete the checkpoint")
            stats = {key: [torch.cat(list(stats[key]), dim=1)] for key in ("means", "vars")}
        self.store.load_state_dict(stats)
        self.history = [float(v) for v in state["history"]]
        initial = float(state["initial_bns"])
        self.initial_bns = None if np.isnan(initial) else initial
        base = float(state.get("check_base", initial))
        self.check_base = None if np.isnan(base) else base
        self.position = (int(state["iteration"]), int(state["batch"]))
        self.elapsed = float(state["elapsed_s"])

    def _resume(self, model_sha256: str) -> list[int] | None:
        """Load this rank's checkpoint when resuming; all ranks must find theirs at one position.

        Returns the position resumed from, or None for a fresh start (after the initial pass).
        """
        config = self.config
        path = self._checkpoint_path() if config.checkpoint else None
        found = bool(config.resume and path and Path(path).exists())
        flags = [bool(row[0]) for row in self.shard.agree([float(found)])]
        if any(flags) and not all(flags):
            missing = [rank for rank, flag in enumerate(flags) if not flag]
            raise InvalidInputError(
                f"--resume: the checkpoints of ranks {missing} are missing ({config.checkpoint}.rankN)",
                "resume with the same number of processes, or delete the checkpoints and start again",
            )
        if not found:
            if config.resume:
                _LOG.warning("checkpoint %s does not exist yet: starting from the beginning", path)
            self._initial_pass()
            return None
        self._restore(load_checkpoint(path, model_sha256=model_sha256, settings=self._settings()))
        positions = {tuple(row) for row in self.shard.agree([float(self.position[0]), float(self.position[1])])}
        if len(positions) > 1:
            raise InvalidInputError(
                f"--resume: the ranks' checkpoints stop at different steps {sorted(positions)}",
                "delete the checkpoints and start again (a rank was stopped between two checkpoints)",
            )
        _LOG.info("resuming %s at iteration %d, batch %d", path, *self.position)
        return list(self.position)

    # -- loop -----------------------------------------------------------------

    def _moments(self, view: torch.Tensor) -> tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]]:
        if self.channels_last:
            view = view.contiguous(memory_format=torch.channels_last)
        probe = self.model.probe(view)
        if not self.layers:
            return probe, []
        mean, var = flat_batch_moments(probe.bn_inputs)
        if self.tap_scale is not None:
            mean = (mean - self.tap_shift) / self.tap_scale
            var = var / self.tap_scale.square()
        return probe, [(mean, var)]

    def _view(self, batch: int, view: int) -> torch.Tensor:
        """View number ``view`` of ``batch``'s canvas (0: the initial pass; 2t+1 / 2t+2: iteration t's step / rerun)."""
        flips, tops, lefts = view_draws(self.config.seed, self._indices(batch), view, self.prep.margin)
        return self.prep.train_view_at(self.canvases[batch], flips, tops, lefts)

    def _rounds(self) -> range:
        """First batches of the rounds of one iteration."""
        return range(0, len(self.sizes), self.shard.world)

    def _share_round(self, first: int, moments: list[tuple[torch.Tensor, torch.Tensor]] | None) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The detached moments of every batch of the round starting at ``first`` (this rank's: ``moments``)."""
        if not self.layers:
            return {}
        width = sum(self.channels)
        mine = torch.cat([moments[0][0].detach(), moments[0][1].detach()]) if moments is not None else \
            torch.zeros(2 * width, device=self.device)
        return {first + rank: [(part[:width], part[width:])]
                for rank, part in enumerate(self.shard.gather(mine))
                if first + rank < len(self.sizes)}

    def _layer_stats(self) -> dict[str, list[torch.Tensor]]:
        """The stored statistics split per BN layer (the checkpoint format)."""
        flat = self.store.state_dict()
        if not self.layers:
            return flat
        return {key: [part.clone() for part in flat[key][0].split(self.channels, dim=1)] for key in ("means", "vars")}

    def _set_bns(self) -> float:
        if not self.layers:
            return 0.0
        with torch.no_grad():
            return float(bns_loss(self.store.all_moments(), self.flat_targets))

    def _check(self, value: float, where: str) -> None:
        """Stop a diverged run: a non-finite loss, or a whole-set BN loss far above its start.

        Images are projected into the valid input range after every step, so their values
        cannot run away; what remains is the loss. DGH lowers the whole-set BN loss by one
        to two orders of magnitude from the noise it starts at (samples: 30 -> 0.3); a
        loss DIVERGED_RISE times its start means the steps push the statistics away from
        the targets (too large a learning rate, or targets the input range cannot reach).
        A diverged set is refused (exit 1) rather than written: its thresholds would be
        meaningless, and quantizing with it gives a model that "passes" on its own images.
        """
        hint = ("check the input normalisation (give --preprocess or --mean/--std); "
                "with `onnxdgh generate`, also try a lower --lr")
        if not math.isfinite(value):
            raise GenerationDivergedError(f"image generation diverged: the loss is {value} {where}", hint)
        start = self.check_base
        if start is not None and start > 0 and value > DIVERGED_RISE * start:
            raise GenerationDivergedError(
                f"image generation diverged: the whole-set BN loss rose from {start:.4g} to {value:.4g} {where}", hint
            )

    def _plateaued(self) -> bool:
        """Whether ``plateau_stop`` iterations have passed without the whole-set BN loss improving.

        Improving means falling below (1 - PLATEAU_TOLERANCE) x the best loss before those
        iterations. The history is the same on every rank, so all ranks stop together.
        """
        window = self.config.plateau_stop
        if window is None or self.stage < len(self.stages) - 1:
            return False
        history = self.history[self.stages[-1].start:]  # history[i] is after iteration i; other sizes do not compare
        if len(history) <= window:
            return False
        best_before = min(history[:-window])
        return min(history[-window:]) > (1.0 - PLATEAU_TOLERANCE) * best_before

    def _fill_store(self) -> None:
        """Store every batch's moments from one no-grad forward pass (view 0; Algorithm 1, lines 2-5)."""
        with torch.no_grad():
            for first in self._rounds():
                batch = first + self.shard.rank
                moments = self._moments(self._view(batch, 0))[1] if batch in self.canvases else None
                for other, shared in self._share_round(first, moments).items():
                    self.store.store(other, shared)

    def _initial_pass(self) -> None:
        self._fill_store()
        self.initial_bns = self.check_base = self._set_bns()
        self._check(self.initial_bns, "at the start (the model's outputs on the initial noise)")

    def _step(self, index: int, probe: Any, moments: list[tuple[torch.Tensor, torch.Tensor]]) -> StepInfo:
        """Loss, backward and optimiser step of batch ``index`` from its forward pass (probe, moments)."""
        config = self.config
        optimizer = self.optimizers[index]
        scoped = self.store.global_moments(index, moments) if config.use_sas else moments
        loss = bns_loss(scoped, self.flat_targets) if self.layers else torch.zeros((), device=self.device)
        bns_value = float(loss.detach())
        low, high = per_image_range([t.detach() for t in probe.stretch])
        spread = float((high - low).mean())
        if config.use_odsl and config.odsl_lambda > 0:
            last_input = probe.bn_inputs[self.last_bn] if self.last_bn is not None else None
            last_target = self.targets[self.last_bn] if self.last_bn is not None else None
            last_tap = self.taps[self.last_bn] if self.last_bn is not None else None
            per_image = odsl_per_image(probe.stretch, last_input, last_target, self.delta, tap=last_tap)
            scope = config.images if config.use_sas else self.sizes[index]
            loss = loss + config.odsl_lambda * per_image.sum() / scope
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self._project(index)
        value = float(loss.detach())
        scheduler = self.schedulers[index]
        if scheduler is not None:
            scheduler.step(value)
        return StepInfo(
            iteration=self.position[0], batch=index, loss=value, bns_loss=bns_value, output_range=spread,
            lr=float(optimizer.param_groups[0]["lr"]),
        )

    def _round(self, first: int, interrupted: bool) -> tuple[list[StepInfo], bool]:
        """Step this rank's batch of the round starting at ``first``; every batch's StepInfo and any rank's interrupt.

        Algorithm 1, lines 7-15 for one batch per rank. Before the loss, the store holds
        what one process would hold when it reaches this batch: the round-mates below it
        already stepped this iteration (their fresh forward moments), those above not.
        """
        iteration = self.position[0]
        batch = first + self.shard.rank
        mine = batch in self.canvases
        probe, moments = self._moments(self._view(batch, 2 * iteration + 1)) if mine else (None, None)
        shared = self._share_round(first, moments)
        for other in range(first, batch):
            if other in shared:
                self.store.store(other, shared[other])
        info = self._step(batch, probe, moments) if mine else None
        if self.config.stats_refresh == "rerun":  # one process only (see __init__)
            with torch.no_grad():
                _, fresh = self._moments(self._view(batch, 2 * iteration + 2))
            self.store.store(batch, fresh)
        else:
            for other, values in shared.items():
                self.store.store(other, values)
        row = [info.loss, info.bns_loss, info.output_range, info.lr, 1.0] if info is not None else [0.0] * 5
        rows = self.shard.agree([*row, float(interrupted)])
        infos = [
            StepInfo(iteration=iteration, batch=first + rank, loss=r[0], bns_loss=r[1], output_range=r[2], lr=r[3])
            for rank, r in enumerate(rows) if r[4]
        ]
        return infos, any(r[5] for r in rows)

    def execute(
        self, *, progress: bool, callback: Callable[[StepInfo], None] | None, model_sha256: str
    ) -> tuple[np.ndarray, dict[str, Any]]:
        config = self.config
        resumed_from = self._resume(model_sha256)

        n_batches = len(self.sizes)
        rounds = list(self._rounds())
        bar = progress_bar(total=config.iterations * n_batches,
                           initial=self.position[0] * n_batches + self.position[1],
                           enabled=progress, desc="generate", unit="step")
        # Two clocks: run_started restarts at each checkpoint (self.elapsed adds up the run
        # over resumes); loop_started times this process's share, the rate's denominator.
        loop_started = run_started = time.perf_counter()
        image_steps = 0
        stopped_at: int | None = None
        try:
            with _deferred_interrupt() as interrupted:
                for iteration in range(self.position[0], config.iterations):
                    while self.stages[self.stage].end <= iteration:
                        self._advance_stage()
                    if self._plateaued():
                        stopped_at = iteration
                        if config.checkpoint:
                            save_checkpoint(self._checkpoint_path(), self._state(model_sha256))
                        break
                    start = self.position[1] if iteration == self.position[0] else 0
                    for first in rounds[rounds.index(start):]:
                        self.position = (iteration, first)
                        infos, stop = self._round(first, interrupted())
                        following = first + self.shard.world
                        self.position = (iteration, following) if following < n_batches else (iteration + 1, 0)
                        for info in infos:
                            image_steps += self.sizes[info.batch]
                            self._check(info.loss, f"at iteration {iteration + 1}, batch {info.batch + 1}")
                            self.last_step = {"loss": info.loss, "bns_loss_scope": info.bns_loss,
                                              "output_range": info.output_range, "lr": info.lr}
                        if following >= n_batches:
                            self.history.append(self._set_bns())
                            self._check(self.history[-1], f"after iteration {iteration + 1}")
                        for info in infos:
                            bar.set_postfix(bns=f"{self.history[-1] if self.history else info.bns_loss:.4g}",
                                            range=f"{info.output_range:.3g}", lr=f"{info.lr:.3g}", refresh=False)
                            bar.update(1)
                            if callback is not None:
                                callback(info)
                        if stop or (self.shard.world == 1 and interrupted()):
                            raise KeyboardInterrupt
                    if config.checkpoint and (
                        (iteration + 1) % config.checkpoint_every == 0 or iteration + 1 == config.iterations
                    ):
                        self.elapsed += time.perf_counter() - run_started
                        run_started = time.perf_counter()
                        save_checkpoint(self._checkpoint_path(), self._state(model_sha256))
        except KeyboardInterrupt:
            if config.checkpoint:
                self.elapsed += time.perf_counter() - run_started
                save_checkpoint(self._checkpoint_path(), self._state(model_sha256))
                _LOG.warning(
                    "interrupted at iteration %d, batch %d; checkpoint written to %s (continue with --resume)",
                    self.position[0], self.position[1], self._checkpoint_path(),
                )
            raise
        finally:
            bar.close()
        while self.stage < len(self.stages) - 1:  # a schedule whose full-size stage never ran (resumed at the end)
            self._advance_stage()
        self.elapsed += time.perf_counter() - run_started
        optimise_s = time.perf_counter() - loop_started

        unclamped = self._final_images()
        finals = [self.prep.clamp(image) for image in unclamped]
        images = torch.cat(finals).cpu().numpy().astype(np.float32)
        clamped = float(sum(int((f != u).sum()) for f, u in zip(finals, unclamped)) / max(1, images.size))
        report = {
            "bn_layers": len(self.layers),
            "stretch_tensors": list(self.model.stretch_names),
            "last_bn_layer": self.layers[self.last_bn].node_name if self.last_bn is not None else None,
            "odsl_delta": self.delta,
            "crop_margin": self.prep.margin,
            "resolution_stages": [
                {"scale": st.scale, "size": [st.height, st.width], "crop_margin": st.margin, "iterations": [st.start, st.end]}
                for st in self.stages
            ],
            "batches": n_batches,
            "processes": self.shard.world,
            "resumed_from": resumed_from,
            "iterations_run": stopped_at if stopped_at is not None else config.iterations,
            "stopped_on_plateau": stopped_at is not None,
            "clamped_fraction": clamped,
            "final": {
                "bns_loss_initial": self.initial_bns,
                "bns_loss_last_iteration": self.history[-1] if self.history else None,
                "bns_loss_history": _thin(self.history, 20),
                "last_step": self.last_step,
            },
            "timings": {
                "optimise_s": round(optimise_s, 3),
                "optimise_total_s": round(self.elapsed, 3),
                "image_iterations": image_steps,
                "image_iterations_per_s": round(image_steps / optimise_s, 2) if optimise_s > 0 else None,
            },
        }
        return images, report

    def _final_images(self) -> list[torch.Tensor]:
        """Every batch's unclamped final images, in batch order, on every rank."""
        result = []
        for first in self._rounds():
            batch = first + self.shard.rank
            # all_gather needs one shape on every rank: pad to a full batch
            padded = torch.zeros((self.config.batch_size, *self.model.loaded.input_shape), device=self.device)
            if batch in self.canvases:
                mine = self.prep.final_unclamped(self.canvases[batch].detach())
                padded[: mine.shape[0]] = mine
            for rank, part in enumerate(self.shard.gather(padded)):
                if first + rank < len(self.sizes):
                    result.append(part[: self.sizes[first + rank]])
        return result


@dataclass(frozen=True)
class _Stage:
    """One resolution stage: iterations ``start`` to ``end`` (exclusive) at ``height`` x ``width``."""

    scale: float
    start: int
    end: int
    height: int
    width: int
    margin: int


def _stages(schedule: tuple[tuple[float, float], ...] | None, iterations: int, height: int, width: int,
            margin: int) -> list[_Stage]:
    """The resolution stages of a run: ``schedule``'s, then full size (stages of 0 iterations dropped).

    A stage at ``scale`` optimises ``round(scale * side)``-pixel views on a canvas whose
    crop margin scales the same way (at least 1 px when the full size has one), so the
    random crops shift the image by the same fraction of its side at every stage. The
    3x3 smoothing prior stays 3x3 on the smaller canvas: it damps pixel-to-pixel noise of
    what is being optimised, and the bilinear upsampling adds no high frequencies.
    Boundaries are ``floor(until * iterations)``: the full-size stage always runs at least
    one iteration.
    """
    stages: list[_Stage] = []
    start = 0
    for scale, until in schedule or ():
        end = int(math.floor(until * iterations))
        if end > start:
            side_margin = max(1, int(round(margin * scale))) if margin > 0 else 0
            stages.append(_Stage(scale, start, end, max(1, int(round(height * scale))), max(1, int(round(width * scale))),
                                 side_margin))
            start = end
    stages.append(_Stage(1.0, start, iterations, height, width, margin))
    return stages


def _thin(values: list[float], count: int) -> list[list[float]]:
    """Up to ``count`` (iteration, value) pairs, evenly spread, last included."""
    step = max(1, len(values) // count)
    picked = sorted({*range(step - 1, len(values), step), len(values) - 1}) if values else []
    return [[index + 1, float(values[index])] for index in picked]


@contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Turn the first Ctrl-C into a flag checked between batch steps (a second one stops at once).

    A KeyboardInterrupt in the middle of an optimiser step could leave a batch half
    updated, and a checkpoint of that state would not resume to the same images.
    """
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag["set"]:
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        flag["set"] = True

    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: flag["set"]
    finally:
        signal.signal(signal.SIGINT, previous)


# -------------------------------------------------------------------- evaluation


def evaluate_images(model: TorchModel | LoadedModel, images: np.ndarray, *, batch_size: int = 64) -> dict[str, Any]:
    """Measure a set of images against the model: whole-set BN loss and output ranges.

    Returns a dict with ``bns_loss`` (Eq. 4 over all images at once, no augmentation),
    ``bns_loss_per_layer``, ``output_range`` (per-image max - min of the stretch tensors:
    mean, min, max over images), ``output_min``/``output_max`` of those tensors, and the
    same for the graph outputs when they differ (``graph_output_min``/``max``).
    """
    torch_model = model if isinstance(model, TorchModel) else to_torch(model)
    device = torch_model.device
    count = images.shape[0]
    store = StatsStore([min(batch_size, count - s) for s in range(0, count, batch_size)],
                       [layer.channels for layer in torch_model.bn_layers], device)
    ranges: list[tuple[torch.Tensor, torch.Tensor]] = []
    out_ranges: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for index, start in enumerate(range(0, count, batch_size)):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)).to(device)
            probe = torch_model.probe(batch)
            store.store(index, [batch_moments(x) for x in probe.bn_inputs])
            ranges.append(per_image_range(probe.stretch))
            out_ranges.append(per_image_range(probe.outputs))
        targets = [(layer.mean, layer.std) for layer in torch_model.bn_layers]
        moments = store.all_moments()
        per_layer = [float(bns_loss([m], [t])) for m, t in zip(moments, targets)]
    lows, highs = (torch.cat(part) for part in zip(*ranges))
    spread = highs - lows
    result: dict[str, Any] = {
        "images": int(count),
        "bns_loss": float(sum(per_layer)),
        "bns_loss_per_layer": {layer.node_name: value for layer, value in zip(torch_model.bn_layers, per_layer)},
        "output_range": {"mean": float(spread.mean()), "min": float(spread.min()), "max": float(spread.max())},
        "output_min": float(lows.min()),
        "output_max": float(highs.max()),
    }
    if tuple(torch_model.stretch_names) != tuple(torch_model.output_names):
        result["graph_output_min"] = min(float(low.min()) for low, _ in out_ranges)
        result["graph_output_max"] = max(float(high.max()) for _, high in out_ranges)
    return result
