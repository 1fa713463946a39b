#!/usr/bin/env python3
"""Fuzz the onnxdgh command line with mutated models and calibration files (issue 17).

    python3 tools/fuzz.py --cases 10000 --seed 0 --out out/fuzz

Hypothesis draws each case (:mod:`fuzz_cases`): a tiny Conv-BN-ReLU model (or its
quantized form) mutated at the protobuf byte level or the graph level, ``.npz``/``.npy``
calibration, label and profile files mutated likewise, and fuzzed options; the case runs
``onnxdgh inspect|validate|generate|quantize`` with tiny settings. A case FAILS on

* ``traceback``: an exception escaped the command (in-process: click's runner caught a
  non-``SystemExit``) or ``Traceback`` appears in its output;
* ``bad_exit``: an exit code outside 0, 1, 2, 130; ``crash``: the worker process died;
* ``hang``: no answer within ``--time-limit`` seconds (the worker is killed and restarted);
* ``modified_input``: an input file's SHA-256 changed or the file vanished;
* ``partial_output``: a file left behind by a run that exited 2/130 (or any code but 0/1),
  or a file written by a run that exited 0/1 that does not load (``.onnx`` through the
  ONNX checker, ``.npz`` through onnxdgh's image loader, ``.json``, ``.png``, checkpoint);
  ``missing_output``: exit 0 without the ``-o`` file. Exit 1 is "a check failed" (not
  ready, violations, a gate): its reports and ``quantize``'s model are complete outputs.

Speed: cases run in one long-lived worker process (``--worker``) that imports onnxdgh and
torch once, pins itself to one CPU with one torch thread, and invokes the click ``main``
through ``click.testing.CliRunner``; the supervisor (this process, no torch) sends one
case at a time over a pipe, waits at most ``--time-limit`` seconds, and hashes the inputs
before and after. The summary (``DIR/summary.json``) counts outcomes per command,
mutation and failure kind; reproducers (pristine inputs, ``case.json``, ``repro.sh``) are
saved under ``DIR/failures/<signature>/``. Exit status: 0 when no case failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent

ALLOWED_EXIT_CODES = (0, 1, 2, 130)
FAILURE_KINDS = ("traceback", "bad_exit", "crash", "hang", "modified_input", "partial_output", "missing_output")
_TRACEBACK = "Traceback (most recent call last)"
_MAX_LISTED = 2000  # failed cases listed one by one in the summary (all are counted)
_ROUND = 1000  # cases per hypothesis run (see run_fuzz)


# =========================================================================== worker side


def _check_output(path: Path) -> str | None:
    """None when ``path`` is a complete output file, else why not."""
    name = path.name
    try:
        if path.is_dir():
            return "a folder was created"
        if name.endswith(".tmp") or name.startswith("."):
            return "temporary file left behind"
        if name.endswith(".onnx"):
            import onnx

            onnx.checker.check_model(onnx.load(str(path)))
        elif name.endswith((".npz", ".npy")):
            from onnxdgh.fileio import load_images_npz

            load_images_npz(path)
        elif name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as image:
                image.verify()
        elif name.endswith(".ckpt"):
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "format" not in state:
                return "not an onnxdgh checkpoint"
        else:
            return "unexpected file"
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        return f"does not load: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def _files(root: Path) -> list[str]:
    """Every file and folder below ``root``, relative, sorted (folders end with '/')."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        found.append(rel + "/" if path.is_dir() and not path.is_symlink() else rel)
    return found


