"""Where PP-OCRv4's W8A8 error comes from (issue 14): the bench_ocr metrics on a given quantized model,
on a model quantized with given options, and with the activation Q/DQ pairs of one producer op family
bypassed (that family's activations left float, weights still quantized).

Usage (from the repository root; models as in tools/bench_ocr.py)::

    python3 tools/diag_ocr.py rec OUT.onnx --calib-data SET.npz      # quantize (no validation), then measure
    python3 tools/diag_ocr.py det OUT.onnx --eval-only                 # measure an existing model
    python3 tools/diag_ocr.py det OUT.onnx --eval-only --bypass        # ... and per producer-op family

Measured on bench_ocr's own sets (same seeds): the recogniser on 200 rendered lines (characters
decoded as float, %), the detector on 20 rendered 320 x 320 pages (IoU of the maps cut at 0.3).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import string
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ocr as bo  # noqa: E402
import benchlib as bl  # noqa: E402


def activation_pairs(model: object) -> list[tuple[str, str, list[str]]]:
    """(quantized tensor, its producer's op type or 'input', the DequantizeLinear outputs reading it)."""
    nodes = model.graph.node  # type: ignore[attr-defined]
    producer = {out: node for node in nodes for out in node.output}
    constants = {init.name for init in model.graph.initializer}  # type: ignore[attr-defined]
    pairs = []
    for q in nodes:
        if q.op_type != "QuantizeLinear" or q.input[0] in constants:
            continue
        dqs = [n.output[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0]]
        parent = producer.get(q.input[0])
        pairs.append((q.input[0], parent.op_type if parent else "input", dqs))
    return pairs


def bypass(model: object, keep: Callable[[str, str], bool]) -> object:
    """A copy of ``model`` whose readers of the chosen activations' DequantizeLinear read the float tensor."""
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # type: ignore[arg-type]
    rename = {dq: tensor for tensor, op, dqs in activation_pairs(model) if keep(tensor, op) for dq in dqs}
    outputs = {value.name for value in copy.graph.output}
    for node in copy.graph.node:
        if node.op_type == "DequantizeLinear" and node.output[0] in outputs and node.output[0] in rename:
            source = rename[node.output[0]]
            node.op_type = "Identity"
            del node.input[:]
            node.input.append(source)
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            for index, name in enumerate(node.input):
                if name in rename:
                    node.input[index] = rename[name]
    return copy


def _predict(model: object, images: np.ndarray, path: Path) -> np.ndarray:
    import onnx

    onnx.save(model, str(path))  # type: ignore[arg-type]
    return bl.predict(path, images, batch_size=8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("rec", "det"))
    parser.add_argument("output", type=Path, help="the quantized model (written unless --eval-only)")
    parser.add_argument("--models", type=Path, default=Path("/work/thirdparty/whl/ocr/rapidocr_onnxruntime/models"))
    parser.add_argument("--eval-only", action="store_true", help="measure OUTPUT as it is")
    parser.add_argument("--bypass", action="store_true", help="also leave each producer-op family's activations float")
    args, quantize_args = parser.parse_known_args()
    import onnx

    model = args.models / (bo.REC_FILE if args.kind == "rec" else bo.DET_FILE)
    shape = "3x48x320" if args.kind == "rec" else "3x320x320"
    if not args.eval_only:
        subprocess.run([sys.executable, "-m", "onnxdgh", "-q", "quantize", str(model), "-o", str(args.output),
                        "--input-shape", shape, "--no-validate", *quantize_args], check=True)
    charset = string.ascii_letters + string.digits + bo.PUNCTUATION
    fonts = bo.fonts()
    if args.kind == "det":
        images = bo.render_pages(20, 1000, 320, charset, fonts)
        reference = bl.predict(model, images, batch_size=4)

        def metric(out: np.ndarray) -> str:
            return f"IoU {bo.map_iou(reference, out)[0]:.4f}"
    else:
        images, _texts = bo.render_lines(200, 2000, charset, fonts)
        characters = bo.dictionary(model)
        reference_text = bo.decode(bl.predict(model, images, batch_size=16), characters)

        def metric(out: np.ndarray) -> str:
            return f"chars {100 * bo.char_agreement(reference_text, bo.decode(out, characters)):.2f} %"
    quantized = onnx.load(str(args.output))
    print(f"{args.output}: {metric(bl.predict(args.output, images, batch_size=8))}", flush=True)
    if args.bypass:
        scratch = args.output.with_suffix(".bypass.onnx")
        families = Counter(op for _t, op, _d in activation_pairs(quantized))
        print(f"  every activation float: {metric(_predict(bypass(quantized, lambda t, o: True), images, scratch))}")
        for family in sorted(families):
            chosen = bypass(quantized, lambda t, o, f=family: o == f)
            print(f"  {family} outputs float ({families[family]}): {metric(_predict(chosen, images, scratch))}", flush=True)
        scratch.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
