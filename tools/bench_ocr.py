"""The PP-OCRv4 text detector and recogniser from rapidocr-onnxruntime 1.4.4, float vs quantized (issue 14).

Usage (from the repository root; the models come from the wheel, git-ignored)::

    pip download --no-deps rapidocr-onnxruntime==1.4.4 -d bench-work/
    (cd bench-work && python3 -m zipfile -e rapidocr_onnxruntime-1.4.4-py3-none-any.whl ocr/)
    python3 tools/bench_ocr.py --models bench-work/ocr/rapidocr_onnxruntime/models
    python3 tools/bench_ocr.py --smoke

Preprocessing is rapidocr's (its ``config.yaml``): both models read (pixel/255 - 0.5)/0.5
(``--preprocess symmetric``), BGR. The recogniser reads 3 x 48 x 320 (``rec_img_shape``):
a text line resized to height 48 keeping its aspect ratio (at most 320 wide), zero padding to the
right; its output is N x 40 steps x 6625 classes, decoded greedily (CTC: arg-max per step, repeats
collapsed, blank 0 dropped) with the dictionary in the model's ``character`` metadata
(blank + 6623 characters + space, rapidocr's ``use_space_char``). The detector (DBNet) is
pinned to 3 x 320 x 320 (``--det-size``); its output is a 1-channel probability map, cut at
rapidocr's ``thresh`` 0.3.

Data, rendered with Pillow from the Debian font packages present (DejaVu; Liberation and
FreeFont when installed: ``apt-get install fonts-liberation fonts-freefont-ttf``):

* recogniser: text lines of words and codes made of Latin letters, digits and punctuation
  (every one in the dictionary), one font and size (18-40 px) per line, dark ink on lighter
  paper with a gradient and noise;
* detector: pages with 4-9 such lines at random places, sizes and colours on tinted paper.

Metrics (:mod:`onnxdgh.validation.metrics`, the ones ``onnxdgh validate --metric`` reports):

* recogniser: character agreement of the quantized decoding with the float one,
  1 - edits / max(length) pooled over the lines, and of each model's decoding with the rendered
  text (spaces removed on both sides: the space class is rarely emitted between words);
* detector: pooled IoU of the maps cut at 0.3, float vs quantized, run in onnxruntime
  (default session: what ships); the same figure from ``onnxdgh validate --data PAGES
  --iou-threshold 0.3`` beside it.

Calibration: ``defaults`` (``onnxdgh quantize`` with its own defaults: ``--method auto`` and the
W8A8 generation budget; ``--gen IMAGESxITERATIONS`` forces a size) and ``real`` (rendered lines
or pages of another seed, ``--calib-data``). Each row also gives the images ``auto`` generated
and ``quantize``'s own held-out verdict (its agreement metric on the 20 % of the calibration
images it held back); the section records the refusal when ``onnxdgh quantize`` refuses a model.
Writes the ``ocr`` section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import string
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxdgh, also in process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "ocr"
TITLE = "OCR models (issue 14)"
DET_FILE, REC_FILE = "ch_PP-OCRv4_det_infer.onnx", "ch_PP-OCRv4_rec_infer.onnx"
DB_THRESH = 0.3
"""rapidocr's ``Det.thresh``: where the DBNet probability map is cut."""
REC_HEIGHT, REC_WIDTH = 48, 320
FONT_FILES = (
    "dejavu/DejaVuSans.ttf", "dejavu/DejaVuSerif.ttf", "dejavu/DejaVuSansMono.ttf", "dejavu/DejaVuSansCondensed.ttf",
    "dejavu/DejaVuSans-Bold.ttf", "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSerif-Regular.ttf",
    "liberation/LiberationMono-Regular.ttf", "liberation/LiberationSansNarrow-Regular.ttf",
    "liberation/LiberationSans-Bold.ttf", "freefont/FreeSans.ttf", "freefont/FreeSerif.ttf", "freefont/FreeMono.ttf",
)
FONT_ROOT = Path("/usr/share/fonts/truetype")
PUNCTUATION = ".,:;-()/%&+!?'#"
_WORDS = ("invoice", "total", "amount", "date", "page", "section", "model", "quantize", "power", "scale", "number",
          "street", "phone", "order", "receipt", "price", "table", "figure", "result", "value", "Berlin", "Paris",
          "ONNX", "Conv", "March", "Monday", "the", "and", "of", "for", "with", "from", "Total", "Name", "Item")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", type=Path, default=bl.WORK / "ocr" / "rapidocr_onnxruntime" / "models",
                        help="folder with ch_PP-OCRv4_det_infer.onnx and ch_PP-OCRv4_rec_infer.onnx")
    parser.add_argument("--lines", type=int, default=200, help="rendered text lines for the recogniser (default 200)")
    parser.add_argument("--pages", type=int, default=20, help="rendered pages for the detector (default 20)")
    parser.add_argument("--calib-pages", type=int, default=64, help="rendered pages of the 'real' calibration (default 64)")
    parser.add_argument("--det-size", type=int, default=320, help="detector input height = width (default 320)")
    parser.add_argument("--gen", default=None, metavar="IMAGESxITERATIONS",
                        help="generation size of the defaults rows (default: none given, onnxdgh quantize's own)")
    parser.add_argument("--det-quantized", type=Path, default=None,
                        help="evaluate this already quantized detector as the defaults row instead of quantizing "
                             "(its generation settings are read from its metadata)")
    return parser.parse_args(argv)


