"""A third-party model: RapidOCR's text-line direction classifier, quantized zero-shot.

Usage (from the repository root, in the benchmark venv that has scikit-image)::

    pip download --no-deps rapidocr-onnxruntime==1.4.4 -d bench-work/     # once
    bench-work/venv/bin/python tools/bench_third_party.py
    bench-work/venv/bin/python tools/bench_third_party.py --smoke          # seconds, tmp folder

The model is ``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx`` from the
PyPI wheel (PaddleOCR's mobile v2.0 direction classifier: input ``x`` N x 3 x H x W with
symbolic H/W, weights in Constant nodes, 35 BatchNormalization nodes, HardSigmoid
squeeze-excitation, a Softmax over 2 classes: 0 and 180 degrees). onnxdgh pins the input
to 3 x 48 x 192 (``--input-shape``) and normalises as PaddleOCR's classifier does,
``x = (pixel / 255 - 0.5) / 0.5`` (``--mean 0.5 --std 0.5``).

Evaluation data, all real: text-line crops of scikit-image's bundled ``data.page()``
scan. Text lines are found by horizontal projection of ink (pixels darker than the
local background), each line is cut into pieces of at most 4x its height (the model's
aspect), resized to 48 px height keeping the aspect, padded to 192 wide (PaddleOCR's
``resize_norm_img``: padding is 0 in the normalised space), grey replicated to 3
channels. Each crop appears upright (label 0) and rotated by 180 degrees (label 1).

Reported: the float model's accuracy on those labels, and for each quantized model its
top-1 agreement with the float model (and accuracy) and whether ``onnxdgh quantize``'s
own validation against the default profile of its bit widths passed: W8A8 calibrated
with DGH images (the main command, defaults), with Gaussian noise, and with real crops
(the crops of the even-numbered lines; agreement is also given on the odd-numbered
lines, which that calibration never saw), each with the ``mse`` and ``noclip`` threshold
rules; and what broke on the way, if anything (every failing command is recorded with its
error line and, for a model written but failing validation, its violations; the benchmark
goes on).

Writes the section ``third-party`` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import math
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "third-party"
TITLE = "Third-party model: RapidOCR text direction classifier (issue 6 item 4)"
WHEEL = "rapidocr_onnxruntime-1.4.4-py3-none-any.whl"
MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
HEIGHT, WIDTH = 48, 192


@dataclass
class Crops:
    """Normalised crops (N x 3 x 48 x 192), labels (0 upright, 1 rotated) and source line index."""

    images: np.ndarray
    labels: np.ndarray
    line: np.ndarray


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--wheel", type=Path, default=bl.WORK / WHEEL, help=f"the downloaded wheel (default bench-work/{WHEEL})")
    parser.add_argument("--images", type=int, default=None, help="DGH images (default: onnxdgh's default)")
    parser.add_argument("--iterations", type=int, default=None, help="DGH iterations (default: onnxdgh's default)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------ crops


def _background(gray: np.ndarray) -> np.ndarray:
    """Local paper brightness: a wide max filter (removes the dark strokes) then a blur."""
    from PIL import Image, ImageFilter

    image = Image.fromarray(gray)
    size = max(3, (min(gray.shape) // 12) | 1)
    bright = image.filter(ImageFilter.MaxFilter(size)).filter(ImageFilter.GaussianBlur(size))
    return np.maximum(np.asarray(bright, dtype=np.float32), 1.0)


def text_lines(gray: np.ndarray, *, ink_level: float = 0.25, min_height: int = 6) -> list[tuple[int, int]]:
    """Row ranges [top, bottom) of text lines, by horizontal projection of the ink mask."""
    ink = np.clip((_background(gray) - gray.astype(np.float32)) / _background(gray), 0.0, 1.0) > ink_level
    profile = ink.mean(axis=1)
    on = profile > max(0.01, 0.12 * float(profile.max()))
    lines: list[tuple[int, int]] = []
    start = None
    for row, value in enumerate(np.append(on, False)):
        if value and start is None:
            start = row
        elif not value and start is not None:
            if lines and start - lines[-1][1] <= 1:  # a one-row gap inside a line (thin strokes)
                lines[-1] = (lines[-1][0], row)
            else:
                lines.append((start, row))
            start = None
    return [(top, bottom) for top, bottom in lines if bottom - top >= min_height]


def line_pieces(gray: np.ndarray, lines: list[tuple[int, int]], *, pad: int = 2) -> list[tuple[int, np.ndarray]]:
    """(line index, crop) pieces of each line, at most 4x the line height wide, cut where ink starts/ends."""
    background = _background(gray)
    ink = np.clip((background - gray.astype(np.float32)) / background, 0.0, 1.0) > 0.25
    pieces = []
    for index, (top, bottom) in enumerate(lines):
        top, bottom = max(0, top - pad), min(gray.shape[0], bottom + pad)
        columns = np.flatnonzero(ink[top:bottom].any(axis=0))
        if columns.size == 0:
            continue
        left, right = int(columns[0]), int(columns[-1]) + 1
        height = bottom - top
        piece_w = 4 * height
        count = max(1, math.ceil((right - left) / piece_w))
        for k in range(count):
            x0 = left + k * piece_w
            x1 = min(right, x0 + piece_w)
            if x1 - x0 < height:  # a sliver at the end of the line
                continue
            crop = gray[top:bottom, x0:x1]
            if ink[top:bottom, x0:x1].mean() < 0.03:
                continue
            pieces.append((index, crop))
    return pieces


def paddle_cls_input(crop: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img`` for the classifier: 3 x ``height`` (48) x ``width`` (192),
    (p/255 - 0.5)/0.5, zero padding (the recogniser's is the same at width 320: tools/bench_ocr.py)."""
    from PIL import Image

    h, w = crop.shape
    resized_w = min(width, int(math.ceil(height * w / h)))
    image = np.asarray(Image.fromarray(crop).resize((resized_w, height), Image.BILINEAR), dtype=np.float32)
    normed = (image / 255.0 - 0.5) / 0.5
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :resized_w] = normed[None]
    return out


