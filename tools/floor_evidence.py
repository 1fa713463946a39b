"""Evidence for the profiles' validation floors: what good and broken quantizations score on held-out images.

Usage (from the repository root):

    python tools/floor_evidence.py --json bench-work/floors.json

For each sample model it generates the default DGH set (256 images x 200 iterations,
seed 0) and a Gaussian-noise set of the same size, holds back the images ``onnxdgh
quantize`` holds back (``holdout_size``, seeded with the quantize seed 0) and, for each
bit width / profile, measures on the held-out images (the figures ``onnxdgh quantize``
judges) and on 1000 real Fashion-MNIST test images (float vs quantized top-1):

* ``good``: ``onnxdgh quantize`` defaults on the DGH images;
* ``x16``: the same model with the input quantizer's scale 16x too wide (what a wrong
  input normalisation does to the first layer);
* ``noise``: calibrated on Gaussian noise, judged on its own held-out noise images;
* ``random``: the good model judged by ``onnxdgh validate`` without ``--data`` (64
  seeded random images), to see what the floors do there.

A tool, not library code: it prints its own table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fashion_mnist as fm  # noqa: E402

from onnxdgh.errors import QuantizationError  # noqa: E402
from onnxdgh.generation import GenerateConfig, generate  # noqa: E402
from onnxdgh.load import load_model  # noqa: E402
from onnxdgh.quantization import QuantizeConfig, quantize  # noqa: E402
from onnxdgh.quantization.api import holdout_size  # noqa: E402
from onnxdgh.validation import ValidateConfig, validate  # noqa: E402

MODELS = ("fmnist_resnet8", "fmnist_mobilenetv2", "fmnist_resnet8_silu")
CONFIGS = {  # label -> (weight bits, act bits, profile)
    "W8A8 generic-pot-int8": (8, 8, "generic-pot-int8"),
    "W8A8 strict-pot-int8": (8, 8, "strict-pot-int8"),
    "W4A8 pot-w4a8": (4, 8, "pot-w4a8"),
    "W4A4 pot-lowbit": (4, 4, "pot-lowbit"),
}


def widen_input_scale(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """A copy of ``model`` whose graph-input QuantizeLinear/DequantizeLinear scale (and the
    range Clip in front of it, below 8 bits) is ``factor`` x wider."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    image = out.graph.input[0].name
    clips = [node for node in out.graph.node if node.op_type == "Clip" and node.input[0] == image]
    source = clips[0].output[0] if clips else image
    quant = next(node for node in out.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == source)
    dequant = [node for node in out.graph.node if node.op_type == "DequantizeLinear" and node.input[0] == quant.output[0]]
    names = {quant.input[1]} | {node.input[1] for node in dequant} | {name for clip in clips for name in clip.input[1:]}
    for init in out.graph.initializer:
        if init.name in names:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    return out


def _figures(report: Any) -> dict[str, Any]:
    out = report.outputs[0]
    return {
        "sqnr_db": round(out.sqnr_db, 2),
        "agreement": out.top1_agreement,
        "float_top1": out.float_accuracy,
        "quant_top1": out.quantized_accuracy,
        "worst_layer": report.layers[0].tensor if report.layers else None,
    }


def _judge(model: onnx.ModelProto, loaded: Any, profile: str, held: np.ndarray, real: np.ndarray,
           labels: np.ndarray) -> dict[str, Any]:
    on_held = _figures(validate(model, loaded, ValidateConfig(profile=profile), data=held))
    on_real = _figures(validate(model, loaded, ValidateConfig(profile=profile), data=real, labels=labels))
    return {"held": on_held, "real": on_real}


def render(results: dict[str, Any]) -> str:
    """The Markdown table of docs/VALIDATE.md ("Floors")."""
    lines = ["| model | profile | case | held-out SQNR dB | held-out agreement | real SQNR dB | real top-1 (float) |",
             "|---|---|---|---|---|---|---|"]
    for key, row in results.items():
        model, config = key.split(" ", 1)
        for kind, value in row.items():
            held, real_fig = value["held"], value.get("real")
            agree = "-" if held["agreement"] is None else f"{100 * held['agreement']:.1f} %"
            real_text = "-" if real_fig is None else f"{real_fig['sqnr_db']}"
            top1 = "-" if real_fig is None else f"{100 * real_fig['quant_top1']:.1f} % ({100 * real_fig['float_top1']:.1f} %)"
            case = "random (64 random images)" if kind == "random" else kind
            lines.append(f"| {model} | {config} | {case} | {held['sqnr_db']} | {agree} | {real_text} | {top1} |")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="Write every figure as JSON here.")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--real", type=int, default=1000, help="Real test images for the top-1 figures.")
    parser.add_argument("--table", action="store_true", help="Only print the table of the --json file.")
    args = parser.parse_args(argv)
    if args.table:
        print(render(json.loads(args.json.read_text())))
        return 0

    test_images, test_labels = fm.load_split("test")
    results: dict[str, Any] = {}
    if args.json and args.json.exists():  # resume: keep what an interrupted run measured
        results = json.loads(args.json.read_text())
    for name in args.models:
        if all(f"{name} {label}" in results for label in args.configs):
            continue
        loaded = load_model(f"samples/{name}.onnx")
        mean, std = loaded.input_normalization()  # type: ignore[misc]
        real = fm.normalize(test_images[: args.real], tuple(mean.tolist()), tuple(std.tolist()))
        labels = test_labels[: args.real]
        started = time.perf_counter()
        sets = {
            "dgh": generate(loaded, GenerateConfig(seed=0), progress=False).images,
            "noise": generate(loaded, GenerateConfig(seed=0, method="noise"), progress=False).images,
        }
        print(f"{name}: generated in {time.perf_counter() - started:.0f} s", flush=True)
        held_count = holdout_size(sets["dgh"].shape[0])
        for label in args.configs:
            if f"{name} {label}" in results:
                continue
            weight_bits, act_bits, profile = CONFIGS[label]
            config = QuantizeConfig(weight_bits=weight_bits, act_bits=act_bits, profile=profile)
            row: dict[str, Any] = {}
            for source, images in sets.items():
                started = time.perf_counter()
                try:
                    result = quantize(loaded, images, config, progress=False, holdout=held_count)
                except QuantizationError as exc:  # e.g. SiLU's Sigmoid under strict-pot-int8
                    print(f"  {label}: refused ({exc.message})", flush=True)
                    break
                assert result.holdout is not None
                if source == "dgh":
                    row["good"] = _judge(result.model, loaded, profile, result.holdout, real, labels)
                    row["x16"] = _judge(widen_input_scale(result.model, 16.0), loaded, profile, result.holdout, real, labels)
                    row["random"] = {"held": _figures(validate(result.model, loaded, ValidateConfig(profile=profile)))}
                else:
                    row["noise"] = _judge(result.model, loaded, profile, result.holdout, real, labels)
                print(f"  {label} {source}: {time.perf_counter() - started:.0f} s", flush=True)
            if not row:
                continue
            results[f"{name} {label}"] = row
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2) + "\n")
            print(f"  {label}: " + "; ".join(
                f"{kind} {v['held']['sqnr_db']} dB / agree {v['held']['agreement']}"
                + (f" / top1 {v['real']['quant_top1']}" if "real" in v else "")
                for kind, v in row.items()), flush=True)
    print()
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
