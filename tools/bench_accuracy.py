"""Zero-shot accuracy: float vs fully quantized top-1 per calibration source and bit width.

Usage (from the repository root, in the benchmark venv that has MCT and matplotlib)::

    bench-work/venv/bin/python tools/bench_accuracy.py                  # all samples, all parts
    bench-work/venv/bin/python tools/bench_accuracy.py --parts ablation --ablation-model fmnist_resnet8_silu
    bench-work/venv/bin/python tools/bench_accuracy.py --smoke          # seconds, tmp folder

For every Fashion-MNIST sample model (10,000-image test split, Debian package
``dataset-fashion-mnist``): the float top-1, then the model fully quantized by
``onnxdgh quantize --calib-data --no-validate`` at W8A8, W4A8, W4A4 (and W2A4 when the quantizer
offers rounding optimisation), calibrated on

- ``DGH``: ``onnxdgh generate`` with its defaults;
- ``real 512``: 512 training images drawn with the seed (the float model's own data);
- ``noise``: ``onnxdgh generate --method noise`` (Gaussian N(0, 1) in input space);
- ``BNS``: ``onnxdgh generate --method bns`` (per-batch BN matching, no prep, no ODSL);
- ``MCT``: Sony MCT's DGH (``tools/benchlib_mct.py``) on the same onnx2torch module, with
  onnxdgh's default image count, iterations, batch and crop margin.

Every quantization goes through the ``onnxdgh`` command line in a child process, so the
figures are what a user gets. Parts (``--parts``): ``sources`` (the main table),
``thresholds`` (``--threshold mse`` vs ``noclip`` at W8A8/W4A8 for DGH, real and noise),
``ablation`` (the DGH paper's Table 4: SAS / prep / ODSL switched on and off, 8 rows, one
model). Generated image sets are cached under ``bench-work/accuracy/`` keyed by their
settings (``--fresh`` regenerates). Writes one section per model (``accuracy-<model>``,
the sources table and the threshold table), ``accuracy-ablation`` and ``accuracy-plot``
of docs/BENCHMARKS.md, and ``docs/bench_accuracy.png`` (accuracy vs bit width per data
source, every model measured so far).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import itertools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import benchlib_mct  # noqa: E402

SOURCES = ("DGH", "real 512", "noise", "BNS", "MCT")
PARTS = ("sources", "thresholds", "ablation")


@dataclass(frozen=True)
class Bits:
    """One quantization setting of the table."""

    weight: int
    act: int
    rounding: bool | None = None  # None: the quantizer's default; True/False: forced

    @property
    def label(self) -> str:
        text = f"W{self.weight}A{self.act}"
        if self.rounding is True:
            text += " +round"
        elif self.rounding is False:
            text += " nearest"
        return text


@dataclass
class Dataset:
    """Evaluation images (model input space) and labels, plus the data for 'real' calibration."""

    test_x: np.ndarray
    test_y: np.ndarray
    train_pool: np.ndarray  # normalised training images to draw calibration sets from
    name: str


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--models", nargs="*", default=None, help="sample model names (default: all in samples/)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS, help="which tables to make")
    parser.add_argument("--sources", nargs="*", default=list(SOURCES), choices=SOURCES, help="calibration sources")
    parser.add_argument("--bits", nargs="*", default=None, metavar="LABEL",
                        help="bit settings to run, e.g. W8A8 'W4A4 nearest' 'W4A4 +round' (default: all). Cells of "
                             "earlier runs on the same calibration sets are kept, so a table can be filled in steps")
    parser.add_argument("--real-images", type=int, default=512, help="training images for the 'real' source (default 512)")
    parser.add_argument("--images", type=int, default=None, help="generated images (default: onnxdgh's default)")
    parser.add_argument("--iterations", type=int, default=None, help="generation iterations (default: onnxdgh's default)")
    parser.add_argument("--ablation-model", nargs="+", default=["fmnist_resnet8"],
                        help="model(s) of the ablation (default fmnist_resnet8); one section each")
    parser.add_argument("--ablation-bits", nargs="+", default=["W4A8 nearest", "W4A4 nearest"], metavar="LABEL",
                        help="bit settings of the ablation columns (default: 'W4A8 nearest' 'W4A4 nearest'; "
                             "'W4A4 +round' runs the rounding optimisation on every row)")
    parser.add_argument("--ablation-iterations", type=int, default=None,
                        help="generation iterations of the ablation runs (default: as --iterations)")
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images only")
    parser.add_argument("--fresh", action="store_true", help="regenerate cached calibration sets")
    parser.add_argument("--reuse-sets", action="store_true",
                        help="use cached generated sets even when onnxdgh's generator source changed since "
                             "(to add columns to a table measured on exactly those sets)")
    return parser.parse_args(argv)


def _all_bits(rounding_flags: tuple[str, str] | None) -> list[Bits]:
    """Every bit setting a table can have with this quantizer."""
    if not rounding_flags:
        return [Bits(8, 8), Bits(4, 8), Bits(4, 4)]
    # Rounding optimisation is what makes sub-8-bit weights usable (issue 7): show both.
    return [Bits(8, 8), Bits(4, 8, False), Bits(4, 8, True), Bits(4, 4, False), Bits(4, 4, True),
            Bits(2, 4, False), Bits(2, 4, True)]


# ------------------------------------------------------------------------ onnxdgh CLI


def _rounding_flags(help_text: str) -> tuple[str, str] | None:
    """The (on, off) flags of rounding optimisation when ``onnxdgh quantize`` has them."""
    for on, off in (("--optimize-rounding", "--no-optimize-rounding"), ("--rounding", "--no-rounding"),
                    ("--adaround", "--no-adaround")):
        if on in help_text:
            return on, (off if off in help_text else "")
    return None


def _generator_fingerprint() -> str:
    """Hash of the generator's source: a cached image set is reused only if it was made by this code."""
    import onnxdgh

    root = Path(onnxdgh.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("generation/*.py"), root / "convert.py", root / "load.py"]):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _generate(ctx: bl.Context, model: Path, out: Path, *, method: str, images: int | None, iterations: int | None,
              extra: list[str], fresh: bool, reuse: bool = False) -> dict[str, Any]:
    """``onnxdgh generate`` into ``out`` (cached per generator version); return its JSON report (with wall time)."""
    report_path = out.with_suffix(".json")
    fingerprint = _generator_fingerprint()
    if out.exists() and report_path.exists() and not fresh:
        cached = json.loads(report_path.read_text())
        settings = cached.get("settings", {})
        same = (images is None or settings.get("images") == images) and \
            (iterations is None or method == "noise" or settings.get("iterations") == iterations)
        if same and (cached.get("bench_fingerprint") == fingerprint or reuse):
            return cached
        bl.log(f"  {out.name} was made by another version of onnxdgh's generator: regenerating")
    args = ["generate", str(model), "-o", str(out), "--method", method, "--seed", str(ctx.seed), "--json", str(report_path)]
    if images is not None:
        args += ["--images", str(images)]
    if iterations is not None and method != "noise":
        args += ["--iterations", str(iterations)]
    args += extra
    bl.log(f"  onnxdgh {' '.join(args[:2])} {Path(args[1]).name} --method {method} {' '.join(extra)}")
    result = bl.run_onnxdgh(args, what=f"generate ({method}) on {model.name}", quiet=ctx.quiet, in_process=ctx.smoke)
    report = json.loads(report_path.read_text())
    report["bench_wall_s"] = round(result.wall_s, 2)
    report["bench_fingerprint"] = fingerprint
    report_path.write_text(json.dumps(report, indent=1))
    return report


