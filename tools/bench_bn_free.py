"""Models without BN statistics: calibration candidates on BN-folded copies of the samples (issue 15).

Usage (from the repository root)::

    python3 tools/bench_bn_free.py                       # resnet8 + mobilenetv2, 2,000 test images
    python3 tools/bench_bn_free.py --models fmnist_resnet8 --test-limit 10000
    python3 tools/bench_bn_free.py --smoke               # seconds, tmp folder

For every Fashion-MNIST sample model, a BN-free copy is made the way an exporter's default
makes one: every BatchNormalization folded into its convolution by onnxdgh's own folding
(``onnxdgh.quantization.fold.fold_batch_norms`` on the loaded, canonical model), the metadata
(input normalisation) kept. The copy is then quantized at W8A8 and W4A8 (the quantizer's
defaults: rounding optimisation below 8 bits) with calibration images from

- ``noise``: ``onnxdgh generate --method noise`` (Gaussian N(0, 1) in input space, clamped);
- ``procedural (no flags)``: ``onnxdgh quantize FOLDED -o Q`` with no generation options:
  ``--method auto`` picks the procedural fallback on a model without BN;
- ``dgh, no BN``: ``onnxdgh generate --method dgh --allow-no-bn``: optimisation through the
  model without BN targets (ODSL + smoothing + crop/flip, from noise);
- ``stretch + balance, from noise``: ODSL and DAFL's entropy/class-balance term on the
  logits, smoothing + crop/flip, from noise (``generate_actreg`` with no activation term,
  in process: no CLI method runs it);
- ``actreg, from noise``: activation-range regularisation (every convolution's output
  channels kept alive and bounded) + the two output terms, from noise (in process);
- ``actreg (procedural start)``: ``onnxdgh generate --method actreg``: the same, starting
  from the procedural images;
- ``real``: training images drawn with the seed (the float model's own data);

and the top-1 on the first ``--test-limit`` test images is reported against the float
model's. Writes the ``bn-free`` section of docs/BENCHMARKS.md.

``--partial K`` adds copies that keep only their last K BN layers (the rest folded, as in a
detector that keeps a few) and compares what ``--method auto`` could do there: ``dgh`` on
the K layers it has (from noise, ``--images/--iterations`` as 'dgh, no BN'),
``procedural``, and both mixed (the two sets concatenated), against real data.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxdgh, also in process
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

BITS = ((8, 8), (4, 8))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=["fmnist_resnet8", "fmnist_mobilenetv2"],
                        help="sample model names (default: resnet8 and mobilenetv2)")
    parser.add_argument("--test-limit", type=int, default=2000, help="test images evaluated (default 2000)")
    parser.add_argument("--real-images", type=int, default=512, help="training images of the 'real' set (default 512)")
    parser.add_argument("--opt-images", type=int, default=64, help="images of the 'dgh, no BN' set (default 64)")
    parser.add_argument("--opt-iterations", type=int, default=200, help="iterations of the 'dgh, no BN' set (default 200)")
    parser.add_argument("--act-iterations", type=int, default=100,
                        help="iterations of the activation-range / stretch + balance sets (default 100)")
    parser.add_argument("--partial", type=int, default=0, help="also test copies keeping their last K BN layers (default 0: off)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: rewrite the section from the stored results (bench-work/bn_free/results.json)")
    parser.add_argument("--skip-main", action="store_true",
                        help="keep the stored full-fold results (an earlier run's) and run only --partial")
    return parser.parse_args(argv)


def fold_copy(model: Path, out: Path, keep_last: int = 0) -> Path:
    """Write ``model`` with its BN folded away but the last ``keep_last`` (metadata kept), as an exporter would."""
    from onnxdgh.load import load_model
    from onnxdgh.quantization.fold import fold_batch_norms

    loaded = load_model(model)
    source = loaded.model
    bns = [node for node in source.graph.node if node.op_type == "BatchNormalization"]
    kept = bns[len(bns) - keep_last:] if keep_last else []
    for node in kept:  # hidden from the folding pass under another op type, restored after
        node.op_type = "KeptBatchNormalization"
    folded = fold_batch_norms(source)
    for node in folded.graph.node:
        if node.op_type == "KeptBatchNormalization":
            node.op_type = "BatchNormalization"
    left = sum(node.op_type == "BatchNormalization" for node in folded.graph.node)
    if left != len(kept):
        raise bl.BenchError(f"{model.name}: {left} BatchNormalization left after folding, expected {len(kept)}")
    out.write_bytes(folded.SerializeToString())
    return out


def _dataset(model: Path, test_limit: int, smoke: bool, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(test images, labels, training pool) in the model's input space, and the data's name."""
    from onnxdgh.load import load_model

    if smoke:
        shape = load_model(model).input_shape
        rng = np.random.default_rng(seed)
        test_x = rng.uniform(-2.0, 2.0, size=(64, *shape)).astype(np.float32)
        test_y = bl.predict(model, test_x).argmax(axis=1)
        pool = rng.uniform(-2.0, 2.0, size=(32, *shape)).astype(np.float32)
        return test_x, test_y, pool, "random images labelled by the float model (smoke)"
    import fashion_mnist as fm

    mean, std = load_model(model).input_normalization()  # the samples carry it in their metadata
    try:
        test_u8, test_y = fm.load_split("test")
        train_u8, _ = fm.load_split("train")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    test_u8, test_y = test_u8[:test_limit], test_y[:test_limit]
    return (fm.normalize(test_u8, tuple(map(float, mean)), tuple(map(float, std))), test_y,
            fm.normalize(train_u8, tuple(map(float, mean)), tuple(map(float, std))), "Fashion-MNIST test split")


