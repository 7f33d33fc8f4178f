"""Distributed runs on torchrun: one process per device, coordinated through torch.distributed.

`torchrun --nproc_per_node N -m patchsae train|cache ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR;
`Dist.from_env()` joins that process group (NCCL on CUDA, gloo on CPU). A plain `patchsae` call gets the
single-process `Dist()`, whose collectives are no-ops, so every stage has one code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

TIMEOUT = timedelta(hours=2)  # ranks wait at barriers while others finish their share of a long extraction


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Dist":
        """Join torchrun's process group if WORLD_SIZE > 1 (once per process), else the single-process Dist."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not tdist.is_initialized():
            backend = "nccl" if device.startswith("cuda") else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(local)
            tdist.init_process_group(backend, timeout=TIMEOUT)
        return cls(rank=rank, world=world, local_rank=local)

    def device(self, device: str) -> str:
        """`cuda` means this process's own GPU (cuda:LOCAL_RANK) in a distributed run."""
        return f"cuda:{self.local_rank}" if self.active and device == "cuda" else device

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place, and returned; op is sum, max or min."""
        if self.active:
            tdist.all_reduce(t, {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX,
                                 "min": tdist.ReduceOp.MIN}[op])
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's value, in place."""
        if self.active:
            tdist.broadcast(t, 0)
        return t