def _run_job(job: dict[str, Any], main: Any, runner_cls: Any) -> dict[str, Any]:
    import logging
    import traceback

    cwd = Path(job["cwd"])
    os.chdir(cwd)
    # A fresh process starts with no logging handlers; main() installs one on the
    # stream that is sys.stderr *now*, which the runner replaces per invocation.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    runner = runner_cls()
    start = time.perf_counter()
    tb = None
    try:
        result = runner.invoke(main, job["args"], catch_exceptions=True)
        exit_code = result.exit_code
        stdout, stderr = result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            tb = "".join(traceback.format_exception(*result.exc_info))
    except BaseException as exc:  # noqa: BLE001 - KeyboardInterrupt and the like escape the runner
        exit_code, stdout, stderr = 1, "", ""
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    seconds = time.perf_counter() - start
    before = set(job["inputs"]) | set(job.get("folders", []))
    outputs = {}
    for rel in _files(cwd):
        if rel not in before:
            outputs[rel] = _check_output(cwd / rel.rstrip("/"))
    os.chdir(job.get("home", "/"))
    return {
        "exit_code": exit_code,
        "traceback": tb,
        "stdout_tail": stdout[-2000:],
        "stderr_tail": stderr[-4000:],
        "traceback_in_output": _TRACEBACK in stdout or _TRACEBACK in stderr,
        "outputs": outputs,
        "seconds": round(seconds, 4),
    }


def worker_main(memory_gib: float, cpu: int) -> None:
    """Serve cases: one JSON job per stdin line, one JSON reply per line on the protocol pipe."""
    import resource

    if memory_gib > 0:
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})
    # The protocol owns the original stdout; stray prints (C libraries included) go to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    from click.testing import CliRunner

    from onnxdgh.cli import main

    protocol.write(json.dumps({"ready": True, "onnxdgh": str(Path(sys.modules["onnxdgh"].__file__).parent)}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        protocol.write(json.dumps(_run_job(job, main, CliRunner)) + "\n")


# =========================================================================== supervisor side


class WorkerDied(RuntimeError):
    """The worker process exited (crash, memory kill) while running a case."""


class Worker:
    """A ``--worker`` subprocess answering one case at a time, killed on a time-out."""

    def __init__(self, log_path: Path, *, memory_gib: float, cpu: int, start_timeout: float = 600) -> None:
        self.log_path = log_path
        self.memory_gib = memory_gib
        self.cpu = cpu
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.buffer = b""
        self.starts = 0
        self.onnxdgh_path = ""

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
                   PYTHONHASHSEED="0", PYTHONWARNINGS="ignore")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--memory-gib", str(self.memory_gib),
             "--cpu", str(self.cpu)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(REPO),
            start_new_session=True,
        )
        log.close()
        self.buffer = b""
        self.starts += 1
        ready = self._read(self.start_timeout)
        if ready is None or not ready.get("ready"):
            self.stop()
            raise RuntimeError(f"the fuzz worker did not start; see {self.log_path}")
        self.onnxdgh_path = ready["onnxdgh"]

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                stream.close()
        self.proc = None

    def _read(self, timeout: float) -> dict[str, Any] | None:
        """The next reply line, None on time-out; WorkerDied when the process ends."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                code = self.proc.wait()
                self.proc = None
                raise WorkerDied(f"worker exited with status {code}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def run(self, job: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """The worker's reply to ``job``; None when it did not answer in ``timeout`` seconds."""
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError as exc:
            self.stop()
            raise WorkerDied("worker pipe closed") from exc
        return self._read(timeout)


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _signature(command: str, kinds: list[str], reply: dict[str, Any] | None) -> str:
    """A short stable name grouping failures with one cause (exception + innermost onnxdgh frame)."""
    detail = ""
    tb = (reply or {}).get("traceback") or ""
    if not tb and reply and reply.get("traceback_in_output"):
        tb = reply.get("stderr_tail", "")
    if tb:
        frames = re.findall(r'File "([^"]+)", line (\d+)', tb)
        ours = [(f, n) for f, n in frames if "/onnxdgh/" in f and "/tools/" not in f]
        where = ours[-1] if ours else (frames[-1] if frames else ("?", "0"))
        last = tb.strip().splitlines()[-1] if tb.strip() else ""
        detail = f"{last.split(':')[0]}@{Path(where[0]).name}:{where[1]}"
    elif reply:
        bad = [f"{name}:{why.split(':')[0]}" for name, why in sorted(reply.get("outputs", {}).items()) if why]
        detail = ",".join(bad) if bad else ""
    return f"{command}:{'+'.join(kinds)}:{detail}"