def _quantize(ctx: bl.Context, model: Path, calib: Path, out: Path, bits: Bits, *, threshold: str | None,
              rounding_flags: tuple[str, str] | None, extra: list[str] | None = None) -> float:
    # --no-validate: the table measures top-1 itself. quantize's own check would hold back 20 % of
    # the calibration set (so every cell would calibrate on fewer images than the set has) and exit 1
    # below its profile's floor, as W4A8 with nearest rounding on DGH images does.
    args = ["quantize", str(model), "-o", str(out), "--calib-data", str(calib),
            "--weight-bits", str(bits.weight), "--act-bits", str(bits.act), "--no-validate"]
    if threshold:
        args += ["--threshold", threshold]
    if bits.rounding is not None and rounding_flags:
        flag = rounding_flags[0] if bits.rounding else rounding_flags[1]
        if flag:
            args.append(flag)
    args += extra or []
    result = bl.run_onnxdgh(args, what=f"quantize {bits.label} of {model.name} on {calib.name}", quiet=True,
                            in_process=ctx.smoke)
    return result.wall_s


# ------------------------------------------------------------------------ data


def _fashion_dataset(model: Path, test_limit: int | None) -> Dataset:
    import fashion_mnist as fm

    from onnxdgh.load import load_model

    norm = load_model(model).input_normalization()
    mean, std = (fm.MEAN, fm.STD) if norm is None else (tuple(map(float, norm[0])), tuple(map(float, norm[1])))
    try:
        test_u8, test_y = fm.load_split("test")
        train_u8, _ = fm.load_split("train")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    if test_limit:
        test_u8, test_y = test_u8[:test_limit], test_y[:test_limit]
    return Dataset(fm.normalize(test_u8, mean, std), test_y, fm.normalize(train_u8, mean, std), "Fashion-MNIST test split")


