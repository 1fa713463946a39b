"""Print what onnxdgh infers about each model's input normalisation, with every preset's snap score.

Usage (from the repository root)::

    python3 tools/infer_normalization.py samples/fmnist_resnet8.onnx MODEL.onnx=3x48x192 ...

``MODEL=CxHxW`` pins a symbolic input shape. Metadata is ignored: the line is what
``onnxdgh quantize`` would infer for the model with its normalisation metadata removed
(:func:`onnxdgh.normalization.infer_input_distribution`; a score <= 1 snaps, the least wins,
``inf``: the preset's range misses the fitted mean). The evidence in the docstring of
``onnxdgh/normalization.py`` was printed by this script.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's onnxdgh

from onnxdgh.load import load_model  # noqa: E402
from onnxdgh.normalization import describe, infer_input_distribution, resolve_normalization  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    for item in argv:
        path, _, shape = item.partition("=")
        loaded = load_model(path, input_shape=tuple(int(v) for v in shape.split("x")) if shape else None)
        loaded = replace(loaded, metadata={})
        inference = infer_input_distribution(loaded)
        if inference is None or inference.convention is None:
            print(f"{path}: nothing decided ({'no BN-ed first layer' if inference is None else inference.problem})")
            continue
        scores = ", ".join(f"{name} {value:.2f}" for name, value in inference.preset_scores.items())
        print(f"{path}: {describe(resolve_normalization(loaded))}\n    preset scores: {scores or '(not compared)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
