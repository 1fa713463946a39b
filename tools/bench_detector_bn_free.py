"""A real BN-free model: ddddocr's YOLOX-style text detector quantized W8A8 without data (issue 15).

Usage (from the repository root; the model comes from the ddddocr wheel, git-ignored)::

    pip download --no-deps ddddocr==1.6.1 -d .whl/ && (cd .whl && unzip -o -q ddddocr-1.6.1-py3-none-any.whl)
    bench-work/venv/bin/python tools/bench_detector_bn_free.py --model .whl/ddddocr/common_det.onnx

``common_det.onnx`` (416 x 416 BGR input, raw 0-255 values, no BatchNormalization) is
quantized at W8A8 with calibration images from ``noise`` (``generate --method noise``),
``procedural`` (``quantize --preprocess raw255``: ``--method auto`` picks the procedural
fallback) and ``real`` (rendered pages, another seed than the evaluation pages), under each
``--thresholds`` rule. The float and quantized models run on two evaluation sets: rendered
text pages (single glyphs and words in DejaVu fonts of random size and colour on uneven,
tinted paper) and scikit-image's bundled photos (``skimage.data``, shipped with the package:
each photo whole, then random square crops, in ddddocr's letterbox: resized into 416 x 416,
padded with 114, BGR; run the tool with ``bench-work/venv/bin/python``, which has
scikit-image); boxes are decoded as
ddddocr does (YOLOX grid decoding, class-agnostic NMS at IoU 0.45), those with
objectness > 0.5 kept, and each quantized model's boxes are matched greedily to the float
model's at IoU >= 0.5. Writes the ``bn-free-detector`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxdgh, also in process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

SIZE = 416
OBJECTNESS = 0.5
MATCH_IOU = 0.5
_GLYPHS = "ABCDEFGHJKLMNPQRSTUVWXYZabdefghkmnpqrtwxy23456789"
_WORDS = ("quantize", "every", "tensor", "power", "two", "scale", "zero", "point", "batch", "norm", "ONNX", "8x7k",
          "Qp4z", "3719", "hello", "world", "data", "free", "model", "image")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--model", type=Path, default=Path(".whl/ddddocr/common_det.onnx"), help="common_det.onnx")
    parser.add_argument("--pages", type=int, default=80, help="evaluation pages (default 80)")
    parser.add_argument("--photos", type=int, default=60,
                        help="evaluation photos: the scikit-image photos whole, then random crops (default 60)")
    parser.add_argument("--images", type=int, nargs="+", default=[32],
                        help="calibration images per candidate; several counts give one row each (default 32)")
    parser.add_argument("--thresholds", nargs="+", default=["mse", "lp", "noclip"], choices=["mse", "lp", "noclip"],
                        help="quantize --threshold rules; each gives its rows (default: all three)")
    parser.add_argument("--actreg-iterations", type=int, default=0,
                        help="also calibrate on `generate --method actreg` images with this many iterations (default 0: off)")
    return parser.parse_args(argv)


def render_pages(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    """``count`` rendered text pages as float32 N x 3 x size x size, BGR, values 0..255."""
    from PIL import Image, ImageDraw, ImageFont

    fonts = sorted(Path("/usr/share/fonts/truetype").rglob("DejaVu*.ttf"))
    pages = np.empty((count, 3, size, size), dtype=np.float32)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        paper = rng.uniform(170, 250, size=3)
        image = Image.new("RGB", (size, size), tuple(int(v) for v in paper))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 14))):  # captcha-like: separate glyphs, ddddocr's use
            font_size = int(rng.integers(28, 72))
            font = ImageFont.truetype(str(fonts[int(rng.integers(len(fonts)))]), font_size) if fonts else \
                ImageFont.load_default(size=font_size)
            text = str(rng.choice(list(_GLYPHS))) if rng.uniform() < 0.7 else str(rng.choice(_WORDS))
            ink = tuple(int(v) for v in rng.uniform(0, 110, size=3))
            draw.text((int(rng.integers(0, size - 60)), int(rng.integers(0, size - font_size))), text, fill=ink, font=font)
        arr = np.asarray(image, dtype=np.float32)
        shade = np.linspace(1.0, rng.uniform(0.7, 1.0), size)[:, None, None]
        arr = np.clip(arr * shade + rng.normal(0.0, 4.0, size=arr.shape), 0, 255)
        pages[index] = arr[:, :, ::-1].transpose(2, 0, 1)  # RGB -> BGR, HWC -> CHW (cv2's order)
    return pages


SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "text", "page", "camera", "coins", "horse",
                  "hubble_deep_field", "immunohistochemistry", "moon", "retina", "logo", "colorwheel", "brick", "grass",
                  "gravel", "clock", "cell")
"""The photos bundled with scikit-image (no download) used as evaluation images."""


def letterbox(image: np.ndarray, size: int = SIZE) -> np.ndarray:
    """An RGB uint8 H x W x 3 image as ddddocr feeds it (resized into size x size, padded with 114):
    3 x size x size BGR float32."""
    from PIL import Image

    ratio = min(size / image.shape[0], size / image.shape[1])
    width, height = int(image.shape[1] * ratio), int(image.shape[0] * ratio)
    resized = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR), dtype=np.float32)
    out = np.full((size, size, 3), 114.0, dtype=np.float32)
    out[:height, :width] = resized
    return np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1))


def skimage_photos(count: int, seed: int, size: int = SIZE) -> np.ndarray:
    """``count`` evaluation images: each :data:`SKIMAGE_PHOTOS` photo whole, then random square crops
    (35-80 % of the short side), letterboxed."""
    data = bl.optional_import("skimage.data", "the photo evaluation set")
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        image = np.asarray(getattr(data, SKIMAGE_PHOTOS[index % len(SKIMAGE_PHOTOS)])())
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = image[..., :3]
        if image.dtype != np.uint8:  # float or bool images: stretched to 0..255
            image = image.astype(np.float64)
            image = (255 * (image - image.min()) / max(float(np.ptp(image)), 1e-9)).astype(np.uint8)
        if index >= len(SKIMAGE_PHOTOS):
            height, width = image.shape[:2]
            side = int(min(height, width) * rng.uniform(0.35, 0.8))
            y, x = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
            image = image[y:y + side, x:x + side]
        out[index] = letterbox(np.ascontiguousarray(image), size)
    return out


def decode(output: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Boxes (x1, y1, x2, y2, objectness) with objectness > OBJECTNESS after NMS, ddddocr's decoding."""
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = size // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred = output.astype(np.float64).copy()
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(np.minimum(pred[:, 2:4], 20.0)) * stride
    keep = pred[:, 4] > OBJECTNESS
    pred = pred[keep]
    boxes = np.stack([pred[:, 0] - pred[:, 2] / 2, pred[:, 1] - pred[:, 3] / 2,
                      pred[:, 0] + pred[:, 2] / 2, pred[:, 1] + pred[:, 3] / 2, pred[:, 4]], axis=1)
    order = np.argsort(-boxes[:, 4])
    chosen: list[int] = []
    while order.size:
        first = order[0]
        chosen.append(int(first))
        rest = order[1:]
        order = rest[_iou(boxes[first], boxes[rest]) <= 0.45]
    return boxes[chosen]


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def matched(reference: np.ndarray, candidate: np.ndarray) -> int:
    """How many reference boxes have a distinct candidate box at IoU >= MATCH_IOU (greedy)."""
    free = np.ones(len(candidate), dtype=bool)
    count = 0
    for box in reference:
        if not free.any():
            break
        ious = np.where(free, _iou(box, candidate), -1.0)
        best = int(np.argmax(ious))
        if ious[best] >= MATCH_IOU:
            free[best] = False
            count += 1
    return count