def _smoke_dataset(model: Path, seed: int) -> Dataset:
    """Random images labelled by the float model itself (float top-1 is 100% by construction)."""
    from onnxdgh.load import load_model

    shape = load_model(model).input_shape
    rng = np.random.default_rng(seed)
    test_x = rng.normal(0.0, 1.0, size=(64, *shape)).astype(np.float32)
    test_y = bl.predict(model, test_x).argmax(axis=1)
    pool = rng.normal(0.0, 1.0, size=(64, *shape)).astype(np.float32)
    return Dataset(test_x, test_y, pool, "random images labelled by the float model (smoke)")


def _real_set(ctx: bl.Context, data: Dataset, count: int, out: Path) -> Path:
    from onnxdgh.fileio import save_images_npz

    rng = np.random.default_rng(ctx.seed)
    index = np.sort(rng.choice(data.train_pool.shape[0], size=min(count, data.train_pool.shape[0]), replace=False))
    save_images_npz(out, data.train_pool[index], {"source": "training images", "count": int(index.size), "seed": ctx.seed})
    return out


def _mct_set(ctx: bl.Context, model: Path, out: Path, images: int | None, iterations: int | None,
             fresh: bool) -> dict[str, Any]:
    from onnxdgh.convert import to_torch
    from onnxdgh.fileio import save_images_npz
    from onnxdgh.generation.config import GenerateConfig
    from onnxdgh.generation.prep import auto_margin
    from onnxdgh.load import load_model

    report_path = out.with_suffix(".json")
    defaults = GenerateConfig()
    loaded = load_model(model)
    channels, height, width = loaded.input_shape
    n_images = images or defaults.images
    n_iter = iterations or defaults.iterations
    margin = auto_margin(height, width)
    if out.exists() and report_path.exists() and not fresh:
        cached = json.loads(report_path.read_text())
        # Same budget as onnxdgh's generation: reuse only a set made with today's settings.
        if (cached.get("images"), cached.get("iterations"), cached.get("batch_size"), cached.get("extra_pixels")) == (
                n_images, n_iter, defaults.batch_size, margin):
            return cached
        bl.log(f"  {out.name} was made with other settings than onnxdgh's current defaults: regenerating")
    norm = loaded.input_normalization()
    if norm is None:
        raise bl.BenchError(f"{model.name} has no input_mean/input_std metadata; MCT needs the normalisation")
    bl.log(f"  MCT data generation: {n_images} images x {n_iter} iterations, batch {defaults.batch_size}, margin {margin}")
    started = time.perf_counter()
    module = to_torch(loaded).module
    imgs = benchlib_mct.mct_generate(module, n_images=n_images, image_size=(height, width), channels=channels,
                                     mean=list(map(float, norm[0])), std=list(map(float, norm[1])), iterations=n_iter,
                                     batch_size=defaults.batch_size, extra_pixels=margin, seed=ctx.seed,
                                     progress=not ctx.quiet)
    wall = time.perf_counter() - started
    meta = {"source": "MCT", "mct": benchlib_mct.mct_version(), "images": n_images, "iterations": n_iter,
            "batch_size": defaults.batch_size, "extra_pixels": margin, "seed": ctx.seed, "bench_wall_s": round(wall, 2)}
    save_images_npz(out, imgs, meta)
    report_path.write_text(json.dumps(meta, indent=1))
    return meta


