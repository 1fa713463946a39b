"""Which generation method ``--method auto`` runs on a model, and what quality to expect.

Contract: :func:`choose_method` returns the method ``auto`` stands for on a loaded model
(any other method is returned unchanged), :func:`resolve_method` returns the config with
that method filled in, and :func:`expected_quality` is the one-line quality note that
``inspect`` prints. The decision only reads the model's BatchNormalization nodes:

- every usable BN statistic is a DGH target, so a model with at least one usable BN node
  runs ``dgh`` on the layers that have them (the others add no term; ODSL and phi_prep
  still apply to the whole model);
- a model with none (BN folded into the convolutions at export, or never trained with BN)
  runs ``procedural``: the data-free natural-image priors of
  :mod:`onnxdgh.generate.procedural`. The evidence for that choice over Gaussian noise and
  over optimising through the model without BN targets (``dgh --allow-no-bn``: ODSL +
  smoothing + crop/flip) is docs/BENCHMARKS.md, section ``bn-free``.

``--allow-no-bn`` with ``auto`` on a model without BN statistics asks for DGH without BN
terms explicitly, so it is honoured (``dgh``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..load import LoadedModel
    from .config import GenerateConfig

__all__ = ["choose_method", "resolve_method", "expected_quality"]


def choose_method(loaded: LoadedModel, method: str = "auto", *, allow_no_bn: bool = False) -> str:
    """The method to run: ``method`` itself unless it is ``"auto"`` (then see the module docstring)."""
    if method != "auto":
        return method
    if loaded.usable_bn_nodes or allow_no_bn:
        return "dgh"
    return "procedural"


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
    if usable and usable == total:
        return f"generation: dgh on {usable} BN layer(s) (full DGH: close to real-data calibration)"
    if usable:
        return (f"generation: dgh on the {usable} of {total} BN layer(s) with usable statistics "
                "(partial BN targets: quality between DGH and the procedural fallback)")
    return ("generation: procedural images (no BN statistics to match: data-free natural-image priors; "
            "measured W8A8 within ~1 point of float on BN-folded samples, low-bit widths lose more "
            "than with DGH; see docs/BENCHMARKS.md 'bn-free'). Re-exporting with BN kept gives full DGH.")