def _detections(model: Path, pages: np.ndarray) -> tuple[list[np.ndarray], float]:
    out = bl.predict(model, pages)
    return [decode(o) for o in out], float(out[..., 4].max())


def _default_rule(model: Path) -> str:
    from onnxdgh.load import load_model
    from onnxdgh.quantization.plan import default_threshold

    return default_threshold(load_model(model).model, 8)


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "bn_free_detector")
    info = bl.machine_info()
    command = bl.command_string()
    load_before = bl.load_average()
    if ctx.smoke:
        raise bl.BenchError("the detector benchmark has no smoke mode: it needs common_det.onnx (see --help)")
    if not args.model.exists():
        raise bl.BenchError(f"{args.model} not found; see the usage in tools/bench_detector_bn_free.py")
    from onnxdgh.fileio import save_images_npz

    model = args.model
    work = ctx.work
    sets = {"pages": render_pages(args.pages, seed=ctx.seed + 1000),
            "photos": skimage_photos(args.photos, ctx.seed + 2000)}
    reference = {}
    rows = [["float"]]
    for kind, images in sets.items():
        reference[kind], float_max = _detections(model, images)
        total = sum(len(b) for b in reference[kind])
        bl.log(f"float: {total} boxes with objectness > {OBJECTNESS} on {len(images)} {kind} "
               f"(max objectness {float_max:.3f})")
        rows[0] += [str(total), "", f"{float_max:.3f}"]
    candidates: dict[str, list[str]] = {}
    for count in args.images:
        real = work / f"real_pages_{count}.npz"
        save_images_npz(real, render_pages(count, seed=ctx.seed), {"source": "rendered pages"})
        noise = work / f"noise_{count}.npz"
        bl.run_onnxdgh(["generate", str(model), "-o", str(noise), "--method", "noise", "--preprocess", "raw255",
                        "--images", str(count), "--seed", str(ctx.seed)], what="generate noise")
        actreg = work / f"actreg_{count}.npz"
        if args.actreg_iterations:
            result = bl.run_onnxdgh(["generate", str(model), "-o", str(actreg), "--method", "actreg", "--preprocess",
                                     "raw255", "--images", str(count), "--iterations", str(args.actreg_iterations),
                                     "--batch-size", "8", "--seed", str(ctx.seed)], what="generate actreg")
            bl.log(f"  actreg: {count} images x {args.actreg_iterations} iterations, {result.wall_s:.0f} s")
        for rule in args.thresholds:
            flag = ["--threshold", rule]
            tag = f", `--threshold {rule}`"  # named always: the default depends on the model (noclip here)
            if rule == args.thresholds[0]:  # noise finds nothing either way: one row
                candidates[f"noise, {count} images{tag}"] = ["--calib-data", str(noise), *flag]
            candidates[f"procedural (`--preprocess raw255`), {count} images{tag}"] = [
                "--preprocess", "raw255", "--images", str(count), *flag]
            if args.actreg_iterations:
                candidates[f"actreg ({args.actreg_iterations} iterations), {count} images{tag}"] = [
                    "--calib-data", str(actreg), *flag]
            candidates[f"real (rendered pages), {count} images{tag}"] = ["--calib-data", str(real), *flag]
    for index, (name, extra) in enumerate(candidates.items()):
        out = work / f"q{index}_{name.split()[0].strip(',')}.onnx"
        result = bl.run_onnxdgh(["quantize", str(model), "-o", str(out), "--seed", str(ctx.seed), *extra],
                                what=f"quantize W8A8 ({name})")
        row = [name]
        for kind, images in sets.items():
            boxes, top = _detections(out, images)
            found = sum(len(b) for b in boxes)
            total = sum(len(b) for b in reference[kind])
            hits = sum(matched(r, c) for r, c in zip(reference[kind], boxes))
            bl.log(f"  {name}, {kind}: {found} boxes, {hits}/{total} float boxes matched, max objectness {top:.3f} "
                   f"({result.wall_s:.0f} s)")
            row += [str(found), f"{hits} / {total} ({100 * hits / max(total, 1):.1f} %)", f"{top:.3f}"]
        rows.append(row)
    body = [
        f"`common_det.onnx` from `ddddocr==1.6.1` (YOLOX-style, 416 x 416 BGR, raw 0-255 input, no BatchNormalization), "
        f"W8A8 with the quantizer's defaults but the `--threshold` each row names (the default for this model, "
        f"whose output is N x 3549 x 6, is {_default_rule(model)}). Evaluation: {args.pages} "
        f"rendered text pages (`render_pages`, seed {ctx.seed + 1000}) and {args.photos} scikit-image photos "
        f"(`skimage_photos`, seed {ctx.seed + 2000}: the {len(SKIMAGE_PHOTOS)} bundled photos whole, then random "
        f"crops, in ddddocr's letterbox); boxes with objectness > {OBJECTNESS} after "
        f"ddddocr's decoding and NMS; 'matched' = float boxes with a quantized box at IoU >= {MATCH_IOU}. "
        "`quantize` holds back 20 % of a given set for its own validation, so a 32-image set calibrates on 26. "
        "'actreg': `generate --method actreg --preprocess raw255` (procedural images refined through the model, "
        "batches of 8).", "",
        bl.md_table(["calibration", "pages: boxes", "pages: float boxes matched", "pages: max objectness",
                     "photos: boxes", "photos: float boxes matched", "photos: max objectness"], rows), "",
    ]
    bl.write_section("bn-free-detector", "A BN-free detector without data: ddddocr common_det W8A8 (issue 15)",
                     "\n".join(body), info=info, command=command, load_before=load_before,
                     load_after=bl.load_average(), doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
