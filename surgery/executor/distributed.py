"""Several processes (GPUs, or CPU processes with gloo) sharing one calibration.

Launched by `torchrun --nproc-per-node N -m surgery calibrate ...` (or `surgery calibrate --nproc N`,
which launches that): every rank runs every layer on its own share of the batches (round robin,
fixed for the whole run, so a rank only ever needs its own rows' hidden states), writes its rows of
the shared zarr cache (one row per chunk, so ranks never write the same file), and the per-expert
statistics are summed across ranks in rank order on rank 0, which alone writes statistics and the
manifest. Frequencies are exact integers, so they equal the single-process result to the last bit;
the float sums are equal up to summation order (~1e-15 relative).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if it is True on any rank (e.g. an error or a stop request)."""
        if self.world == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def agree_max(self, value: int) -> int:
        """The largest of every rank's `value`, on every rank: decisions that lead to collective
        operations (e.g. when to checkpoint) must be the same everywhere, or the ranks deadlock."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj: object) -> list[object]:
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def init_ranks(device_spec: str) -> Ranks:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch.distributed.is_initialized():
        use_cuda = torch.cuda.is_available() and device_spec != "cpu"
        torch.distributed.init_process_group(backend="gloo" if not use_cuda else "cuda:nccl,cpu:gloo")
    return Ranks(rank, world, local)


def sum_stats(parts: list[dict]) -> dict:
    """Combine per-rank raw accumulators in rank order (max for max_activation)."""
    total = {k: np.array(v, dtype=np.float64) for k, v in parts[0].items()}
    for part in parts[1:]:
        for k, v in part.items():
            v = np.array(v, dtype=np.float64)
            total[k] = np.maximum(total[k], v) if k == "max_activation" else total[k] + v
    return total
