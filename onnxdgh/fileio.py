"""Safe file input and output shared by every stage.

Contract:
* outputs are written atomically (temporary file in the target folder, fsync, rename),
  so a failure never leaves a half-written file behind;
* every output path of a command is checked before long work starts
  (:func:`check_output_paths`): its folder must exist and be writable, and it must not be
  one of the inputs or another output, compared resolved (links, ``.``/``..``);
* a failed write (a full disk) is an :class:`~onnxdgh.errors.OutputPathError` naming the path;
* numpy files are read with ``allow_pickle=False`` after every array header is checked
  (:func:`open_numpy`): untrusted files are never unpickled, and a forged header cannot
  make the reader allocate more than the file or the machine holds.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from .errors import CalibrationDataError, OutputPathError
from .memory import format_bytes, machine_memory_bytes

__all__ = [
    "DAMAGED_FILE_ERRORS",
    "check_output_path",
    "check_output_paths",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "save_images_npz",
    "open_numpy",
    "read_npz_array",
    "load_images_npz",
    "check_images",
]

DAMAGED_FILE_ERRORS = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)
"""What ``numpy.load`` raises on a damaged ``.npz``/``.npy`` (bad zip directory, CRC,
offsets, compression method) -- reading the archive *and* reading its members."""


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path, or a hard link."""
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    option: str = "output path",
) -> Path:
    """Validate one output path before any long work; return it as a ``Path``.

    ``option`` is the command-line option (or argument) that gave the path; messages name
    it. For a command with several outputs use :func:`check_output_paths`, which also
    refuses two outputs naming one file.

    Raises:
        OutputPathError: the path is a folder, its folder is missing or read-only, or it
            names one of ``inputs`` (compared resolved, so ``./a`` and ``d/../a`` and
            links are caught).
    """
    check_output_paths([(option, path)], inputs=[("input", given) for given in inputs])
    return Path(path)


def check_output_paths(
    outputs: Sequence[tuple[str, str | os.PathLike[str] | None]],
    *,
    inputs: Sequence[tuple[str, str | os.PathLike[str] | None]] = (),
) -> list[Path]:
    """The one output-path check of every command, run before any long work.

    ``outputs`` and ``inputs`` are ``(option, path)`` pairs, e.g. ``("--json", "r.json")``
    and ``("MODEL", "model.onnx")``; ``None`` paths (options not given) are skipped. Paths
    are compared resolved (symbolic links, ``.``/``..``) and by inode (hard links), so no
    spelling lets an output overwrite an input or another output.

    Raises:
        OutputPathError: an output is a folder, in a missing or read-only folder, an
            existing read-only file, one of the inputs, or the same file as another output.
    """
    given_inputs = [(option, Path(path)) for option, path in inputs if path is not None]
    checked: list[tuple[str, Path]] = []
    for option, path in outputs:
        if path is None:
            continue
        out = Path(path)
        if out.exists() and out.is_dir():
            raise OutputPathError(f"{option} {out} is a folder", f"give {option} a file name")
        for input_option, src in given_inputs:
            if _same_file(out, src):
                same = "" if str(out) == str(src) else f" {src}"
                raise OutputPathError(
                    f"{option} {out} is the {input_option} file{same}; onnxdgh never overwrites its input",
                    f"give {option} a new file name",
                )
        for other_option, other in checked:
            if _same_file(out, other):
                raise OutputPathError(
                    f"{option} {out} and {other_option} {other} name the same file",
                    "give each output its own file",
                )
        parent = out.parent  # "." for a bare file name
        if not parent.is_dir():
            raise OutputPathError(f"folder {parent} of {option} {out} does not exist", f"create it first: mkdir -p {parent}")
        if not os.access(parent, os.W_OK):
            raise OutputPathError(f"folder {parent} of {option} {out} is not writable", "choose a folder you can write to")
        if out.exists() and not os.access(out, os.W_OK):
            raise OutputPathError(f"{option} {out} exists and is not writable", "remove it or choose another name")
        checked.append((option, out))
    return [out for _, out in checked]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return the path.

    Raises:
        OutputPathError: the write failed (a full disk, a lost permission, ...): the
            message names the path and the system's reason; nothing is left behind.
    """
    out = Path(path)
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        # mkstemp creates the file 0600; give it the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            reason = exc.strerror or type(exc).__name__
            raise OutputPathError(
                f"cannot write {out}: {reason} (nothing was written)",
                "free space on that disk or choose another folder" if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                else "check the folder's permissions and free space, or choose another folder",
            ) from exc
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


_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL = 0x80  # first byte of every pickle of protocol 2 and later


def _npy_header(handle: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) from the header of the ``.npy`` stream at ``handle``; ValueError if malformed."""
    version = np.lib.format.read_magic(handle)
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0
    }
    if version not in readers:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not read")
    shape, _, dtype = readers[version](handle)
    return tuple(int(d) for d in shape), dtype


