"""Quantizer benchmark: accuracy of mse vs noclip thresholds per bit width and data source, and speed vs ORT.

Usage (from the repository root):

    python tools/bench_quantize.py --model samples/fmnist_resnet8.onnx --json bench-work/quantize.json

For each calibration source (512 real Fashion-MNIST training images normalised with the
model's metadata; Gaussian noise from ``onnxdgh generate --method noise``; optionally a
DGH image file given with ``--dgh FILE.npz``) and each bit width (W8A8, W4A8, W4A4) it
quantizes the model with ``--threshold mse`` and ``--threshold noclip`` and reports top-1
on the 10k test split. Then it times the quantize step (``onnxdgh.quantize`` on
already-loaded images, generation excluded) against
``onnxruntime.quantization.quantize_static`` (QDQ, per-channel int8 weights, MinMax)
given the same 512 real images, alternating the two ``--repeats`` times and reporting
medians. A tool, not library code: it prints its own tables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fashion_mnist as fm  # noqa: E402

from onnxdgh.fileio import load_images_npz  # noqa: E402
from onnxdgh.load import load_model  # noqa: E402
from onnxdgh.quantization import QuantizeConfig, quantize  # noqa: E402
from onnxdgh.runtime import make_session, run_batched  # noqa: E402

BITS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A8": (2, 8)}


def top1(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in onnxruntime (CPU, optimisations on)."""
    session = make_session(model, optimize=True)
    logits = run_batched(session, images, batch_size=500)[0]
    return float(np.mean(logits.argmax(axis=1) == labels))


def calibration_sets(args: argparse.Namespace, loaded: Any) -> dict[str, np.ndarray]:
    """The calibration image sets by name."""
    norm = loaded.input_normalization()
    mean, std = (norm if norm is not None else (np.array(fm.MEAN), np.array(fm.STD)))
    train, _ = fm.load_split("train")
    pick = np.random.default_rng(args.seed).choice(len(train), args.count, replace=False)
    sets = {"real": fm.normalize(train[pick], tuple(mean.tolist()), tuple(std.tolist()))}
    from onnxdgh.generation import GenerateConfig, generate

    sets["noise"] = generate(loaded, GenerateConfig(method="noise", images=args.count, seed=args.seed), progress=False).images
    for path in args.dgh or []:
        images, _ = load_images_npz(path)
        sets[f"dgh:{Path(path).name}"] = images
    return sets


class _Reader:
    """onnxruntime CalibrationDataReader over an in-memory image array."""

    def __init__(self, name: str, images: np.ndarray, batch: int) -> None:
        self.name, self.images, self.batch, self.index = name, images, batch, 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.images):
            return None
        part = self.images[self.index : self.index + self.batch]
        self.index += self.batch
        return {self.name: part}

    def rewind(self) -> None:
        self.index = 0


def time_against_ort(model_path: str, images: np.ndarray, repeats: int, batch: int) -> dict[str, Any]:
    """Median wall time of onnxdgh.quantize (load included) and ORT quantize_static on the same data."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    loaded = load_model(model_path)
    ours, ours_step, theirs = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ort_q.onnx")
        for _ in range(repeats):
            started = time.perf_counter()
            result = quantize(model_path, images, QuantizeConfig(calibration_batch_size=batch), progress=False)
            ours.append(time.perf_counter() - started)
            ours_step.append(result.report["timings"]["quantize_s"])
            started = time.perf_counter()
            quantize_static(
                model_path, out, _Reader(loaded.input_name, images, batch),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            )
            theirs.append(time.perf_counter() - started)
    return {
        "repeats": repeats,
        "onnxdgh_call_s": statistics.median(ours),
        "onnxdgh_quantize_step_s": statistics.median(ours_step),
        "ort_quantize_static_s": statistics.median(theirs),
        "all": {"onnxdgh_call_s": ours, "ort_quantize_static_s": theirs},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="samples/fmnist_resnet8.onnx")
    parser.add_argument("--count", type=int, default=512, help="calibration images per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", default="W8A8,W4A8,W4A4")
    parser.add_argument("--thresholds", default="mse,noclip")
    parser.add_argument("--dgh", action="append", help="an .npz of DGH images to add as a source (repeatable)")
    parser.add_argument("--sources", default=None, help="comma list to restrict sources (real,noise,dgh:NAME)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repetitions (0 skips timing)")
    parser.add_argument("--batch", type=int, default=64, help="calibration batch for both quantizers")
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--no-rounding", action="store_true", help="nearest rounding only (no AdaRound / bias correction)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    loaded = load_model(args.model)
    test_x, test_y = fm.load_split("test")
    norm = loaded.input_normalization()
    mean, std = norm if norm is not None else (np.array(fm.MEAN), np.array(fm.STD))
    test = fm.normalize(test_x, tuple(mean.tolist()), tuple(std.tolist()))
    if args.test_limit:
        test, test_y = test[: args.test_limit], test_y[: args.test_limit]
    float_acc = top1(onnx.load(args.model), test, test_y)
    print(f"float top-1 {float_acc:.4f}  ({args.model}, {len(test_y)} test images)", flush=True)

    sets = calibration_sets(args, loaded)
    if args.sources:
        keep = set(args.sources.split(","))
        sets = {name: value for name, value in sets.items() if name in keep}
    results: list[dict[str, Any]] = []
    for source, images in sets.items():
        for label in args.bits.split(","):
            weight_bits, act_bits = BITS[label]
            for method in args.thresholds.split(","):
                rounding = {"optimize_rounding": False, "bias_correction": False} if args.no_rounding else {}
                config = QuantizeConfig(weight_bits=weight_bits, act_bits=act_bits, threshold=method, **rounding)  # type: ignore[arg-type]
                result = quantize(loaded, images, config, progress=False)
                accuracy = top1(result.model, test, test_y)
                row = {"source": source, "bits": label, "threshold": method, "top1": accuracy,
                       "delta_vs_float": accuracy - float_acc, "quantize_s": result.report["timings"]["quantize_s"],
                       "optimize_rounding": config.rounding_enabled, "bias_correction": config.bias_correction_enabled}
                results.append(row)
                print(f"{source:>12} {label} {method:>6}  top-1 {accuracy:.4f}  ({accuracy - float_acc:+.4f})", flush=True)

    timing = None
    if args.repeats > 0:
        timing = time_against_ort(args.model, sets["real"] if "real" in sets else next(iter(sets.values())),
                                  args.repeats, args.batch)
        print(
            f"time: onnxdgh.quantize {timing['onnxdgh_call_s']:.2f} s (quantize step {timing['onnxdgh_quantize_step_s']:.2f} s)"
            f" vs ORT quantize_static {timing['ort_quantize_static_s']:.2f} s (medians of {args.repeats}); "
            f"load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    print("\n| source | bits | mse | noclip |\n|---|---|---|---|")
    for source in sets:
        for label in args.bits.split(","):
            cells = {r["threshold"]: r["top1"] for r in results if r["source"] == source and r["bits"] == label}
            print(f"| {source} | {label} | {cells.get('mse', float('nan')) * 100:.2f} | {cells.get('noclip', float('nan')) * 100:.2f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": args.model, "float_top1": float_acc, "results": results,
                                                "timing": timing}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
