"""Low-bit weights with and without rounding optimisation (AdaRound / BRECQ-style), per calibration source.

Usage (from the repository root)::

    python tools/bench_rounding.py                                   # resnet8 + resnet8_silu, W4A4 and W2A4
    python tools/bench_rounding.py --models fmnist_resnet8 --bits W4A4 --sources DGH "real 512" \\
        --variants layer block layer+bc --iterations 500
    python tools/bench_rounding.py --smoke                           # seconds, tmp folder

For every sample model and bit width: the model fully quantized by ``onnxdgh.quantize``
(power-of-two QDQ, MSE thresholds, weights rounded to nearest) calibrated on each source,
then the same QDQ model after :func:`onnxdgh.quantization.rounding.optimize_rounding` driven
by the *same* calibration images, one column per variant:

- ``layer``: AdaRound layer by layer (each weighted node on its own fused output);
- ``block``: the nodes of each block (e.g. residual block) learned jointly on its output;
- ``+bc``: bias correction after each unit's rounding;
- ``+lb``: biases learned jointly with the rounding (the library default is ``block+lb``).

Sources: ``DGH`` (``onnxdgh.generate`` defaults), ``real 512`` (512 training images drawn
with the seed), ``noise`` (``generate`` method noise), ``BNS`` (method bns). Generated
sets are cached in the work folder (``--fresh`` regenerates). Top-1 on the 10,000-image
Fashion-MNIST test split. Writes section ``rounding`` of docs/BENCHMARKS.md and a JSON
file with every figure next to it (``work/rounding.json``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "rounding"
TITLE = "Rounding optimisation for low-bit weights (AdaRound layer / block) and bias correction"
SOURCES = ("DGH", "real 512", "noise", "BNS")
GENERATE_METHOD = {"DGH": "dgh", "noise": "noise", "BNS": "bns"}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="+", default=["fmnist_resnet8", "fmnist_resnet8_silu"])
    parser.add_argument("--bits", nargs="+", default=["W4A4", "W2A4"], help="e.g. W4A4 W2A4 W4A8")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--variants", nargs="+", default=["layer", "block", "block+lb"],
                        help="layer or block, optionally +bc and/or +lb (one column each)")
    parser.add_argument("--iterations", type=int, default=None, help="per unit (default: RoundingConfig's)")
    parser.add_argument("--target", default="activation", choices=("activation", "output", "quantized"))
    parser.add_argument("--fresh", action="store_true", help="regenerate cached image sets")
    return parser.parse_args(argv)


def _bits(text: str) -> tuple[int, int]:
    text = text.upper()
    if not (text.startswith("W") and "A" in text):
        raise bl.BenchError(f"--bits {text!r} is not like W4A4")
    w, a = text[1:].split("A")
    return int(w), int(a)


def _variant(text: str) -> dict[str, Any]:
    """``mode[+bc][+lb]`` -> RoundingConfig fields (every field explicit, so defaults cannot drift)."""
    mode, *extras = text.split("+")
    if mode not in ("layer", "block") or not set(extras) <= {"bc", "lb"} or len(set(extras)) != len(extras):
        raise bl.BenchError(f"--variants {text!r}: use layer or block, optionally +bc (bias correction) and +lb (learned bias)")
    return {"mode": mode, "bias_correction": "bc" in extras, "learn_bias": "lb" in extras}


def _images(source: str, model: Path, work: Path, args: argparse.Namespace, smoke: bool) -> np.ndarray:
    from onnxdgh.fileio import load_images_npz, save_images_npz
    from onnxdgh.load import load_model

    if source == "real 512":
        if smoke:
            loaded = load_model(model)
            return np.random.default_rng(args.seed + 7).standard_normal((32, *loaded.input_shape)).astype(np.float32)
        import fashion_mnist as fm

        x, _ = fm.load_split("train")
        pick = np.random.default_rng(args.seed).choice(x.shape[0], 512, replace=False)
        return fm.normalize(x[np.sort(pick)], fm.MEAN, fm.STD)
    path = work / f"calib_{GENERATE_METHOD[source]}.npz"
    if path.exists() and not args.fresh:
        return load_images_npz(path)[0]
    from onnxdgh.generation import GenerateConfig, generate

    settings: dict[str, Any] = {"seed": args.seed, "method": GENERATE_METHOD[source]}
    if smoke:
        settings.update(images=16, iterations=2, batch_size=8)
    bl.log(f"{model.stem}: generating {source} images ({settings})")
    started = time.perf_counter()
    result = generate(model, GenerateConfig(**settings), progress=not args.quiet)
    save_images_npz(path, result.images, {"settings": settings, "seconds": time.perf_counter() - started})
    return result.images


def _test_set(model: Path, smoke: bool, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if smoke:
        from onnxdgh.load import load_model

        shape = load_model(model).input_shape
        x = np.random.default_rng(seed + 1).standard_normal((64, *shape)).astype(np.float32)
        return x, bl.predict(model, x).argmax(axis=1), "64 random images labelled by the float model (smoke)"
    import fashion_mnist as fm

    x, y = fm.load_split("test")
    return fm.normalize(x, fm.MEAN, fm.STD), y, "Fashion-MNIST test split (10,000)"


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "rounding")
    import torch

    torch.set_num_threads(1)
    from onnxdgh.load import load_model
    from onnxdgh.quantization import QuantizeConfig, quantize
    from onnxdgh.quantization.api import rounding_inputs
    from onnxdgh.quantization.rounding import RoundingConfig, optimize_rounding

    busy = bl.busy_processes()
    if busy and not args.smoke:
        bl.log("WARNING: other busy processes, timings will be under load: " + "; ".join(busy))
    info = bl.machine_info()
    load_before = bl.load_average()
    bits = [_bits(b) for b in args.bits]
    variants = [(v, _variant(v)) for v in args.variants]
    iterations = 20 if args.smoke and args.iterations is None else args.iterations
    models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))] if args.smoke else bl.sample_models(args.models)

    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    data_name = ""
    for model in models:
        work = ctx.work / model.stem
        work.mkdir(parents=True, exist_ok=True)
        loaded = load_model(model)
        test_x, test_y, data_name = _test_set(model, args.smoke, args.seed)
        float_top1 = bl.top1(model, test_x, test_y)
        bl.log(f"{model.stem}: float top-1 {100 * float_top1:.2f}%")
        for source in args.sources:
            images = _images(source, model, work, args, args.smoke)
            for weight_bits, act_bits in bits:
                result = quantize(loaded, images, QuantizeConfig(weight_bits=weight_bits, act_bits=act_bits, seed=args.seed,
                                                                   optimize_rounding=False, bias_correction=False),
                                  progress=False, calibration_source=source)
                nearest = bl.top1(result.model.SerializeToString(), test_x, test_y)
                label = f"W{weight_bits}A{act_bits}"
                bl.log(f"{model.stem} {label} {source}: nearest {100 * nearest:.2f}%")
                row = [model.stem, label, source, str(images.shape[0]), f"{100 * float_top1:.2f}", f"{100 * nearest:.2f}"]
                record: dict[str, Any] = {"model": model.stem, "bits": label, "source": source, "images": int(images.shape[0]),
                                          "float_top1": float_top1, "nearest_top1": nearest, "variants": {}}
                for name, chosen in variants:
                    fields: dict[str, Any] = {"weight_bits": weight_bits, "seed": args.seed, "target": args.target, **chosen}
                    if iterations is not None:
                        fields["iterations"] = iterations
                    config = RoundingConfig(**fields)
                    started = time.perf_counter()
                    # The quantized graph's own float reference: with the shift negative
                    # correction (A4 SiLU) it has the shift's Adds, and shifted layers learn
                    # on their unshifted input.
                    float_model, input_shifts = rounding_inputs(result)
                    optimized, report = optimize_rounding(result.model, float_model, images, config,
                                                          progress=not args.quiet, input_shifts=input_shifts)
                    seconds = time.perf_counter() - started
                    acc = bl.top1(optimized.SerializeToString(), test_x, test_y)
                    bl.log(f"  {name}: {100 * acc:.2f}% in {seconds:.0f} s")
                    row += [f"{100 * acc:.2f}", f"{seconds:.0f} s"]
                    record["variants"][name] = {"top1": acc, "seconds": seconds, "config": report["config"],
                                                "units": report["units"], "skipped": report["skipped"],
                                                "block_fallbacks": report["block_fallbacks"]}
                rows.append(row)
                records.append(record)
                # Written after every cell, so a long run interrupted keeps what it measured.
                (ctx.work / "rounding.json").write_text(json.dumps(records, indent=1, default=float))
    load_after = bl.load_average()
    (ctx.work / "rounding.json").write_text(json.dumps(records, indent=1, default=float))
    headers = ["model", "bits", "calibration", "images", "float top-1", "nearest top-1"]
    for name, _ in variants:
        headers += [f"{name} top-1", f"{name} time"]
    shown = iterations if iterations is not None else RoundingConfig().iterations
    body = [
        f"Fully quantized (power-of-two QDQ, MSE thresholds), weights rounded to nearest, then rounding optimised on "
        f"the same calibration images ({shown} iterations per unit, batch {RoundingConfig().batch_size}, target "
        f"`{args.target}`). Time = the rounding step alone (single torch thread). Top-1 on: {data_name}.",
        "",
        bl.md_table(headers, rows),
    ]
    if busy and not args.smoke:
        body += ["", "**Taken under load** — other busy processes at the start: " + "; ".join(busy)]
    bl.write_section(KEY, TITLE, "\n".join(body), info=info, command=bl.command_string(), load_before=load_before,
                     load_after=load_after, doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