def _mutation_kind(mutation: str) -> str:
    """'graph:init_values:bn0.var=nan:all' -> 'graph:init_values'; data mutations keep their kind."""
    parts = re.split(r"[=@]", mutation, maxsplit=1)[0].split(":")
    return ":".join(parts[:3] if parts[0] == "data" else parts[:2])


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)[:120]


class Fuzzer:
    """Runs cases through a :class:`Worker`, classifies them and keeps the summary."""

    def __init__(self, out: Path, *, time_limit: float, restart_every: int, memory_gib: float, cpu: int,
                 keep: int) -> None:
        self.out = out
        self.case_dir = out / "work" / "case"
        self.time_limit = time_limit
        self.restart_every = restart_every
        self.keep = keep
        self.worker = Worker(out / "worker.log", memory_gib=memory_gib, cpu=cpu)
        self.count = 0
        self.seen: set[bytes] = set()
        self.duplicates = 0
        self.by_command: dict[str, Counter[str]] = defaultdict(Counter)
        self.by_mutation: dict[str, Counter[str]] = defaultdict(Counter)
        self.failure_counts: Counter[str] = Counter()
        self.signatures: dict[str, dict[str, Any]] = {}
        self.failed_cases: list[dict[str, Any]] = []
        self.seconds_by_command: Counter[str] = Counter()
        self.hangs_restarts = 0

    # ----------------------------------------------------------------- one case
    def run_files(self, args: list[str], files: dict[str, bytes]) -> tuple[dict[str, Any] | None, list[str], int]:
        """Run ``onnxdgh ARGS`` on ``files`` in a fresh case folder; (reply, failure kinds, exit code)."""
        from fuzz_cases import SUBDIR

        if self.case_dir.exists():
            shutil.rmtree(self.case_dir)
        self.case_dir.mkdir(parents=True)
        (self.case_dir / SUBDIR).mkdir()
        for name, data in files.items():
            (self.case_dir / name).write_bytes(data)
        hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        job = {"cwd": str(self.case_dir), "args": args, "inputs": sorted(files), "folders": [SUBDIR + "/"],
               "home": str(self.out)}
        kinds: list[str] = []
        try:
            reply = self.worker.run(job, self.time_limit)
        except WorkerDied as exc:
            reply = {"exit_code": None, "traceback": None, "stderr_tail": str(exc), "outputs": {}}
            kinds.append("crash")
        else:
            if reply is None:
                kinds.append("hang")
                self.worker.stop()
                self.hangs_restarts += 1
        if reply is not None and "crash" not in kinds:
            code = reply["exit_code"]
            if reply.get("traceback") or reply.get("traceback_in_output"):
                kinds.append("traceback")
            if code not in ALLOWED_EXIT_CODES:
                kinds.append("bad_exit")
            outputs = reply.get("outputs", {})
            if outputs and code not in (0, 1):
                kinds.append("partial_output")
            elif any(why for why in outputs.values()):
                kinds.append("partial_output")
        for name, digest in hashes.items():
            if _sha256(self.case_dir / name) != digest:
                kinds.append("modified_input")
                break
        code = reply["exit_code"] if reply else None
        return reply, kinds, code

    def run_case(self, case: Any) -> None:
        """Run one :class:`fuzz_cases.Case`, record its outcome, save a reproducer if it fails."""
        key = hashlib.sha256(json.dumps(case.args).encode())
        for name in sorted(case.files):
            key.update(name.encode() + b"\0" + hashlib.sha256(case.files[name]).digest())
        if key.digest() in self.seen:  # hypothesis draws some cases again: run each once
            self.duplicates += 1
            return
        self.seen.add(key.digest())
        index = self.count
        self.count += 1
        if self.restart_every and index and index % self.restart_every == 0:
            self.worker.stop()
        started = time.perf_counter()
        reply, kinds, code = self.run_files(case.args, case.files)
        output = case.output_options.get("-o")
        if code == 0 and output and output != "-" and not (self.case_dir / output).is_file():
            kinds.append("missing_output")
        self.seconds_by_command[case.command] += time.perf_counter() - started
        outcome = "+".join(kinds) if kinds else f"exit{code}"
        self.by_command[case.command][outcome] += 1
        for mutation in case.mutations:
            self.by_mutation[_mutation_kind(mutation)][outcome] += 1
        if not kinds:
            return
        for kind in kinds:
            self.failure_counts[kind] += 1
        signature = _signature(case.command, kinds, reply)
        entry = self.signatures.setdefault(signature, {"signature": signature, "count": 0, "reproducers": []})
        entry["count"] += 1
        record = {"case": index, "command": case.command, "kinds": kinds, "exit_code": code, "args": case.args,
                  "mutations": case.mutations, "signature": signature}
        if len(entry["reproducers"]) < self.keep:
            folder = self.out / "failures" / _slug(signature) / f"case-{index}"
            self._save(folder, case, record, reply)
            entry["reproducers"].append(str(folder.relative_to(self.out)))
            record["reproducer"] = entry["reproducers"][-1]
        if len(self.failed_cases) < _MAX_LISTED:
            self.failed_cases.append(record)

    def _save(self, folder: Path, case: Any, record: dict[str, Any], reply: dict[str, Any] | None) -> None:
        from fuzz_cases import SUBDIR

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / SUBDIR).mkdir()
        for name, data in case.files.items():
            (folder / name).write_bytes(data)
        details = dict(record, reply=reply)
        (folder / "case.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
        (folder / "repro.sh").write_text(
            "#!/bin/sh\n# Reproduce in a scratch copy of this folder (outputs are written beside the inputs).\n"
            f'cd "$(dirname "$0")" && PYTHONPATH="{REPO}" python3 -m onnxdgh {shlex.join(case.args)}\n'
        )

    # ----------------------------------------------------------------- summary
    def summary(self, *, seed: int, seconds: float, command_line: list[str]) -> dict[str, Any]:
        failed = sum(sum(n for o, n in c.items() if not o.startswith("exit")) for c in self.by_command.values())
        return {
            "command": " ".join(shlex.quote(a) for a in command_line),
            "onnxdgh": self.worker.onnxdgh_path,
            "seed": seed,
            "cases": self.count,
            "duplicates_skipped": self.duplicates,
            "failed_cases": failed,
            "seconds": round(seconds, 1),
            "cases_per_second": round(self.count / seconds, 2) if seconds else None,
            "failures": {kind: self.failure_counts.get(kind, 0) for kind in FAILURE_KINDS},
            "worker_starts": self.worker.starts,
            "by_command": {cmd: dict(sorted(c.items())) for cmd, c in sorted(self.by_command.items())},
            "seconds_by_command": {cmd: round(s, 1) for cmd, s in sorted(self.seconds_by_command.items())},
            "by_mutation": {m: dict(sorted(c.items())) for m, c in sorted(self.by_mutation.items())},
            "signatures": sorted(self.signatures.values(), key=lambda e: -e["count"]),
            "failed_case_list": self.failed_cases,
            "failed_case_list_truncated": failed > len(self.failed_cases),
        }


def prepare_seeds(fuzzer: Fuzzer) -> Any:
    """The seed files, with the quantized seed made by ``onnxdgh quantize`` in the worker."""
    import io

    import numpy as np
    import onnx

    import fuzz_cases

    float_model = fuzz_cases.tiny_float_model()
    images = np.random.default_rng(1).normal(0, 1, (4, *fuzz_cases.INPUT_SHAPE)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, images=images)
    files = {"model.onnx": float_model.SerializeToString(), "calib.npz": buffer.getvalue()}
    args = ["-q", "quantize", "model.onnx", "-o", "q.onnx", "--calib-data", "calib.npz", "--no-validate"]
    reply, kinds, code = fuzzer.run_files(args, files)
    if kinds or code != 0:
        raise RuntimeError(f"could not quantize the seed model: {kinds} exit {code}: {(reply or {}).get('stderr_tail')}")
    quantized = onnx.load_from_string((fuzzer.case_dir / "q.onnx").read_bytes())
    return fuzz_cases.make_seeds(quantized)


def run_fuzz(cases: int, seed: int, out: str | os.PathLike[str], *, time_limit: float = 60.0,
             restart_every: int = 2000, memory_gib: float = 6.0, cpu: int | None = None, keep: int = 3,
             progress: bool = False, command_line: list[str] | None = None) -> dict[str, Any]:
    """Run ``cases`` hypothesis-drawn cases seeded by ``seed``; write and return the summary.

    ``cpu`` pins the worker to that CPU (default: the first CPU this process may use;
    -1: no pinning). Reproducible: the same seed draws the same cases.
    """
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    import fuzz_cases

    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if cpu is None:
        cpu = min(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else -1
    fuzzer = Fuzzer(out_dir, time_limit=time_limit, restart_every=restart_every, memory_gib=memory_gib, cpu=cpu,
                    keep=keep)
    started = time.perf_counter()
    try:
        seeds = prepare_seeds(fuzzer)
        for case in fuzz_cases.baseline_cases(seeds)[:cases]:
            fuzzer.run_case(case)
        round_ = stalled = 0
        while fuzzer.count < cases:
            # Rounds of at most _ROUND cases, each with a derived seed: hypothesis keeps the
            # draws of a run in memory, and may draw fewer examples than asked (it skips
            # duplicates); rounds go on until the count is reached.
            # (At least 100: a run's first examples are the simplest, the same in every round.)
            @settings(max_examples=min(max(cases - fuzzer.count, 100), _ROUND), database=None, deadline=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck), derandomize=False)
            @hypothesis_seed(seed * 1000 + round_)
            @given(case=fuzz_cases.case_strategy(seeds))
            def one(case: Any) -> None:
                if fuzzer.count >= cases:
                    return
                ran = fuzzer.count
                fuzzer.run_case(case)
                if progress and fuzzer.count != ran and fuzzer.count % 100 == 0:
                    failed = sum(fuzzer.failure_counts.values())
                    print(f"{fuzzer.count} cases, {time.perf_counter() - started:.0f} s, {failed} failure(s)",
                          flush=True)

            before = fuzzer.count
            one()
            round_ += 1
            stalled = stalled + 1 if fuzzer.count == before else 0
            if stalled >= 20:  # only duplicates, round after round: the strategy is exhausted
                break
    finally:
        fuzzer.worker.stop()
    summary = fuzzer.summary(seed=seed, seconds=time.perf_counter() - started,
                             command_line=command_line or ["run_fuzz", str(cases), str(seed)])
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    shutil.rmtree(out_dir / "work", ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10000, help="Cases to run (default 10000).")
    parser.add_argument("--seed", type=int, default=0, help="Hypothesis seed: the same seed draws the same cases.")
    parser.add_argument("--out", help="Folder for summary.json, reproducers and the worker log.")
    parser.add_argument("--time-limit", type=float, default=60.0, help="Seconds a case may take before it is a hang.")
    parser.add_argument("--restart-every", type=int, default=2000, help="Restart the worker after this many cases.")
    parser.add_argument("--memory-gib", type=float, default=6.0, help="Address-space limit of the worker (0: none).")
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin the worker to (default: first allowed; -1: none).")
    parser.add_argument("--keep", type=int, default=3, help="Reproducers saved per failure signature.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.memory_gib, -1 if args.cpu is None else args.cpu)
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    summary = run_fuzz(args.cases, args.seed, args.out, time_limit=args.time_limit, restart_every=args.restart_every,
                       memory_gib=args.memory_gib, cpu=args.cpu, keep=args.keep, progress=True,
                       command_line=["python3", "tools/fuzz.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"{summary['cases']} distinct cases in {summary['seconds']:.0f} s; failed cases {summary['failed_cases']}; "
          + ", ".join(f"{kind} {n}" for kind, n in summary["failures"].items()))
    for entry in summary["signatures"][:20]:
        print(f"  {entry['count']:5d}  {entry['signature']}  {entry['reproducers'][:1]}")
    print(f"summary: {Path(args.out) / 'summary.json'}")
    return 1 if summary["failed_cases"] else 0


if __name__ == "__main__":
    sys.exit(main())
