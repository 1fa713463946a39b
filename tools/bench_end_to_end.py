"""End to end: wall time and peak memory of ``onnxdgh quantize``, and the quantize step vs onnxruntime.

Usage (from the repository root)::

    python tools/bench_end_to_end.py                 # all sample models
    python tools/bench_end_to_end.py --smoke         # seconds, tmp folder

Part 1, the main command: ``onnxdgh quantize MODEL -o OUT`` with default settings (DGH
generation included) runs in a child process per sample model; the table gives its wall
time and its peak resident memory (``ru_maxrss`` of that child process tree, measured by a
tiny intermediate interpreter so the benchmark's own memory does not leak into it), plus
the quantized model's top-1 on the Fashion-MNIST test split.

Environment: OpenMP's default wait policy, as a user's shell has it (the script sets no
OMP_WAIT_POLICY); run it on a quiet machine, every section records the load.

Part 2, the quantize step alone, given the same calibration images (512 training images
drawn with the seed; any images serve for timing): ``onnxdgh quantize --calib-data``
against onnxruntime's ``quantize_static`` (QDQ format, per-channel weights, MinMax
calibration, int8 activations and weights, the images fed through a
``CalibrationDataReader``), and ``onnxdgh quantize --calib-data --no-validate`` (onnxruntime's
quantizer does not validate either). Each runs in its own child process; the table gives the
time spent inside the quantize call (measured in the child, imports excluded), the child's
wall time and peak memory, and each result's top-1. The two products are not the same:
onnxruntime's leaves the model output (and ops it does not handle) in float and its scales
are not powers of two; onnxdgh quantizes every tensor with power-of-two scales.

Writes the section ``end-to-end`` of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "end-to-end"
TITLE = "End to end: onnxdgh quantize time and memory; quantize step vs onnxruntime quantize_static (issue 6 item 3)"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=None, help="sample model names (default: all in samples/)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each quantize-step child; the median is kept")
    parser.add_argument("--skip-main", action="store_true", help="skip part 1 (the full default command)")
    parser.add_argument("--child", nargs=4, metavar=("TOOL", "MODEL", "CALIB", "OUT"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------- child side


def _child(tool: str, model: str, calib: str, out: str) -> int:
    """Run one quantize step in this (child) process; print {"seconds": ...} as JSON on stdout.

    The onnxruntime child never imports onnxdgh (whose package imports torch), so its peak
    memory is onnxruntime's own.
    """
    if tool == "ort":
        with np.load(calib, allow_pickle=False) as stored:
            images = stored["images"].astype(np.float32)
        import onnxruntime.quantization as oq

        class Reader(oq.CalibrationDataReader):
            def __init__(self, data: np.ndarray, name: str, batch: int = 32) -> None:
                self.batches = iter([data[i:i + batch] for i in range(0, data.shape[0], batch)])
                self.name = name

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self.batches, None)
                return None if batch is None else {self.name: batch}

        import onnx

        name = onnx.load(model, load_external_data=False).graph.input[0].name
        started = time.perf_counter()
        oq.quantize_static(model, out, Reader(images, name), quant_format=oq.QuantFormat.QDQ, per_channel=True,
                           activation_type=oq.QuantType.QInt8, weight_type=oq.QuantType.QInt8,
                           calibrate_method=oq.CalibrationMethod.MinMax)
        seconds = time.perf_counter() - started
    elif tool == "onnxdgh":
        # The command line, in-process: what `onnxdgh quantize --calib-data` does, timed without imports.
        # --no-validate: quantize_static does not validate either (the main command's table includes it).
        from click.testing import CliRunner

        from onnxdgh.cli import main

        report = Path(out).with_suffix(".json")
        started = time.perf_counter()
        result = CliRunner().invoke(main, ["-q", "quantize", model, "-o", out, "--calib-data", calib, "--no-validate",
                                          "--json", str(report)])
        seconds = time.perf_counter() - started
        if result.exit_code != 0:
            print(result.output, file=sys.stderr)
            return result.exit_code or 1
        timings = json.loads(report.read_text()).get("timings", {})
        print(json.dumps({"seconds": seconds, "timings": timings}))
        return 0
    else:
        print(f"unknown tool {tool}", file=sys.stderr)
        return 2
    print(json.dumps({"seconds": seconds}))
    return 0


# ----------------------------------------------------------------------- parent side


def _run_child(tool: str, model: Path, calib: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", tool, str(model), str(calib), str(out)]
    result = bl.run_measured(cmd)
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-4:])
        raise bl.BenchError(f"{tool} quantize step on {model.name} failed (exit {result.returncode}): {tail}")
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    return {"seconds": reply["seconds"], "timings": reply.get("timings", {}), "wall_s": result.wall_s,
            "rss": result.max_rss_bytes}


def _dataset(model: Path, smoke: bool, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    if smoke:
        from onnxdgh.load import load_model

        shape = load_model(model).input_shape
        x = np.random.default_rng(seed).normal(size=(64, *shape)).astype(np.float32)
        return x, bl.predict(model, x).argmax(axis=1), "64 random images labelled by the float model (smoke)"
    import fashion_mnist as fm

    from onnxdgh.load import load_model

    norm = load_model(model).input_normalization()
    mean, std = (fm.MEAN, fm.STD) if norm is None else (tuple(map(float, norm[0])), tuple(map(float, norm[1])))
    try:
        images, labels = fm.load_split("test")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    return fm.normalize(images, mean, std), labels, "Fashion-MNIST test split (10,000)"


def _calibration_set(model: Path, out: Path, smoke: bool, seed: int) -> str:
    """The images both quantizers get: 512 training images (smoke: 32 random ones); returns a description.

    Timing the quantize step needs the same images for both tools, not DGH images in
    particular, so no generation is spent on it.
    """
    from onnxdgh.fileio import save_images_npz
    from onnxdgh.load import load_model

    rng = np.random.default_rng(seed)
    if smoke:
        shape = load_model(model).input_shape
        save_images_npz(out, rng.normal(size=(32, *shape)).astype(np.float32))
        return "32 random images"
    import fashion_mnist as fm

    norm = load_model(model).input_normalization()
    mean, std = (fm.MEAN, fm.STD) if norm is None else (tuple(map(float, norm[0])), tuple(map(float, norm[1])))
    try:
        images, _ = fm.load_split("train")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    index = np.sort(rng.choice(images.shape[0], size=512, replace=False))
    save_images_npz(out, fm.normalize(images[index], mean, std))
    return "512 Fashion-MNIST training images"


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.child:
        return _child(*args.child)
    ctx = bl.make_context(args, "end_to_end")
    busy = bl.busy_processes()
    if busy and not args.smoke:
        bl.log("WARNING: other busy processes, timings will be under load: " + "; ".join(busy))
    info = bl.machine_info()
    load_before = bl.load_average()
    if args.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        gen_args = ["--images", "16", "--iterations", "2", "--batch-size", "8"]
        repeats = 1
    else:
        models = bl.sample_models(args.models)
        gen_args = []
        repeats = max(1, args.repeats)

    main_rows, step_rows = [], []
    calib_name = ""
    step_notes: list[str] = []
    data_name = ""
    for model in models:
        name = model.stem
        work = ctx.work / name
        work.mkdir(parents=True, exist_ok=True)
        test_x, test_y, data_name = _dataset(model, args.smoke, ctx.seed)
        float_top1 = bl.top1(model, test_x, test_y)
        if not args.skip_main:
            out = work / "main_q.onnx"
            main_cmd = ["quantize", str(model), "-o", str(out), "--seed", str(ctx.seed), *gen_args]
            bl.log(f"{name}: onnxdgh {' '.join(main_cmd)}")
            result = bl.run_onnxdgh(main_cmd, what=f"onnxdgh quantize on {name}", quiet=True)
            acc = bl.top1(out, test_x, test_y)
            bl.log(f"  {result.wall_s:.1f} s, peak RSS {_mib(result.max_rss_bytes)}, top-1 {100 * acc:.2f}%")
            main_rows.append([name, f"{result.wall_s:.1f} s", _mib(result.max_rss_bytes),
                              f"{100 * float_top1:.2f}", f"{100 * acc:.2f}"])

        calib = work / "calib.npz"
        calib_name = _calibration_set(model, calib, args.smoke, ctx.seed)
        from onnxdgh.fileio import load_images_npz

        n_calib = load_images_npz(calib)[0].shape[0]
        measured: dict[str, list[dict[str, Any]]] = {"onnxdgh": [], "ort": []}
        for rep in range(repeats):
            for tool in ("onnxdgh", "ort"):  # alternate so that drift in machine load hits both alike
                measured[tool].append(_run_child(tool, model, calib, work / f"step_{tool}.onnx"))
        med = {tool: sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2] for tool, runs in measured.items()}
        acc_ours = bl.top1(work / "step_onnxdgh.onnx", test_x, test_y)
        acc_ort = bl.top1(work / "step_ort.onnx", test_x, test_y)
        ratio = med["ort"]["seconds"] / med["onnxdgh"]["seconds"]
        verdict = "onnxdgh faster" if ratio >= 1 else "**onnxdgh slower**"
        bl.log(f"{name}: quantize step onnxdgh {med['onnxdgh']['seconds']:.2f} s vs ORT {med['ort']['seconds']:.2f} s ({verdict})")
        step_rows.append([
            name, str(n_calib),
            f"{med['onnxdgh']['seconds']:.2f} s", f"{med['ort']['seconds']:.2f} s", f"{ratio:.2f}x ({verdict})",
            f"{med['onnxdgh']['wall_s']:.1f} s / {_mib(med['onnxdgh']['rss'])}",
            f"{med['ort']['wall_s']:.1f} s / {_mib(med['ort']['rss'])}",
            f"{100 * float_top1:.2f}", f"{100 * acc_ours:.2f}", f"{100 * acc_ort:.2f}",
        ])
        breakdown = med["onnxdgh"]["timings"]
        if breakdown:
            step_notes.append(f"- {name}: onnxdgh in-call {med['onnxdgh']['seconds']:.2f} s = "
                              + ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in breakdown.items() if k.endswith("_s")
                                          and k not in ("total_s", "quantize_s"))
                              + " (from its --json report; the rest is reading and writing)")
    load_after = bl.load_average()
    body = []
    if main_rows:
        body += ["**The main command with default settings** (`onnxdgh quantize MODEL -o OUT --seed "
                 f"{ctx.seed}`{' ' + ' '.join(gen_args) if gen_args else ''}): DGH generation, calibration, "
                 "quantization and validation in one child process.", "",
                 bl.md_table(["model", "wall time", "peak RSS", "float top-1", "quantized top-1 (W8A8 default)"], main_rows),
                 ""]
    body += [f"**The quantize step alone, same calibration images** ({calib_name}; median of "
             f"{repeats} runs each, alternating). 'in-call' is the time inside the quantize call, imports excluded; "
             "'child' is the whole child process (interpreter start and imports included) and its peak RSS. "
             "onnxruntime: `quantize_static(QDQ, per_channel=True, MinMax, QInt8/QInt8)`, which keeps the output in "
             "float and uses arbitrary (not power-of-two) scales; onnxdgh (`--calib-data SET --no-validate`: "
             "onnxruntime's quantizer does not validate) quantizes every tensor, power-of-two.", "",
             bl.md_table(["model", "calib images", "onnxdgh in-call", "onnxruntime in-call", "ORT time / onnxdgh time",
                          "onnxdgh child (wall / RSS)", "onnxruntime child (wall / RSS)", "float top-1",
                          "onnxdgh top-1", "onnxruntime top-1"], step_rows),
             "", *step_notes, "", f"Top-1 on: {data_name}."]
    if busy and not args.smoke:
        body += ["", "**Taken under load** — other busy processes at the start: " + "; ".join(busy)]
    bl.write_section(KEY, TITLE, "\n".join(body), info=info, command=bl.command_string(), load_before=load_before,
                     load_after=load_after, doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(lambda: run(sys.argv[1:]))