def make_crops(gray: np.ndarray) -> Crops:
    """Upright and 180-degree-rotated crops of every text-line piece of a grey page."""
    pieces = line_pieces(gray, text_lines(gray))
    if not pieces:
        raise bl.BenchError("no text lines found on the page image")
    images, labels, line = [], [], []
    for index, crop in pieces:
        for label, img in ((0, crop), (1, np.ascontiguousarray(crop[::-1, ::-1]))):
            images.append(paddle_cls_input(img))
            labels.append(label)
            line.append(index)
    return Crops(np.stack(images), np.asarray(labels), np.asarray(line))


def synthetic_page(seed: int = 0) -> np.ndarray:
    """A grey page with a few lines of dark text on uneven paper (smoke mode; no scikit-image)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    page = Image.new("L", (256, 96), 225)
    draw = ImageDraw.Draw(page)
    words = ["quantize", "every", "tensor", "power", "of", "two", "scale", "zero", "point", "batch", "norm"]
    for row in range(4):
        text = " ".join(rng.choice(words, size=5))
        draw.text((6, 8 + 22 * row), text, fill=30)
    arr = np.asarray(page, dtype=np.float32) * np.linspace(1.0, 0.8, 96)[:, None]
    return np.clip(arr, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------ model


def extract_model(wheel: Path, out: Path) -> Path:
    """The classifier's .onnx taken out of the RapidOCR wheel into ``out`` (kept once extracted)."""
    if out.exists():
        return out
    if not wheel.exists():
        raise bl.BenchError(f"{wheel} not found; download it: pip download --no-deps rapidocr-onnxruntime==1.4.4 -d {wheel.parent}")
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(MEMBER)
    from onnxdgh.fileio import atomic_write_bytes

    atomic_write_bytes(out, data)
    return out


def _smoke_model(path: Path) -> Path:
    """A small 3-channel classifier with symbolic H/W and a Softmax output, like the real one."""
    return bl.tiny_classifier(path, channels=3, size=(HEIGHT, WIDTH), classes=2, mean=0.5, std=0.5,
                              dynamic_hw=True, softmax=True)


