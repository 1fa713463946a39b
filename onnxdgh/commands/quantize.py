"""``onnxdgh quantize``: write a fully quantized power-of-two QDQ model (HPTQ).

Every option and the output paths are checked before any long work (generation,
calibration); the model is written atomically and never over its input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import bn_targets, echo_err, float_list, input_shape_option, preflight, preprocess_option, progress_enabled, run_command
from ..errors import EXIT_CHECK_FAILED, EXIT_OK, InvalidInputError

__all__ = ["quantize_command"]

_GENERATION_OPTIONS = ("images", "iterations", "coarse_to_fine", "plateau_stop", "batch_size",
                       "device", "method", "mean", "std", "preprocess", "allow_no_bn")
"""The options that steer only the image generation (``GenerateConfig`` fields), in --help order."""
_ROUNDING = (("optimize_rounding", "AdaRound"), ("gptq_rounding", "GPTQ"),
             ("kernel_sum_rounding", "kernel-sum preserving"))


def _json_default(value: Any) -> Any:
    """numpy scalars and arrays in the report become plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def render(report: dict[str, Any], output: str) -> str:
    """A short human summary of a quantization report."""
    config = report["config"]
    counts = report["counts"]
    timings = report["timings"]
    lines = [
        f"wrote     {output}",
        f"target    W{config['weight_bits']}A{config['act_bits']}, threshold {config['threshold']}, "
        f"profile {report['profile']}, opset {report['opset']}"
        + (", weights stored as float on their grid" if config.get("weights_as_float") else ""),
        f"data      {report['calibration']['images']} images ({report['calibration']['source']})"
        + (f", {report['holdout']['images']} more held back for validation" if "holdout" in report else "")
        + bn_targets(report.get("generation", {})),
        f"quantized {counts['activations']} activations, {counts['weights']} weights, {counts['biases']} biases, "
        f"{counts['constants']} constants; {counts['fused_pairs']} fused pairs; "
        f"BN folded {report['fold']['bn_folded']}, rewritten {len(report['fold']['bn_converted'])}",
        f"rounding  {next((name for key, name in _ROUNDING if config.get(key)), 'nearest')}"
        f"{', bias correction' if config['bias_correction'] else ''}",
        f"time      quantize {timings['quantize_s']:.2f} s"
        + (f", generate {timings['generate_s']:.1f} s" if "generate_s" in timings else "")
        + f", total {timings['total_s']:.1f} s",
    ]
    if "equalize" in report:
        lines.insert(-1, f"equalize  {len(report['equalize']['pairs'])} layer pair(s) equalized "
                         f"(cross-layer equalization), {len(report['equalize']['skipped'])} layer(s) left")
    shifted = report.get("shift_negative", {}).get("shifted", [])
    if shifted:
        lines.insert(-1, f"shift     {len(shifted)} activation(s) moved onto the unsigned grid "
                         f"(shift negative correction)")
    if counts["bias_values_clipped"]:
        lines.append(f"warning   {counts['bias_values_clipped']} bias value(s) clipped to int32 (see the log)")
    return "\n".join(lines)


@click.command("quantize")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=True, path_type=str),
              help="Where to write the quantized .onnx model (never the input file).")
@click.option("--calib-data", type=click.Path(dir_okay=True, path_type=str), default=None,
              help="Calibration images (.npz with an 'images' array, e.g. from `onnxdgh generate`); "
                   "without it DGH images are generated.")
@click.option("--weight-bits", type=int, default=None,
              help="Weight bit width: 8, 7, 4 or 2 (signed, symmetric, per output channel; 7 for onnxruntime "
                   "on x86 without VNNI). Default: 8, or the widest the --profile allows.")
@click.option("--act-bits", type=int, default=8, show_default=True,
              help="Activation bit width: 8 or 4 (every activation, the model input included).")
@click.option("--threshold", default=None, metavar="mse|lp|noclip",
              help="Power-of-two threshold rule: HPTQ's MSE search, the same search on "
                   "|error|^3 (lp: "
                   "clips rare large values less), or the no-clipping min/max. Default: lp "
                   "for dense predictions (an output of rank > 2: detectors, maps) at 8-bit activations, else mse.")
@click.option("--per-tensor-weights", is_flag=True, help="One weight scale per tensor instead of per channel.")
@click.option("--profile", default=None, metavar="NAME|PATH",
              help="Target constraint profile (built-in name or .json); default by bits: "
                   "generic-pot-int8 (W8A8), ort-x86-avx2 (W7A8), pot-w4a8 (W4A8), pot-lowbit (other).")
