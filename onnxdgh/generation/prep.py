"""phi_prep: the per-step image preprocessing of DGH (paper Section 5.2, Appendix A.1).

Contract: images are optimised on a canvas ``margin`` pixels larger than the model input
in height and width. Every optimisation step sees
    3x3 Gaussian smoothing (depthwise, zero padding) -> random horizontal flip (p = 0.5,
    per image) -> random crop (per image) to the model input size;
the final images are smoothing -> centre crop -> clamp to the valid pixel range (when the
model's normalization is known). Smoothing is differentiable; flips and crop offsets are
drawn on the CPU, so a seed gives the same draws on any device.

Randomness keyed by image (:func:`image_noise`, :func:`view_draws`): the run draws each
image's initial noise and each of its views' flip and crop offsets from a hash of (seed,
the image's global index, the view's number), not from one generator stream consumed in
batch order. An image's draws are then the same whichever process or batch position
steps it, which is what lets a data-parallel run (:mod:`onnxdgh.generation.distributed`)
produce one process's images. The hash is SplitMix64's finaliser (Steele et al., 2014),
a bijection on 64-bit words with full avalanche: ample for augmentation draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["auto_margin", "gaussian_kernel", "image_noise", "view_draws", "Preprocessor"]

_NOISE_STREAM = 0
"""Stream number of the initial noise; view v uses stream v + 1."""


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on uint64 words (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _keys(seed: int, indices: Sequence[int], stream: int) -> np.ndarray:
    """One 64-bit word per image: a hash of (seed, global image index, stream)."""
    base = _mix(_mix(np.uint64(seed)) ^ np.asarray(indices, dtype=np.uint64))
    return _mix(base ^ _mix(np.uint64(stream)))


def image_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` for each image in ``indices``: a len(indices) x shape CPU tensor.

    Image k's noise depends only on (seed, k), not on which other images are drawn with it.
    """
    keys = _keys(seed, indices, _NOISE_STREAM)
    parts = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(key))) for key in keys]
    return torch.stack(parts) if parts else torch.empty((0, *shape))


