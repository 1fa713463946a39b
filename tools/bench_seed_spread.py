"""How much one accuracy cell moves with the rounding seed and the torch thread count alone.

Usage (from the repository root)::

    python tools/bench_seed_spread.py --calib bench-work/accuracy/fmnist_resnet8_silu/dgh.npz
    git worktree add /tmp/old 2ba11ad        # the code just before the one simulation
    python tools/bench_seed_spread.py --checkout /tmp/old \\
        --calib bench-work/accuracy/fmnist_resnet8_silu/dgh.npz

Quantizes ``--model`` with the ``onnxdgh quantize`` of ``--checkout`` (default: this
repository) on a fixed calibration set, once per ``--seeds`` value, with ``--threads``
torch/OpenMP threads (``OMP_NUM_THREADS``), and prints top-1 on the 10,000-image
Fashion-MNIST test split per seed, then mean and sample standard deviation. The seed
only reaches the rounding optimisation's batch sampling here (the images are given), so
the spread is that of the optimisation, not of the data. Prints; writes no docs section.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402
import fashion_mnist as fm  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkout", type=Path, default=REPO,
                        help="the onnxdgh source tree to run (default: this one)")
    parser.add_argument("--model", type=Path, default=REPO / "samples" / "fmnist_resnet8_silu.onnx")
    parser.add_argument("--calib", type=Path, required=True,
                        help="calibration images (.npz), the same for every run")
    parser.add_argument("--weight-bits", type=int, default=2)
    parser.add_argument("--act-bits", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of each quantize run (default 1)")
    parser.add_argument("extra", nargs="*",
                        help="more quantize flags after '--' (default: --optimize-rounding)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        test_u8, labels = fm.load_split("test")
    except fm.FashionMnistError as exc:
        raise bl.BenchError(str(exc)) from exc
    images = fm.normalize(test_u8)
    # The quantize children inherit it (benchlib._child_env copies os.environ).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    extra = args.extra or ["--optimize-rounding"]
    scores = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            out = Path(tmp) / f"q{seed}.onnx"
            bl.run_onnxdgh(
                ["quantize", str(args.model.resolve()), "-o", str(out),
                 "--calib-data", str(args.calib.resolve()), "--weight-bits", str(args.weight_bits),
                 "--act-bits", str(args.act_bits), "--no-validate", "--seed", str(seed), *extra],
                what=f"quantize with seed {seed}", cwd=args.checkout.resolve(),
            )
            scores.append(100 * bl.top1(out, images, labels))
            print(f"seed {seed}: top-1 {scores[-1]:.2f} %", flush=True)
    spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
    print(f"{args.checkout} W{args.weight_bits}A{args.act_bits} {' '.join(extra)}, "
          f"{args.threads} thread(s): mean {statistics.mean(scores):.2f} %, sd {spread:.2f}, "
          f"range {min(scores):.2f}-{max(scores):.2f} over seeds {args.seeds}")
    return 0


if __name__ == "__main__":
    bl.main_wrapper(run)