def _sets(ctx: bl.Context, folded: Path, work: Path, pool: np.ndarray, args: argparse.Namespace,
          notes: list[str]) -> dict[str, Path | None]:
    """The calibration set of each candidate (None: the quantizer generates it itself)."""
    from onnxdgh.fileio import save_images_npz

    sets: dict[str, Path | None] = {}
    noise = work / "noise.npz"
    bl.run_onnxdgh(["generate", str(folded), "-o", str(noise), "--method", "noise", "--seed", str(ctx.seed)],
                   what="generate noise", in_process=ctx.smoke)
    sets["noise"] = noise
    sets["procedural (no flags)"] = None
    opt = work / "dgh_no_bn.npz"
    report = work / "dgh_no_bn.json"
    result = bl.run_onnxdgh(["generate", str(folded), "-o", str(opt), "--method", "dgh", "--allow-no-bn",
                             "--images", str(args.opt_images), "--iterations", str(args.opt_iterations),
                             "--seed", str(ctx.seed), "--json", str(report)],
                            what="generate dgh --allow-no-bn", in_process=ctx.smoke)
    notes.append(f"'dgh, no BN': {args.opt_images} images x {args.opt_iterations} iterations, {result.wall_s:.0f} s")
    sets["dgh, no BN"] = opt
    for name, start, weight in (("stretch + balance, from noise", "noise", 0.0), ("actreg, from noise", "noise", 1.0)):
        path = work / f"{name.split(',')[0].replace(' + ', '_')}_{start}.npz"
        seconds = _actreg_set(folded, path, ctx.seed, args.opt_images, args.act_iterations, start, weight)
        notes.append(f"'{name}': {args.opt_images} images x {args.act_iterations} iterations, {seconds:.0f} s")
        sets[name] = path
    procedural_start = work / "actreg_procedural.npz"
    result = bl.run_onnxdgh(["generate", str(folded), "-o", str(procedural_start), "--method", "actreg",
                             "--images", str(args.opt_images), "--iterations", str(args.act_iterations),
                             "--seed", str(ctx.seed)], what="generate --method actreg", in_process=ctx.smoke)
    notes.append(f"'actreg (procedural start)': {args.opt_images} images x {args.act_iterations} iterations, "
                 f"{result.wall_s:.0f} s")
    sets["actreg (procedural start)"] = procedural_start
    rng = np.random.default_rng(ctx.seed)
    index = np.sort(rng.choice(pool.shape[0], size=min(args.real_images, pool.shape[0]), replace=False))
    real = work / "real.npz"
    save_images_npz(real, pool[index], {"source": "training images", "count": int(index.size), "seed": ctx.seed})
    sets["real"] = real
    return sets


def _actreg_set(model: Path, out: Path, seed: int, images: int, iterations: int, start: str, weight: float) -> float:
    """Write an activation-range (or, at ``weight`` 0, stretch + balance) set in process; its seconds."""
    import time

    from onnxdgh.fileio import save_images_npz
    from onnxdgh.generation.activation import generate_actreg
    from onnxdgh.generation.config import GenerateConfig
    from onnxdgh.generation.core import resolve_normalization
    from onnxdgh.load import load_model

    started = time.perf_counter()
    loaded = load_model(model)
    config = GenerateConfig(images=images, iterations=iterations, seed=seed, method="actreg")
    array, report = generate_actreg(loaded, config, resolve_normalization(loaded, config), start=start,
                                    activation_weight=weight)
    save_images_npz(out, array, {"source": "generate_actreg", "start": start, "activation_weight": weight,
                                 "penalised_channels": report["penalised_channels"]})
    return time.perf_counter() - started


