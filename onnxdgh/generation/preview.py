"""Contact sheets of generated images, for a person to look at.

Contract: :func:`contact_sheet_png` turns float N x C x H x W images in the model's input
space into PNG bytes: a grid of at most ``limit`` tiles, de-normalised with the model's
mean/std when known (pixels = x * std + mean, clipped to [0, 1]) and otherwise stretched
per image to its own min..max. One channel is shown grey, three as RGB, any other count
by its first channel. Small images are enlarged by an integer factor (nearest neighbour).
"""

from __future__ import annotations

import io
import math

import numpy as np

__all__ = ["contact_sheet_png"]


def contact_sheet_png(
    images: np.ndarray,
    mean: np.ndarray | None = None,
    std: np.ndarray | None = None,
    *,
    limit: int = 64,
    min_tile: int = 84,
    gap: int = 2,
) -> bytes:
    """PNG bytes of a grid showing the first ``limit`` images."""
    from PIL import Image

    shown = np.asarray(images[:limit], dtype=np.float32)
    count, channels, height, width = shown.shape
    if mean is not None and std is not None:
        pixels = shown * np.asarray(std, np.float32).reshape(1, -1, 1, 1) + np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
    else:
        low = shown.reshape(count, -1).min(axis=1).reshape(-1, 1, 1, 1)
        high = shown.reshape(count, -1).max(axis=1).reshape(-1, 1, 1, 1)
        pixels = (shown - low) / np.maximum(high - low, 1e-12)
    pixels = np.clip(pixels, 0.0, 1.0)
    pixels = pixels if channels == 3 else pixels[:, :1]
    scale = max(1, math.ceil(min_tile / max(height, width)))
    columns = max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    tile_h, tile_w = height * scale, width * scale
    sheet = np.full((rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, pixels.shape[1]), 0.5, np.float32)
    for index in range(count):
        row, col = divmod(index, columns)
        tile = np.transpose(pixels[index], (1, 2, 0)).repeat(scale, axis=0).repeat(scale, axis=1)
        top = gap + row * (tile_h + gap)
        left = gap + col * (tile_w + gap)
        sheet[top : top + tile_h, left : left + tile_w] = tile
    data = np.round(sheet * 255.0).astype(np.uint8)
    image = Image.fromarray(data[:, :, 0], mode="L") if data.shape[2] == 1 else Image.fromarray(data, mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