@click.option("--int4-types", is_flag=True,
              help="Carry <=4-bit values in INT4/UINT4 Q/DQ types (upgrades the model to opset 21).")
@click.option("--weights-as-float", is_flag=True,
              help="Store weights and biases as float values already on their power-of-two grid (no weight "
                   "DequantizeLinear; the grid is recorded in the metadata), for converters that cannot read "
                   "integer weights. Activations keep their Q/DQ pairs.")
@click.option("--optimize-rounding/--no-optimize-rounding", "optimize_rounding", default=None,
              help="Choose weight integers by AdaRound (default: on below 7-bit weights or 8-bit activations).")
@click.option("--bias-correction/--no-bias-correction", "bias_correction", default=None,
              help="Correct int32 biases to the float model's mean outputs (default: off; the rounding optimisation learns biases itself).")
@click.option("--rounding-iterations", type=int, default=300, show_default=True,
              help="AdaRound optimisation steps per layer.")
@click.option("--shift-negative/--no-shift-negative", "shift_negative", default=None,
              help="Shift negative correction: SiLU/HardSwish-like outputs read only by Conv/Gemm move onto the "
                   "unsigned grid, the consumers' biases and padding compensate (default: on below 8-bit "
                   "activations when the profile fuses the activation with Add, as pot-lowbit does).")
@click.option("--equalize/--no-equalize", "equalize", default=None,
              help="Cross-layer equalization: rescale consecutive convolutions (e.g. depthwise -> pointwise) so "
                   "their per-channel weight ranges match; the float function is unchanged (default: off).")
@click.option("--kernel-sum-rounding/--no-kernel-sum-rounding", "kernel_sum_rounding", default=None,
              help="Round each output channel's weights so their integer sum stays nearest the float sum "
                   "(keeps the gain of high-gain depthwise kernels; default: on for 8-bit weights without --optimize-rounding).")
@click.option("--gptq-rounding/--no-gptq-rounding", "gptq_rounding", default=None,
              help="Re-round the Conv/Gemm weights (scales fixed) so each layer's output error on the calibration "
                   "images is smallest (GPTQ; default: on for 8-bit weights without --optimize-rounding, "
                   "--bias-correction or a --kernel-sum-rounding choice).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the DGH generation and of AdaRound.")
@click.option("--images", type=int, default=None,
              help="Generation: number of images (default by bit width: 64 at W8A8, else 256; docs/QUANTIZE.md).")
@click.option("--iterations", type=int, default=None, help="Generation: optimisation iterations (default by bit width: 50 at W8A8, else 200).")
@click.option("--coarse-to-fine", default=None, metavar="SCALE:UNTIL[,...]|auto|off",
              help="Generation: resolution schedule, as `generate --coarse-to-fine` (default off).")
@click.option("--plateau-stop", type=int, default=None, metavar="N",
              help="Generation: stop once the whole-set BN loss has not improved by 1% for N iterations.")
@click.option("--batch-size", type=int, default=None, help="Generation: images optimised together.")
@click.option("--device", default=None, metavar="cpu|cuda",
              help="Generation: where DGH runs (default cpu); the rest of the quantization runs on the CPU.")
@click.option("--method", default=None, metavar="auto|dgh|bns|noise|procedural|mixed|actreg",
              help="Generation method: auto (default: dgh when the model has BN statistics, mixed when few layers "
                   "do, else procedural), dgh, bns (per-batch BN matching), noise (Gaussian), procedural (data-free "
                   "natural-image priors), mixed (half dgh, half procedural) or actreg (procedural images refined "
                   "through the model by activation-range regularisation).")
@click.option("--mean", default=None,
              help="Generation: input mean per channel, pixels in [0,1], e.g. 0.485,0.456,0.406 "
                   "(default: the model's metadata, else inferred from its first BN-ed layer; images are clamped "
                   "to the valid pixel range).")
@click.option("--std", default=None,
              help="Generation: input std per channel, e.g. 0.229,0.224,0.225.")
@preprocess_option
@click.option("--allow-no-bn", is_flag=True, default=None,
              help="Generation: run DGH on a model without BN statistics (prep + ODSL only; as `generate`).")
@input_shape_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="Write the quantization report as JSON to this file ('-' for stdout).")
@click.option("--validate/--no-validate", "run_validation", default=True, show_default=True,
              help="Check the result against the profile and the float model, on a seeded 20 % of the images "
                   "held back from calibration (at least 4).")
