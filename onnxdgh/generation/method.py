"""Which generation method ``--method auto`` runs on a model, and what quality to expect.

Contract: :func:`choose_method` returns the method ``auto`` stands for on a loaded model
(any other method is returned unchanged), :func:`resolve_method` returns the config with
that method filled in, and :func:`expected_quality` is the one-line quality note that
``inspect`` prints. The decision only reads the model's BatchNormalization nodes:

- a model whose convolutions mostly have usable BN statistics (at least
  :data:`MIXED_BELOW` of them) runs ``dgh`` on the layers that have them;
- a model where only some do (a partly folded export; at least :data:`PROCEDURAL_BELOW`)
  runs ``mixed``: half the images by DGH on the BN layers it has, half procedural. A few BN
  layers alone constrain the images too little; the procedural half supplies natural
  structure, the DGH half the model's own statistics (samples/fmnist_resnet8.onnx keeping
  3 of 9 BN layers: W4A8 92.70 mixed, 92.05 DGH, 92.50 procedural; docs/BENCHMARKS.md
  ``bn-free``);
- a model where very few do (below :data:`PROCEDURAL_BELOW`: PP-OCRv4's detector keeps 3
  BN layers for 62 convolutions, its recogniser 6 for 38) runs ``procedural``: there the
  DGH half drove 80 of the detector's 128 activation thresholds to 2-16x those of rendered
  pages, and procedural images alone agreed better with float on both models
  (docs/BENCHMARKS.md ``ocr``);
- a model with none (BN folded into the convolutions at export, or never trained with BN)
  runs ``procedural``: the data-free natural-image priors of
  :mod:`onnxdgh.generation.procedural`. They beat every candidate that optimises through
  the model without BN targets (``dgh --allow-no-bn``, ODSL + entropy/class balance,
  ``actreg`` from noise or from the procedural images, Gaussian noise; docs/BENCHMARKS.md
  ``bn-free``): optimising from noise without BN targets finds patterns that drive the
  model but have little of the structure its thresholds must cover, and refining the
  procedural images gains nothing measurable, so nothing is optimised by default.

``--allow-no-bn`` with ``auto`` on a model without BN statistics asks for DGH without BN
terms explicitly, so it is honoured (``dgh``).

``mixed`` (:func:`generate_mixed`): ``ceil(N / 2)`` images by DGH (same settings, same
seed), then ``floor(N / 2)`` procedural images (same seed), concatenated; the report is
the DGH run's with ``method: "mixed"`` and the split under ``mixed``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .procedural import procedural_images

if TYPE_CHECKING:
    from ..load import LoadedModel
    from .config import GenerateConfig
    from .core import GenerationResult

__all__ = [
    "MIXED_BELOW", "PROCEDURAL_BELOW", "choose_method", "resolve_method", "expected_quality",
    "bn_coverage", "generate_mixed",
]

# Measured at the two ends only: samples with BN on every convolution (1.0) do best with
# DGH (docs/BENCHMARKS.md accuracy sections), resnet8 keeping 3 of 9 (0.33) does best mixed.
MIXED_BELOW = 0.5
"""Share of convolutions with a usable BN below which ``auto`` mixes DGH with procedural images."""
# Between the measured points: resnet8 keeping 3 of 9 (0.33) does best mixed, PP-OCRv4's
# recogniser (6 of 38, 0.16) and detector (3 of 62, 0.05) do best procedural.
PROCEDURAL_BELOW = 0.25
"""Share of convolutions with a usable BN below which ``auto`` uses procedural images alone."""


def bn_coverage(loaded: LoadedModel) -> float:
    """Usable BN nodes per Conv/ConvTranspose node (1.0 when the graph has no convolution but has BN)."""
    convs = sum(node.op_type in ("Conv", "ConvTranspose") for node in loaded.model.graph.node)
    usable = len(loaded.usable_bn_nodes)
    return min(1.0, usable / convs) if convs else float(usable > 0)


def choose_method(loaded: LoadedModel, method: str = "auto", *, allow_no_bn: bool = False) -> str:
    """The method to run: ``method`` itself unless it is ``"auto"`` (then see the module docstring)."""
    if method != "auto":
        return method
    if not loaded.usable_bn_nodes:
        return "dgh" if allow_no_bn else "procedural"
    coverage = bn_coverage(loaded)
    if coverage < PROCEDURAL_BELOW:
        return "procedural"
    return "dgh" if coverage >= MIXED_BELOW else "mixed"


def resolve_method(loaded: LoadedModel, config: GenerateConfig) -> GenerateConfig:
    """``config`` with ``method="auto"`` replaced by :func:`choose_method`'s answer (else unchanged).

    Raises:
        InvalidInputError: an option that does not apply to the chosen method (e.g. ``--sas``
            when ``auto`` picks ``procedural``), from the config's own validation.
    """
    if config.method != "auto":
        return config
    return replace(config, method=choose_method(loaded, allow_no_bn=config.allow_no_bn))


def expected_quality(loaded: LoadedModel) -> str:
    """One line: the method ``auto`` uses on ``loaded`` and the quality measured for it."""
    usable = len(loaded.usable_bn_nodes)
    total = len(loaded.bn_nodes)
    method = choose_method(loaded)
    if method == "dgh":
        note = "" if usable == total else f" of {total}"
        return f"generation: dgh on {usable}{note} BN layer(s) with usable statistics (close to real-data calibration)"
    if method == "mixed":
        return (f"generation: mixed: half dgh on the {usable} BN layer(s) with usable statistics, half procedural "
                "images (few BN targets; measured close to real-data calibration, docs/BENCHMARKS.md 'bn-free')")
    if usable:
        return (f"generation: procedural images (only {usable} BN layer(s) with usable statistics, "
                "too few to steer DGH; data-free natural-image priors; measured closer to "
                "real-data calibration than mixed, "
                "docs/BENCHMARKS.md 'ocr')")
    return ("generation: procedural images (no BN statistics to match; data-free natural-image priors). "
            "Measured: W8A8 within 0.3 point of float on BN-folded samples, W4A8 0.05-0.65 point below real-data "
            "calibration; a BN-free detector kept 89% of its float boxes on rendered pages and 71% "
            "on photos at W8A8 with the lp thresholds that dense outputs get by default "
            "(rendered-page calibration: 89% / 84%); "
            "docs/BENCHMARKS.md 'bn-free', 'bn-free-detector'")


def generate_mixed(loaded: LoadedModel, config: GenerateConfig, run: Any, **options: Any) -> GenerationResult:
    """``mixed``: DGH on ``ceil(N / 2)`` images through ``run`` (:func:`~onnxdgh.generation.generate`), the rest procedural."""
    optimised = (config.images + 1) // 2
    result = run(loaded, replace(config, method="dgh", images=optimised), **options)
    norm = result.report["normalization"]
    low = np.asarray(norm["low"], dtype=np.float32).reshape(1, -1, 1, 1)
    high = np.asarray(norm["high"], dtype=np.float32).reshape(1, -1, 1, 1)
    extra = procedural_images(config.images - optimised, loaded.input_shape, config.seed,
                              np.asarray(norm["mean"]), np.asarray(norm["std"]))
    images = np.concatenate([result.images, np.clip(extra, low, high)]).astype(np.float32)
    report = {**result.report, "method": "mixed", "settings": {**result.report["settings"], "images": config.images,
                                                                "method": "mixed"},
              "mixed": {"dgh_images": optimised, "procedural_images": config.images - optimised}}
    return type(result)(images=images, report=report)
