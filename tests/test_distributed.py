"""Data-parallel generation (``distributed=True``): 2 gloo ranks give one process's images.

The ranks are real processes (torch.multiprocessing spawn) joined by the environment
torchrun would set. Both sides run with one intra-op thread: the ranks then run the same
per-batch kernels as the one process, and the images are compared for exact equality
(see onnxdgh/generation/distributed.py for why equality, not a tolerance, is expected).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from onnxdgh.cli import main
from onnxdgh.errors import InvalidInputError
from onnxdgh.generation import GenerateConfig, StepInfo, generate
from onnxdgh.generation.core import _Run
from onnxdgh.generation.distributed import Shard
from onnxdgh.load import load_model
from onnxdgh.convert import to_torch

from .helpers_generate import consistent_model

# 3 batches over 2 ranks: the second round has an idle rank. Iterations 0-1 at 6 x 6, 2-4 at
# full size (coarse_to_fine): the interrupted run below stops after the switch, so its
# resume restores full-size canvases over coarse ones.
SETTINGS = dict(images=12, batch_size=4, iterations=5, checkpoint_every=2, coarse_to_fine="0.5:0.4")
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop_at(iteration: int, batch: int):
    def callback(info: StepInfo) -> None:
        if (info.iteration, info.batch) == (iteration, batch):
            raise KeyboardInterrupt

    return callback


def _worker(rank: int, model: str, out: str, ports: list[int]) -> None:
    """One rank: a full run, a run stopped mid-way with checkpoints, its resume, a resume with a checkpoint missing."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    ckpt = str(Path(out) / "run.ckpt")

    def run(port: int, **kwargs):
        os.environ["MASTER_PORT"] = str(ports[port])
        callback = kwargs.pop("callback", None)
        return generate(model, GenerateConfig(**SETTINGS, distributed=True, **kwargs), progress=False, callback=callback)

    full = run(0)
    assert full.rank == rank and full.report["processes"] == WORLD
    np.save(Path(out) / f"full{rank}.npy", full.images)
    try:  # every rank sees every batch's step info, so all stop at the same step
        run(1, checkpoint=ckpt, callback=_stop_at(2, 1))
        raise AssertionError("the run was not interrupted")
    except KeyboardInterrupt:
        pass
    resumed = run(2, checkpoint=ckpt, resume=True)
    assert resumed.report["resumed_from"] == [2, 2]
    np.save(Path(out) / f"resumed{rank}.npy", resumed.images)
    if rank == 1:
        os.remove(f"{ckpt}.rank1")
    try:
        run(3, checkpoint=ckpt, resume=True)
        raise AssertionError("a missing checkpoint was accepted")
    except InvalidInputError as exc:
        (Path(out) / f"missing{rank}.txt").write_text(f"{exc.message}\n{exc.hint}")


def test_two_gloo_ranks_make_the_images_of_one_process(tmp_path: Path) -> None:
    model = consistent_model(tmp_path / "tiny.onnx")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = generate(model, GenerateConfig(**SETTINGS), progress=False)
    finally:
        torch.set_num_threads(threads)
    # fork, not spawn: a spawned child re-imports torch (over 10 s on a loaded 2-core machine)
    mp.start_processes(_worker, args=(str(model), str(tmp_path), [_free_port() for _ in range(4)]), nprocs=WORLD,
                       join=True, start_method="fork")
    for rank in range(WORLD):
        np.testing.assert_array_equal(np.load(tmp_path / f"full{rank}.npy"), single.images)
        np.testing.assert_array_equal(np.load(tmp_path / f"resumed{rank}.npy"), single.images)
        message = (tmp_path / f"missing{rank}.txt").read_text()
        assert "ranks [1] are missing" in message and "same number of processes" in message
    # per-rank checkpoint files, the given path itself unused
    assert (tmp_path / "run.ckpt.rank0").exists() and not (tmp_path / "run.ckpt").exists()


def test_rerun_refresh_is_refused_with_several_ranks(tiny_model_path: Path) -> None:
    torch_model = to_torch(load_model(tiny_model_path))
    config = GenerateConfig(images=8, batch_size=4, iterations=1, stats_refresh="rerun")
    with pytest.raises(InvalidInputError, match="--stats-refresh rerun") as info:
        _Run(torch_model, config, None, None, Shard(rank=0, world=2))
    assert "reuse" in (info.value.hint or "")


def test_cli_distributed_without_torchrun_exit_2(tiny_model_path: Path, tmp_path: Path, monkeypatch) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(main, ["generate", str(tiny_model_path), "-o", str(tmp_path / "x.npz"), "--distributed",
                                       "--images", "4", "--iterations", "1"])
    assert result.exit_code == 2, result.output
    assert "torchrun" in result.output and "hint:" in result.output
    assert not (tmp_path / "x.npz").exists()


def test_bench_distributed_smoke(tmp_path: Path) -> None:
    """tools/bench_distributed.py --smoke: one process and 2 torchrun ranks, images equal, section written."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1", PYTHONPATH=str(repo))
    command = [sys.executable, str(repo / "tools" / "bench_distributed.py"), "--smoke", "-q", "--out", str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    if proc.returncode != 0 and "(SIGABRT)" in proc.stderr:
        # Seen once in a fresh-clone CI run (and 0 times in 5 reruns): a torchrun rank aborted
        # at start-up with no message. The same 2-rank equality is also tested in-process
        # above without torchrun; here one retry keeps a launcher hiccup from failing CI,
        # and a second abort still fails.
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- bench:distributed:start -->" in section and "| equal |" in section


def test_random_draws_depend_on_the_image_index_only() -> None:
    """An image's noise and crops are the same whichever batch (or rank) draws them."""
    from onnxdgh.generation.prep import image_noise, view_draws

    whole = image_noise(7, range(10), (1, 4, 4))
    np.testing.assert_array_equal(image_noise(7, [5, 6], (1, 4, 4)).numpy(), whole[5:7].numpy())
    assert not np.array_equal(image_noise(8, [5], (1, 4, 4)).numpy(), whole[5:6].numpy())
    flips, tops, lefts = view_draws(7, range(64), 3, margin=4)
    part = view_draws(7, range(10, 20), 3, margin=4)
    for full, piece in zip((flips, tops, lefts), part):
        assert torch.equal(full[10:20], piece)
    assert 0 < int(flips.sum()) < 64 and int(tops.min()) >= 0 and int(tops.max()) == 4 and len(set(lefts.tolist())) == 5
    assert not torch.equal(view_draws(7, range(64), 4, margin=4)[1], tops)  # another view, other crops
