"""``onnxdgh generate``: DGH synthetic calibration images for an ONNX model.

Writes float32 N x C x H x W images in the model's input space plus the settings, seed
and final losses (key ``meta`` of the ``.npz``); ``--preview`` adds a PNG contact sheet and
``--json`` the full report. Every output path is checked before any work starts, against
the model and the other outputs (:func:`~onnxdgh.fileio.check_output_paths`).
Exit codes: 0 success, 1 the generation diverged (non-finite or rising BN loss; nothing
written), 2 bad input (options, model, paths, memory, an input normalisation that cannot
be decided), 130 interrupted.
"""

from __future__ import annotations

import json
import os
from typing import Any

import click

from .common import bn_targets, echo_err, float_list, input_shape_option, preflight, preprocess_option, progress_enabled, run_command

__all__ = ["generate_command"]

def summary(report: dict[str, Any], output: str) -> list[str]:
    """Terminal lines summarising a generation report."""
    final = report.get("final", {})
    settings = report["settings"]
    lines = [
        f"wrote {final.get('images', settings['images'])} images "
        f"({'x'.join(str(d) for d in report['input_shape'])}, method {report['method']}, seed {report['seed']}) to {output}"
        + bn_targets(report)
    ]
    if "bns_loss" in final:
        start = final.get("bns_loss_initial")
        start_text = f"{start:.4g} -> " if isinstance(start, (int, float)) else ""
        lines.append(f"BN statistics loss {start_text}{final['bns_loss']:.4g} (whole set, final images)")
    if "output_range" in final:
        spread = final["output_range"]
        lines.append(
            f"output range per image {spread['mean']:.3g} (min {spread['min']:.3g}, max {spread['max']:.3g}); "
            f"values {final['output_min']:.3g} .. {final['output_max']:.3g}"
        )
    stages = report.get("resolution_stages") or []
    if len(stages) > 1:
        lines.append("coarse to fine: " + ", then ".join(
            f"{st['iterations'][1] - st['iterations'][0]} iterations at {st['size'][0]}x{st['size'][1]}" for st in stages))
    if report.get("stopped_on_plateau"):
        lines.append(f"stopped after {report['iterations_run']} of {settings['iterations']} iterations: "
                     f"the whole-set BN loss had not improved for {settings['plateau_stop']} (--plateau-stop)")
    timings = report.get("timings", {})
    if timings.get("image_iterations_per_s"):
        lines.append(f"time {timings['total_s']:.1f} s ({timings['image_iterations_per_s']:.0f} image-iterations/s)")
    return lines


@click.command("generate")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=True, path_type=str), help="Images file to write (.npz).")
@click.option("--images", type=int, default=None, help="Number of images (default 256).")
@click.option("--iterations", type=int, default=None, help="Optimisation passes over all batches (default 200).")
@click.option("--batch-size", type=int, default=None, help="Images optimised together (default 64).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for identical images on rerun.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--method", default="auto", show_default=True,
              help="auto (dgh when the model has BN statistics, mixed when few layers do, else procedural), dgh, "
                   "bns (BN matching per batch), noise (Gaussian), procedural (data-free natural-image priors, for "
                   "models without BN), mixed (half dgh, half procedural) or actreg (procedural images refined "
                   "through the model by activation-range regularisation; no BN needed).")
@click.option("--sas/--no-sas", default=None, help="Statistics aggregation over the whole set (default: on for dgh).")
@click.option("--prep/--no-prep", default=None, help="Smoothing + flip + crop every step (default: on for dgh).")
@click.option("--odsl/--no-odsl", default=None, help="Output distribution stretching loss (default: on for dgh).")
@click.option("--odsl-lambda", type=float, default=None, help="Weight of the stretching loss (Eq. 8; default 0.001).")
@click.option("--odsl-delta", type=float, default=None, help="Allowed squared deviation at the last BN (Eq. 7; default 0.5 x ||sigma_L||^2).")
@click.option("--lr", type=float, default=None, help="Initial learning rate (paper: 16).")
@click.option("--optimizer", default=None, help="radam (default) or adam.")
@click.option("--scheduler", default=None, help="plateau (default) or none.")
@click.option("--patience", type=int, default=None, help="Plateau patience in iterations (default iterations/50).")
@click.option("--plateau-stop", type=int, default=None, metavar="N",
              help="Stop early once the whole-set BN loss has not improved by 1% for N iterations "
                   "(default: run all --iterations).")
