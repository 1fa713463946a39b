"""How many images x iterations each bit width needs: generation budget against accuracy (issue 16 item 1).

Usage (from the repository root)::

    python tools/bench_generation_budget.py --images 64 128 256 --iterations 25 50 100 200 \\
        --schedules off 0.5:0.75                                  # fmnist_resnet8
    python tools/bench_generation_budget.py --smoke               # seconds, tmp folder

For each model and each (images, iterations, ``--coarse-to-fine`` schedule, ``--plateau-stop``)
in the grid: ``onnxdgh generate`` (seed fixed), then ``onnxdgh quantize --calib-data SET
--weight-bits W --act-bits A`` at W8A8 and W4A8 (the command's defaults otherwise:
kernel-sum rounding at W8A8, AdaRound at W4A8), top-1 on the Fashion-MNIST test split
(``--test-limit`` first images). Every row is compared with the reference row, today's
``onnxdgh generate`` defaults (256 images x 200 iterations, full size), and a budget
qualifies for a bit width when its top-1 is within ``--bar`` points of the reference.
"Work" is the generation's cost in full-size image-iterations (a stage at scale s costs
s^2 of one: the convolutions' work scales with the pixels), independent of the machine's
load. Generated sets and their accuracies are cached in the work folder (``--fresh``
recomputes).
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
from bench_plateau_stop import BITS, _test_set  # noqa: E402

KEY = "generation-budget"
TITLE = "Generation budget by bit width: images x iterations, coarse-to-fine, plateau stop (issue 16)"
REFERENCE = (256, 200, "off", None)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=None, help="sample model names (default: fmnist_resnet8)")
    parser.add_argument("--images", nargs="+", type=int, default=[64, 128, 256], help="image counts (default 64 128 256)")
    parser.add_argument("--iterations", nargs="+", type=int, default=[25, 50, 100, 200], help="iteration counts")
    parser.add_argument("--schedules", nargs="+", default=["off", "0.5:0.75"], help="--coarse-to-fine values ('off': none)")
    parser.add_argument("--plateau-stops", nargs="+", type=int, default=[0], help="--plateau-stop values (0: none)")
    parser.add_argument("--cells", nargs="+", default=None, metavar="NxT[:SCHEDULE][/STOP]",
                        help="explicit grid cells instead of the product of the lists above, e.g. 64x50:0.5:0.75 "
                             "or 256x200/20 (schedule 'off' unless given, plateau stop after '/'); "
                             "MODEL=CELL runs the cell on that model only")
    parser.add_argument("--test-limit", type=int, default=10000, help="test images evaluated (default 10000: all)")
    parser.add_argument("--bar", type=float, default=0.3, help="largest loss against the reference, points (default 0.3)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached sets and accuracies")
    return parser.parse_args(argv)


def _cell(text: str) -> tuple[int, int, str, int | None]:
    """``[MODEL=]NxT[:SCHEDULE][/STOP]`` -> (images, iterations, schedule, plateau stop); the schedule may hold colons."""
    cell, _, stop = text.rpartition("=")[2].partition("/")
    size, _, schedule = cell.partition(":")
    try:
        images, iterations = (int(v) for v in size.split("x"))
        return images, iterations, schedule or "off", int(stop) if stop else None
    except ValueError:
        raise bl.BenchError(f"--cells {text!r}: give NxT[:SCHEDULE][/STOP], e.g. 64x50:0.5:0.75/10") from None


def _work(images: int, iterations: int, schedule: str, report: dict[str, Any]) -> float:
    """Full-size image-iterations of the run (stages at scale s count s^2)."""
    stages = report.get("resolution_stages") or [{"scale": 1.0, "iterations": [0, report["iterations_run"]]}]
    run = report["iterations_run"]
    return float(sum(images * max(0, min(st["iterations"][1], run) - st["iterations"][0]) * st["scale"] ** 2 for st in stages))


def _one(ctx: bl.Context, model: Path, key: tuple[int, int, str, int | None], test: tuple[np.ndarray, np.ndarray],
         fresh: bool) -> dict[str, Any]:
    images, iterations, schedule, stop = key
    name = f"{model.stem}-{images}x{iterations}-{schedule.replace(':', '_').replace(',', '+')}" + (f"-stop{stop}" if stop else "")
    calib, cache = ctx.work / f"{name}.npz", ctx.work / f"{name}.result.json"
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    report_path = calib.with_suffix(".json")
    extra = ["--images", str(images), "--iterations", str(iterations), "--coarse-to-fine", schedule,
             *(["--plateau-stop", str(stop)] if stop else [])]
    if ctx.smoke:
        extra += ["--batch-size", "4"]
    measured = bl.run_onnxdgh(["generate", str(model), "-o", str(calib), "--seed", str(ctx.seed), "--json", str(report_path),
                               *extra], what=f"generate {' '.join(extra)} on {model.name}", in_process=ctx.smoke)
    report = json.loads(report_path.read_text())
    result: dict[str, Any] = {
        "iterations_run": report["iterations_run"], "bns": report["final"]["bns_loss"],
        "optimise_s": report["timings"]["optimise_s"], "wall_s": measured.wall_s,
        "work": _work(images, iterations, schedule, report),
    }
    for label, weight, act in BITS:
        out = calib.with_name(f"{name}-{label}.onnx")
        bl.run_onnxdgh(["quantize", str(model), "-o", str(out), "--calib-data", str(calib), "--weight-bits", str(weight),
                        "--act-bits", str(act), "--no-validate"], what=f"quantize {label} on {calib.name}", in_process=ctx.smoke)
        result[label] = bl.top1(out, *test)
        out.unlink()
    cache.write_text(json.dumps(result))
    return result


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "generation_budget")
    if ctx.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        grid = [(8, 4, "off", None), (8, 4, "0.5:0.5", None), (4, 4, "0.5:0.5", 1)]
        reference = (8, 6, "off", None)
    else:
        models = bl.sample_models(args.models or ["fmnist_resnet8"])
        grid = [(n, t, s, p or None) for n in args.images for t in args.iterations for s in args.schedules
                for p in args.plateau_stops] if not args.cells else [_cell(text) for text in args.cells]
        reference = REFERENCE
    # cells given as MODEL=CELL run on that model only
    only = {index: text.partition("=")[0] for index, text in enumerate(args.cells or []) if "=" in text and not ctx.smoke}

    def model_grid(model: Path) -> list[tuple[int, int, str, int | None]]:
        keys = [key for index, key in enumerate(grid) if only.get(index, model.stem) == model.stem]
        return [reference] + [key for key in keys if key != reference]

    info = bl.machine_info()
    load_before = bl.load_average()
    rows, verdicts = [], []
    test_name = ""
    for model in models:
        test_x, test_y, test_name = _test_set(model, args, ctx)
        float_top1 = bl.top1(model, test_x, test_y)
        results = []
        for key in model_grid(model):
            bl.log(f"{model.name}: {key[0]} images x {key[1]} iterations, --coarse-to-fine {key[2]}, --plateau-stop {key[3]}")
            result = _one(ctx, model, key, (test_x, test_y), args.fresh)
            bl.log("  " + ", ".join(f"{b}: {100 * result[b]:.2f}%" for b, _, _ in BITS) + f", work {result['work']:.0f}")
            results.append((key, result))
        ref = results[0][1]
        for key, result in sorted(results, key=lambda kr: kr[1]["work"]):
            deltas = [100 * (result[b] - ref[b]) for b, _, _ in BITS]
            rows.append([model.stem, key[0], key[1], key[2], key[3] or "-", result["iterations_run"],
                         f"{result['work'] / 1000:.1f}", f"{result['optimise_s']:.1f}", f"{result['bns']:.4g}",
                         *(f"{100 * result[b]:.2f} ({d:+.2f})" for (b, _, _), d in zip(BITS, deltas))])
        for label, _, _ in BITS:
            passing = [(kr[1]["work"], kr[0]) for kr in results if 100 * (kr[1][label] - ref[label]) >= -args.bar]
            work, key = min(passing)
            verdicts.append(f"- {model.stem} {label}: the cheapest budget within {args.bar} pt of the reference is "
                            f"{key[0]} images x {key[1]} iterations, --coarse-to-fine {key[2]}"
                            f"{', --plateau-stop ' + str(key[3]) if key[3] else ''} ({work / 1000:.1f}k full-size "
                            f"image-iterations, {100 * work / ref['work']:.0f}% of the reference's).")
        verdicts.append(f"- {model.stem} float top-1: {100 * float_top1:.2f}%.")
    load_after = bl.load_average()
    body = "\n".join([
        f"Generation: `onnxdgh generate MODEL -o SET --seed {ctx.seed} --images N --iterations T --coarse-to-fine S "
        "[--plateau-stop P]`; quantization: `onnxdgh quantize MODEL -o Q --calib-data SET --weight-bits W --act-bits A "
        f"--no-validate` (defaults otherwise); top-1 on the {test_name}; in brackets the change against the reference "
        f"row ({REFERENCE[0]} x {REFERENCE[1]}, full size: today's `generate` defaults), in points. Work: full-size "
        "image-iterations in thousands (a stage at scale s counts s^2), the generation's cost independent of the "
        "machine's load; loop s: the optimisation loop's wall time under the load recorded here. Rows by work.",
        "",
        bl.md_table(["model", "images", "iterations", "coarse-to-fine", "plateau stop", "iterations run", "work (k)",
                     "loop s", "whole-set BN loss", *(f"{b} top-1 %" for b, _, _ in BITS)], rows),
        "",
        *verdicts,
        *bl.load_note(load_before, load_after, "the loop times are inflated; work and accuracies are not."),
    ])
    return bl.finish_section(ctx, KEY, TITLE, body, info=info, load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    bl.main_wrapper(run)
