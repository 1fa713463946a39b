"""Sony MCT's DGH data generation as a baseline for the benchmarks (optional dependency).

Contract:

- :func:`mct_available` says whether ``model_compression_toolkit`` imports here (it is
  installed only in the benchmark venv, ``bench-work/venv``, never as an onnxdgh
  dependency) and, if not, why.
- :func:`mct_generate` runs ``mct.data_generation.pytorch_data_generation_experimental``
  on a torch module and returns float32 N x C x H x W images in the module's
  normalised input space, with MCT's own defaults except where a benchmark pins a
  setting to match onnxdgh (image count, iterations, batch size, crop margin,
  normalisation).

MCT 2.x hard-codes three input channels in its data generation (the Gaussian
initialisation, the 3-group smoothing convolution, the clipping grid and the input
statistics placeholder). For single-channel models (the Fashion-MNIST samples) this
module patches those four places to the module's channel count for the duration of a
call, and restores them afterwards; three-channel models run unpatched. MCT's clipping
needs the normalisation in 0..255 pixel units: the model's ``input_mean``/``input_std``
(pixels in [0, 1]) are scaled by 255 and installed as MCT's "TORCHVISION" normalisation
for the call. Nothing else of MCT's algorithm is changed.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["mct_available", "mct_version", "mct_generate"]


def mct_available() -> tuple[bool, str]:
    """(True, version) when MCT imports, else (False, reason)."""
    try:
        import model_compression_toolkit as mct  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return False, f"model-compression-toolkit is not importable ({type(exc).__name__}: {exc})"
    return True, str(getattr(mct, "__version__", "unknown"))


def mct_version() -> str:
    """MCT's version string, or 'not installed'."""
    ok, text = mct_available()
    return text if ok else "not installed"


@contextlib.contextmanager
def _channels_and_normalisation(channels: int, mean255: Sequence[float], std255: Sequence[float]) -> Iterator[Any]:
    """Patch MCT's 3-channel assumptions and normalisation table for one call, then restore."""
    import torch
    import torch.nn.functional as F
    from model_compression_toolkit.data_generation.common import image_pipeline as common_pipeline
    from model_compression_toolkit.data_generation.common.enums import ImageNormalizationType
    from model_compression_toolkit.data_generation.pytorch import image_operations, image_pipeline, model_info_exctractors
    from model_compression_toolkit.data_generation.pytorch import optimization_utils
    from model_compression_toolkit.data_generation.pytorch.optimization_functions import image_initilization

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    table = common_pipeline.image_normalization_dict
    saved_norm = table[ImageNormalizationType.TORCHVISION]
    table[ImageNormalizationType.TORCHVISION] = [list(mean255), list(std255)]
    try:
        if channels != 3:
            def grid(means: Sequence[float], stds: Sequence[float]) -> torch.Tensor:
                pixels = torch.arange(256, dtype=torch.float32)
                m = torch.tensor(list(means), dtype=torch.float32)[:, None]
                s = torch.tensor(list(stds), dtype=torch.float32)[:, None]
                return (pixels[None, :] - m) / s

            def smooth(self: Any, image: torch.Tensor) -> torch.Tensor:
                c = image.shape[1]
                kernel = self.kernel[:1].to(image.device).expand(c, -1, -1, -1)
                return F.conv2d(image, kernel, padding=self.kernel.shape[-1] // 2, groups=c)

            patch(image_initilization, "NUM_INPUT_CHANNELS", channels)
            patch(model_info_exctractors, "NUM_INPUT_CHANNELS", channels)
            patch(image_pipeline, "create_valid_grid", grid)
            patch(optimization_utils, "create_valid_grid", grid)
            patch(image_operations.Smoothing, "forward", smooth)
        yield None
    finally:
        table[ImageNormalizationType.TORCHVISION] = saved_norm
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def mct_generate(
    module: Any,
    *,
    n_images: int,
    image_size: tuple[int, int],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    iterations: int,
    batch_size: int,
    extra_pixels: int,
    seed: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Generate ``n_images`` with MCT's DGH on ``module``; return float32 NCHW images.

    ``mean``/``std`` are the model's input normalisation for pixels in [0, 1] (one value
    per channel). All other settings are MCT's defaults (RAdam, lr 16, reduce-on-plateau
    with reset, L2-square BN alignment with all-images granularity, negative min-max
    output loss x 1e-5, smoothing + flip + crop pipeline, clipping).
    """
    import torch
    import model_compression_toolkit as mct

    torch.manual_seed(seed)
    np.random.seed(seed)
    mean255 = [255.0 * float(v) for v in mean]
    std255 = [255.0 * float(v) for v in std]
    if len(mean255) != channels or len(std255) != channels:
        raise ValueError(f"mean/std need {channels} values each, got {len(mean255)} and {len(std255)}")
    logging.getLogger("Model Compression Toolkit").setLevel(logging.ERROR)
    with _channels_and_normalisation(channels, mean255, std255):
        config = mct.data_generation.get_pytorch_data_generation_config(
            n_iter=iterations,
            data_gen_batch_size=batch_size,
            extra_pixels=extra_pixels,
        )
        import warnings

        with warnings.catch_warnings():
            # torch.cuda.amp.autocast on a CPU-only run warns once per step.
            warnings.simplefilter("ignore")
            if progress:
                images = mct.data_generation.pytorch_data_generation_experimental(
                    model=module, n_images=n_images, output_image_size=tuple(image_size), data_generation_config=config)
            else:
                import tqdm as _tqdm
                from model_compression_toolkit.data_generation.pytorch import pytorch_data_generation as _pdg

                original = _pdg.tqdm
                _pdg.tqdm = lambda iterable, *a, **k: _tqdm.tqdm(iterable, *a, disable=True, **k)
                try:
                    images = mct.data_generation.pytorch_data_generation_experimental(
                        model=module, n_images=n_images, output_image_size=tuple(image_size),
                        data_generation_config=config)
                finally:
                    _pdg.tqdm = original
    batch = torch.cat([img if img.dim() == 4 else img[None] for img in images], dim=0)
    return batch.detach().cpu().numpy().astype(np.float32)
