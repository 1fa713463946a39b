"""Procedural calibration images: data-free natural-image priors for models without BN statistics.

Contract: :func:`procedural_pixels` returns ``count`` float32 images ``N x C x H x W`` with
every pixel in [0, 1]; the same ``(count, shape, seed)`` gives the same images on every
machine (NumPy's PCG64, one stream per image, so image ``k`` does not depend on ``count``).
:func:`procedural_images` maps them through the model's input normalisation,
``x = (p - mean) / std``, so they lie in the valid input range by construction.

Why: a model exported with BatchNormalization folded into its convolutions (the default of
both torch exporters) leaves DGH nothing to match, and Gaussian noise calibrates badly
because it has none of the structure the network's filters respond to (flat spectrum, no
edges, no regions). "Learning to See by Looking at Noise" (Baradad et al., NeurIPS 2021)
shows that simple generative models with natural-image statistics -- an amplitude spectrum
falling as ``1/f^a``, occluding objects of power-law sizes (dead leaves), textured regions
-- stand in for real images far better than noise. Three kinds are drawn, in turn:

- ``pink``: Gaussian noise whose amplitude spectrum is ``1/f^a`` with ``a`` ~ U(0.8, 2.2)
  (natural photographs sit near ``a = 1``; larger ``a`` gives smooth, blurred scenes),
  random brightness and contrast, channels partly correlated (colour photos are mostly
  luminance);
- ``leaves``: the dead-leaves model: discs and rectangles of random colour, radii drawn
  from ``p(r) ~ r^-3`` (scale invariance) between ~1/64 and 1/2 of the side, painted over
  one another, each with a faint pink-noise texture;
- ``objects``: one to three large shapes on a flat, dark or light background, textured,
  softened by a box blur -- a centred object on a plain ground, as in product photos and
  Fashion-MNIST.

Evidence that these beat Gaussian noise and how they compare with model-guided
optimisation is in docs/BENCHMARKS.md (``bn-free``, tools/bench_bn_free.py).
"""

from __future__ import annotations

import numpy as np

__all__ = ["KINDS", "procedural_pixels", "procedural_images"]

KINDS = ("pink", "leaves", "objects")
"""The image kinds, drawn in turn (image k is of kind ``KINDS[k % 3]``)."""

_ALPHA = (0.8, 2.2)
_LEAVES_PER_AREA = 1.0 / 40.0  # about one leaf per 40 pixels: the canvas is covered several times
_MAX_LEAVES = 400
_TEXTURE = 0.08  # std of a leaf's texture in pixel units


def procedural_pixels(count: int, shape: tuple[int, int, int], seed: int, first: int = 0) -> np.ndarray:
    """Procedural images ``first .. first + count - 1`` of ``shape`` (C, H, W), pixels in [0, 1], float32 N x C x H x W."""
    channels, height, width = (int(v) for v in shape)
    out = np.empty((count, channels, height, width), dtype=np.float32)
    painters = {"pink": _pink_image, "leaves": _leaves_image, "objects": _objects_image}
    for slot, index in enumerate(range(first, first + count)):
        rng = np.random.default_rng([int(seed), index])
        image = painters[KINDS[index % len(KINDS)]](rng, channels, height, width)
        out[slot] = np.clip(image, 0.0, 1.0)
    return out


def procedural_images(count: int, shape: tuple[int, int, int], seed: int, mean: np.ndarray, std: np.ndarray,
                      first: int = 0) -> np.ndarray:
    """Procedural images in the model's input space: ``(pixels - mean) / std`` per channel."""
    pixels = procedural_pixels(count, shape, seed, first)
    m = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return ((pixels - m) / s).astype(np.float32)


# ------------------------------------------------------------------- the painters