# ------------------------------------------------------------------ rendering


def fonts() -> list[Path]:
    """The regular faces of :data:`FONT_FILES` that are installed."""
    found = [FONT_ROOT / name for name in FONT_FILES if (FONT_ROOT / name).exists()]
    if not found:
        raise bl.BenchError(f"none of the fonts in {FONT_ROOT} is installed; apt-get install fonts-dejavu-core")
    return found


def random_text(rng: np.random.Generator, charset: str, words: int) -> str:
    """``words`` tokens: dictionary words, numbers, codes and random strings over ``charset``."""
    tokens = []
    letters = "".join(c for c in charset if c.isalpha())
    for _ in range(words):
        kind = rng.uniform()
        if kind < 0.4:
            tokens.append(str(rng.choice(_WORDS)))
        elif kind < 0.6:
            tokens.append(f"{rng.integers(0, 10000)}{rng.choice(['', '.', ',', ':', '/'])}{rng.integers(0, 100):02d}")
        elif kind < 0.8:
            tokens.append(f"{''.join(rng.choice(list(letters), 2))}-{rng.integers(1, 999)}")
        else:
            tokens.append("".join(rng.choice(list(charset), int(rng.integers(2, 7)))))
    return " ".join(tokens)


def render_line(text: str, font_path: Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey crop tight around ``text`` (small margin), dark ink on lighter paper, gradient and noise."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), size)
    left, top, right, bottom = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    margin = int(rng.integers(2, 8))
    paper, ink = int(rng.integers(170, 256)), int(rng.integers(0, 90))
    canvas = Image.new("L", (right - left + 2 * margin, bottom - top + 2 * margin), paper)
    ImageDraw.Draw(canvas).text((margin - left, margin - top), text, font=font, fill=ink)
    arr = np.asarray(canvas, np.float32) * np.linspace(1.0, rng.uniform(0.8, 1.0), canvas.width)[None, :]
    arr = arr + rng.normal(0.0, rng.uniform(0.0, 6.0), arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def render_lines(count: int, seed: int, charset: str, font_list: Sequence[Path], *, width: int = REC_WIDTH,
                 height: int = REC_HEIGHT) -> tuple[np.ndarray, list[str]]:
    """``count`` recogniser inputs (N x 3 x height x width, rapidocr's resize and normalisation) and their texts.

    Lines longer than the input allows (aspect ratio above width/height) are re-drawn with fewer
    words, so the resize never squeezes glyphs.
    """
    import bench_third_party as tp

    rng = np.random.default_rng([seed, 7])
    images, texts = [], []
    while len(images) < count:
        words = int(rng.integers(1, 4))
        text = random_text(rng, charset, words)
        crop = render_line(text, font_list[int(rng.integers(len(font_list)))], int(rng.integers(18, 41)), rng)
        if crop.shape[1] * height > width * crop.shape[0]:
            continue
        images.append(tp.paddle_cls_input(crop, width=width, height=height))
        texts.append(text)
    return np.stack(images).astype(np.float32), texts


def render_pages(count: int, seed: int, size: int, charset: str, font_list: Sequence[Path]) -> np.ndarray:
    """``count`` detector inputs N x 3 x size x size: 4-9 text lines on tinted paper, BGR, (p/255 - 0.5)/0.5."""
    from PIL import Image, ImageDraw, ImageFont

    pages = np.empty((count, 3, size, size), np.float32)
    for index in range(count):
        rng = np.random.default_rng([seed, index, 11])
        paper = tuple(int(v) for v in rng.uniform(175, 250, 3))
        image = Image.new("RGB", (size, size), paper)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 10))):
            font_size = int(rng.integers(max(8, size // 28), max(10, size // 10)))
            font = ImageFont.truetype(str(font_list[int(rng.integers(len(font_list)))]), font_size)
            text = random_text(rng, charset, int(rng.integers(1, 4)))
            ink = tuple(int(v) for v in rng.uniform(0, 100, 3))
            draw.text((int(rng.integers(0, size * 3 // 4)), int(rng.integers(0, size - font_size))), text, fill=ink,
                      font=font)
        arr = np.asarray(image, np.float32) * np.linspace(1.0, rng.uniform(0.75, 1.0), size)[:, None, None]
        arr = np.clip(arr + rng.normal(0.0, 3.0, arr.shape), 0, 255)
        pages[index] = ((arr[:, :, ::-1] / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)  # RGB -> BGR (cv2's order), CHW
    return pages


# ------------------------------------------------------------------ metrics


def dictionary(model: Path) -> list[str]:
    """rapidocr's character list: blank, the model's ``character`` metadata, space."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    if "character" not in meta:
        raise bl.BenchError(f"{model} has no 'character' metadata (the recogniser's dictionary)")
    return ["blank", *meta["character"].splitlines(), " "]


def decode(scores: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Greedy CTC decoding of N x T x C scores into strings."""
    from onnxdgh.validation.metrics import ctc_greedy_decode

    return ["".join(characters[c] for c in seq) for seq in ctc_greedy_decode(scores)]


def char_agreement(reference: Sequence[str], candidate: Sequence[str], *, strip_spaces: bool = False) -> float:
    """1 - sum edit(ref, cand) / sum max(len) over the pairs (1.0 when everything is empty)."""
    from onnxdgh.validation.metrics import edit_distance

    errors = length = 0
    for ref, cand in zip(reference, candidate):
        if strip_spaces:
            ref, cand = ref.replace(" ", ""), cand.replace(" ", "")
        errors += edit_distance(ref, cand)
        length += max(len(ref), len(cand))
    return 1.0 - errors / length if length else 1.0


def map_iou(reference: np.ndarray, candidate: np.ndarray, threshold: float = DB_THRESH) -> tuple[float, float]:
    """(pooled IoU of the maps cut at ``threshold``, share of float pixels above it)."""
    from onnxdgh.validation.metrics import IouAccumulator

    acc = IouAccumulator(threshold)
    acc.add(reference, candidate)
    return acc.value, float(np.mean(reference > threshold))


# ------------------------------------------------------------------ smoke models


def _smoke_models(folder: Path, classes: int) -> tuple[Path, Path]:
    """A tiny DBNet-like map net (3 x 32 x 32 -> 1 x 32 x 32 sigmoid) and a tiny CTC recogniser
    (3 x 16 x 64 -> 8 steps x ``classes``), with a 'character' dictionary in its metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def save(nodes: list, inits: dict, in_shape: list, out: tuple[str, list], path: Path, meta: dict | None = None) -> Path:
        graph = helper.make_graph(nodes, path.stem, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *in_shape])],
                                  [helper.make_tensor_value_info(out[0], TensorProto.FLOAT, ["n", *out[1]])],
                                  [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        onnx.helper.set_model_props(model, meta or {})
        onnx.save(model, path)
        return path

    det = save([helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
                helper.make_node("Sigmoid", ["c2"], ["prob"], name="sigmoid")],
               {"w1": rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32), "b1": np.zeros(4, np.float32),
                "w2": rng.normal(0, 0.4, (1, 4, 3, 3)).astype(np.float32), "b2": np.full(1, -0.5, np.float32)},
               [3, 32, 32], ("prob", [1, 32, 32]), folder / "det.onnx")
    rec = save([helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", strides=[16, 8]),
                helper.make_node("Squeeze", ["c1", "axes"], ["sq"], name="squeeze"),
                helper.make_node("Transpose", ["sq"], ["tr"], name="transpose", perm=[0, 2, 1]),
                helper.make_node("Softmax", ["tr"], ["probs"], name="softmax", axis=2)],
               {"w1": rng.normal(0, 0.1, (classes, 3, 16, 8)).astype(np.float32), "b1": np.zeros(classes, np.float32),
                "axes": np.array([2], np.int64)},
               [3, 16, 64], ("probs", [8, classes]), folder / "rec.onnx",
               {"character": "\n".join(string.ascii_lowercase[: classes - 2])})
    return det, rec


# ------------------------------------------------------------------ the run


def _quantize(model: Path, out: Path, shape: str, extra: Sequence[str], what: str, ctx: bl.Context) -> dict:
    """Run ``onnxdgh quantize``; its command, exit code, first error line and validation verdict."""
    args = ["quantize", str(model), "-o", str(out), "--input-shape", shape, "--seed", str(ctx.seed), "--json", str(out.with_suffix(".report.json")), *extra]
    command = "python3 -m onnxdgh " + shlex.join(args).replace(f"{bl.REPO}/", "")
    try:
        result = bl.run_onnxdgh(args, what=what, in_process=ctx.smoke)
    except bl.BenchError as exc:
        if not out.exists():
            message = str(exc).split(": ", 1)[-1].split("\n")[0]
            bl.log(f"  {what}: refused: {message}")
            return {"command": command, "written": False, "error": message}
        result = None  # written, but its own validation failed (exit 1): still measured
    report = json.loads(out.with_suffix(".report.json").read_text())
    generation = report.get("generation") or {}
    verdict = json.loads(out.with_suffix(".validation.json").read_text())
    held = verdict["outputs"][0]
    return {"command": command, "written": True, "exit": 0 if result is not None else 1,
            "bn_layers": generation.get("bn_layers"), "method": report["calibration"]["source"],
            "seconds": report["timings"]["total_s"], "held_out": {
                "metric": held.get("metric"), "agreement": held.get("agreement"), "sqnr_db": held.get("sqnr_db"),
                "images": verdict["data"]["count"], "passed": verdict["passed"]}}


def _metadata_row(path: Path) -> dict:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return {"command": f"(given: {path}; generation {meta.get('onnxdgh.generation', '?')})", "written": True,
            "exit": None, "bn_layers": None, "method": meta.get("onnxdgh.calibration_source"), "seconds": None}


def _validate(quantized: Path, reference: Path, pages_file: Path, shape: str) -> dict:
    """What ``onnxdgh validate --data PAGES --iou-threshold 0.3`` reports (the library's metric): exit, IoU, SQNR."""
    import sys as _sys

    args = [_sys.executable, "-m", "onnxdgh", "validate", str(quantized), "--reference", str(reference), "--data",
            str(pages_file), "--iou-threshold", str(DB_THRESH), "--input-shape", shape, "--json", "-"]
    result = bl.run_measured(args)  # exit 1 (a floor not reached) still prints the report
    if result.returncode not in (0, 1):
        raise bl.BenchError(f"onnxdgh validate failed (exit {result.returncode}): {result.stderr.strip()[-400:]}")
    output = json.loads(result.stdout)["outputs"][0]
    return {"exit": result.returncode, "iou": output.get("iou"), "sqnr_db": output.get("sqnr_db")}


def run(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "ocr")
    info, command, load_before = bl.machine_info(), bl.command_string(), bl.load_average()
    from onnxdgh.fileio import save_images_npz

    charset = string.ascii_letters + string.digits + PUNCTUATION
    font_list = fonts()
    if ctx.smoke:
        characters = ["blank", *string.ascii_lowercase[:10], " "]
        det_model, rec_model = _smoke_models(ctx.work, len(characters))
        charset, det_size, rec_h, rec_w = "abcdefghij", 32, 16, 64
        n_lines, n_pages, n_calib, gen = 6, 3, 8, ["--images", "8", "--iterations", "2", "--batch-size", "8"]
        gen = ["--preprocess", "symmetric", *gen]
    else:
        det_model, rec_model = args.models / DET_FILE, args.models / REC_FILE
        for path in (det_model, rec_model):
            if not path.exists():
                raise bl.BenchError(f"{path} not found; see the usage in tools/bench_ocr.py")
        characters = dictionary(rec_model)
        det_size, rec_h, rec_w = args.det_size, REC_HEIGHT, REC_WIDTH
        n_lines, n_pages, n_calib = args.lines, args.pages, args.calib_pages
        gen = ["--preprocess", "symmetric"]  # rapidocr's (p/255 - 0.5)/0.5 for the generated images
        if args.gen:
            images, iterations = args.gen.lower().split("x")
            gen += ["--images", images, "--iterations", iterations]
    missing = sorted(set(charset) - set(characters))
    if missing:
        raise bl.BenchError(f"characters {''.join(missing)!r} are not in the recogniser's dictionary")

    # Recogniser: float reading of the rendered lines, then the quantizer's answer.
    lines, texts = render_lines(n_lines, ctx.seed + 2000, charset, font_list, width=rec_w, height=rec_h)
    float_rec = decode(bl.predict(rec_model, lines, batch_size=16), characters)
    float_gt = char_agreement(texts, float_rec, strip_spaces=True)
    bl.log(f"recogniser float: {100 * float_gt:.2f} % of the rendered characters read ({n_lines} lines)")
    rec_calib = ctx.work / "rec_calib.npz"
    save_images_npz(rec_calib, render_lines(n_calib, ctx.seed + 3000, charset, font_list, width=rec_w, height=rec_h)[0],
                    {"source": "rendered text lines"})
    rec_rows = []
    for name, extra in (("defaults", gen), ("real", ["--calib-data", str(rec_calib)])):
        out = ctx.work / f"rec_{name}.onnx"
        shape = f"3x{rec_h}x{rec_w}"
        row = _quantize(rec_model, out, shape, extra, f"quantize recogniser ({name})", ctx)
        if row["written"]:
            quant_rec = decode(bl.predict(out, lines, batch_size=16), characters)
            row.update(float_agreement=char_agreement(float_rec, quant_rec),
                       truth=char_agreement(texts, quant_rec, strip_spaces=True))
        rec_rows.append((name, row))

    # Detector: IoU of the maps cut at 0.3, float vs quantized.
    pages = render_pages(n_pages, ctx.seed + 1000, det_size, charset, font_list)
    pages_file = ctx.work / "pages.npz"
    save_images_npz(pages_file, pages, {"source": "rendered pages"})
    float_maps = bl.predict(det_model, pages, batch_size=4)
    det_calib = ctx.work / "det_calib.npz"
    save_images_npz(det_calib, render_pages(n_calib, ctx.seed, det_size, charset, font_list), {"source": "rendered pages"})
    det_rows = []
    for name, extra in (("defaults", gen), ("real", ["--calib-data", str(det_calib)])):
        out = ctx.work / f"det_{name}.onnx"
        if name == "defaults" and args.det_quantized is not None:
            out, row = args.det_quantized, _metadata_row(args.det_quantized)
        else:
            row = _quantize(det_model, out, f"3x{det_size}x{det_size}", extra, f"quantize detector ({name})", ctx)
        if row["written"]:
            row["iou"], row["float_text_share"] = map_iou(float_maps, bl.predict(out, pages, batch_size=4))
            row["validate"] = _validate(out, det_model, pages_file, f"3x{det_size}x{det_size}")
            bl.log(f"  detector {name}: IoU {row['iou']:.4f} at {DB_THRESH} (validate: {row['validate']})")
        det_rows.append((name, row))

    body = _markdown(rec_rows, det_rows, float_gt=float_gt, n_lines=n_lines, n_pages=n_pages, n_calib=n_calib,
                     det_size=det_size, rec_shape=(rec_h, rec_w), font_list=font_list, smoke=ctx.smoke)
    bl.write_section(KEY, TITLE, body, info=info, command=command, load_before=load_before,
                     load_after=bl.load_average(), doc=ctx.doc)
    (ctx.work / "results.json").write_text(json.dumps({"recogniser": dict(rec_rows), "detector": dict(det_rows),
                                                       "float_truth": float_gt}, indent=2, default=str))
    bl.log(f"wrote {ctx.doc}")
    return 0


def _validated(figures: dict | None) -> str:
    if not figures or figures.get("iou") is None:
        return "-"
    sqnr = figures.get("sqnr_db")
    return f"{figures['iou']:.4f} (exit {figures['exit']}, SQNR {'-' if sqnr is None else f'{sqnr:.1f}'} dB)"


def _images(row: dict) -> str:
    """The calibration images: what ``--method auto`` generated (with the BN layers DGH matched), or the file."""
    method = str(row.get("method") or "-")
    if method.startswith("dgh:"):
        bn = f", {row['bn_layers']} BN layers matched" if row.get("bn_layers") else ""
        return f"generated: {method.split(':', 1)[1]}{bn}"
    return "rendered" if method.startswith("file:") else method


def _held_out(figures: dict | None) -> str:
    if not figures or figures.get("agreement") is None:
        return "-"
    from onnxdgh.validation.metrics import METRIC_NAMES

    verdict = "pass" if figures["passed"] else "fail"
    return (f"{verdict}: {METRIC_NAMES[figures['metric']]} {figures['agreement']:.3f} "
            f"(SQNR {figures['sqnr_db']:.1f} dB) on {figures['images']} images")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def _markdown(rec_rows: list, det_rows: list, *, float_gt: float, n_lines: int, n_pages: int, n_calib: int,
              det_size: int, rec_shape: tuple[int, int], font_list: Sequence[Path], smoke: bool) -> str:
    what = "tiny in-process models (smoke run)" if smoke else \
        f"`{DET_FILE}` and `{REC_FILE}` from `rapidocr-onnxruntime==1.4.4`"
    families = sorted({f.parent.name for f in font_list})
    rec_table = [[name, f"`{row['command']}`", row.get("error") or f"exit {row['exit']}", _images(row),
                  _held_out(row.get("held_out")), _pct(row.get("float_agreement")), _pct(row.get("truth"))]
                 for name, row in rec_rows]
    det_table = [[name, f"`{row['command']}`", f"exit {row['exit']}" if row["written"] else row.get("error", ""),
                  _images(row), _held_out(row.get("held_out")), f"{row['iou']:.4f}" if "iou" in row else "-",
                  _validated(row.get("validate"))]
                 for name, row in det_rows]
    share = next((row["float_text_share"] for _, row in det_rows if "float_text_share" in row), None)
    return "\n".join([
        f"Models: {what}, W8A8 with the quantizer's defaults, rapidocr's normalisation (`--preprocess symmetric`). "
        f"Fonts: {len(font_list)} regular faces ({', '.join(families)}).", "",
        f"**Recogniser** (3 x {rec_shape[0]} x {rec_shape[1]}): {n_lines} rendered text lines (seed +2000); the float model "
        f"reads {_pct(float_gt)} of their characters (greedy CTC, spaces ignored). 'real' calibration: {n_calib} other "
        "rendered lines.", "",
        bl.md_table(["calibration", "command", "result", "images", "quantize's held-out verdict",
                     "chars agreeing with float", "chars agreeing with the text"], rec_table), "",
        f"**Detector** (3 x {det_size} x {det_size}): {n_pages} rendered pages (seed +1000; the float map marks "
        f"{_pct(share)} of the pixels above {DB_THRESH}); IoU of the maps cut at {DB_THRESH}, quantized (onnxruntime's "
        f"default session) vs float; 'validate' = the IoU `onnxdgh validate --data PAGES --iou-threshold {DB_THRESH}` "
        f"reports. 'real' calibration: {n_calib} other rendered pages.", "",
        bl.md_table(["calibration", "command", "result", "images", "quantize's held-out verdict", f"IoU @ {DB_THRESH}",
                     "validate: IoU"], det_table), "",
    ])


if __name__ == "__main__":
    bl.main_wrapper(run)
