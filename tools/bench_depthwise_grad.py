"""Is the depthwise-convolution input gradient a large share of a DGH step on CPU? (issue 16 item 1)

Usage (from the repository root)::

    PYTHONPATH=. python tools/bench_depthwise_grad.py          # EfficientNet-Lite0, batch 16, one thread
    python tools/bench_depthwise_grad.py --smoke               # seconds, tmp folder

Runs one optimisation step of ``onnxdgh generate``'s loop (phi_prep view, forward with the
BN probes, loss, backward into the pixels, optimiser step) under torch's profiler and
splits the convolutions' CPU time into forward (``conv2d``) and input gradient
(``conv_transpose2d``: onnxdgh's frozen convolutions back-propagate through the
transposed convolution, ``onnxdgh.convert._InputGradConv2d``), depthwise (one input
channel per group) and dense. Then each depthwise layer alone: forward, the transposed
convolution onnxdgh uses, and torch's own ``convolution_backward`` for the input
gradient, best of 3 by process time.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib as bl  # noqa: E402

KEY = "depthwise-grad"
TITLE = "Depthwise-convolution input gradient: share of a DGH step on CPU (issue 16 item 1)"
MODEL = bl.REPO / "bench-work" / "real_models" / "efficientnet_lite0.onnx"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    bl.add_common_arguments(parser)
    parser.add_argument("--model", type=Path, default=MODEL, help="model (default: EfficientNet-Lite0)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return parser.parse_args(argv)


def _best(fn: Callable[[], Any], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best * 1e3


def run(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = bl.make_context(args, "depthwise_grad")
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from onnxdgh.convert import _InputGradConv2d, to_torch
    from onnxdgh.generation import GenerateConfig
    from onnxdgh.generation.core import _Run
    from onnxdgh.load import load_model
    from onnxdgh.normalization import resolve_normalization

    torch.set_num_threads(args.threads)
    if ctx.smoke:
        model = bl.tiny_classifier(ctx.work / "tiny.onnx", channels=3, size=(16, 16))
        batch = 4
    else:
        model, batch = args.model, args.batch
        if not model.exists():
            raise bl.BenchError(f"{model} is missing: copy it from /work/thirdparty/models (see HELPERS.md)")
    loaded = load_model(model)
    norm = resolve_normalization(loaded, mean=None, std=None, preprocess=None if not ctx.smoke else "symmetric")
    torch_model = to_torch(loaded)
    run_ = _Run(torch_model, GenerateConfig(images=batch, batch_size=batch, iterations=3),
                torch.from_numpy(norm.low), torch.from_numpy(norm.high))
    run_._initial_pass()

    def step() -> None:
        probe, moments = run_._moments(run_._view(0, 1))
        run_._step(0, probe, moments)

    info = bl.machine_info()
    load_before = bl.load_average()
    step_ms = _best(step)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    shares: dict[tuple[str, str], float] = {}
    for event in prof.events():
        shapes = event.input_shapes
        if event.name in ("aten::conv2d", "aten::conv_transpose2d") and shapes and len(shapes) > 1 and shapes[1]:
            # one input channel per output channel: depthwise (a 1-channel stem conv would count too,
            # which EfficientNet's 3-channel stem does not)
            weight = shapes[1]
            kind = "depthwise" if weight[1] == 1 and weight[0] > 1 else "dense"
            key = ("forward" if event.name == "aten::conv2d" else "input gradient", kind)
            shares[key] = shares.get(key, 0.0) + event.cpu_time_total / 1e3
    profiled_ms = prof.key_averages().self_cpu_time_total / 1e3
    share_rows = [[part, kind, f"{ms:.1f}", f"{100 * ms / profiled_ms:.1f}"] for (part, kind), ms in sorted(shares.items())]

    # each depthwise layer alone
    sizes: dict[str, tuple[int, ...]] = {}
    modules = {name: m for name, m in torch_model._probe.named_modules() if isinstance(m, _InputGradConv2d)}
    hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: (sizes.setdefault(name, tuple(a[0].shape)), None)[1])
             for name, m in modules.items()]
    with torch.no_grad():
        torch_model._probe(torch.zeros((1, *loaded.input_shape)))
    for hook in hooks:
        hook.remove()
    layer_rows, totals = [], [0.0, 0.0, 0.0]
    for name, module in modules.items():
        conv = module.conv
        if not (conv.groups == conv.in_channels > 1) or name not in sizes:
            continue
        x = torch.randn(batch, *sizes[name][1:]).contiguous(memory_format=torch.channels_last)
        w = conv.weight
        y = F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        g = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
        pad = tuple(size - ((out - 1) * st - 2 * p + d * (k - 1) + 1) for size, out, st, p, d, k in
                    zip(x.shape[2:], y.shape[2:], conv.stride, conv.padding, conv.dilation, conv.kernel_size))
        times = [
            _best(lambda: F.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)),
            _best(lambda: F.conv_transpose2d(g, w, None, conv.stride, conv.padding, pad, conv.groups, conv.dilation)),
            _best(lambda: torch.ops.aten.convolution_backward(g, x, w, None, conv.stride, conv.padding, conv.dilation,
                                                              False, [0, 0], conv.groups, [True, False, False])),
        ]
        totals = [a + b for a, b in zip(totals, times)]
        layer_rows.append([name, "x".join(map(str, x.shape[1:])), f"{conv.kernel_size[0]}/{conv.stride[0]}",
                           *(f"{t:.1f}" for t in times)])
    layer_rows.append(["**all depthwise layers**", "", "", *(f"**{t:.1f}**" for t in totals)])
    load_after = bl.load_average()
    dw_grad = shares.get(("input gradient", "depthwise"), 0.0)
    body = "\n".join([
        f"Model `{model.name}`, one step of {batch} images, {args.threads} torch thread(s): best of 3 by process time "
        f"{step_ms:.0f} ms; the profiled step's CPU time {profiled_ms:.0f} ms (profiler overhead included).",
        "",
        bl.md_table(["convolutions", "kind", "CPU ms in the profiled step", "% of the step"], share_rows),
        "",
        "Each depthwise layer alone (input C x H x W, kernel/stride; ms, best of 3 by process time):",
        "",
        bl.md_table(["layer", "input", "k/s", "forward", "input gradient (onnxdgh: conv_transpose2d)",
                     "input gradient (torch convolution_backward)"], layer_rows),
        "",
        f"- The depthwise input gradient is {100 * dw_grad / profiled_ms:.1f}% of the profiled step; timed layer by "
        f"layer it is {totals[1]:.0f} ms against the depthwise forward's {totals[0]:.0f} ms, "
        f"{100 * totals[1] / step_ms:.1f}% of an unprofiled step. A gradient as cheap as the forward would save at most "
        f"{100 * (totals[1] - totals[0]) / step_ms:.1f}% of a step.",
        *bl.load_note(load_before, load_after, "process times, which load inflates less than wall times, still include cache and core sharing."),
    ])
    return bl.finish_section(ctx, KEY, TITLE, body, info=info, load_before=load_before, load_after=load_after)


if __name__ == "__main__":
    bl.main_wrapper(run)
