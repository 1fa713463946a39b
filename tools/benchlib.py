"""Shared plumbing of the benchmarks in ``tools/bench_*.py``.

Contract:

- :func:`write_section` puts one benchmark's markdown into ``docs/BENCHMARKS.md``
  between ``<!-- bench:KEY:start -->`` / ``<!-- bench:KEY:end -->`` markers, replacing
  the previous run's section in place (appending it the first time), atomically.
  Every section carries the date, the machine (:func:`machine_info`), the load average
  while it ran and the exact command (:func:`command_string`).
- :func:`run_onnxdgh` runs the ``onnxdgh`` command line in a child process with the
  interpreter running the benchmark, and raises :class:`BenchError` with the child's
  last error lines when it fails; :func:`run_measured` also returns the child's wall
  time and peak resident memory (rusage of that child's own process tree).
- :func:`top1` / :func:`predict` evaluate an ONNX model in onnxruntime (CPU).
- :func:`gemm_gflops` measures the machine's fp32 matrix-multiply rate in torch;
  :func:`input_grad_flops` counts forward plus input-gradient backward FLOPs of a
  torch module (weights frozen) per image.
- :func:`tiny_classifier` builds the small Conv-BN-ReLU model every ``--smoke`` mode
  uses, in-process, so smoke runs never need the sample models or a network.

Benchmarks are tools, not library code: they print progress and tables themselves.
This module depends only on the project's own dependencies; optional ones (matplotlib,
MCT, scikit-image) are imported where used and reported as missing by name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
DOCS_DIR = REPO / "docs"
WORK = REPO / "bench-work"
SAMPLES = REPO / "samples"
VENV_PYTHON = WORK / "venv" / "bin" / "python"

__all__ = [
    "BenchError",
    "DOC",
    "DOCS_DIR",
    "WORK",
    "SAMPLES",
    "Measured",
    "machine_info",
    "machine_markdown",
    "load_average",
    "busy_processes",
    "command_string",
    "md_table",
    "write_section",
    "run_onnxdgh",
    "run_measured",
    "command_help",
    "predict",
    "top1",
    "gemm_gflops",
    "input_grad_flops",
    "tiny_classifier",
    "fmt_pct",
    "optional_import",
    "Context",
    "add_common_arguments",
    "make_context",
    "log",
    "main_wrapper",
    "sample_models",
]

DOC_HEADER = """# Benchmarks

Every figure below was produced by the command printed beside it, on the machine named
in its section; rerunning the command replaces the section in place. The benchmark
scripts live in `tools/` (`tools/bench_*.py`, shared code in `tools/benchlib.py`).
Each has a `--smoke` mode (tiny model built in-process, seconds, writes to a temporary
folder only) that CI runs through `tests/test_bench_smoke.py`.

## Benchmark environment

The comparison with Sony MCT's data generation, the plots and the third-party model's
evaluation images need packages that are **not** dependencies of onnxdgh. They live in a
separate virtual environment that sees the project's own installation:

```bash
python3 -m venv --system-site-packages bench-work/venv
bench-work/venv/bin/pip install model-compression-toolkit scikit-image matplotlib
# the third-party model (benchmark 4):
pip download --no-deps rapidocr-onnxruntime==1.4.4 -d bench-work/
```

`bench-work/` is git-ignored. Run the benchmarks with `bench-work/venv/bin/python
tools/bench_....py`. Timed figures need a quiet machine: every section records the load
average (1 min) before and after its run; on this 2-core machine two CPU-heavy processes
slow each other several-fold, so a figure taken under load says so.
"""


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which step and why."""


@dataclass(frozen=True)
class Measured:
    """A child process's exit code, wall time (s), peak RSS (bytes), stdout and stderr, CPU time (s, user + system)."""

    returncode: int
    wall_s: float
    max_rss_bytes: int
    stdout: str
    stderr: str
    cpu_s: float = 0.0


def optional_import(name: str, purpose: str) -> Any:
    """Import ``name`` or raise :class:`BenchError` saying what it is needed for."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise BenchError(
            f"{name} is not installed ({purpose}); run the benchmark with bench-work/venv/bin/python "
            "(see docs/BENCHMARKS.md, 'Benchmark environment')"
        ) from exc


# ---------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average (0.0 where the platform has none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return 0.0


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, torch/onnxruntime/onnx/numpy versions, Python, date."""
    import onnx
    import onnxruntime
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
    try:
        import onnxdgh

        info["onnxdgh"] = onnxdgh.__version__
    except ImportError:  # pragma: no cover - the benchmarks run from the checkout
        info["onnxdgh"] = "not importable"
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        info["git"] = head.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git"] = "unknown"
    return info