# ------------------------------------------------------------------------ main


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "third_party")
    info = bl.machine_info()
    load_before = bl.load_average()
    if args.smoke:
        model = _smoke_model(ctx.work / "cls_tiny.onnx")
        gray = synthetic_page(ctx.seed)
        page_name = "a synthetic page drawn with PIL (smoke)"
        gen = ["--images", "8", "--iterations", "2", "--batch-size", "8"]
    else:
        model = extract_model(args.wheel, ctx.work / "ch_ppocr_mobile_v2.0_cls_infer.onnx")
        skimage_data = bl.optional_import("skimage.data", "the page image of the evaluation set")
        gray = np.asarray(skimage_data.page(), dtype=np.uint8)
        page_name = "scikit-image `data.page()`"
        gen = []
        if args.images:
            gen += ["--images", str(args.images)]
        if args.iterations:
            gen += ["--iterations", str(args.iterations)]
    shape = ["--input-shape", f"3x{HEIGHT}x{WIDTH}"]
    norm = ["--mean", "0.5", "--std", "0.5"]

    crops = make_crops(gray)
    n_lines = int(crops.line.max()) + 1
    bl.log(f"{crops.images.shape[0]} crops from {n_lines} text lines ({int((crops.labels == 0).sum())} upright)")
    float_scores = bl.predict(model, crops.images)
    float_pred = float_scores.argmax(axis=1)
    float_acc = float(np.mean(float_pred == crops.labels))
    bl.log(f"float accuracy {100 * float_acc:.2f}%")

    broke: list[str] = []
    rows: list[list[str]] = []
    validation: dict[Path, str] = {}  # model -> what `onnxdgh quantize`'s validation said
    held_out = crops.line % 2 == 1

    def evaluate(label: str, path: Path, seconds: float | None) -> None:
        pred = bl.predict(path, crops.images).argmax(axis=1)
        agree = float(np.mean(pred == float_pred))
        agree_held = float(np.mean(pred[held_out] == float_pred[held_out])) if held_out.any() else float("nan")
        acc = float(np.mean(pred == crops.labels))
        rows.append([label, f"{100 * agree:.1f}", f"{100 * agree_held:.1f}", f"{100 * acc:.1f}",
                     validation.get(path, "—"), "—" if seconds is None else f"{seconds:.1f} s"])
        bl.log(f"  {label}: agreement {100 * agree:.1f}% (held-out lines {100 * agree_held:.1f}%), accuracy {100 * acc:.1f}%")

    def attempt(label: str, cli: list[str], out: Path) -> float | None:
        started = time.perf_counter()
        if out.exists():
            out.unlink()
        try:
            result = bl.run_onnxdgh(cli, what=label, quiet=True, in_process=ctx.smoke)
        except bl.BenchError as exc:
            text = f"- {label}: `{' '.join(['onnxdgh', *cli]).replace(str(bl.REPO) + '/', '')}` → {str(exc).splitlines()[0]}"
            report = out.with_suffix(".validation.json")
            if "(exit 1)" in str(exc) and out.exists():
                # Written but failing the validator: the model exists and runs, so it is still measured.
                rules = json.loads(report.read_text()).get("violations", []) if report.exists() else []
                if rules:
                    text += " Violations: " + "; ".join(f"{v.get('rule')} at {v.get('node')}" for v in rules[:8])
                validation[out] = f"fails ({len(rules)} violations)" if rules else "fails"
                broke.append(text + " (the written model is evaluated below anyway)")
                bl.log(f"  {label}: written but fails validation")
                return time.perf_counter() - started
            broke.append(text)
            bl.log(f"  FAILED {label}: {exc}")
            return None
        if cli[0] == "quantize":  # exit 0 with validation on (the default): the profile's rules hold
            validation[out] = "passes"
        return result.wall_s

    work = ctx.work
    # 1. The main command, as a user would run it: DGH with defaults, W8A8, default threshold.
    out = work / "cls_q_default.onnx"
    seconds = attempt("onnxdgh quantize (defaults: DGH, W8A8)", ["quantize", str(model), "-o", str(out), *shape, *norm,
                                                                "--seed", str(ctx.seed), *gen], out)
    if seconds is not None:
        evaluate("W8A8, DGH (main command, defaults)", out, seconds)

    # 2. Calibration sets: DGH (once, reused), noise, real crops of the even-numbered lines.
    sets: dict[str, Path] = {}
    dgh = work / "calib_dgh.npz"
    report_path = work / "calib_dgh.json"
    dgh_cached = dgh.exists()
    if dgh_cached or attempt("onnxdgh generate (DGH)", ["generate", str(model), "-o", str(dgh), *shape, *norm,
                                                          "--seed", str(ctx.seed), "--json", str(report_path), *gen], dgh) is not None:
        sets["DGH"] = dgh
    noise = work / "calib_noise.npz"
    if attempt("onnxdgh generate --method noise", ["generate", str(model), "-o", str(noise), *shape, *norm, "--method",
                                                   "noise", "--seed", str(ctx.seed), *gen], noise) is not None:
        sets["noise"] = noise
    from onnxdgh.fileio import save_images_npz

    real = work / "calib_real.npz"
    calib_idx = ~held_out
    if calib_idx.sum() >= 8:
        save_images_npz(real, crops.images[calib_idx], {"source": "text crops of even-numbered lines"})
        sets[f"real crops ({int(calib_idx.sum())}, even lines)"] = real
    for source, calib in sets.items():
        for threshold in ("mse", "noclip"):
            q = work / f"cls_q_{calib.stem}_{threshold}.onnx"
            seconds = attempt(f"quantize W8A8 on {source}, {threshold}",
                              ["quantize", str(model), "-o", str(q), *shape, "--calib-data", str(calib),
                               "--threshold", threshold], q)
            if seconds is not None:
                evaluate(f"W8A8, {source}, threshold {threshold}", q, seconds)
    if "DGH" in sets:
        q = work / "cls_q_dgh_w4a8.onnx"
        seconds = attempt("quantize W4A8 on DGH", ["quantize", str(model), "-o", str(q), *shape, "--calib-data",
                                                   str(sets["DGH"]), "--weight-bits", "4", "--act-bits", "8"], q)
        if seconds is not None:
            evaluate("W4A8, DGH, default threshold", q, seconds)

    load_after = bl.load_average()
    gen_note = ""
    if report_path.exists():
        report = json.loads(report_path.read_text())
        settings = report.get("settings", {})
        final = report.get("final", {})
        gen_note = (f"DGH set: {settings.get('images')} images x {settings.get('iterations')} iterations, "
                    f"BN loss {final.get('bns_loss_initial', float('nan')):.4g} -> "
                    f"{final.get('bns_loss_last_iteration') or float('nan'):.4g}, "
                    f"optimisation {report.get('timings', {}).get('optimise_s', float('nan')):.0f} s.")
        if dgh_cached:
            # The main command generates its own images every run; the cached set may come from
            # an older generator, so the two DGH mse rows can differ by their images.
            written = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(dgh.stat().st_mtime))
            gen_note += (f" The set is reused from an earlier run ({dgh.name}, written {written}); the main command "
                         "(first row) generated its own images in this run with the same settings.")
    body = [
        f"Model: `{MEMBER}` from the PyPI wheel `rapidocr-onnxruntime==1.4.4` ({'smoke stand-in' if args.smoke else 'pretrained'}), "
        f"pinned with `--input-shape 3x{HEIGHT}x{WIDTH}`, normalisation `--mean 0.5 --std 0.5` (PaddleOCR's classifier).",
        f"Evaluation set: {crops.images.shape[0]} crops ({crops.images.shape[0] // 2} upright + the same rotated "
        f"180 degrees) from {n_lines} text lines of {page_name}. **Float model accuracy: {100 * float_acc:.1f}%.**",
        "",
        bl.md_table(["quantized model", "agreement with float % (all)", "agreement % (odd lines, never calibrated on)",
                     "accuracy %", "validation (default profile)", "command time"], rows),
        "",
        "The real-crop calibration set holds the crops of the even-numbered lines (both orientations); the held-out "
        "column counts only the odd-numbered lines. Validation is `onnxdgh quantize`'s own check of the written "
        "model against the default profile of its bit widths (generic-pot-int8 for W8A8, pot-w4a8 for W4A8): "
        "\"passes\" means the command exited 0.",
    ]
    if gen_note:
        body += ["", gen_note]
    body += ["", "**What broke on the way:**", ""] + (broke or ["- nothing: every command above succeeded."])
    bl.write_section(KEY, TITLE, "\n".join(body), info=info, command=bl.command_string(), load_before=load_before,
                     load_after=load_after, doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(lambda: run(sys.argv[1:]))
