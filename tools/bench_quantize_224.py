"""Default ``onnxdgh quantize`` on a 224x224 classifier: time on one thread, and accuracy (issue 16 target).

Usage (from the repository root, in the benchmark venv for the photos)::

    PYTHONPATH=. bench-work/venv/bin/python tools/bench_quantize_224.py            # EfficientNet-Lite0, defaults
    PYTHONPATH=. bench-work/venv/bin/python tools/bench_quantize_224.py --variants "" "--coarse-to-fine off"
    python tools/bench_quantize_224.py --smoke                                      # seconds, tmp folder

Each variant runs ``onnxdgh quantize MODEL -o OUT --json REPORT [OPTIONS]`` as a child
process with ``OMP_NUM_THREADS=1`` (one core of the 2-core machine, so another process's
load changes the figure less), recording wall time, CPU time (user + system of the child:
the honest figure when the machine is shared) and peak RSS. The quantized model is then
compared with the float model on evaluation crops of real photos that no calibration set
saw (``bench_depthwise``'s photo sets): top-1 agreement, top-5 containing the float top-1,
logit SQNR. Results are cached per variant in the work folder (``--fresh`` reruns).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "quantize-224"
TITLE = "Default `onnxdgh quantize` on a 224x224 classifier, one thread (issue 16 target)"
MODEL = bl.REPO / "bench-work" / "real_models" / "efficientnet_lite0.onnx"
TARGET_S = 600.0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--model", type=Path, default=MODEL, help=f"the 224-px model (default {MODEL.relative_to(bl.REPO)})")
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="extra `onnxdgh quantize` options per run, one string each ('' = the defaults)")
    parser.add_argument("--eval", type=int, default=200, help="evaluation crops (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the child (default 1)")
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    return parser.parse_args(argv)


def _evaluation(ctx: bl.Context, model: Path, count: int) -> tuple[np.ndarray, str]:
    if ctx.smoke:
        from onnxdgh.load import load_model

        shape = load_model(model).input_shape
        return np.random.default_rng(ctx.seed).normal(0.0, 1.0, (16, *shape)).astype(np.float32), "random images (smoke)"
    from bench_depthwise import _photo_sets

    _, evaluation, note = _photo_sets(1, count, ctx.seed)
    return evaluation, note.split("; ", 1)[1]


def _throughput(model: Path, rows: list[dict[str, Any]], threads: int, smoke: bool) -> list[str]:
    """The generation loop's rate against this machine's fp32 GEMM rate at the same thread count (issue 16)."""
    import torch

    from onnxdgh.convert import to_torch
    from onnxdgh.load import load_model

    torch.set_num_threads(threads)
    loaded = load_model(model)
    fwd, bwd = bl.input_grad_flops(to_torch(loaded).module, loaded.input_shape)
    gemm = bl.gemm_gflops(512 if smoke else 1024, 0.3 if smoke else 2.0)
    lines = ["", f"Generation throughput against the fp32 GEMM rate (torch, 1024x1024, {threads} thread(s), measured now: "
                 f"{gemm:.1f} GFLOP/s); work per image-iteration {(fwd + bwd) / 1e9:.2f} GFLOP (forward "
                 f"{fwd / 1e9:.2f} + input-gradient backward {bwd / 1e9:.2f}, torch's FLOP counter):", ""]
    for row in rows:
        rate = row.get("image_it_s")
        if rate:
            lines.append(f"- `{row['options'] or '(defaults)'}`: {rate:.2f} image-iterations/s in the optimisation loop, "
                         f"{100 * rate * (fwd + bwd) / (gemm * 1e9):.1f} % of the GEMM rate.")
    return lines


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "quantize_224")
    from bench_depthwise import compare

    from onnxdgh.load import load_model

    if ctx.smoke:
        model = bl.tiny_classifier(ctx.work / "tiny.onnx", channels=3, size=(16, 16))
        variants = ["--images 8 --iterations 4 --batch-size 4", "--images 8 --iterations 4 --batch-size 4 --coarse-to-fine off"]
    else:
        model = args.model
        if not model.exists():
            raise bl.BenchError(f"{model} is missing: copy it from /work/thirdparty/models (see HELPERS.md)")
        variants = args.variants
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    evaluation, eval_note = _evaluation(ctx, model, args.eval)
    reference = bl.predict(model, evaluation, batch_size=50)
    info = bl.machine_info()
    load_before = bl.load_average()
    rows: list[list[str]] = []
    rows_raw: list[dict[str, Any]] = []
    for variant in variants:
        options = shlex.split(variant)
        name = "default" if not options else "-".join(o.lstrip("-").replace(":", "_").replace("/", "_") for o in options)
        cache = ctx.work / f"{model.stem}-{name}.result.json"
        if cache.exists() and not args.fresh:
            row = json.loads(cache.read_text())
        else:
            out, report_path = ctx.work / f"{model.stem}-{name}.onnx", ctx.work / f"{model.stem}-{name}.json"
            command = ["quantize", str(model), "-o", str(out), "--json", str(report_path), *options]
            bl.log(f"onnxdgh {shlex.join(command)} (OMP_NUM_THREADS={args.threads})")
            load_start = bl.load_average()
            measured = bl.run_onnxdgh(command, what=f"quantize {variant or '(defaults)'}", in_process=ctx.smoke)
            report = json.loads(report_path.read_text())
            settings = report.get("calibration", {}).get("generation", {})
            row = {
                "options": variant, "wall_s": measured.wall_s, "cpu_s": measured.cpu_s,
                "rss_mib": measured.max_rss_bytes / 2**20, "load": [load_start, bl.load_average()],
                "generate_s": report.get("timings", {}).get("generate_s"), "settings": settings,
                "image_it_s": report.get("generation", {}).get("timings", {}).get("image_iterations_per_s"),
                "bns": [report.get("generation", {}).get("final", {}).get(k) for k in ("bns_loss_initial", "bns_loss")],
                "validation": report.get("validation", {}).get("passed"),
                **compare(reference, bl.predict(out, evaluation, batch_size=50)),
            }
            cache.write_text(json.dumps(row))
        bl.log(f"  wall {row['wall_s']:.0f} s, CPU {row['cpu_s']:.0f} s, agreement {100 * row['agreement']:.1f}%")
        gen = row["settings"] or {}
        budget = f"{gen.get('images', '?')} x {gen.get('iterations', '?')}, coarse-to-fine {gen.get('coarse_to_fine') or 'off'}"
        verdict = "meets" if row["cpu_s"] <= TARGET_S and row["wall_s"] <= TARGET_S else (
            "CPU time meets" if row["cpu_s"] <= TARGET_S else "misses")
        rows.append([f"`onnxdgh quantize MODEL -o OUT{' ' + variant if variant else ''}`", budget,
                     f"{row['wall_s']:.0f} s (load {row['load'][0]:.1f} -> {row['load'][1]:.1f})", f"{row['cpu_s']:.0f} s",
                     f"{row['rss_mib']:.0f}" if row["rss_mib"] else "-", f"{row['generate_s']:.0f} s" if row["generate_s"] else "-",
                     " -> ".join(f"{v:.3g}" for v in row.get("bns", []) if v is not None) or "-",
                     f"{100 * row['agreement']:.1f}", f"{100 * row['top5']:.1f}", f"{row['sqnr_db']:.2f}", verdict])
        rows_raw.append(row)
    load_after = bl.load_average()
    throughput = _throughput(model, rows_raw, args.threads, ctx.smoke)
    body = "\n".join([
        f"Model: `{model.name}` (input {'x'.join(map(str, load_model(model).input_shape))}). Every run: one child "
        f"process with `OMP_NUM_THREADS={args.threads}`; CPU time is the child's user + system time, which other "
        "processes' load inflates far less than the wall time (on 2 shared cores the wall time is the CPU time "
        "plus the time the child waited for a core). Accuracy: the quantized model against the float model on "
        f"{eval_note}.",
        "",
        bl.md_table(["command", "generation (images x iterations)", "wall", "CPU time", "peak RSS MiB", "of which generate (wall)",
                     "whole-set BN loss (start -> final images)", "top-1 agreement %", "top-5 has float top-1 %",
                     "logit SQNR dB", f"target <= {TARGET_S / 60:.0f} min"], rows),
        *throughput,
        *bl.load_note(load_before, load_after, "the wall times are inflated; the CPU times and accuracies are not."),
    ])
    return bl.finish_section(ctx, KEY, TITLE, body, info=info, load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    bl.main_wrapper(run)