def _check_npy_header(handle: IO[bytes], stored: int, *, name: str, what: str, hint: str) -> None:
    """Refuse an array whose header declares object data, more bytes than ``stored`` or than memory."""
    try:
        shape, dtype = _npy_header(handle)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise CalibrationDataError(f"{what}: {name} has a malformed .npy header ({exc})", hint) from exc
    if dtype.hasobject:
        raise CalibrationDataError(f"{what}: {name} holds pickled objects, which onnxdgh never loads", hint)
    needed = math.prod(shape) * dtype.itemsize
    available = stored - handle.tell()
    declared = f"{name} declares shape {shape} {dtype} = {format_bytes(needed)}"
    if needed > available:
        raise CalibrationDataError(
            f"{what}: {declared} but holds only {max(0, available):,} bytes (truncated or forged header)", hint
        )
    memory = machine_memory_bytes()
    if needed > memory:
        raise CalibrationDataError(f"{what}: {declared}, more than this machine's memory ({format_bytes(memory)})", hint)


def open_numpy(path: str | os.PathLike[str], *, what: str, hint: str) -> np.ndarray | np.lib.npyio.NpzFile:
    """``numpy.load`` of an ``.npy``/``.npz`` file, after reading every header first.

    The one reader of user numpy files. Before any array is allocated it refuses, naming
    the file as ``what`` with ``hint``: a file that is neither format (a text file is not
    called a pickle), a pickle, object arrays, and any array whose header declares more
    bytes than the file holds or than this machine's memory (the figure is given). Arrays
    are loaded with ``allow_pickle=False``.

    Raises:
        CalibrationDataError: see above (the caller's ``what`` says which file it is).
    """
    src = Path(path)
    try:
        with src.open("rb") as handle:
            magic = handle.read(len(_NPY_MAGIC))
            handle.seek(0)
            if magic.startswith(_NPY_MAGIC):
                _check_npy_header(handle, src.stat().st_size, name="the array", what=what, hint=hint)
            elif magic.startswith(_ZIP_MAGIC):
                with zipfile.ZipFile(handle) as archive:
                    for info in archive.infolist():
                        if info.filename.endswith(".npy"):
                            with archive.open(info) as member:
                                _check_npy_header(member, info.file_size, name=f"array {info.filename[:-4]!r}",
                                                  what=what, hint=hint)
            elif magic[:1] == bytes([_PICKLE_PROTOCOL]):
                raise CalibrationDataError(f"{what} holds pickled objects, which onnxdgh never loads", hint)
            else:
                raise CalibrationDataError(
                    f"{what} is not an .npz/.npy file (it starts with {magic[:8]!r})", hint
                )
        return np.load(src, allow_pickle=False)
    except (ValueError, *DAMAGED_FILE_ERRORS) as exc:  # pickles were refused above
        raise CalibrationDataError(f"{what} is not a readable .npz/.npy file ({exc})", hint) from exc


def read_npz_array(archive: np.lib.npyio.NpzFile, key: str, *, what: str, hint: str) -> np.ndarray:
    """``archive[key]`` from an archive opened by :func:`open_numpy`; a corrupt member is refused.

    Raises:
        CalibrationDataError: the member is truncated or fails its checksum.
    """
    try:
        return archive[key]
    except (ValueError, *DAMAGED_FILE_ERRORS) as exc:
        raise CalibrationDataError(f"{what}: array {key!r} cannot be read ({exc})", hint) from exc


def load_images_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Load calibration images from ``.npz`` (key ``images``) or ``.npy`` without unpickling.

    Returns:
        ``(images, meta)``: float32 NCHW images and the stored metadata (``{}`` if none).

    Raises:
        CalibrationDataError: missing file, not a numpy file, pickled content, a header
            declaring more than the file or the machine holds (:func:`open_numpy`), no
            ``images`` array, metadata that is not JSON, or not a 4-D float array.
    """
    src = Path(path)
    if not src.exists():
        raise CalibrationDataError(f"calibration file {src} does not exist", "check the path given to --calib-data")
    if src.is_dir():
        raise CalibrationDataError(f"calibration path {src} is a folder", "give an .npz file made by `onnxdgh generate`")
    hint = "give an .npz file with an 'images' array (float32, N x C x H x W): numpy.savez(path, images=array)"
    what = f"calibration file {src}"
    loaded = open_numpy(src, what=what, hint=hint)
    meta: dict[str, Any] = {}
    if isinstance(loaded, np.ndarray):
        images = loaded
    else:
        with loaded:
            if "images" not in loaded.files:
                raise CalibrationDataError(
                    f"{what} has no 'images' array "
                    f"(it has: {', '.join(loaded.files) or 'nothing'})",
                    "save the images under the key 'images': numpy.savez(path, images=array)",
                )
            images = read_npz_array(loaded, "images", what=what, hint=hint)
            if "meta" in loaded.files:
                meta_hint = "drop the 'meta' array or store json.dumps(...) of a dict in it"
                try:
                    meta = json.loads(str(read_npz_array(loaded, "meta", what=what, hint=hint)))
                except json.JSONDecodeError as exc:
                    raise CalibrationDataError(
                        f"{what}: its 'meta' entry is not valid JSON "
                        f"({exc.msg} at character {exc.pos})",
                        meta_hint,
                    ) from exc
                if not isinstance(meta, dict):
                    raise CalibrationDataError(
                        f"{what}: its 'meta' entry is JSON {type(meta).__name__}, not an object",
                        meta_hint,
                    )
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
