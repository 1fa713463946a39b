"""``onnxdgh validate``: does a quantized model fit the target, and does it still answer like the float one?

Exit codes: 0 pass, 1 constraint violations or a gate not reached, 2 bad input.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from .common import echo_err, input_shape_option, progress_enabled, run_command
from ..errors import EXIT_CHECK_FAILED, EXIT_OK, CalibrationDataError, InvalidInputError
from ..fileio import open_numpy, read_npz_array
from ..profile import DEFAULT_PROFILE, builtin_profiles, load_profile
from ..validation import OutputMetrics, ValidateConfig, ValidationReport, validate
from ..validation.metrics import DEFAULT_IOU_THRESHOLD, METRICS

__all__ = ["validate_command", "render", "render_profiles", "load_labels"]


def load_labels(path: str) -> np.ndarray:
    """Class indices from a ``.npy`` array or the ``labels`` array of an ``.npz`` (never unpickled)."""
    src = Path(path)
    if not src.is_file():
        raise InvalidInputError(f"labels file {src} does not exist", "give a .npy file of class indices")
    what, hint = f"labels file {src}", "save them with numpy.save(path, labels)"
    loaded = open_numpy(src, what=what, hint=hint)
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded:
        if "labels" not in loaded.files:
            raise InvalidInputError(
                f"labels file {src} has no 'labels' array (it has: {', '.join(loaded.files) or 'nothing'})",
                "store them as numpy.savez(path, labels=array) or numpy.save(path, array)",
            )
        return read_npz_array(loaded, "labels", what=what, hint=hint)


def _db(value: float | None) -> str:
    return {None: "-", math.inf: "exact", -math.inf: "-inf"}.get(value) or f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(map(len, column)) for column in zip(headers, *rows)]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
            for row in [headers, *rows]]


def render(report: ValidationReport, *, top: int = 10) -> str:
    """The report as terminal text: verdict, violations, outputs, worst layers, gates."""
    lines = [f"model       {report.model}" + (f"  sha256 {report.model_sha256}" if report.model_sha256 else "")]
    if report.reference:
        lines.append(f"reference   {report.reference}"
                     + (f"  sha256 {report.reference_sha256}" if report.reference_sha256 else ""))
    lines.append(f"profile     {report.profile.name}: {report.profile.summary()}")
    stats = report.quantization
    weights = ", ".join(f"{count} x {bits}-bit" for bits, count in stats["weights_by_bits"].items()) or "none"
    acts = ", ".join(f"{count} x {bits}-bit" for bits, count in stats["activations_by_bits"].items()) or "none"
    lines.append(f"quantizers  {stats['quantize_nodes']} Q / {stats['dequantize_nodes']} DQ; weights {weights}; activations {acts}")
    if report.data:
        lines.append(f"data        {report.data.description}{', labelled' if report.data.labelled else ''}")
    lines.append("")
    if report.violations:
        counts = ", ".join(f"{rule} {n}" for rule, n in sorted(report.violation_counts.items()))
        lines.append(f"Structure: {len(report.violations)} violation(s) ({counts})")
        rows = [[v.rule, v.node or "-", v.tensor or "-"] for v in report.violations]
        table = _table(["RULE", "NODE", "TENSOR"], rows)
        lines.append(table[0])
        for row_line, violation in zip(table[1:], report.violations):
            lines.append(row_line)
            lines.append(f"      {violation.message}")
    else:
        lines.append(f"Structure: no violations of {report.profile.name}")
    if report.outputs:
        lines.append("")
        lines.append("Outputs")
        rows = [
            [o.name, _db(o.sqnr_db), f"{o.cosine:.5f}", _metric(o), _pct(o.agreement), _pct(o.float_accuracy),
             _pct(o.quantized_accuracy), _db(o.runtime_sqnr_db)]
            for o in report.outputs
        ]
        lines += _table(["OUTPUT", "SQNR dB", "COSINE", "METRIC", "AGREEMENT", "FLOAT ACC", "QUANT ACC", "ORT-OPT SQNR"],
                        rows)
    if report.layers:
        shown = report.layers[: max(0, top)]
        lines.append("")
        lines.append(f"Worst layers ({len(shown)} of {len(report.layers)}, lowest SQNR first)")
        rows = [[_db(m.sqnr_db), f"{m.cosine:.5f}", str(m.bits or "-"), m.tensor, f"{m.node} ({m.op_type})"] for m in shown]
        lines += _table(["SQNR dB", "COSINE", "BITS", "TENSOR", "NODE (OP)"], rows)
    first = (report.diagnosis or {}).get("first_bad_layer")
    if first:
        lines.append(f"  error made first at {first['node']} ({first['op_type']}): SQNR {first['input_sqnr_db']:.1f} -> "
                     f"{first['sqnr_db']:.1f} dB; addresses it: {first['options']}")
    if report.unmatched_layers:
        lines.append(f"  not compared (no float counterpart): {', '.join(report.unmatched_layers[:5])}"
                     f"{' ...' if len(report.unmatched_layers) > 5 else ''}")
    for title, checks in (("Gates", report.gates), ("Runtime (onnxruntime optimised vs exact QDQ simulation)",
                                                        report.runtime_checks)):
        if not checks:
            continue
        lines.append("")
        lines.append(title)
        for gate in checks:
            source = {"profile": "profile floor", "runtime": "runtime check"}.get(gate.origin, f"--{gate.gate}")
            if gate.gate.endswith("-sqnr"):
                unit = " dB" if gate.value is not None and math.isfinite(gate.value) else ""
                text = f"SQNR of {gate.output}: {_db(gate.value)}{unit} (needs >= {gate.threshold:g} dB, {source})"
            else:
                text = f"{gate.measure} of {gate.output}: {_pct(gate.value)} (needs >= {_pct(gate.threshold)}, {source})"
            lines.append(f"  {'pass' if gate.passed else 'FAIL'}  {text}")
        hints = dict.fromkeys(gate.hint for gate in checks if gate.hint and not gate.passed)
        lines += [f"  hint: {hint}" for hint in hints]
    lines.append("")
    if report.passed:
        lines.append("verdict     PASS")
    else:
        counts = ((report.violations, "violation(s)"), (report.failed_gates, "gate(s) failed"),
                  (report.failed_runtime_checks, "runtime check(s) failed"))
        reasons = [f"{len(items)} {what}" for items, what in counts if items]
        lines.append(f"verdict     FAIL ({', '.join(reasons)})")
    return "\n".join(lines)


def _metric(output: OutputMetrics) -> str:
    """The output's agreement metric as a table cell (``iou@0.3``, ``sequence (exact 80.00%)``)."""
    if output.metric == "iou":
        return f"iou@{output.iou_threshold:g}"
    if output.metric == "sequence":
        return f"sequence (exact {_pct(output.sequence_exact)})"
    return output.metric or "-"


