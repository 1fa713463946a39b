"""A real BN-free model: ddddocr's YOLOX-style text detector quantized W8A8 without data (issue 15).

Usage (from the repository root; the model comes from the ddddocr wheel, git-ignored)::

    pip download --no-deps ddddocr==1.6.1 -d .whl/ && (cd .whl && unzip -o -q ddddocr-1.6.1-py3-none-any.whl)
    python3 tools/bench_detector_bn_free.py --model .whl/ddddocr/common_det.onnx
    python3 tools/bench_detector_bn_free.py --smoke

``common_det.onnx`` (416 x 416 BGR input, raw 0-255 values, no BatchNormalization) is
quantized at W8A8 with calibration images from ``noise`` (``generate --method noise``),
``procedural`` (``quantize --preprocess raw255``: ``--method auto`` picks the procedural
fallback) and ``real`` (rendered pages, another seed than the evaluation pages). The float
and quantized models run on rendered text pages (single glyphs and words in DejaVu fonts of random size and
colour on uneven, tinted paper, ddddocr's letterbox preprocessing); boxes are decoded as
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
    parser.add_argument("--pages", type=int, default=40, help="evaluation pages (default 40)")
    parser.add_argument("--images", type=int, nargs="+", default=[32],
                        help="calibration images per candidate; several counts give one row each (default 32)")
    parser.add_argument("--thresholds", nargs="+", default=["mse"], choices=["mse", "noclip"],
                        help="quantize --threshold rules; each gives its rows (default: mse, the quantizer's default)")
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
    pages = render_pages(args.pages, seed=ctx.seed + 1000)
    reference, float_max = _detections(model, pages)
    total = sum(len(b) for b in reference)
    bl.log(f"float: {total} boxes with objectness > {OBJECTNESS} on {args.pages} pages (max objectness {float_max:.3f})")
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
    rows = [["float", str(total), "", f"{float_max:.3f}"]]
    for index, (name, extra) in enumerate(candidates.items()):
        out = work / f"q{index}_{name.split()[0].strip(',')}.onnx"
        result = bl.run_onnxdgh(["quantize", str(model), "-o", str(out), "--seed", str(ctx.seed), *extra],
                                what=f"quantize W8A8 ({name})")
        boxes, top = _detections(out, pages)
        found = sum(len(b) for b in boxes)
        hits = sum(matched(r, c) for r, c in zip(reference, boxes))
        bl.log(f"  {name}: {found} boxes, {hits}/{total} float boxes matched, max objectness {top:.3f} ({result.wall_s:.0f} s)")
        rows.append([name, str(found), f"{hits} / {total} ({100 * hits / max(total, 1):.1f} %)", f"{top:.3f}"])
    body = [
        f"`common_det.onnx` from `ddddocr==1.6.1` (YOLOX-style, 416 x 416 BGR, raw 0-255 input, no BatchNormalization), "
        f"W8A8 with the quantizer's defaults but the `--threshold` each row names (the default for this model, "
        f"whose output is N x 3549 x 6, is noclip). Evaluation: {args.pages} "
        f"rendered text pages (`render_pages`, seed {ctx.seed + 1000}); boxes with objectness > {OBJECTNESS} after "
        f"ddddocr's decoding and NMS; 'matched' = float boxes with a quantized box at IoU >= {MATCH_IOU}. "
        "`quantize` holds back 20 % of a given set for its own validation, so a 32-image set calibrates on 26. "
        "'actreg': `generate --method actreg --preprocess raw255` (procedural images refined through the model, "
        "batches of 8).", "",
        bl.md_table(["calibration", "boxes", "float boxes matched", "max objectness"], rows), "",
    ]
    bl.write_section("bn-free-detector", "A BN-free detector without data: ddddocr common_det W8A8 (issue 15)",
                     "\n".join(body), info=info, command=command, load_before=load_before,
                     load_after=bl.load_average(), doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