def _spectral_field(rng: np.random.Generator, height: int, width: int, alpha: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian field whose amplitude spectrum falls as 1/f^alpha."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx * fx + fy * fy)
    freq[0, 0] = 1.0
    amplitude = freq ** (-alpha)
    amplitude[0, 0] = 0.0  # no DC: brightness is set explicitly
    spectrum = amplitude * (rng.standard_normal(amplitude.shape) + 1j * rng.standard_normal(amplitude.shape))
    field = np.fft.irfft2(spectrum, s=(height, width))
    std = field.std()
    return field / std if std > 0 else field


def _colours(rng: np.random.Generator, channels: int, size: int | None = None) -> np.ndarray:
    """Random colours (``size`` x C, or C): a grey level plus a moderate per-channel tint."""
    shape = (size, 1) if size is not None else (1,)
    grey = rng.uniform(0.0, 1.0, size=shape)
    tint = rng.normal(0.0, 0.15, size=(*shape[:-1], channels))
    colour = np.clip(grey + tint, 0.0, 1.0)
    return colour if size is not None else colour.reshape(channels)


def _texture(rng: np.random.Generator, channels: int, height: int, width: int, alpha: float) -> np.ndarray:
    """C x H x W pink-noise texture: a shared luminance field plus weaker per-channel fields."""
    shared = _spectral_field(rng, height, width, alpha)
    if channels == 1:
        return shared[None]
    own = np.stack([_spectral_field(rng, height, width, alpha) for _ in range(channels)])
    return 0.8 * shared[None] + 0.45 * own


def _pink_image(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    alpha = rng.uniform(*_ALPHA)
    field = _texture(rng, channels, height, width, alpha)
    brightness = _colours(rng, channels).reshape(channels, 1, 1) * 0.6 + 0.2
    contrast = rng.uniform(0.08, 0.3)
    return brightness + contrast * field


def _radii(rng: np.random.Generator, count: int, low: float, high: float) -> np.ndarray:
    """Radii with density ~ r^-3 on [low, high] (inverse CDF), the dead-leaves size law."""
    u = rng.uniform(0.0, 1.0, size=count)
    return (low ** -2 - u * (low ** -2 - high ** -2)) ** -0.5


def _paint(image: np.ndarray, rng: np.random.Generator, cy: float, cx: float, radius: float, colour: np.ndarray,
           shape: str, texture: np.ndarray | None) -> None:
    """Paint one disc / rectangle / ellipse into ``image`` (C x H x W) in place."""
    _, height, width = image.shape
    y0, y1 = max(0, int(cy - radius) - 1), min(height, int(cy + radius) + 2)
    x0, x1 = max(0, int(cx - radius) - 1), min(width, int(cx + radius) + 2)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        mask = dy * dy + dx * dx <= radius * radius
    elif shape == "ellipse":
        angle = rng.uniform(0.0, np.pi)
        ratio = rng.uniform(0.3, 1.0)
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        mask = (u / radius) ** 2 + (v / (radius * ratio)) ** 2 <= 1.0
    else:  # rectangle of random aspect
        ry = radius * rng.uniform(0.3, 1.0)
        rx = radius * rng.uniform(0.3, 1.0)
        mask = (np.abs(dy) <= ry) & (np.abs(dx) <= rx)
    patch = np.broadcast_to(colour.reshape(-1, 1, 1), (image.shape[0], y1 - y0, x1 - x0)).copy()
    if texture is not None:
        patch += texture[:, y0:y1, x0:x1]
    region = image[:, y0:y1, x0:x1]
    region[:, mask] = patch[:, mask]


def _leaves_image(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    side = min(height, width)
    image = np.broadcast_to(_colours(rng, channels).reshape(channels, 1, 1), (channels, height, width)).copy()
    count = int(min(_MAX_LEAVES, max(8, height * width * _LEAVES_PER_AREA)))
    radii = _radii(rng, count, max(1.0, side / 64.0), side / 2.0)
    colours = _colours(rng, channels, count)
    texture = _TEXTURE * _texture(rng, channels, height, width, rng.uniform(*_ALPHA))
    shapes = rng.choice(("disc", "rectangle", "ellipse"), size=count)
    centres = rng.uniform(0.0, 1.0, size=(count, 2)) * np.array([height, width])
    for k in range(count):  # painted in order: later leaves occlude earlier ones
        _paint(image, rng, centres[k, 0], centres[k, 1], radii[k], colours[k], str(shapes[k]), texture)
    return image


def _objects_image(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    side = min(height, width)
    dark = rng.uniform() < 0.6
    ground = rng.uniform(0.0, 0.15) if dark else rng.uniform(0.75, 1.0)
    image = np.full((channels, height, width), ground, dtype=np.float64)
    texture = _TEXTURE * 1.5 * _texture(rng, channels, height, width, rng.uniform(*_ALPHA))
    for _ in range(int(rng.integers(1, 4))):
        radius = side * rng.uniform(0.15, 0.45)
        cy = height * rng.uniform(0.3, 0.7)
        cx = width * rng.uniform(0.3, 0.7)
        _paint(image, rng, cy, cx, radius, _colours(rng, channels), str(rng.choice(("disc", "rectangle", "ellipse"))),
               texture)
    size = int(rng.integers(1, max(2, side // 14) + 1))
    return _box_blur(image, size)


def _box_blur(image: np.ndarray, size: int) -> np.ndarray:
    """Separable box blur of odd width ``2 * size - 1`` (edge-replicated); ``size`` 1 is the identity."""
    if size <= 1:
        return image
    width = 2 * size - 1
    out = np.pad(image, ((0, 0), (size - 1, size - 1), (size - 1, size - 1)), mode="edge")
    for axis in (1, 2):  # running sums: O(pixels) whatever the width (a 416-px image blurs by ~29)
        total = np.moveaxis(np.cumsum(out, axis=axis), axis, -1)
        total = np.concatenate([np.zeros_like(total[..., :1]), total], axis=-1)
        out = np.moveaxis((total[..., width:] - total[..., :-width]) / width, -1, axis)
    return out