def _partial(ctx: bl.Context, model: Path, work: Path, args: argparse.Namespace, test_x: np.ndarray,
             test_y: np.ndarray, float_top1: float) -> dict[str, Any]:
    """The partial-BN comparison (``--partial K``): dgh on the kept layers vs procedural vs both."""
    from onnxdgh.fileio import load_images_npz, save_images_npz

    name = model.stem
    copy = fold_copy(model, work / f"{name}_keep{args.partial}.onnx", keep_last=args.partial)
    seed = ["--seed", str(ctx.seed)]
    sets: dict[str, Path] = {}
    dgh = work / "partial_dgh.npz"
    result = bl.run_onnxdgh(["generate", str(copy), "-o", str(dgh), "--images", str(args.opt_images),
                             "--iterations", str(args.opt_iterations), *seed], what="generate dgh (partial)",
                            in_process=ctx.smoke)
    note = f"dgh on {args.partial} BN layer(s): {args.opt_images} images x {args.opt_iterations} iterations, {result.wall_s:.0f} s"
    sets[f"dgh on the {args.partial} kept BN"] = dgh
    procedural = work / "partial_procedural.npz"
    bl.run_onnxdgh(["generate", str(copy), "-o", str(procedural), "--method", "procedural", "--images",
                    str(args.opt_images), *seed], what="generate procedural (partial)", in_process=ctx.smoke)
    sets["procedural"] = procedural
    mixed = work / "partial_mixed.npz"
    save_images_npz(mixed, np.concatenate([load_images_npz(dgh)[0], load_images_npz(procedural)[0]]),
                    {"source": "dgh + procedural"})
    sets["both (concatenated)"] = mixed
    sets["real"] = work / "real.npz"
    acc: dict[str, dict[str, float]] = {}
    for candidate, calib in sets.items():
        for weight, act in BITS[:1] if ctx.smoke else BITS:  # the smoke run only needs the path once
            out = work / f"p_{candidate.split()[0]}_W{weight}A{act}.onnx"
            bl.run_onnxdgh(["quantize", str(copy), "-o", str(out), "--calib-data", str(calib), "--seed", str(ctx.seed),
                            "--weight-bits", str(weight), "--act-bits", str(act)],
                           what=f"quantize ({candidate}) of {copy.name}", in_process=ctx.smoke)
            acc.setdefault(candidate, {})[f"W{weight}A{act}"] = top = bl.top1(out, test_x, test_y)
            bl.log(f"  partial {candidate:28s} W{weight}A{act} top-1 {100 * top:6.2f}%")
    return {"acc": acc, "notes": [note], "reference": float_top1, "kept": args.partial, "images": args.opt_images}


def _main_part(ctx: bl.Context, model: Path, folded: Path, work: Path, args: argparse.Namespace, test_x: np.ndarray,
               test_y: np.ndarray, pool: np.ndarray, folded_top1: float) -> dict[str, Any]:
    """Every candidate at every bit width on the fully folded copy."""
    notes: list[str] = []
    sets = _sets(ctx, folded, work, pool, args, notes)
    acc: dict[str, dict[str, float]] = {}
    for candidate, calib in sets.items():
        for weight, act in BITS:
            label = f"W{weight}A{act}"
            stem = "_".join("".join(c for c in candidate if c.isalnum() or c == " ").split()[:3])
            out = work / f"q_{stem}_{label}.onnx"
            cmd = ["quantize", str(folded), "-o", str(out), "--seed", str(ctx.seed)]
            if calib is not None:
                cmd += ["--calib-data", str(calib)]
            if (weight, act) != (8, 8):
                cmd += ["--weight-bits", str(weight), "--act-bits", str(act)]
            if ctx.smoke and calib is None:
                cmd += ["--images", "8"]
            result = bl.run_onnxdgh(cmd, what=f"quantize {label} ({candidate}) of {folded.name}", in_process=ctx.smoke)
            top = bl.top1(out, test_x, test_y)
            acc.setdefault(candidate, {})[label] = top
            bl.log(f"  {candidate:22s} {label} top-1 {100 * top:6.2f}%  ({result.wall_s:.0f} s)")
    return {"acc": acc, "notes": notes, "reference": folded_top1}


