"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, without a network.

Contract:

- ``load_split("train" | "test")`` returns ``(images, labels)``: ``images`` is a
  C-contiguous ``uint8`` array of shape ``(N, 28, 28)`` (60,000 train, 10,000 test),
  ``labels`` an ``int64`` array of shape ``(N,)`` with values in ``0..9``.
- ``normalize(images, mean, std)`` maps ``uint8`` pixels to the float32 model input
  ``(pixel / 255 - mean) / std`` of shape ``(N, 1, 28, 28)``.
- ``CLASS_NAMES`` are the ten labels in index order.

A missing package raises ``FashionMnistMissingError`` naming the install command.
The module depends only on the standard library and numpy so that benchmarks and
tests can import it as a plain module (``tools/`` on ``sys.path``).
"""

from __future__ import annotations

import gzip
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "CLASS_NAMES",
    "DATA_DIR",
    "MEAN",
    "STD",
    "FashionMnistError",
    "FashionMnistMissingError",
    "load_split",
    "normalize",
]

DATA_DIR: Final = Path("/usr/share/datasets/fashion-mnist")

CLASS_NAMES: Final[tuple[str, ...]] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Per-channel statistics of the 60k training images in the [0, 1] pixel range,
# rounded to 4 digits (measured: mean 0.28604, std 0.35302).
MEAN: Final[tuple[float, ...]] = (0.2860,)
STD: Final[tuple[float, ...]] = (0.3530,)

Split = Literal["train", "test"]

_FILES: Final[dict[str, tuple[str, str]]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

_IMAGE_MAGIC: Final = 0x00000803  # unsigned byte, 3 dimensions
_LABEL_MAGIC: Final = 0x00000801  # unsigned byte, 1 dimension


class FashionMnistError(Exception):
    """A Fashion-MNIST file is missing or not the IDX file it should be."""


class FashionMnistMissingError(FashionMnistError, FileNotFoundError):
    """The Debian package with the data set is not installed."""


def _read_idx(path: Path, magic: int, ndim: int) -> npt.NDArray[np.uint8]:
    if not path.is_file():
        raise FashionMnistMissingError(
            f"{path} not found: install the data set with "
            "'apt-get install dataset-fashion-mnist'"
        )
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise FashionMnistError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    (found_magic,) = struct.unpack(">I", raw[:4])
    if found_magic != magic:
        raise FashionMnistError(
            f"{path}: IDX magic {found_magic:#010x}, expected {magic:#010x}; "
            "reinstall 'dataset-fashion-mnist'"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    expected = int(np.prod(shape))
    if len(raw) - header_size != expected:
        raise FashionMnistError(
            f"{path}: header says shape {shape} ({expected} bytes), "
            f"file holds {len(raw) - header_size}; reinstall 'dataset-fashion-mnist'"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def load_split(
    split: Split, data_dir: Path = DATA_DIR
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Load one split as ``(uint8 images N x 28 x 28, int64 labels N)``.

    ``split`` is ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
    Raises ``FashionMnistMissingError`` when the package is not installed and
    ``ValueError`` for an unknown split name.
    """
    if split not in _FILES:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    image_file, label_file = _FILES[split]
    images = _read_idx(Path(data_dir) / image_file, _IMAGE_MAGIC, 3)
    labels = _read_idx(Path(data_dir) / label_file, _LABEL_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise FashionMnistError(
            f"{split}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    return images, labels


def normalize(
    images: npt.NDArray[np.uint8],
    mean: Sequence[float] | float = MEAN,
    std: Sequence[float] | float = STD,
) -> npt.NDArray[np.float32]:
    """Map ``uint8`` images ``(N, 28, 28)`` to float32 ``(N, 1, 28, 28)``.

    Each pixel becomes ``(pixel / 255 - mean) / std``; ``mean`` and ``std`` are one
    value or a one-element sequence (Fashion-MNIST has a single channel).
    """
    if images.ndim == 3:
        images = images[:, None, :, :]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(
            f"expected images of shape (N, 28, 28) or (N, 1, 28, 28), got {images.shape}"
        )
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    if mean_arr.shape[0] != 1 or std_arr.shape[0] != 1:
        raise ValueError("mean and std must each hold one value (one channel)")
    if np.any(std_arr <= 0):
        raise ValueError(f"std must be positive, got {std_arr.ravel().tolist()}")
    scaled = images.astype(np.float32) / np.float32(255.0)
    return ((scaled - mean_arr) / std_arr).astype(np.float32, copy=False)