def machine_markdown(info: dict[str, Any], load_before: float, load_after: float) -> str:
    """Two markdown lines: when/where, and the software versions."""
    return (
        f"*Run {info['date']} on {info['cpu']}, {info['cores']} logical cores "
        f"(torch threads {info['torch_threads']}); load average (1 min) {load_before:.2f} before, "
        f"{load_after:.2f} after; git {info['git']}.*  \n"
        f"*Python {info['python']}, torch {info['torch']}, onnxruntime {info['onnxruntime']}, "
        f"onnx {info['onnx']}, numpy {info['numpy']}, onnxdgh {info['onnxdgh']}.*"
    )


def busy_processes(min_cpu: float = 30.0) -> list[str]:
    """Other processes now using more than ``min_cpu`` percent of a core (``ps``), as short lines."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {os.getpid(), os.getppid()}
    busy = []
    for line in out.stdout.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        try:
            pid, cpu = int(parts[0]), float(parts[1])
        except ValueError:
            continue
        if cpu < min_cpu:
            break
        if pid not in mine:
            busy.append(f"{pid} {cpu:.0f}% {parts[2][:80]}")
    return busy


def command_string() -> str:
    """The command that is running, as a person would retype it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script_text = str(script.resolve().relative_to(REPO))
    except ValueError:
        script_text = str(script)
    exe = Path(sys.executable)
    try:
        exe_text = str(exe.relative_to(REPO))  # the benchmark venv's python, not its resolved target
    except ValueError:
        exe_text = "python"
    return shlex.join([exe_text, script_text, *sys.argv[1:]])


# --------------------------------------------------------------------------- markdown


def fmt_pct(value: float | None, digits: int = 2) -> str:
    """A fraction as a percentage string, or an em dash for a missing value."""
    return "—" if value is None else f"{100.0 * value:.{digits}f}"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def _markers(key: str) -> tuple[str, str]:
    if not re.fullmatch(r"[a-z0-9_-]+", key):
        raise ValueError(f"section key {key!r}: use lower-case letters, digits, '-' and '_'")
    return f"<!-- bench:{key}:start -->", f"<!-- bench:{key}:end -->"


def write_section(
    key: str,
    title: str,
    body: str,
    *,
    info: dict[str, Any],
    command: str,
    load_before: float,
    load_after: float,
    doc: Path = DOC,
) -> Path:
    """Replace (or append) the section ``key`` of ``doc`` with ``body`` under ``title``.

    The section starts with the machine line and the command, so a reader can rerun it.
    Sections of other benchmarks are left byte for byte as they were.
    """
    from onnxdgh.fileio import atomic_write_text

    start, end = _markers(key)
    section = "\n".join([
        start,
        f"## {title}",
        "",
        machine_markdown(info, load_before, load_after),
        "",
        "```bash",
        command,
        "```",
        "",
        body.rstrip(),
        end,
    ])
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text(encoding="utf-8") if doc.exists() else DOC_HEADER
    if start in text and end in text and text.index(start) < text.index(end):
        before = text[: text.index(start)]
        after = text[text.index(end) + len(end):]
        text = before + section + after
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(doc, text)
    return doc


def load_note(load_before: float, load_after: float, unaffected: str) -> list[str]:
    """The lines that say a run was measured under load (1-min load average above 1.5), else none.

    ``unaffected`` says which figures load inflates and which it does not, e.g. "the wall
    times are inflated; the CPU times and accuracies are not."
    """
    if max(load_before, load_after) <= 1.5:
        return []
    return ["", f"**Measured under load** (1-min load average {load_before:.1f} -> {load_after:.1f} on 2 cores): {unaffected}"]


def finish_section(ctx: Any, key: str, title: str, body: str, *, info: dict[str, Any], load_before: float,
                   load_after: float) -> int:
    """Write the section ``key`` of the context's document with this invocation's command; exit code 0."""
    doc = write_section(key, title, body, info=info, command=command_string(), load_before=load_before,
                        load_after=load_after, doc=ctx.doc)
    log(f"wrote {doc}")
    return 0


# ------------------------------------------------------------------------ processes


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Peak memory of a child: Linux carries a process's high-water RSS across exec, so a child
# forked from this (large, torch-importing) process would report at least our own peak.
# A tiny interpreter in between forks the real command and reports RUSAGE_CHILDREN, which
# then counts only the command and its own children.
_RSS_WRAPPER = (
    "import json, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "open(sys.argv[1], 'w').write(json.dumps({'maxrss_kb': usage.ru_maxrss, 'cpu_s': usage.ru_utime + usage.ru_stime}))\n"
    "sys.exit(code if code >= 0 else 128 - code)\n"
)