# ------------------------------------------------------------------------ tables


def _cell(value: float | None, reference: float | None = None) -> str:
    if value is None:
        return "—"
    text = f"{100 * value:.2f}"
    if reference is not None:
        text += f" ({100 * (value - reference):+.2f})"
    return text


def _plot(results: dict[str, dict[str, Any]], bit_labels: list[str], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bl.log("matplotlib not installed: no plot")
        return None
    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 3.8), squeeze=False)
    markers = dict(zip(SOURCES, "os^Dv"))
    for ax, name in zip(axes[0], names):
        res = results[name]
        x = list(range(len(bit_labels)))
        for source in SOURCES:
            if source not in res["acc"]:
                continue
            ys = [res["acc"][source].get(label) for label in bit_labels]
            # Lines join the nearest-rounding settings only; '+round' points stand alone
            # (a line through them would suggest a trend across different methods).
            plain = [(i, y) for i, y, label in zip(x, ys, bit_labels) if y is not None and "+round" not in label]
            line = ax.plot([i for i, _ in plain], [100 * y for _, y in plain], marker=markers[source], label=source)[0]
            rounded = [(i, y) for i, y, label in zip(x, ys, bit_labels) if y is not None and "+round" in label]
            if rounded:
                ax.plot([i for i, _ in rounded], [100 * y for _, y in rounded], linestyle="none", marker=markers[source],
                        markersize=9, markerfacecolor="none", color=line.get_color())
        ax.axhline(100 * res["float"], color="black", linestyle="--", linewidth=1, label="float")
        ax.set_xticks(x, bit_labels, fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.set_ylabel("top-1 (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Fully quantized top-1 vs bit width, per calibration source", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ main


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "accuracy")
    info = bl.machine_info()
    help_text = bl.command_help("quantize")
    rounding_flags = _rounding_flags(help_text)
    use_mct, mct_text = benchlib_mct.mct_available()
    sources = list(args.sources)
    if "MCT" in sources and not use_mct:
        if not args.smoke:
            raise bl.BenchError(f"{mct_text}; run with bench-work/venv/bin/python, or leave MCT out with --sources")
        sources.remove("MCT")
        bl.log(f"MCT left out: {mct_text}")

    if args.smoke:
        models = [bl.tiny_classifier(ctx.work / "tiny.onnx", channels=1, size=(12, 12))]
        images, iterations, ablation_iterations, real_count = 16, 3, 2, 16
    else:
        models = bl.sample_models(args.models)
        images, iterations, real_count = args.images, args.iterations, args.real_images
        ablation_iterations = args.ablation_iterations or iterations

    bit_settings = _all_bits(rounding_flags)
    all_labels = [b.label for b in bit_settings]
    if args.bits:
        unknown = [label for label in args.bits if label not in all_labels]
        if unknown:
            raise bl.BenchError(f"--bits {', '.join(unknown)}: choose from {', '.join(all_labels)}")
        bit_settings = [b for b in bit_settings if b.label in args.bits]
    # The threshold question is about calibration; nearest rounding keeps that table cheap.
    threshold_bits = [Bits(8, 8), Bits(4, 8, False if rounding_flags else None)]
    threshold_sources = ("DGH", "real 512", "noise")
    if args.smoke:
        # Every code path once, few commands: the smoke run must take seconds.
        sources = [s for s in sources if s in ("DGH", "real 512", "MCT")]
        bit_settings = [b for b in bit_settings if b.label in ("W8A8", "W4A4", "W4A4 nearest", "W4A4 +round")]
        threshold_bits, threshold_sources = [Bits(8, 8)], ("DGH",)

    ablation_names = {Path(m).stem for m in args.ablation_model}
    ablation_bits = [b for b in _all_bits(rounding_flags) if b.label in args.ablation_bits]
    unknown = set(args.ablation_bits) - {b.label for b in ablation_bits}
    if unknown:
        raise bl.BenchError(f"--ablation-bits {', '.join(sorted(unknown))}: choose from "
                            f"{', '.join(b.label for b in _all_bits(rounding_flags))}")
    command = bl.command_string()
    rounding_text = ("`" + " / ".join(f for f in rounding_flags if f) + "`") if rounding_flags else "not available in this quantizer"
    written = 0
    for model in models:
        name = model.stem
        ablation_only = "sources" not in args.parts and "thresholds" not in args.parts
        if ablation_only and not args.smoke and name not in ablation_names:
            continue
        bl.log(f"== {name}")
        load_before = bl.load_average()
        work = ctx.work / name
        work.mkdir(parents=True, exist_ok=True)
        data = _smoke_dataset(model, ctx.seed) if args.smoke else _fashion_dataset(model, args.test_limit)
        float_top1 = bl.top1(model, data.test_x, data.test_y)
        bl.log(f"  float top-1 {100 * float_top1:.2f}% on {data.test_x.shape[0]} images")
        stored_path = work / "results.json"
        res: dict[str, Any] = json.loads(stored_path.read_text()) if stored_path.exists() and not args.smoke else {}
        res.update({"model": name, "float": float_top1})
        for key in ("acc", "thresholds", "calib_hash", "gen_notes"):
            res.setdefault(key, {})
        res.setdefault("commands", [])
        if command not in res["commands"]:
            res["commands"].append(command)

        filled: set[tuple[str, str, str]] = set()  # the cells this run measured
        calib: dict[str, Path] = {}
        need = set(sources) if ("sources" in args.parts) else set()
        if "thresholds" in args.parts:
            need |= set(threshold_sources) & set(sources)
        for source in [s for s in SOURCES if s in need]:
            out = work / (source.replace(" ", "_").lower() + ".npz")
            if source == "real 512":
                calib[source] = _real_set(ctx, data, real_count, out)
                _track(res, source, out)
                continue
            if source == "MCT":
                meta = _mct_set(ctx, model, out, images, iterations, args.fresh)
                res["gen_notes"][source] = (f"MCT {meta.get('mct', '')}: {meta['images']} images x {meta['iterations']} "
                                            f"iterations, batch {meta['batch_size']}, margin {meta['extra_pixels']}: "
                                            f"{meta['bench_wall_s']:.0f} s")
            else:
                method = {"DGH": "dgh", "noise": "noise", "BNS": "bns"}[source]
                report = _generate(ctx, model, out, method=method, images=images, iterations=iterations, extra=[],
                                   fresh=args.fresh, reuse=args.reuse_sets)
                settings = report.get("settings", {})
                final = report.get("final", {})
                loss = ""
                if method != "noise" and final.get("bns_loss_last_iteration") is not None:
                    loss = f", whole-set BN loss {final.get('bns_loss_initial', float('nan')):.4g} -> {final['bns_loss_last_iteration']:.4g}"
                res["gen_notes"][source] = (f"{source} (`onnxdgh generate --method {method}`): {settings.get('images')} "
                                            f"images x {settings.get('iterations') if method != 'noise' else 0} "
                                            f"iterations{loss}: {report.get('bench_wall_s', float('nan')):.0f} s")
            calib[source] = out
            _track(res, source, out)

        body: list[str] = [
            f"Evaluation: {data.name} ({data.test_x.shape[0]} images). Calibration sets: onnxdgh defaults unless the "
            f"command overrides them, seed {ctx.seed}; 'real 512' = {real_count} training images drawn with the seed. "
            f"Quantization: `onnxdgh quantize --calib-data SET --weight-bits W --act-bits A --no-validate` (every tensor, "
            f"power-of-two, default threshold rule, every image of the set used for calibration). Rounding optimisation flags: {rounding_text}. "
            "Each cell: top-1 % (difference to float in points).", ""]
        if "sources" in args.parts:
            for source in [s for s in SOURCES if s in calib]:
                for bits in bit_settings:
                    q = work / f"q_{source.replace(' ', '_').lower()}_{bits.label.replace(' ', '_').replace('+', '')}.onnx"
                    seconds = _quantize(ctx, model, calib[source], q, bits, threshold=None, rounding_flags=rounding_flags)
                    acc = bl.top1(q, data.test_x, data.test_y)
                    res["acc"].setdefault(source, {})[bits.label] = acc
                    filled.add(("acc", source, bits.label))
                    bl.log(f"  {source:9s} {bits.label:14s} top-1 {100 * acc:6.2f}%  (quantize {seconds:.1f} s)")
        shown = [label for label in all_labels if any(label in cells for cells in res["acc"].values())]
        if shown:
            rows = [["float", _cell(float_top1)] + [""] * (len(shown) - 1)]
            for source in [s for s in SOURCES if s in res["acc"]]:
                rows.append([source] + [_cell(res["acc"][source].get(label), float_top1) for label in shown])
            body += [bl.md_table(["calibration"] + shown, rows), ""]
            body += _targets(name, res, float_top1) + [""]

        if "thresholds" in args.parts:
            for source in [s for s in threshold_sources if s in calib]:
                for bits in threshold_bits:
                    for threshold in ("mse", "noclip"):
                        q = work / f"t_{source.replace(' ', '_').lower()}_{bits.label.replace(' ', '_')}_{threshold}.onnx"
                        _quantize(ctx, model, calib[source], q, bits, threshold=threshold, rounding_flags=rounding_flags)
                        acc = bl.top1(q, data.test_x, data.test_y)
                        res["thresholds"].setdefault(source, {})[f"{bits.label} {threshold}"] = acc
                        filled.add(("thresholds", source, f"{bits.label} {threshold}"))
                        bl.log(f"  threshold {threshold:6s} {source:9s} {bits.label}: {100 * acc:.2f}%")
        columns = [c for c in (f"{label} {t}" for label in all_labels for t in ("mse", "noclip"))
                   if any(c in cells for cells in res["thresholds"].values())]
        if columns:
            rows = [[source] + [_cell(res["thresholds"][source].get(c), float_top1) for c in columns]
                    for source in SOURCES if source in res["thresholds"]]
            body += ["**Threshold rule** forced with `--threshold`: HPTQ's MSE search over power-of-two candidates "
                     "vs the no-clipping power of two (top-1 %, difference to float):", "",
                     bl.md_table(["calibration"] + columns, rows), ""]
        if res["gen_notes"]:
            body += ["Generation of the calibration sets (wall time on this machine, under the load recorded above; "
                     "cached sets keep the time of the run that made them):", "",
                     *[f"- {res['gen_notes'][s]}" for s in SOURCES if s in res["gen_notes"]], ""]
        every_cell = {("acc", src, label) for src, cells in res["acc"].items() for label in cells} | \
            {("thresholds", src, label) for src, cells in res["thresholds"].items() for label in cells}
        if every_cell <= filled:
            res["commands"] = [command]  # this run measured every cell shown: earlier commands no longer apply
        if len(res["commands"]) > 1:
            body += ["The cells of this section were filled by these commands (cached calibration sets shared):", "",
                     "```bash", *res["commands"], "```"]
        if "sources" in args.parts or "thresholds" in args.parts:
            stored_path.write_text(json.dumps(res, indent=1))
            bl.write_section(f"accuracy-{name.replace('_', '-').lower()}", f"Zero-shot accuracy: {name} (issue 6 item 1, issues 4 and 7)",
                             "\n".join(body), info=info, command=command, load_before=load_before,
                             load_after=bl.load_average(), doc=ctx.doc)
            written += 1

        if "ablation" in args.parts and (args.smoke or name in ablation_names):
            load_before = bl.load_average()
            bits_list = ablation_bits
            if args.smoke:
                bits_list = [Bits(4, 4, False if rounding_flags else None)]
            lines = _ablation(ctx, model, work, data, float_top1, images, ablation_iterations, bits_list, args.fresh)
            bl.write_section(f"accuracy-ablation-{name.replace('_', '-').lower()}",
                             f"DGH ablation (paper Table 4): SAS, prep, ODSL on {name}", "\n".join(lines),
                             info=info, command=command, load_before=load_before, load_after=bl.load_average(), doc=ctx.doc)
            written += 1

    # The plot gathers every model measured so far (this run or earlier ones, same work folder).
    stored = {}
    for path in sorted(ctx.work.glob("*/results.json")):
        item = json.loads(path.read_text())
        stored[item["model"]] = item
    if stored and ("sources" in args.parts):
        labels = [label for label in all_labels if any(label in a for r in stored.values() for a in r["acc"].values())]
        figure = _plot(stored, labels, ctx.figures / "bench_accuracy.png")
        if figure is not None:
            body = [f"Models: {', '.join(stored)} (each from its own section's run above). Dashed line: float top-1.", "",
                    f"![accuracy vs bit width]({figure.name})"]
            bl.write_section("accuracy-plot", "Zero-shot accuracy vs bit width (plot)", "\n".join(body), info=info,
                             command=command, load_before=bl.load_average(), load_after=bl.load_average(), doc=ctx.doc)
    if not written:
        raise bl.BenchError("nothing was measured: check --models, --parts and --ablation-model")
    bl.log(f"wrote {ctx.doc}")
    return 0


def _track(res: dict[str, Any], source: str, calib: Path) -> None:
    """Forget a source's cells when its calibration set changed since they were measured."""
    digest = hashlib.sha256(calib.read_bytes()).hexdigest()[:16]
    if res["calib_hash"].get(source) != digest:
        res["acc"].pop(source, None)
        res["thresholds"].pop(source, None)
        res["calib_hash"][source] = digest


def _targets(name: str, res: dict[str, Any], float_top1: float) -> list[str]:
    """Issue 4/7 targets checked against this model's row, as plain sentences."""
    acc = res["acc"]
    lines = []
    dgh8 = acc.get("DGH", {}).get("W8A8")
    real8 = acc.get("real 512", {}).get("W8A8")
    if dgh8 is not None:
        gap = 100 * (float_top1 - dgh8)
        lines.append(f"- W8A8 DGH is {gap:.2f} points below float (target <= 0.5): **{'met' if gap <= 0.5 else 'NOT met'}**.")
    if dgh8 is not None and real8 is not None:
        gap = 100 * (real8 - dgh8)
        lines.append(f"- W8A8 DGH vs real 512: {gap:+.2f} points behind real (target <= 0.3): **{'met' if gap <= 0.3 else 'NOT met'}**.")
    for label in ("W4A4 +round", "W4A4"):
        value = acc.get("DGH", {}).get(label)
        if value is not None:
            gap = 100 * (float_top1 - value)
            lines.append(f"- {label} DGH is {gap:.2f} points below float (issue 7 target <= 4): **{'met' if gap <= 4 else 'NOT met'}**.")
            real = acc.get("real 512", {}).get(label)
            if real is not None:
                diff = 100 * (real - value)
                lines.append(f"- {label} DGH vs real 512: {diff:+.2f} points behind real (issue 7 target <= 1): "
                             f"**{'met' if diff <= 1 else 'NOT met'}**.")
            break
    return lines


def _ablation(ctx: bl.Context, model: Path, work: Path, data: Dataset, float_top1: float, images: int | None,
              iterations: int | None, bits_list: list[Bits], fresh: bool) -> list[str]:
    """The paper's Table 4 on one model: 8 on/off combinations of SAS, prep and ODSL."""
    rounding_flags = _rounding_flags(bl.command_help("quantize"))
    rows = []
    curves: list[tuple[str, list[list[float]]]] = []
    combos = list(itertools.product((False, True), repeat=3))
    if ctx.smoke:
        combos = [combos[0], combos[-1]]
    for sas, prep, odsl in combos:
        flags = [f"--{'' if sas else 'no-'}sas", f"--{'' if prep else 'no-'}prep", f"--{'' if odsl else 'no-'}odsl"]
        tag = "".join(str(int(v)) for v in (sas, prep, odsl))
        out = work / f"ablation_{tag}.npz"
        report = _generate(ctx, model, out, method="dgh", images=images, iterations=iterations, extra=flags, fresh=fresh)
        final = report.get("final", {})
        row = ["✓" if sas else "", "✓" if prep else "", "✓" if odsl else ""]
        bns = final.get("bns_loss_last_iteration")
        row.append("—" if bns is None else f"{bns:.4g}")
        on = [name for name, flag in (("SAS", sas), ("prep", prep), ("ODSL", odsl)) if flag]
        curves.append(("+".join(on) or "all off", final.get("bns_loss_history") or []))
        for bits in bits_list:
            q = work / f"ablation_{tag}_{bits.label.replace(' ', '_').replace('+', '')}.onnx"
            _quantize(ctx, model, out, q, bits, threshold=None, rounding_flags=rounding_flags)
            acc = bl.top1(q, data.test_x, data.test_y)
            row.append(_cell(acc, float_top1))
            bl.log(f"  ablation sas={sas} prep={prep} odsl={odsl} {bits.label}: {100 * acc:.2f}%")
        rows.append(row)
    settings = f"{images or 'default'} images x {iterations or 'default'} iterations"
    plot = _plot_losses(curves, ctx.doc.parent / f"bench_ablation_loss_{model.stem}.png", model.stem)
    figure = [f"", f"![BN-statistics loss per iteration]({plot.name})"] if plot else []
    return [f"Model {model.stem} (float top-1 {100 * float_top1:.2f}%), {settings}, seed {ctx.seed}. "
            "The first row (all off) is per-batch BN matching without prep or ODSL; the last (all on) is DGH. "
            "'BNS loss' is the whole-set BN-statistics loss at the last iteration as onnxdgh reports it. "
            "With nearest rounding the images reach the quantized model only through the power-of-two "
            "thresholds they select, so equal 'nearest' cells are usually bit-identical models.", "",
            bl.md_table(["SAS", "prep", "ODSL", "BNS loss"] + [b.label for b in bits_list], rows), *figure]


def _plot_losses(curves: list[tuple[str, list[list[float]]]], path: Path, name: str) -> Path | None:
    """Whole-set BN-statistics loss against iteration, one line per ablation row (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        bl.log("matplotlib not installed: no loss plot")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, points in curves:
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("whole-set BNS loss (Eq. 4)")
    ax.set_title(f"DGH ablation on {name}: BN-statistics loss during generation", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    bl.main_wrapper(lambda: run(sys.argv[1:]))