@click.option("--coarse-to-fine", default=None, metavar="SCALE:UNTIL[,...]|auto|off",
              help="Resolution schedule: optimise at SCALE x the input size until UNTIL x --iterations, then "
                   "upsample (bilinear) and finish at full size, e.g. 0.5:0.75; auto: 0.5:0.75 when the model runs "
                   "at half size, else full size (default: off, full size throughout).")
@click.option("--factor", type=float, default=None, help="Plateau reduction factor (default 0.5).")
@click.option("--min-lr", type=float, default=None, help="Plateau floor (default 1e-4).")
@click.option("--crop-margin", type=int, default=None, help="Extra canvas pixels for random crops (default ~side/7).")
@click.option("--smoothing-sigma", type=float, default=None, help="Sigma of the 3x3 smoothing prior (default 1.25).")
@click.option("--mean", "mean_text", default=None, help="Input mean per channel, pixels in [0,1], e.g. 0.485,0.456,0.406.")
@click.option("--std", "std_text", default=None, help="Input std per channel, e.g. 0.229,0.224,0.225.")
@preprocess_option
@click.option("--stats-refresh", default=None, help="reuse (default) or rerun: how a batch's stored statistics are refreshed.")
@click.option("--allow-no-bn", is_flag=True, help="Run DGH on a model without BN statistics (prep + ODSL only).")
@click.option("--channels-last/--no-channels-last", "channels_last", default=None,
              help="Run the model on NHWC tensors (default on: faster oneDNN convolutions on CPU).")
@click.option("--distributed", is_flag=True,
              help="Split the batches over the processes of a torchrun launch (gloo on CPU, NCCL with --device cuda); "
                   "the same images as one process; rank 0 writes the outputs.")
@click.option("--checkpoint", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Checkpoint file for long runs (with --distributed: one file per rank, PATH.rankN).")
@click.option("--checkpoint-every", type=int, default=None, help="Iterations between checkpoints (default 25).")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint.")
@click.option("--preview", type=click.Path(dir_okay=True, path_type=str), default=None, help="Write a PNG contact sheet.")
@click.option("--json", "json_out", type=click.Path(dir_okay=True, allow_dash=True, path_type=str), default=None,
              help="Write the report as JSON to this file ('-' for stdout).")
@input_shape_option
@click.pass_context
@run_command
def generate_command(ctx: click.Context, model: str, output: str, mean_text: str | None, std_text: str | None,
                     preview: str | None, json_out: str | None, input_shape: tuple[int, int, int] | None,
                     **options: Any) -> int:
    """Generate synthetic calibration images for MODEL: DGH from its BatchNorm statistics, or procedural images without them.

    \b
    Exit codes: 0 success, 1 the generation diverged (no images written), 2 bad input,
    130 interrupted.
    """
    from ..fileio import atomic_write_bytes, atomic_write_json, check_output_paths, save_images_npz
    from ..generation import GenerateConfig, generate
    from ..generation.preview import contact_sheet_png
    from ..load import load_model

    check_output_paths(
        [("-o/--output", output), ("--preview", preview), ("--checkpoint", options.get("checkpoint")),
         ("--json", json_out if json_out != "-" else None)],
        inputs=[("MODEL", model)],
    )

    # unset options leave GenerateConfig's defaults (its flags default to False, as click's do)
    given = {key: value for key, value in options.items() if value is not None}
    config = GenerateConfig(mean=float_list("--mean", mean_text), std=float_list("--std", std_text), **given)
    loaded = load_model(model, input_shape=input_shape)
    # Under torchrun every rank runs this command: only rank 0 (torchrun's RANK) talks.
    quiet = bool(ctx.obj and ctx.obj.get("quiet")) or (config.distributed and os.environ.get("RANK", "0") != "0")
    preflight(loaded, config, quiet)
    result = generate(loaded, config, progress=progress_enabled(ctx))
    if result.rank != 0:
        return 0  # every rank holds the images; rank 0 writes them

    save_images_npz(output, result.images, meta=result.report)
    if preview:
        norm = result.report["normalization"]
        atomic_write_bytes(preview, contact_sheet_png(result.images, norm["mean"], norm["std"]))  # type: ignore[arg-type]
    if json_out == "-":
        click.echo(json.dumps(result.report, indent=2))
    elif json_out:
        atomic_write_json(json_out, result.report)
    if json_out != "-" and not quiet:
        for line in summary(result.report, output):
            click.echo(line)
    return 0
