"""Activation-range regularisation: optimising images through a model that has no BN statistics.

Contract: :func:`generate_actreg` returns ``config.images`` float32 images N x C x H x W in
the model's input space, inside ``[low, high]`` of its normalisation, and a JSON-serialisable
report; a fixed seed gives the same images on rerun on the same machine. Nothing of the
model is changed; its weights get no gradient.

Why: with BatchNormalization folded away there are no statistics to match (the DGH
paper's Eq. 2-5 have no targets), but what a calibration set must do is still known: every
layer's pre-activation channels should *vary* over the set (a channel that never varies,
or never rises above zero before a ReLU/SiLU, calibrates nothing downstream) and stay
*bounded* (a channel blown up by an adversarial pattern widens its tensor's threshold far
beyond what real inputs reach). So instead of matching unknown statistics, each
convolution's output channels are kept inside a band around their own layer: per channel
c of layer l, with mean ``m`` and std ``s`` over the batch and positions, and the layer's
median channel std ``S`` (no gradient: the reference moves with the images),

    dead:      relu(log(S / SPREAD) - log s)^2          (a channel that stopped varying)
    negative:  relu(-(m + ALIVE_Z * s) / S)^2           (below zero almost everywhere)
    exploding: relu(log s - log(S * SPREAD))^2          (a channel far above its layer)

averaged over channels and layers (:func:`activation_range_loss`). Two output terms
complete it, both from the data-free literature: DGH's output distribution stretching
(Eq. 7 without its BN hinge, :func:`~onnxdgh.generation.losses.odsl_per_image`) and, on a
classifier's N x K logits, the entropy / class-balance term of DAFL (Chen et al., ICCV
2019): low entropy per image, high entropy of the batch's mean prediction
(:func:`balance_loss`). The images are optimised through DGH's phi_prep (3x3 smoothing
prior, random flip and crop from a larger canvas, :class:`~onnxdgh.generation.prep.Preprocessor`)
and projected onto the normalisation's valid range after every step.

The canvas starts from the procedural priors (:mod:`onnxdgh.generation.procedural`) by
default -- natural-image structure that the optimisation then adapts to the model -- or
from N(0, 1) noise (``start="noise"``) as DGH does. Adam, step size a fraction of the
input range, cosine-decayed: the images are refined, not redrawn.

``activation_weight=0`` leaves the output terms only: the second candidate of issue 15
(stretching + entropy/class balance with smoothing and crop/flip), measured beside this one
by tools/bench_bn_free.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx

from ..convert import TorchModel, quiet_onnx2torch, to_torch
from ..load import LoadedModel
from ..normalization import Normalization
from .config import GenerateConfig
from .losses import STD_EPS, batch_moments, odsl_per_image
from .prep import Preprocessor, auto_margin, image_noise, view_draws
from .procedural import procedural_images

__all__ = ["SPREAD", "ALIVE_Z", "STARTS", "activation_range_loss", "balance_loss", "preactivation_probe",
           "generate_actreg"]

SPREAD = 8.0
"""A channel's std may lie within this factor of its layer's median channel std, either way."""
ALIVE_Z = 2.0
"""A channel is alive when its mean + ALIVE_Z stds is above zero (a few % of positions positive)."""
STARTS = ("procedural", "noise")
STEP_FRACTION = 0.02
"""Adam's initial step as a fraction of the input range (cosine-decayed to 0 over the iterations)."""
BALANCE_WEIGHT = 1.0
"""Weight of :func:`balance_loss` (its terms are normalised by log K, so of order 1)."""
_CONV_MODULES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def activation_range_loss(preacts: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over layers of the per-channel dead / negative / exploding penalties (module docstring).

    Returns the loss and, per kind, the fraction of channels (over all layers) that the
    penalty touches (no gradient).
    """
    total = torch.zeros((), device=preacts[0].device) if preacts else torch.zeros(())
    counts = {"dead": 0.0, "negative": 0.0, "exploding": 0.0}
    channels = 0
    for z in preacts:
        mean, var = batch_moments(z)
        std = torch.sqrt(var.clamp_min(0.0) + STD_EPS)
        ref = std.detach().median().clamp_min(math.sqrt(STD_EPS))
        log_std = torch.log(std)
        dead = torch.relu(torch.log(ref / SPREAD) - log_std)
        negative = torch.relu(-(mean + ALIVE_Z * std) / ref)
        exploding = torch.relu(log_std - torch.log(ref * SPREAD))
        total = total + (dead.square() + negative.square() + exploding.square()).mean()
        with torch.no_grad():
            for name, term in (("dead", dead), ("negative", negative), ("exploding", exploding)):
                counts[name] += float((term > 0).sum())
        channels += int(mean.numel())
    fractions = {name: value / max(1, channels) for name, value in counts.items()}
    return total / max(1, len(preacts)), fractions


def balance_loss(logits: torch.Tensor) -> torch.Tensor:
    """DAFL's entropy terms on N x K logits, normalised by log K: mean H(p_i) - H(mean p_i).

    Zero for a tensor that is not N x K with K > 1 (a detector's or segmenter's output):
    the classes of a prediction map are not the images' classes.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        return torch.zeros((), device=logits.device)
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    per_image = -(p * log_p).sum(dim=1).mean()
    mean_p = p.mean(dim=0)
    balance = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return (per_image - balance) / math.log(logits.shape[1])


def preactivation_probe(model: TorchModel) -> Callable[[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """A function ``images -> (stretch tensors, convolution outputs)`` on a copy of the model's probe graph.

    The convolution outputs are the pre-activations of a BN-free network (BN, where a
    model still has it, comes after them). Images run one at a time when the model's
    batch is fixed to 1 and could not be made dynamic (as :meth:`TorchModel.probe`).
    """
    source = model._probe
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    old_out = graph.graph_copy(source.graph, values)
    convs = [values[node] for node in source.graph.nodes if node.op == "call_module"
             and _is_conv(source.get_submodule(node.target))]
    old = tuple(old_out) if isinstance(old_out, (tuple, list)) else (old_out,)
    graph.output(old + tuple(convs))
    module = fx.GraphModule(source, graph)
    module.eval()
    first_stretch = len(model.output_names) + len(model.bn_layers)
    n_stretch = len(model.stretch_names)

    def once(images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with quiet_onnx2torch():  # as TorchModel.probe: the deprecation says nothing to the user
            out = module(images)
        return list(out[first_stretch:first_stretch + n_stretch]), list(out[len(old):])

    def run(images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if model.batch_dynamic or images.shape[0] == 1:
            return once(images)
        parts = [once(images[i:i + 1]) for i in range(images.shape[0])]
        return ([torch.cat([p[0][j] for p in parts]) for j in range(n_stretch)],
                [torch.cat([p[1][j] for p in parts]) for j in range(len(convs))])

    return run


def _is_conv(module: torch.nn.Module) -> bool:
    inner = getattr(module, "conv", None)  # convert._InputGradConv2d wraps the frozen nn.Conv2d
    return isinstance(module, _CONV_MODULES) or isinstance(inner, _CONV_MODULES)


def generate_actreg(
    loaded: LoadedModel,
    config: GenerateConfig,
    norm: Normalization,
    *,
    start: str = "procedural",
    activation_weight: float = 1.0,
    balance_weight: float = BALANCE_WEIGHT,
    torch_model: TorchModel | None = None,
    callback: Callable[[int, int, float], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Optimise ``config.images`` images through ``loaded`` by activation-range regularisation.

    Uses ``config``'s images, iterations, batch_size, seed, device, crop_margin,
    smoothing_sigma, prep and odsl_lambda (ODSL on unless ``config.odsl`` is False).
    ``callback(iteration, batch, loss)`` runs after every step.

    Returns the images and the report's method-specific part (settings, loss history,
    the fraction of channels penalised at the start and at the end).

    Raises:
        ValueError: ``start`` not in :data:`STARTS` (a programming error: the CLI offers no choice).
        ConversionError: the model cannot be converted to torch.
    """
    if start not in STARTS:
        raise ValueError(f"start {start!r} is not one of {STARTS}")
    torch_model = torch_model or to_torch(loaded, device=config.device)
    probe = preactivation_probe(torch_model)
    device = torch.device(config.device)
    channels, height, width = loaded.input_shape
    low = torch.from_numpy(norm.low).to(device)
    high = torch.from_numpy(norm.high).to(device)
    margin = config.crop_margin if config.crop_margin is not None else auto_margin(height, width)
    prep = Preprocessor(channels, height, width, margin=margin, sigma=config.smoothing_sigma,
                        enabled=config.use_prep, low=low, high=high, device=device)
    use_odsl = config.use_odsl and config.odsl_lambda > 0
    step = STEP_FRACTION * float((high - low).mean())
    history: list[float] = []
    penalised: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    batches = []
    for first in range(0, config.images, config.batch_size):
        indices = range(first, min(config.images, first + config.batch_size))
        if start == "noise":
            canvas = image_noise(config.seed, list(indices), prep.canvas_shape)
        else:
            canvas = torch.from_numpy(procedural_images(len(indices), prep.canvas_shape,
                                                        config.seed, norm.mean,
                                                        norm.std, first=indices.start))
        canvas = prep.clamp(canvas.to(device)).requires_grad_(True)
        optimizer = torch.optim.Adam([canvas], lr=step)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.iterations))
        for iteration in range(config.iterations):
            view = prep.train_view_at(canvas, *view_draws(config.seed, indices, iteration + 1, prep.margin))
            stretch, preacts = probe(view)
            act, fractions = activation_range_loss(preacts)
            if iteration == 0 and first == 0:
                penalised["start"] = fractions
            loss = activation_weight * act
            if use_odsl:
                loss = loss + config.odsl_lambda * odsl_per_image(stretch, None, None, 0.0).mean()
            if balance_weight:
                loss = loss + balance_weight * balance_loss(stretch[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                canvas.copy_(prep.clamp(canvas))
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"activation-range optimisation diverged at iteration {iteration + 1}")
            if first == 0:
                history.append(value)
            if callback is not None:
                callback(iteration, first // config.batch_size, value)
        batches.append(prep.final(canvas.detach()))
    images = torch.cat(batches).cpu().numpy().astype(np.float32)
    with torch.no_grad():
        _, preacts = probe(torch.from_numpy(images[: config.batch_size]).to(device))
        penalised["end"] = activation_range_loss(preacts)[1]
    report = {
        "start": start,
        "activation_weight": activation_weight,
        "balance_weight": balance_weight,
        "odsl": use_odsl,
        "spread": SPREAD,
        "alive_z": ALIVE_Z,
        "step": step,
        "crop_margin": prep.margin,
        "convolutions": len(preacts),
        "penalised_channels": penalised,
        "loss_history_first_batch": [[i + 1, v] for i, v in enumerate(history)][:: max(1, len(history) // 20)],
        "optimise_s": round(time.perf_counter() - started, 3),
    }
    return images, report
