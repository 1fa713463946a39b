"""Data-parallel image generation over torch.distributed (``--distributed`` under ``torchrun``).

Contract: :func:`open_shard` joins (or creates, from torchrun's environment) the default
process group -- gloo on CPU, NCCL with ``device="cuda"``, one GPU per local rank -- and
returns a :class:`Shard`: this process's rank, the world size and the few collectives the
run needs. Without ``--distributed`` the run uses :data:`SINGLE` (rank 0 of 1), whose
collectives return their input: the one-process run is the same code with no messages.

How the work is split and why the images equal one process's (the run loop is in
:mod:`onnxdgh.generation.core`): batch b (global index, the same batches as one process)
belongs to rank ``b % world``. An iteration steps the batches in rounds of ``world``
consecutive batches, one per rank, at the same time. One process steps batch b after
batches 0..b-1 of this iteration (Algorithm 1 sequential over batches), and with the
default ``stats_refresh="reuse"`` the moments batch m leaves in the SAS store (Eq. 5) are
those of m's own forward pass in this iteration -- computed before its step, from its
canvas alone. So in a round every rank runs its batch's forward, the round's per-batch
moments (per-layer per-channel mean and variance, two vectors per batch) are all-gathered,
and rank r stores its lower-ranked round-mates' fresh moments before its own loss: it sees
exactly the store one process would (batches < b of this iteration, > b of the last), and
the whole-set loss is exact. Gathering each batch's moments (rather than all-reducing
weighted sums) keeps the arithmetic of Eq. 5 the same operations in the same order as in
one process, so the results are equal bit for bit when the per-batch forward is (same
thread count: oneDNN may pick other kernels for another one). ``stats_refresh="rerun"``
stores moments from after the step, which a round-mate cannot have yet: refused with
more than one rank.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import InvalidInputError

__all__ = ["Shard", "SINGLE", "open_shard", "close_shard"]

_LOG = logging.getLogger(__name__)

_LAUNCH_HINT = "launch with torchrun, e.g. torchrun --nproc_per_node 2 -m onnxdgh generate MODEL -o OUT --distributed"

# A rank that dies takes torchrun's whole group down; this bounds a hang when a peer is
# stuck instead (a 224-px round on a slow CPU is minutes at most).
_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Shard:
    """This process's place in a data-parallel run: ``rank`` of ``world`` processes.

    ``device`` is where collective buffers live (the GPU under NCCL, else the CPU);
    ``owned`` is set when :func:`open_shard` created the process group and
    :func:`close_shard` should destroy it.
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    owned: bool = False

    def owns(self, batch: int) -> bool:
        """Whether global batch ``batch`` is optimised by this rank (round-robin)."""
        return batch % self.world == self.rank

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (same shape and dtype on all), in rank order, on ``tensor``'s device."""
        if self.world == 1:
            return [tensor]
        source = tensor.detach().to(self.device).contiguous()
        parts = [torch.empty_like(source) for _ in range(self.world)]
        torch.distributed.all_gather(parts, source)
        return [part.to(tensor.device) for part in parts]

    def agree(self, values: list[float]) -> list[list[float]]:
        """Every rank's list of numbers (same length on all), in rank order."""
        return [part.tolist() for part in self.gather(torch.tensor(values, dtype=torch.float64))]


SINGLE = Shard()
"""The one-process run: no process group, collectives are the identity."""


def open_shard(device: str) -> Shard:
    """Join the process group of a ``torchrun`` launch (creating it from the environment if needed).

    Raises:
        InvalidInputError: not launched by torchrun (no ``RANK``/``WORLD_SIZE``) and no
            process group exists, torch was built without distributed support, or
            ``device="cuda"`` with fewer visible GPUs than local ranks.
    """
    dist = torch.distributed
    if not dist.is_available():
        raise InvalidInputError("--distributed: this torch build has no torch.distributed", "install a standard torch wheel, or drop --distributed")
    if dist.is_initialized():
        return Shard(rank=dist.get_rank(), world=dist.get_world_size(),
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise InvalidInputError("--distributed needs the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR)", _LAUNCH_HINT)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise InvalidInputError(
                f"--distributed --device cuda: local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                "start at most one process per GPU (torchrun --nproc_per_node), or use --device cpu",
            )
        torch.cuda.set_device(local_rank)  # "cuda" tensors of this rank go to its own GPU
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=_TIMEOUT)
    shard = Shard(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owned=True)
    _LOG.info("distributed generation: rank %d of %d (%s)", shard.rank, shard.world, dist.get_backend())
    return shard


def close_shard(shard: Shard) -> None:
    """Destroy the process group if :func:`open_shard` created it."""
    if shard.owned and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
