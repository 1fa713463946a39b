"""Float vs quantized OCR direction classifiers on the real-models benchmark's text crops: softmax and logit SQNR.

Usage (from the repository root, in the benchmark venv)::

    bench-work/venv/bin/python tools/ocr_output_check.py FLOAT.onnx Q.onnx [Q2.onnx ...] [--images SYNTH.npz]

The classifier ends in a 2-class Softmax, so the output SQNR that ``onnxdgh quantize``
judges is taken on probabilities, which saturate on confident inputs and magnify logit
errors on unsure ones. For each quantized model this prints, on the 2,000 evaluation
crops of ``tools/bench_real_models.py`` (same fonts, text and seed), and on an ``.npz``
of images given with ``--images``: the SQNR of the softmax output and of its input
(the logits), top-1 agreement with the float model, accuracy on labels, and the float
model's confidence (median top probability, share below 0.9).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

import bench_real_models as br  # noqa: E402


def _outputs(path: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(softmax output, its input) of the model's last Softmax, in batches of 50."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    softmax = [node for node in model.graph.node if node.op_type == "Softmax"][-1]
    model.graph.output.append(onnx.helper.make_tensor_value_info(softmax.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    batches = [session.run([names[0], names[-1]], {feed: images[i:i + 50]}) for i in range(0, len(images), 50)]
    return np.concatenate([b[0] for b in batches]), np.concatenate([b[1] for b in batches])


def _sqnr(reference: np.ndarray, other: np.ndarray) -> float:
    from onnxdgh.validation.report import sqnr_db

    ref, out = reference.astype(np.float64).ravel(), other.astype(np.float64).ravel()
    return sqnr_db(float(ref @ ref), float(((ref - out) ** 2).sum()))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("float_model", type=Path)
    parser.add_argument("quantized", type=Path, nargs="+")
    parser.add_argument("--images", type=Path, default=None, help="an .npz of images ('images') to check as well")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sets: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    if args.images is not None:
        sets[f"images of {args.images.name}"] = (np.load(args.images)["images"], None)
    calib_count, eval_count = br.DATA_DEFAULTS["ocr_cls"]
    data = br._ocr_data(calib_count, eval_count, args.seed)
    sets["real evaluation crops"] = (data.evaluation, data.labels)
    for name, (images, labels) in sets.items():
        probs, logits = _outputs(args.float_model, images)
        top = probs.max(axis=1)
        print(f"{name} (n={len(images)}): float median top probability {np.median(top):.4f}, "
              f"share below 0.9 {np.mean(top < 0.9):.3f}"
              + ("" if labels is None else f", float accuracy {100 * np.mean(probs.argmax(1) == labels):.2f} %"))
        for path in args.quantized:
            q_probs, q_logits = _outputs(path, images)
            accuracy = "" if labels is None else f", accuracy {100 * np.mean(q_probs.argmax(1) == labels):.2f} %"
            print(f"  {path.name}: softmax SQNR {_sqnr(probs, q_probs):.1f} dB, logit SQNR {_sqnr(logits, q_logits):.1f} dB, "
                  f"agreement {100 * np.mean(q_probs.argmax(1) == probs.argmax(1)):.2f} %{accuracy}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