def run_measured(args: Sequence[str], *, timeout: float | None = None, cwd: Path | None = None) -> Measured:
    """Run ``args`` as a child; return its exit code, wall time, peak RSS and CPU time (the child's own tree)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "rusage.json"
        out_path, err_path = Path(tmp) / "out", Path(tmp) / "err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-S", "-c", _RSS_WRAPPER, str(report), *args],
                                    stdout=out, stderr=err, env=_child_env(), cwd=cwd)
            try:
                returncode = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                returncode = proc.wait()
            wall = time.perf_counter() - start
        usage = json.loads(report.read_text()) if report.exists() else {}
        # ru_maxrss is in kilobytes on Linux.
        return Measured(returncode, wall, int(usage.get("maxrss_kb", 0)) * 1024, out_path.read_text("utf-8", "replace"),
                        err_path.read_text("utf-8", "replace"), float(usage.get("cpu_s", 0.0)))


def run_onnxdgh(args: Sequence[str], *, what: str, quiet: bool = True, timeout: float | None = None,
                in_process: bool = False, cwd: Path | None = None) -> Measured:
    """Run ``python -m onnxdgh [-q] ARGS``; raise :class:`BenchError` naming ``what`` on failure.

    ``in_process`` runs the same click command inside this interpreter (``--smoke`` modes:
    many short commands without paying for an interpreter start and the torch import
    each time); its peak memory is then not measured (0). ``cwd``: the source tree whose
    ``onnxdgh`` runs (``python -m`` imports it from there; default: this process's folder).
    """
    cmd = [sys.executable, "-m", "onnxdgh", *(["-q"] if quiet else []), *args]
    if in_process:
        from click.testing import CliRunner

        from onnxdgh.cli import main

        start = time.perf_counter()
        invoked = CliRunner().invoke(main, cmd[3:], catch_exceptions=True)
        wall = time.perf_counter() - start
        if invoked.exception is not None and not isinstance(invoked.exception, SystemExit):
            raise BenchError(f"{what} raised {type(invoked.exception).__name__}: {invoked.exception}\n  command: {shlex.join(cmd)}")
        result = Measured(invoked.exit_code, wall, 0, invoked.stdout, getattr(invoked, "stderr", "") or invoked.output)
    else:
        result = run_measured(cmd, timeout=timeout, cwd=cwd)
    if result.returncode != 0:
        tail = " | ".join(line for line in result.stderr.strip().splitlines()[-4:])
        raise BenchError(f"{what} failed (exit {result.returncode}): {tail or 'no message'}\n  command: {shlex.join(cmd)}")
    return result


def command_help(command: str) -> str:
    """``onnxdgh COMMAND --help`` of this checkout (benchmarks probe it for options that may not exist yet)."""
    out = subprocess.run([sys.executable, "-m", "onnxdgh", command, "--help"], capture_output=True, text=True,
                         env=_child_env(), cwd=REPO)
    if out.returncode != 0:
        raise BenchError(f"`onnxdgh {command} --help` failed: the {command} command is not available in this checkout")
    return out.stdout


# ------------------------------------------------------------------------ evaluation


def predict(model: str | os.PathLike[str] | bytes, images: np.ndarray, *, batch_size: int = 256,
            output: int = 0) -> np.ndarray:
    """Output ``output`` of ``model`` (path or serialized bytes) on ``images``, run in onnxruntime (CPU)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batch_dim = session.get_inputs()[0].shape[0]
    step = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else batch_size
    parts = []
    for start in range(0, images.shape[0], step):
        batch = np.ascontiguousarray(images[start:start + step], dtype=np.float32)
        if isinstance(batch_dim, int) and batch_dim > 0 and batch.shape[0] != batch_dim:
            parts.extend(session.run(None, {name: batch[i:i + 1]})[output] for i in range(batch.shape[0]))
        else:
            parts.append(session.run(None, {name: batch})[output])
    return np.concatenate(parts, axis=0)


def top1(model: str | os.PathLike[str] | bytes, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256) -> float:
    """Fraction of ``images`` whose arg-max output equals ``labels``."""
    scores = predict(model, images, batch_size=batch_size)
    return float(np.mean(scores.reshape(scores.shape[0], -1).argmax(axis=1) == labels))


# ------------------------------------------------------------------------ compute rate


def gemm_gflops(n: int = 1024, seconds: float = 2.0) -> float:
    """Measured fp32 matrix-multiply rate of torch on this machine (GFLOP/s, 2 n^3 per product)."""
    import torch

    a = torch.randn(n, n)
    b = torch.randn(n, n)
    for _ in range(3):  # warm-up: thread pool start, caches
        torch.mm(a, b)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        elapsed = time.perf_counter() - start
        best = max(best, 4 * 2.0 * n ** 3 / elapsed / 1e9)
    return best


def input_grad_flops(module: Any, input_shape: Sequence[int], batch: int = 4) -> tuple[float, float]:
    """(forward, input-gradient backward) FLOPs per image of a torch module with frozen weights.

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` on one batch whose input
    requires a gradient; the backward pass computes no weight gradients when the
    parameters do not require them, so it counts what image optimisation actually runs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(batch, *input_shape, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counter = FlopCounterMode(display=False)
        with counter:
            out = module(x)
        forward = counter.get_total_flops()
        outs = out if isinstance(out, (list, tuple)) else [out]
        loss = sum(o.float().square().sum() for o in outs)
        counter = FlopCounterMode(display=False)
        with counter:
            loss.backward()
        backward = counter.get_total_flops()
    return forward / batch, backward / batch


# ---------------------------------------------------------------------- smoke models


def tiny_classifier(path: Path, *, channels: int = 1, size: tuple[int, int] = (12, 12), classes: int = 4,
                    seed: int = 0, mean: float = 0.5, std: float = 0.25, dynamic_hw: bool = False,
                    softmax: bool = False) -> Path:
    """Write a small Conv-BN-ReLU classifier with BN kept and input normalisation metadata.

    BN layers get non-trivial running statistics from a few train-mode passes on shifted
    noise. ``dynamic_hw`` exports symbolic height and width (like the third-party model);
    ``softmax`` ends the graph in a Softmax.
    """
    import onnx
    import torch
    from torch import nn

    torch.manual_seed(seed)
    width = 8
    layers: list[nn.Module] = [
        nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes),
    ]
    if softmax:
        layers.append(nn.Softmax(dim=1))
    module = nn.Sequential(*layers)
    generator = torch.Generator().manual_seed(seed)
    module.train()
    with torch.no_grad():
        for _ in range(5):
            module(torch.randn(16, channels, *size, generator=generator) * 1.3 + 0.2)
    module.eval()
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    if dynamic_hw:
        axes["input"].update({2: "height", 3: "width"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, torch.randn(1, channels, *size), str(path), dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          opset_version=17, input_names=["input"], output_names=["logits"], dynamic_axes=axes)
    model = onnx.load(str(path))
    for key, value in (("input_mean", json.dumps([mean] * channels)), ("input_std", json.dumps([std] * channels))):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------- entry points


@dataclass(frozen=True)
class Context:
    """Where one benchmark run writes: the markdown file, the PNG folder, scratch space."""

    smoke: bool
    doc: Path
    figures: Path
    work: Path
    quiet: bool
    seed: int


def add_common_arguments(parser: Any) -> None:
    """The options every benchmark takes (one argparse parser per script)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny in-process model, few images/iterations, seconds; writes only to a temporary folder")
    parser.add_argument("--out", type=Path, default=None,
                        help="write BENCHMARKS.md and PNGs here instead of docs/ (default for --smoke: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def make_context(args: Any, name: str) -> Context:
    """Resolve output locations: ``docs/`` for a real run, a temporary folder for ``--smoke``."""
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc, figures = out / "BENCHMARKS.md", out
        work = out / "work"
    elif args.smoke:
        out = Path(tempfile.mkdtemp(prefix=f"onnxdgh-{name}-smoke-"))
        doc, figures, work = out / "BENCHMARKS.md", out, out / "work"
    else:
        doc, figures, work = DOC, DOCS_DIR, WORK / name
    work.mkdir(parents=True, exist_ok=True)
    return Context(smoke=bool(args.smoke), doc=doc, figures=figures, work=work, quiet=bool(args.quiet), seed=int(args.seed))


def log(text: str) -> None:
    """A progress line on stderr, flushed (benchmarks run for long under nohup)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main_wrapper(run: Any) -> None:
    """Run ``run()``; a :class:`BenchError` or onnxdgh error becomes one ``error:`` line and exit 2."""
    try:
        from onnxdgh.errors import OnnxDghError
    except ImportError:  # pragma: no cover
        OnnxDghError = BenchError  # type: ignore[misc,assignment]
    try:
        code = run()
    except (BenchError, OnnxDghError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(code or 0))


def sample_models(names: Sequence[str] | None = None) -> list[Path]:
    """The Fashion-MNIST sample models present in ``samples/`` (all three by default)."""
    wanted = list(names) if names else ["fmnist_resnet8", "fmnist_mobilenetv2", "fmnist_resnet8_silu"]
    paths = [SAMPLES / (n if n.endswith(".onnx") else f"{n}.onnx") for n in wanted]
    found = [p for p in paths if p.exists()]
    if not found:
        raise BenchError(f"no sample model found ({', '.join(str(p) for p in paths)}); train them with tools/train_fashion_mnist.py")
    return found