@click.option("--validation-report", type=click.Path(dir_okay=False, path_type=str), default=None,
              help="Where to write the validation report (default: OUTPUT with .validation.json).")
@click.option("--min-sqnr", type=float, default=None,
              help="Validation gate: least output SQNR in dB (replaces the profile's floor).")
@click.option("--min-agreement", type=float, default=None,
              help="Validation gate: least top-1 agreement with the float model, 0..1 (replaces the profile's floor).")
@click.pass_context
@run_command
def quantize_command(
    ctx: click.Context,
    model: str,
    output: str,
    calib_data: str | None,
    weight_bits: int | None,
    act_bits: int,
    per_tensor_weights: bool,
    profile: str | None,
    seed: int,
    input_shape: tuple[int, int, int] | None,
    json_out: str | None,
    run_validation: bool,
    validation_report: str | None,
    min_sqnr: float | None,
    min_agreement: float | None,
    **options: Any,
) -> int:
    """Quantize MODEL fully to power-of-two QDQ and write it to OUTPUT.

    Every tensor is quantized (uniform, symmetric, zero point 0, power-of-two scales),
    BatchNormalization is folded, calibration uses DGH synthetic images unless
    --calib-data is given.

    The result is then validated -- profile rules, and the float-vs-quantized figures
    against the profile's floors on images held back from calibration -- and the report
    written next to the model.

    Exit codes: 0 written and valid, 1 written but validation failed (a rule violation,
    an output below the floor, a runtime drift), or the image generation diverged (nothing
    written), 2 invalid input or options, or an input normalisation that cannot be decided
    (nothing written), 130 interrupted.
    """
    from ..fileio import atomic_write_bytes, atomic_write_json, check_images, check_output_paths, load_images_npz
    from ..load import load_model
    from ..quantization import QuantizeConfig, quantize
    from ..quantization.api import default_profile_name, holdout_size, refuse_recurrent

    # the generation options are GenerateConfig fields; the rest of **options QuantizeConfig's
    generation = {key: options.pop(key) for key in _GENERATION_OPTIONS}

    report_path: Path | None = None
    validate_config = None
    if run_validation:
        from ..validation import ValidateConfig

        # Built before any work: a bad gate leaves no output behind.
        validate_config = ValidateConfig(
            profile=profile or default_profile_name(weight_bits or _default_weight_bits(profile), act_bits),
            min_sqnr=min_sqnr, min_agreement=min_agreement, input_shape=input_shape,
        )
        report_path = Path(validation_report) if validation_report else Path(output).with_suffix(".validation.json")
    check_output_paths(
        [("-o/--output", output), ("--json", json_out if json_out != "-" else None),
         ("--validation-report", report_path)],
        inputs=[("MODEL", model), ("--calib-data", calib_data)],
    )
    if report_path is None and (validation_report or min_sqnr is not None or min_agreement is not None):
        raise InvalidInputError(
            "--validation-report, --min-sqnr and --min-agreement need validation, but --no-validate was given",
            "drop --no-validate, or drop the validation options",
        )
    if weight_bits is None:
        weight_bits = _default_weight_bits(profile)
    config = QuantizeConfig(weight_bits=weight_bits, act_bits=act_bits,
                            per_channel=not per_tensor_weights, profile=profile,
                            seed=seed, **options)
    generation.update(mean=float_list("--mean", generation["mean"]),
                      std=float_list("--std", generation["std"]),
                      allow_no_bn=generation["allow_no_bn"] or None)
    given = {key: value for key, value in generation.items() if value is not None}
    generate_config = None
    if calib_data and given:
        flags = ", ".join("--" + key.replace("_", "-") for key in given)
        raise InvalidInputError(
            f"{flags} apply only when images are generated, but --calib-data was given",
            "drop the generation options, or drop --calib-data to generate images",
        )
    if not calib_data:
        from ..generation import GenerateConfig
        from ..generation.config import generation_defaults

        # the budget the benchmarks showed enough for this bit width; explicit options win
        generate_config = GenerateConfig(seed=seed, **{**generation_defaults(weight_bits, act_bits), **given})
    quiet = bool(ctx.obj and ctx.obj.get("quiet"))
    loaded = load_model(model, input_shape=input_shape)
    refuse_recurrent(loaded.model)  # before the normalisation check: no fix of it would help
    if generate_config is not None:
        preflight(loaded, generate_config, quiet)
    calibration = None
    source = None
    if calib_data:
        calibration, _meta = load_images_npz(calib_data)
        calibration = check_images(calibration, input_shape=loaded.input_shape, input_name=loaded.input_name)
        source = f"file:{calib_data}"
    total = calibration.shape[0] if calibration is not None else generate_config.images  # type: ignore[union-attr]
    # Judge the result on images nothing was chosen on (the thresholds, the rounding).
    held = holdout_size(total) if report_path is not None else 0
    result = quantize(
        loaded,
        calibration,
        config,
        generate_config=generate_config,
        progress=progress_enabled(ctx),
        calibration_source=source,
        holdout=held,
    )
    atomic_write_bytes(output, result.model.SerializeToString())
    if json_out == "-":
        click.echo(json.dumps(result.report, indent=2, default=_json_default))
    else:
        if json_out:
            atomic_write_json(json_out, json.loads(json.dumps(result.report, default=_json_default)))
        if not quiet:
            click.echo(render(result.report, output))
    if report_path is None:
        return EXIT_OK
    from ..validation import validate
    from ..validation.metrics import METRIC_NAMES, TASK_METRICS

    origin = result.report["calibration"]["source"]
    kind = f"synthetic images ({origin.split(':', 1)[1]})" if origin.startswith("dgh:") else f"images of {calib_data}"
    validation = validate(
        output,  # the file as written: the report's sha256 is of what the user gets
        loaded,
        validate_config,  # type: ignore[arg-type]  # set whenever report_path is
        data=result.holdout,
        data_description=f"held-out {kind}, n={held} of {total}, not used for calibration",
        progress=False,
    )
    atomic_write_json(report_path, validation.to_dict())
    if validation.passed:
        if not quiet:
            click.echo(f"validated {report_path}: passes {validation.profile.name}" + _figures(validation))
        return EXIT_OK
    echo_err(f"error: {output} was written but fails validation; details in {report_path}")
    for line in validation.failure_lines():
        echo_err(f"  - {line}")
    drift = next((check.hint for check in validation.failed_runtime_checks if check.hint), None)
    task_gates = [gate for gate in validation.failed_gates if gate.metric in TASK_METRICS]
    if task_gates and not calib_data:
        # A recogniser's or detector's agreement on synthetic images (no text, no objects)
        # says little about real inputs (docs/BENCHMARKS.md 'ocr': PP-OCRv4's recogniser
        # scores 11 % on its held-out procedural images, 96.6 % of the characters on rendered
        # lines); real inputs decide.
        echo_err(f"hint: {METRIC_NAMES[task_gates[0].metric]} on synthetic images is a weak "
                 "verdict for this output; "
                 f"calibrate on real images with --calib-data, or judge the model on real inputs: "
                 f"`onnxdgh validate {output} --reference {model} --data IMAGES.npz`")
    elif validation.failed_gates:
        data_fix = ("check that the --calib-data images are normalized as the model expects" if calib_data else
                    "more or better images (--images, --iterations, the input normalisation --preprocess or "
                    "--mean/--std, or real images with --calib-data)")
        echo_err(f"hint: {data_fix}; --optimize-rounding or wider --weight-bits/--act-bits raise the figures; "
                 "--min-sqnr/--min-agreement set your own gate instead of the profile's floor")
    elif drift and not validation.violations:
        echo_err(f"hint: {drift}")
    else:
        echo_err(f"hint: `onnxdgh validate {output} --reference {model}` lists each violation with its node")
    return EXIT_CHECK_FAILED


def _default_weight_bits(profile: str | None) -> int:
    """8, unless ``--profile`` names a profile without 8-bit weights: then its widest."""
    if profile is None:
        return 8
    from ..profile import load_profile

    allowed = load_profile(profile).weight_bits
    return 8 if 8 in allowed else max(allowed)


def _figures(validation: Any) -> str:
    """' (<output> SQNR x dB, agreement y %, on <images>)' for each output."""
    from ..validation.metrics import METRIC_NAMES

    parts = []
    for output in validation.outputs:
        parts.append(f"{output.name} SQNR {output.sqnr_db:.1f} dB")
        if output.agreement is not None:
            parts.append(f"{METRIC_NAMES[output.metric]} {100 * output.agreement:.2f} %")
    where = f", on {validation.data.description}" if validation.data else ""
    return (" (" + ", ".join(parts) + where + ")") if parts else ""
