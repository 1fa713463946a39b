"""Safe file input and output shared by every stage.

Contract:
* outputs are written atomically (temporary file in the target folder, fsync, rename),
  so a failure never leaves a half-written file behind;
* an output path is checked before long work starts (:func:`check_output_path`): its
  folder must exist and be writable, and it must not be one of the inputs;
* image files are read with ``allow_pickle=False``: untrusted files are never unpickled.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CalibrationDataError, OutputPathError

__all__ = [
    "DAMAGED_FILE_ERRORS",
    "check_output_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_images_npz",
    "load_images_npz",
    "check_images",
]

DAMAGED_FILE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)
"""What ``numpy.load`` raises on a damaged ``.npz``/``.npy`` (bad zip directory, CRC,
offsets, compression method) -- reading the archive *and* reading its members."""


def check_output_path(path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str]] = ()) -> Path:
    """Validate an output path before any long work; return it as a ``Path``.

    Raises:
        OutputPathError: the path is a folder, its folder is missing or read-only, or it
            names one of ``inputs``.
    """
    out = Path(path)
    if out.exists() and out.is_dir():
        raise OutputPathError(f"output path {out} is a folder", "give a file name, e.g. model_q.onnx")
    for given in inputs:
        src = Path(given)
        if src.exists() and out.exists() and out.resolve() == src.resolve():
            raise OutputPathError(
                f"output path {out} is the input file; onnxdgh never overwrites its input",
                "write to a new file, e.g. -o model_q.onnx",
            )
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"output folder {parent} does not exist", f"create it first: mkdir -p {parent}")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output folder {parent} is not writable", "choose a folder you can write to")
    if out.exists() and not os.access(out, os.W_OK):
        raise OutputPathError(f"output file {out} exists and is not writable", "remove it or choose another name")
    return out


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path."""
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_images_npz(
    path: str | os.PathLike[str], images: np.ndarray, meta: Mapping[str, Any] | None = None
) -> Path:
    """Save float32 NCHW ``images`` and JSON-serialisable ``meta`` to an ``.npz`` atomically.

    The metadata is stored as a JSON string (key ``meta``), never as a pickled object.
    """
    buffer = io.BytesIO()
    arrays: dict[str, np.ndarray] = {"images": np.ascontiguousarray(images, dtype=np.float32)}
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return atomic_write_bytes(path, buffer.getvalue())


def load_images_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Load calibration images from ``.npz`` (key ``images``) or ``.npy`` without unpickling.

    Returns:
        ``(images, meta)``: float32 NCHW images and the stored metadata (``{}`` if none).

    Raises:
        CalibrationDataError: missing file, not a numpy file, pickled content, no
            ``images`` array, or not a 4-D float array.
    """
    src = Path(path)
    if not src.exists():
        raise CalibrationDataError(f"calibration file {src} does not exist", "check the path given to --calib-data")
    if src.is_dir():
        raise CalibrationDataError(f"calibration path {src} is a folder", "give an .npz file made by `onnxdgh generate`")
    try:
        loaded = np.load(src, allow_pickle=False)
    except ValueError as exc:
        raise CalibrationDataError(
            f"calibration file {src} holds pickled objects, which onnxdgh never loads ({exc})",
            "save plain arrays: numpy.savez(path, images=array)",
        ) from exc
    except DAMAGED_FILE_ERRORS as exc:
        raise CalibrationDataError(
            f"calibration file {src} is not a readable .npz/.npy file",
            "give an .npz file with an 'images' array (float32, N x C x H x W)",
        ) from exc
    meta: dict[str, Any] = {}
    try:
        if isinstance(loaded, np.ndarray):
            images = loaded
        else:
            with loaded:
                if "images" not in loaded.files:
                    raise CalibrationDataError(
                        f"calibration file {src} has no 'images' array (it has: {', '.join(loaded.files) or 'nothing'})",
                        "save the images under the key 'images': numpy.savez(path, images=array)",
                    )
                images = loaded["images"]
                if "meta" in loaded.files:
                    meta = json.loads(str(loaded["meta"]))
    except ValueError as exc:
        raise CalibrationDataError(
            f"calibration file {src} holds pickled objects, which onnxdgh never loads",
            "save plain arrays: numpy.savez(path, images=array)",
        ) from exc
    except DAMAGED_FILE_ERRORS as exc:  # the archive opened but a member is damaged
        raise CalibrationDataError(
            f"calibration file {src} is damaged ({type(exc).__name__}: {exc})",
            "give an .npz file with an 'images' array (float32, N x C x H x W)",
        ) from exc
    return check_images(images, what=f"calibration images in {src}"), meta


def check_images(
    images: object,
    *,
    what: str = "calibration images",
    input_shape: Iterable[int] | None = None,
    input_name: str | None = None,
) -> np.ndarray:
    """``images`` as contiguous float32 N x C x H x W, or a :class:`CalibrationDataError`.

    The one check of an image batch (a loaded file, the quantizer's calibration set, the
    rounding optimisation's, the validator's data): a numpy array, four dimensions (and
    the model's C x H x W when ``input_shape`` is given), at least one image, a float
    dtype, only finite values. ``what`` names the images in the message.
    """
    if not isinstance(images, np.ndarray):
        raise CalibrationDataError(
            f"{what} must be a numpy array, got {type(images).__name__}", "pass a float32 N x C x H x W array"
        )
    expected = None if input_shape is None else tuple(int(v) for v in input_shape)
    if images.ndim != 4 or (expected is not None and tuple(images.shape[1:]) != expected):
        if expected is None:
            needs = "a float N x C x H x W array is needed"
        else:
            model = f"model input {input_name!r}" if input_name else "the model"
            needs = f"{model} takes N x {' x '.join(map(str, expected))}"
        raise CalibrationDataError(
            f"{what} have shape {tuple(images.shape)}; {needs}",
            "give images of the model's input size, normalized as the model expects (float32 NCHW)",
        )
    if images.shape[0] == 0:
        raise CalibrationDataError(f"{what}: no images", "give at least one image")
    if not np.issubdtype(images.dtype, np.floating):
        raise CalibrationDataError(
            f"{what} have dtype {images.dtype}; float images are needed",
            "convert them to float32 and normalize them as the model expects",
        )
    if not np.all(np.isfinite(images)):
        raise CalibrationDataError(
            f"{what} contain NaN or infinity; every value must be finite", "regenerate or clean them"
        )
    return np.ascontiguousarray(images, dtype=np.float32)