def render_profiles() -> str:
    """The built-in profiles, one line each."""
    profiles = builtin_profiles()
    width = max(len(name) for name in profiles)
    lines = []
    for name, profile in profiles.items():
        marker = " (default)" if name == DEFAULT_PROFILE else ""
        lines.append(f"{name.ljust(width)}  {profile.summary()}{marker}")
        lines.append(f"{''.ljust(width)}  {profile.description}")
    return "\n".join(lines)


@click.command("validate")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=str))
@click.option("-r", "--reference", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="The float model MODEL was made from; enables the numerical report.")
@click.option("-p", "--profile", "profile_name", default=None, metavar="NAME|PATH",
              help="Built-in profile name or a profile .json file. Default: the profile recorded in MODEL by "
                   f"`onnxdgh quantize`, else {DEFAULT_PROFILE}.")
@click.option("--data", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Images (.npz with 'images', or .npy; float N x C x H x W, preprocessed). Default: random images.")
@click.option("--labels", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Class indices for --data (.npy, or .npz with 'labels'): adds accuracy.")
@click.option("--min-sqnr", type=float, default=None, metavar="DB",
              help="Fail when an output's SQNR is below DB (replaces the profile's floor).")
@click.option("--min-agreement", type=float, default=None, metavar="FRAC",
              help="Fail when an output's agreement (--metric) is below FRAC, 0..1 (replaces the profile's top-1 floor).")
@click.option("--metric", type=click.Choice(METRICS), default="auto", show_default=True,
              help="Agreement metric per output: top1 (N x K class scores: arg-max agreement), iou (N x 1 x H x W "
                   "map: IoU of the maps cut at --iou-threshold), sequence (N x T x C: greedy CTC decoding, blank 0, "
                   "1 - edit distance / length). auto picks by shape; iou only for maps whose float values lie in [0, 1].")
@click.option("--iou-threshold", type=float, default=DEFAULT_IOU_THRESHOLD, show_default=True,
              help="Where probability maps are cut for the iou metric (0.3 for DBNet text detectors).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the report as JSON to this file ('-' for stdout, instead of the table).")
@click.option("--random-images", type=click.IntRange(min=1), default=64, show_default=True,
              help="How many seeded random images to use when --data is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per onnxruntime run.")
@click.option("--top", type=click.IntRange(min=0), default=10, show_default=True, help="Worst layers shown in the table.")
@click.option("--list-profiles", is_flag=True, help="List the built-in profiles and exit.")
@input_shape_option
@click.pass_context
@run_command
def validate_command(
    ctx: click.Context,
    model: str | None,
    reference: str | None,
    profile_name: str | None,
    data: str | None,
    labels: str | None,
    json_out: str | None,
    top: int,
    list_profiles: bool,
    **settings: Any,
) -> int:
    """Check quantized MODEL against a constraint profile and compare it with its float --reference.

    With --reference, every output must reach the profile's floors (SQNR, top-1
    agreement) unless --min-sqnr/--min-agreement set other gates.

    \b
    Exit codes: 0 pass, 1 constraint violations or a gate not reached, 2 invalid input.
    """
    from ..fileio import atomic_write_text, check_output_paths, load_images_npz

    if list_profiles:
        click.echo(render_profiles())
        return EXIT_OK
    if model is None:
        raise click.UsageError("give the quantized MODEL to validate (or --list-profiles)")
    # the other options (--min-sqnr ... --input-shape) are ValidateConfig fields
    profile = load_profile(profile_name) if profile_name is not None else None
    config = ValidateConfig(profile=profile, **settings)
    check_output_paths(
        [("--json", json_out if json_out != "-" else None)],
        inputs=[("MODEL", model), ("--reference", reference), ("--data", data), ("--labels", labels)],
    )
    images = None
    if data is not None:
        try:
            images, _meta = load_images_npz(data)
        except CalibrationDataError as exc:
            raise CalibrationDataError(exc.message.replace("calibration", "validation"),
                                       "give --data an .npz with an 'images' array (float32, N x C x H x W)") from None
    label_array = load_labels(labels) if labels is not None else None
    quiet = bool((ctx.obj or {}).get("quiet"))
    report = validate(model, reference, config, data=images, labels=label_array, progress=progress_enabled(ctx))
    text = json.dumps(report.to_dict(), indent=2)
    if json_out == "-":
        click.echo(text)
    else:
        if not quiet or not report.passed:
            click.echo(render(report, top=top))
        if json_out:
            atomic_write_text(json_out, text + "\n")
    if report.passed:
        return EXIT_OK
    echo_err(f"error: {model} fails validation")
    for line in report.failure_lines():
        echo_err(f"  - {line}")
    if report.failed_gates:
        echo_err("hint: " + ("" if data else "random images say little: measure on held-out or real images with --data; ")
                 + "re-quantize with better images (onnxdgh quantize FLOAT.onnx --calib-data real.npz); "
                 "--min-sqnr/--min-agreement set your own gate instead of the profile's floor")
    return EXIT_CHECK_FAILED
