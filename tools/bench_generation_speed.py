"""Generation speed: image-iterations per second of onnxdgh's DGH vs Sony MCT's, same run.

Usage (from the repository root, in the benchmark venv that has MCT)::

    bench-work/venv/bin/python tools/bench_generation_speed.py            # all sample models
    bench-work/venv/bin/python tools/bench_generation_speed.py --smoke    # seconds, tmp folder

For each model both generators get the *same* torch module (the ONNX file converted by
onnx2torch exactly as onnxdgh converts it, eval mode, weights frozen), the same image
count, image size, batch size, iteration count and crop margin, one after the other
in one process. An image-iteration is one image taking one optimisation step.

Timing: MCT is given an already converted module, so onnxdgh's time excludes its own
loading and conversion too (``total - load - convert`` from the generation report:
initial statistics pass, optimisation loop and final evaluation); the loop alone is
reported as well. MCT's time is the whole ``pytorch_data_generation_experimental`` call.

Environment: OpenMP's default wait policy, as a user's shell has it (no OMP_WAIT_POLICY
set by the script). OMP_WAIT_POLICY=PASSIVE, which the other benchmarks set to share the
machine politely, slowed onnxdgh's resnet8 steps 1.5x and MCT's similarly.

Compute efficiency: forward FLOPs plus input-gradient backward FLOPs of the model per
image (torch's FLOP counter), times image-iterations per second, over the fp32 GEMM rate
torch reaches on this machine (measured before and after the runs; the mean is used).
The fraction is of the *model's* arithmetic only: preprocessing, loss and optimiser work
are overhead it does not count.

Writes the table into docs/BENCHMARKS.md (section ``generation-speed``) and a bar chart
``docs/bench_generation_speed.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import benchlib_mct  # noqa: E402

KEY = "generation-speed"
TITLE = "Generation speed: onnxdgh DGH vs Sony MCT (issue 3, issue 6 item 2)"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=None, help="sample model names (default: all in samples/)")
    parser.add_argument("--images", type=int, default=256, help="images generated per run (default 256, onnxdgh's default)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64, onnxdgh's default)")
    parser.add_argument("--iterations", type=int, default=20,
                        help="iterations per run (default 20: throughput is steady after the first few)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each generator, alternating; the best is kept")
    parser.add_argument("--skip-mct", action="store_true", help="time onnxdgh only (MCT not installed)")
    return parser.parse_args(argv)


def _onnxdgh_run(path: Path, images: int, iterations: int, batch: int, seed: int, progress: bool) -> dict[str, Any]:
    from onnxdgh.generation.config import GenerateConfig
    from onnxdgh.generation.core import generate

    config = GenerateConfig(images=images, iterations=iterations, batch_size=batch, seed=seed)
    started = time.perf_counter()
    result = generate(str(path), config, progress=progress)
    wall = time.perf_counter() - started
    timings = result.report["timings"]
    work_s = timings["total_s"] - timings["load_s"] - timings["convert_s"]
    return {
        "wall_s": wall,
        "work_s": work_s,
        "loop_s": timings["optimise_s"],
        "image_iterations": images * iterations,
        "crop_margin": result.report.get("crop_margin"),
        "final_bns": result.report.get("final", {}).get("bns_loss_last_iteration"),
    }


def _mct_run(module: Any, loaded: Any, images: int, iterations: int, batch: int, margin: int, seed: int,
             progress: bool) -> dict[str, Any]:
    norm = loaded.input_normalization()
    channels, height, width = loaded.input_shape
    if norm is None:
        raise bl.BenchError(f"{loaded.source} has no input_mean/input_std metadata; MCT's clipping needs them")
    started = time.perf_counter()
    benchlib_mct.mct_generate(module, n_images=images, image_size=(height, width), channels=channels,
                              mean=list(map(float, norm[0])), std=list(map(float, norm[1])), iterations=iterations,
                              batch_size=batch, extra_pixels=margin, seed=seed, progress=progress)
    wall = time.perf_counter() - started
    return {"wall_s": wall, "work_s": wall, "image_iterations": images * iterations}


def _plot(rows: list[dict[str, Any]], path: Path, load: float) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bl.log("matplotlib not installed: no plot")
        return None
    names = [r["model"] for r in rows]
    ours = [r["onnxdgh_rate"] for r in rows]
    theirs = [r["mct_rate"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = list(range(len(names)))
    ax.bar([i - 0.2 for i in x], ours, width=0.4, label="onnxdgh generate")
    ax.bar([i + 0.2 for i in x], theirs, width=0.4, label="MCT data generation")
    for i, r in enumerate(rows):
        if r["mct_rate"]:
            ax.text(i, max(ours[i], theirs[i]) * 1.02, f"{r['onnxdgh_rate'] / r['mct_rate']:.2f}x", ha="center", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylabel("image-iterations / s (higher is better)")
    ax.set_title(f"DGH generation throughput on CPU, same torch module and settings\n(load average {load:.1f} "
                 f"at the start{'; taken under load' if load > 1.5 else ''})", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_ylim(0, max(ours + theirs) * 1.18 if max(ours + theirs) > 0 else 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "generation_speed")
    import torch

    from onnxdgh.convert import to_torch
    from onnxdgh.load import load_model

    if args.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        images, batch, iterations, repeats = 8, 4, 3, 1
    else:
        models = bl.sample_models(args.models)
        images, batch, iterations, repeats = args.images, args.batch_size, args.iterations, max(1, args.repeats)
    use_mct, mct_text = benchlib_mct.mct_available()
    if args.skip_mct:
        use_mct, mct_text = False, "skipped (--skip-mct)"
    elif not use_mct and not args.smoke:
        raise bl.BenchError(f"{mct_text}; run with bench-work/venv/bin/python, or pass --skip-mct")
    busy = bl.busy_processes()
    if busy and not args.smoke:
        bl.log("WARNING: other busy processes, timings will be under load: " + "; ".join(busy))
    info = bl.machine_info()
    load_before = bl.load_average()
    gemm_n = 512 if args.smoke else 1024
    gemm_before = bl.gemm_gflops(gemm_n, 0.3 if args.smoke else 2.0)
    bl.log(f"fp32 GEMM rate before: {gemm_before:.1f} GFLOP/s")

    rows: list[dict[str, Any]] = []
    for path in models:
        loaded = load_model(path)
        module = to_torch(loaded).module
        fwd, bwd = bl.input_grad_flops(module, loaded.input_shape)
        bl.log(f"{path.name}: {fwd / 1e6:.2f} MFLOP forward + {bwd / 1e6:.2f} MFLOP input-gradient backward per image")
        best_ours: dict[str, Any] | None = None
        best_mct: dict[str, Any] | None = None
        for rep in range(repeats):
            bl.log(f"{path.name}: onnxdgh generate, {images} images x {iterations} iterations, batch {batch} (run {rep + 1})")
            ours = _onnxdgh_run(path, images, iterations, batch, ctx.seed, not ctx.quiet)
            bl.log(f"  onnxdgh: {ours['work_s']:.1f} s ({ours['image_iterations'] / ours['work_s']:.1f} image-it/s)")
            if best_ours is None or ours["work_s"] < best_ours["work_s"]:
                best_ours = ours
            if use_mct:
                bl.log(f"{path.name}: MCT data generation, same settings, crop margin {ours['crop_margin']} (run {rep + 1})")
                theirs = _mct_run(module, loaded, images, iterations, batch, int(ours["crop_margin"] or 0), ctx.seed,
                                  not ctx.quiet)
                bl.log(f"  MCT: {theirs['work_s']:.1f} s ({theirs['image_iterations'] / theirs['work_s']:.1f} image-it/s)")
                if best_mct is None or theirs["work_s"] < best_mct["work_s"]:
                    best_mct = theirs
        assert best_ours is not None
        rows.append({
            "model": path.stem,
            "shape": "x".join(str(v) for v in loaded.input_shape),
            "flops": fwd + bwd,
            "onnxdgh_rate": best_ours["image_iterations"] / best_ours["work_s"],
            "onnxdgh_loop_rate": best_ours["image_iterations"] / best_ours["loop_s"],
            "onnxdgh_s": best_ours["work_s"],
            "mct_rate": best_mct["image_iterations"] / best_mct["work_s"] if best_mct else None,
            "mct_s": best_mct["work_s"] if best_mct else None,
            "margin": best_ours["crop_margin"],
        })
        del module
    gemm_after = bl.gemm_gflops(gemm_n, 0.3 if args.smoke else 2.0)
    load_after = bl.load_average()
    bl.log(f"fp32 GEMM rate after: {gemm_after:.1f} GFLOP/s")
    gemm = (gemm_before + gemm_after) / 2

    table_rows = []
    for r in rows:
        ratio = r["onnxdgh_rate"] / r["mct_rate"] if r["mct_rate"] else None
        verdict = "—" if ratio is None else ("meets 2x target" if ratio >= 2 else ("faster, below 2x target" if ratio >= 1 else "**slower than MCT**"))
        frac_ours = r["flops"] * r["onnxdgh_rate"] / (gemm * 1e9)
        frac_mct = r["flops"] * r["mct_rate"] / (gemm * 1e9) if r["mct_rate"] else None
        table_rows.append([
            r["model"], r["shape"], f"{r['flops'] / 1e6:.2f}",
            f"{r['onnxdgh_rate']:.1f} ({r['onnxdgh_s']:.1f} s)", f"{r['onnxdgh_loop_rate']:.1f}",
            "—" if r["mct_rate"] is None else f"{r['mct_rate']:.1f} ({r['mct_s']:.1f} s)",
            "—" if ratio is None else f"**{ratio:.2f}x**", verdict,
            f"{100 * frac_ours:.1f}%", "—" if frac_mct is None else f"{100 * frac_mct:.1f}%",
        ])
        bl.log(f"{r['model']}: onnxdgh {r['onnxdgh_rate']:.1f} vs MCT {r['mct_rate'] or float('nan'):.1f} image-it/s"
               + (f" -> ratio {ratio:.2f}x" if ratio else ""))
    table = bl.md_table(
        ["model", "input", "MFLOP / image-iteration (fwd + input-grad bwd)", "onnxdgh image-it/s (time)",
         "onnxdgh loop only", "MCT image-it/s (time)", "ratio", "target >= 2x", "onnxdgh % of GEMM rate",
         "MCT % of GEMM rate"],
        table_rows,
    )
    figure = _plot(rows, ctx.figures / "bench_generation_speed.png", load_before)
    body = [
        f"Settings: {images} images, batch {batch}, {iterations} iterations, crop margin {rows[0]['margin']} px "
        f"(onnxdgh's default for the input size, given to MCT as `extra_pixels`), seed {ctx.seed}, best of {repeats} "
        f"run(s) each. MCT: {mct_text}, its defaults otherwise (RAdam lr 16, plateau scheduler with reset, "
        "all-images BN statistics, smoothing + flip + crop, clipping, output loss x 1e-5); it gets the same frozen "
        "onnx2torch module as onnxdgh. MCT 2.x hard-codes 3 input channels in its data generation; for these "
        "1-channel models `tools/benchlib_mct.py` patches the channel count (initialisation, smoothing groups, "
        "clipping grid), nothing else.",
        "",
        f"fp32 GEMM rate (torch, {gemm_n}x{gemm_n}, {info['torch_threads']} threads): {gemm_before:.1f} GFLOP/s before, "
        f"{gemm_after:.1f} after; the efficiency columns use the mean {gemm:.1f}.",
        "",
        table,
        "",
        "onnxdgh's time excludes loading and conversion (MCT is handed the converted module); it includes the "
        "initial statistics pass and the final evaluation. 'loop only' is the optimisation loop alone.",
    ]
    if busy and not args.smoke:
        body += ["", "**Taken under load** — other busy processes at the start: " + "; ".join(busy)]
    if figure is not None:
        body += ["", f"![generation throughput]({figure.name})"]
    bl.write_section(KEY, TITLE, "\n".join(body), info=info, command=bl.command_string(),
                     load_before=load_before, load_after=load_after, doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    print(table)
    return 0


if __name__ == "__main__":
    bl.main_wrapper(lambda: run(sys.argv[1:]))
