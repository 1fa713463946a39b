"""``onnxdgh inspect``: is this model ready for zero-shot quantization?"""

from __future__ import annotations

import json

import click

from .common import input_shape_option, run_command
from ..errors import EXIT_CHECK_FAILED, EXIT_OK
from ..errors import SymbolicShapeError
from ..inspection import InspectionReport, inspect_model, symbolic_shape_report
from ..load import load_model

__all__ = ["inspect_command"]


def _fmt_shape(shape: list[object]) -> str:
    return "x".join("?" if d is None else str(d) for d in shape)


def render(report: InspectionReport) -> str:
    """The report as terminal text."""
    canon = report.canonicalisation
    converted = canon.get("opset_converted_from")
    lines = [f"model     {report.source}",
             f"opset     {report.opset}" + (f" (converted from {converted})" if converted else "")]
    for kind, items in (("input", report.inputs), ("output", report.outputs)):
        lines += [f"{kind:<10}{item['name']}  {_fmt_shape(item['shape'])}  {item['dtype']}"
                  for item in items]
    lines.append(f"batch     {'fixed' if report.batch_fixed else 'dynamic'}")
    if any(canon.values()):
        lines.append(
            "canonical "
            f"{canon['constants_lifted']} constants lifted, {canon['identities_removed']} identities removed, "
            f"{canon.get('shape_values_folded', 0)} shape computations folded, "
            f"{canon['dead_nodes_removed']} dead nodes removed"
        )
    ops = ", ".join(f"{op} {count}" for op, count in report.op_histogram.items())
    lines.append(f"ops       {ops}")
    dry = report.quantizer
    if dry:
        if dry["ok"]:
            lines.append(f"quantizer dry run for {dry['profile']} W{dry['weight_bits']}A{dry['act_bits']}: "
                         f"{dry['activations']} activations, {dry['params']} constants to quantize")
        else:
            lines.append(f"quantizer dry run for {dry['profile']}: refused")
    usable = sum(1 for bn in report.batch_norms if bn["usable"])
    lines.append(f"BN nodes  {len(report.batch_norms)} ({usable} with usable statistics)")
    lines += [f"          {bn['node']}: {bn['problem']}"
              for bn in report.batch_norms if not bn["usable"]]
    if report.bn_folded:
        lines.append("          BN looks folded away (Conv with bias, no BatchNormalization)")
    for item in report.unconvertible_ops:
        lines.append(f"torch     cannot convert {item['op_type']} (opset {item['version']}): "
                     f"{', '.join(item['nodes'][:3])}")
    lines += [f"method    {report.generation}", ""]
    # a ready report has no reasons; its advice are tips, a refusal's advice are fixes
    verdict = "READY for zero-shot quantization" if report.ready else "NOT READY"
    lines.append(f"verdict   {verdict}")
    lines += [f"  - {reason}" for reason in report.reasons]
    lines += [f"  {'tip' if report.ready else 'fix'}: {tip}" for tip in report.advice]
    return "\n".join(lines)


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the report as JSON to this file ('-' for stdout).")
@click.option("--profile", default=None, metavar="NAME|PATH",
              help="Target profile of the quantizer's dry run (built-in name or .json; default generic-pot-int8).")
@input_shape_option
@run_command
def inspect_command(model: str, json_out: str | None, profile: str | None,
                    input_shape: tuple[int, int, int] | None) -> int:
    """Say whether MODEL is ready for zero-shot quantization, and why.

    Dry-runs the quantizer (profile check, BN folding, marking every tensor) without
    images: an op `quantize` has no rule for makes the model NOT READY. A symbolic
    height or width is NOT READY until --input-shape pins it.

    Exit codes: 0 ready, 1 not ready, 2 invalid input.
    """
    from ..fileio import atomic_write_text, check_output_paths
    from ..profile import load_profile

    check_output_paths([("--json", json_out if json_out != "-" else None)], inputs=[("MODEL", model)])
    if profile is not None:
        load_profile(profile)  # a bad --profile is bad input (exit 2), not a verdict
    try:
        loaded = load_model(model, input_shape=input_shape)
    except SymbolicShapeError as exc:
        report = symbolic_shape_report(model, exc.message)
    else:
        report = inspect_model(loaded, profile=profile)
    if json_out == "-":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render(report))
        if json_out:
            atomic_write_text(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
    return EXIT_OK if report.ready else EXIT_CHECK_FAILED
