"""Stopping generation on a BN-loss plateau: iterations saved and accuracy kept (issue 16 item 1).

Usage (from the repository root)::

    python tools/bench_plateau_stop.py --windows 20 40          # fmnist_resnet8, default images/iterations
    python tools/bench_plateau_stop.py --smoke                  # seconds, tmp folder

For each model: ``onnxdgh generate`` with the defaults (all ``--iterations``), then with
``--plateau-stop N`` for each window N (the same seed: a stopped run's images are the
full run's after the iterations it ran, as the learning-rate schedule does not depend on
when the run stops). Each set calibrates ``onnxdgh quantize --calib-data`` at W8A8 and
W4A8 (nearest rounding), and the quantized model's top-1 on the Fashion-MNIST test split
(``--test-limit`` first images) is compared with the full run's. The change of a default
needs every delta within 0.3 point (the issue's bar).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "plateau-stop"
TITLE = "Stopping generation on a BN-loss plateau (issue 16 item 1)"
BITS = (("W8A8", 8, 8), ("W4A8", 4, 8))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=None, help="sample model names (default: fmnist_resnet8)")
    parser.add_argument("--windows", nargs="+", type=int, default=[20], help="--plateau-stop values to try (default 20)")
    parser.add_argument("--images", type=int, default=None, help="generated images (default: onnxdgh's default)")
    parser.add_argument("--iterations", type=int, default=None, help="iterations of the full run (default: onnxdgh's)")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images evaluated (default 2000)")
    return parser.parse_args(argv)


def _generate(ctx: bl.Context, model: Path, out: Path, extra: list[str]) -> dict[str, Any]:
    report = out.with_suffix(".json")
    result = bl.run_onnxdgh(["generate", str(model), "-o", str(out), "--seed", str(ctx.seed), "--json", str(report), *extra],
                            what=f"generate {' '.join(extra)} on {model.name}", quiet=True, in_process=ctx.smoke)
    data = json.loads(report.read_text())
    return {"wall_s": result.wall_s, "iterations": data["iterations_run"], "bns": data["final"]["bns_loss"],
            "optimise_s": data["timings"]["optimise_s"]}


def _accuracy(ctx: bl.Context, model: Path, calib: Path, test_x: np.ndarray, test_y: np.ndarray) -> dict[str, float]:
    result = {}
    for label, weight, act in BITS:
        out = calib.with_name(f"{calib.stem}-{label}.onnx")
        bl.run_onnxdgh(["quantize", str(model), "-o", str(out), "--calib-data", str(calib), "--weight-bits", str(weight),
                        "--act-bits", str(act)], what=f"quantize {label} on {calib.name}", quiet=True, in_process=ctx.smoke)
        result[label] = bl.top1(out, test_x, test_y)
    return result


def _test_set(model: Path, args: argparse.Namespace, ctx: bl.Context) -> tuple[np.ndarray, np.ndarray, str]:
    from onnxdgh.load import load_model

    if ctx.smoke:
        rng = np.random.default_rng(ctx.seed)
        test_x = rng.normal(0.0, 1.0, size=(64, *load_model(model).input_shape)).astype(np.float32)
        return test_x, bl.predict(model, test_x).argmax(axis=1), "random images labelled by the float model (smoke)"
    import fashion_mnist as fm

    norm = load_model(model).input_normalization()
    mean, std = (fm.MEAN, fm.STD) if norm is None else (tuple(map(float, norm[0])), tuple(map(float, norm[1])))
    try:
        test_u8, test_y = fm.load_split("test")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    limit = args.test_limit
    return fm.normalize(test_u8[:limit], mean, std), test_y[:limit], f"first {limit} Fashion-MNIST test images"


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "plateau_stop")
    if ctx.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        sizes = ["--images", "8", "--batch-size", "4", "--iterations", "6"]
        windows = [1]
    else:
        models = bl.sample_models(args.models or ["fmnist_resnet8"])
        sizes = [*(["--images", str(args.images)] if args.images else []),
                 *(["--iterations", str(args.iterations)] if args.iterations else [])]
        windows = args.windows
    info = bl.machine_info()
    load_before = bl.load_average()
    rows = []
    test_name = ""
    for model in models:
        test_x, test_y, test_name = _test_set(model, args, ctx)
        float_top1 = bl.top1(model, test_x, test_y)
        runs = [("all iterations", [])] + [(f"--plateau-stop {w}", ["--plateau-stop", str(w)]) for w in windows]
        results = []
        for label, extra in runs:
            calib = ctx.work / f"{model.stem}-{'full' if not extra else 'stop' + extra[1]}.npz"
            bl.log(f"{model.name}: generate ({label})")
            gen = _generate(ctx, model, calib, [*sizes, *extra])
            bl.log(f"  {gen['iterations']} iterations, {gen['optimise_s']:.1f} s loop, BN loss {gen['bns']:.4g}")
            gen.update(_accuracy(ctx, model, calib, test_x, test_y))
            bl.log("  " + ", ".join(f"{b}: {100 * gen[b]:.2f}%" for b, _, _ in BITS))
            results.append((label, gen))
        full = results[0][1]
        for label, gen in results:
            deltas = [100 * (gen[b] - full[b]) for b, _, _ in BITS]
            rows.append([model.stem, label, gen["iterations"], f"{gen['optimise_s']:.1f}", f"{gen['bns']:.4g}",
                         *(f"{100 * gen[b]:.2f} ({d:+.2f})" for (b, _, _), d in zip(BITS, deltas)),
                         f"{100 * float_top1:.2f}"])
    load_after = bl.load_average()
    body = "\n".join([
        f"Generation: `onnxdgh generate` defaults{' ' + ' '.join(sizes) if sizes else ''}, seed {ctx.seed}; "
        f"quantization: `onnxdgh quantize --calib-data SET --weight-bits W --act-bits A`; top-1 on the {test_name}; "
        "in brackets the change against the full run, in points.",
        "",
        bl.md_table(["model", "stop", "iterations run", "loop s", "whole-set BN loss (final images)",
                     *(f"{b} top-1 %" for b, _, _ in BITS), "float top-1 %"], rows),
        *bl.load_note(load_before, load_after, "the loop times are inflated; the iteration counts and accuracies are not."),
    ])
    return bl.finish_section(ctx, KEY, TITLE, body, info=info, load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    bl.main_wrapper(run)