def view_draws(seed: int, indices: Sequence[int], view: int, margin: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(flips, tops, lefts) of view number ``view`` for the images in ``indices`` (CPU tensors).

    A flip has probability 1/2, offsets are uniform in 0..margin (the bias of a 31-bit
    word modulo margin + 1 is below 1e-7 for any margin used). Image k's draws depend
    only on (seed, k, view).
    """
    keys = _keys(seed, indices, view + 1)
    flips = (keys >> np.uint64(63)).astype(bool)
    tops = (keys & np.uint64(0x7FFFFFFF)) % np.uint64(margin + 1)
    lefts = ((keys >> np.uint64(32)) & np.uint64(0x7FFFFFFF)) % np.uint64(margin + 1)
    return torch.from_numpy(flips), torch.from_numpy(tops.astype(np.int64)), torch.from_numpy(lefts.astype(np.int64))


def auto_margin(height: int, width: int) -> int:
    """Canvas margin: 32 px for 224-px inputs as in the paper, i.e. ~1/7 of the side, at least 2."""
    return max(2, int(round(min(height, width) / 7)))


def gaussian_kernel(sigma: float, size: int = 3) -> torch.Tensor:
    """A normalised ``size`` x ``size`` Gaussian kernel."""
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    one_d = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    kernel = torch.outer(one_d, one_d)
    return kernel / kernel.sum()


def _depthwise_smooth(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    channels = x.shape[1]
    if channels > 1:
        # oneDNN's depthwise convolution on NCHW was measured 27x slower than on NHWC for
        # 16 x 3 x 256 x 256 canvases (45 vs 1.7 ms); with one channel the layouts coincide
        x = x.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, kernel, padding=1, groups=channels).contiguous()


class _SelfAdjointSmooth(torch.autograd.Function):
    """Smoothing whose backward is the same smoothing of the output gradient.

    A zero-padded cross-correlation's adjoint is the correlation with the flipped kernel,
    and a Gaussian kernel is its own flip. Autograd's depthwise convolution backward was
    measured at 4.2 ms for 64 x 1 x 32 x 32 canvases (the forward: 0.25 ms), 14% of a
    whole optimisation step on the Fashion-MNIST resnet8 sample.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(kernel)
        return _depthwise_smooth(x, kernel)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (kernel,) = ctx.saved_tensors
        return _depthwise_smooth(grad, kernel), None


class Preprocessor:
    """phi_prep for images of ``channels`` x ``height`` x ``width`` on a canvas larger by ``margin``.

    With ``enabled=False`` the canvas is the input size and the images pass unchanged (the
    "no IP" ablation): no smoothing, flip or crop.
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        *,
        margin: int,
        sigma: float,
        enabled: bool,
        low: torch.Tensor | None,
        high: torch.Tensor | None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.channels, self.height, self.width = channels, height, width
        self.enabled = enabled
        self.margin = margin if enabled else 0
        self.kernel = gaussian_kernel(sigma).to(device).expand(channels, 1, 3, 3).contiguous()
        self.low = None if low is None else low.to(device).view(1, channels, 1, 1)
        self.high = None if high is None else high.to(device).view(1, channels, 1, 1)

    @property
    def canvas_shape(self) -> tuple[int, int, int]:
        """Shape (C, H, W) of the optimised canvas."""
        return (self.channels, self.height + self.margin, self.width + self.margin)

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise 3x3 Gaussian smoothing with zero padding."""
        if torch.is_grad_enabled() and x.requires_grad:
            return _SelfAdjointSmooth.apply(x, self.kernel)
        return _depthwise_smooth(x, self.kernel)

    def train_view(self, canvas: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """What the model sees at one optimisation step, draws from ``generator`` (differentiable w.r.t. ``canvas``)."""
        count = canvas.shape[0]
        flips = torch.rand(count, generator=generator) < 0.5
        tops = torch.randint(0, self.margin + 1, (count,), generator=generator)
        lefts = torch.randint(0, self.margin + 1, (count,), generator=generator)
        return self.train_view_at(canvas, flips, tops, lefts)

    def train_view_at(self, canvas: torch.Tensor, flips: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor) -> torch.Tensor:
        """:meth:`train_view` with given per-image draws (e.g. :func:`view_draws`)."""
        if not self.enabled:
            return canvas
        x = self.smooth(canvas)
        count, channels, canvas_h, canvas_w = x.shape
        # Crop and flip as one gather of canvas positions rather than a per-image slice,
        # flip and stack: the loop cost ~3 small ops per image forward and a zero-filled
        # canvas plus a copy per image backward (measured: see the commit message). The
        # selected pixels are the same: output (i, j) reads canvas row top + i, column
        # left + j, or left + (width - 1 - j) when flipped.
        device = x.device
        rows = tops.to(device).view(-1, 1, 1) + torch.arange(self.height, device=device).view(1, -1, 1)
        cols = torch.arange(self.width, device=device).view(1, 1, -1)
        cols = torch.where(flips.to(device).view(-1, 1, 1), self.width - 1 - cols, cols) + lefts.to(device).view(-1, 1, 1)
        index = (rows * canvas_w + cols).view(count, 1, -1).expand(count, channels, self.height * self.width)
        picked = x.reshape(count, channels, canvas_h * canvas_w).gather(2, index)
        return picked.view(count, channels, self.height, self.width)

    def final_unclamped(self, canvas: torch.Tensor) -> torch.Tensor:
        """Smoothing -> centre crop (no gradient); :meth:`final` also clamps."""
        with torch.no_grad():
            x = canvas
            if self.enabled:
                x = self.smooth(x)
                top = left = self.margin // 2
                x = x[:, :, top : top + self.height, left : left + self.width]
            return x

    def final(self, canvas: torch.Tensor) -> torch.Tensor:
        """The exported images: smoothing -> centre crop -> clamp to the valid range."""
        return self.clamp(self.final_unclamped(canvas))

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp to the valid input range when it is known."""
        if self.low is None or self.high is None:
            return x
        return torch.maximum(torch.minimum(x, self.high), self.low)