def _table(part: dict[str, Any]) -> str:
    labels = [f"W{w}A{a}" for w, a in BITS if any(f"W{w}A{a}" in cells for cells in part["acc"].values())]
    reference = part["reference"]
    rows = [[candidate] + [f"{100 * cells[label]:.2f} ({100 * (cells[label] - reference):+.2f})" for label in labels]
            for candidate, cells in part["acc"].items()]
    return bl.md_table(["calibration"] + labels, rows)


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "bn_free")
    info = bl.machine_info()
    command = bl.command_string()
    if ctx.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        args.opt_images, args.opt_iterations, args.real_images, args.act_iterations = 8, 2, 16, 2
        args.partial = args.partial or 1
    else:
        models = [] if args.render_only else bl.sample_models(args.models)
    load_before = bl.load_average()
    stored_path = ctx.work / "results.json"
    results: dict[str, Any] = json.loads(stored_path.read_text()) if stored_path.exists() and not ctx.smoke else {}
    for model in models:
        name = model.stem
        bl.log(f"== {name}")
        work = ctx.work / name
        work.mkdir(parents=True, exist_ok=True)
        folded = fold_copy(model, work / f"{name}_folded.onnx")
        test_x, test_y, pool, data_name = _dataset(model, args.test_limit, ctx.smoke, ctx.seed)
        float_top1 = bl.top1(model, test_x, test_y)
        folded_top1 = bl.top1(folded, test_x, test_y)
        bl.log(f"  float top-1 {100 * float_top1:.2f}% (folded copy {100 * folded_top1:.2f}%) on {test_x.shape[0]} images")
        entry = results.setdefault(name, {})
        entry.update({"float": float_top1, "folded": folded_top1, "data": f"{data_name}, {test_x.shape[0]} images"})
        if not args.skip_main:
            entry["main"] = {**_main_part(ctx, model, folded, work, args, test_x, test_y, pool, folded_top1),
                             "command": command}
        elif not (work / "real.npz").exists():
            raise bl.BenchError(f"--skip-main needs an earlier full run for {name} (its real.npz)")
        if args.partial:
            entry["partial"] = {**_partial(ctx, model, work, args, test_x, test_y, float_top1), "command": command}
        stored_path.write_text(json.dumps(results, indent=1))
    intro = [
        "BN-folded copies of the samples (`fold_copy`: onnxdgh's BN folding on the loaded model, metadata kept; "
        "no BatchNormalization left, so DGH has no targets). Quantization: `onnxdgh quantize FOLDED --calib-data SET "
        "[--weight-bits 4]` with the quantizer's defaults (power-of-two, rounding optimisation below 8 bits), except "
        "'procedural (no flags)': `onnxdgh quantize FOLDED -o Q [--weight-bits 4]`, which generates its own images "
        "(`--method auto` -> procedural, 256 images). 'noise': `generate --method noise` (256 images); "
        f"'real': {args.real_images} training images. The optimised sets ('dgh, no BN', 'stretch + balance', 'actreg') "
        "have 64 images (CPU time). Cells: top-1 % (difference to the float model in points).",
        "",
    ]
    body: list[str] = []
    for name, entry in results.items():
        if "main" in entry:
            body += [f"### {name}, BN folded ({entry['data']}; float {100 * entry['folded']:.2f})", "",
                     _table(entry["main"]), "", *[f"- {note}" for note in entry["main"]["notes"]]]
            if entry["main"]["command"] != command:
                body += [f"- measured by `{entry['main']['command']}`"]
            body += [""]
        if "partial" in entry:
            part = entry["partial"]
            body += [f"**{name} keeping only its last {part['kept']} BN layer(s)** (the rest folded; float "
                     f"{100 * entry['float']:.2f}): what `--method auto` could run there. {part['images']} images per "
                     "generated set ('both' = the dgh and procedural sets concatenated: what `--method auto` now runs on such a "
                     "model, as `mixed`, with half of its images from each); 'real' as above.", "",
                     _table(part), "", *[f"- {note}" for note in part["notes"]]]
            if part["command"] != command:
                body += [f"- measured by `{part['command']}`"]
            body += [""]
    bl.write_section("bn-free", "Models without BN statistics: calibration candidates (issue 15)",
                     "\n".join(intro + body), info=info, command=command, load_before=load_before,
                     load_after=bl.load_average(), doc=ctx.doc)
    bl.log(f"wrote {ctx.doc}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
