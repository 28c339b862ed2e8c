"""Joining the process group, and what every multi-process strategy shares.

The process group comes from the environment torchrun (or srun, see distributed_launch.py) sets:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Started without a launcher, a strategy
runs as a group of one, which is handy for trying ZeRO-3 or CPU offload on a single GPU.

Gradients: the loop scales each micro-batch loss by world_size / (the objective's count over the
whole global step); every strategy averages gradients over processes; so the update is that of the
mean over the global step, whatever the process count (checked in tests/test_distributed.py).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from lmtune.train.checkpoint import SHARDS_FILE
from lmtune.train.runtime import pick_device, pick_precision
from lmtune.train.strategies.base import SingleProcess, WholeState


def init_process_group() -> tuple[int, int, int]:
    """Join (or create) the default process group; returns (rank, world_size, local_rank)."""
    from lmtune.train.distributed_launch import env_from_slurm

    env_from_slurm()
    if "RANK" not in os.environ:  # not started by a launcher: a group of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        # NCCL on GPU; gloo on CPU. timeout: a checkpoint save or a probe on a large model is slow.
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=torch.device("cuda", local_rank) if cuda else None)
        atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size(), local_rank


def _destroy() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ProcessGroupStrategy(SingleProcess):
    name = "ddp"

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.rank, self.world_size, self.local_rank = init_process_group()
        self.is_main = self.rank == 0

    def device(self, preferred: torch.device) -> torch.device:
        if preferred.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return preferred

    def sum_scalar(self, value: torch.Tensor) -> float:
        return float(self.sum_tensor(value))

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        t = value.detach().clone().to(torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        dist.barrier()

    def amp_dtype(self):
        return pick_precision(self.cfg, self.device(pick_device(self.cfg.device)))


class ShardedState(WholeState):
    """Checkpoint I/O where every rank writes its own part (FSDP2, DeepSpeed)."""

    sharded = True

    def __init__(self, strategy: ProcessGroupStrategy):
        self.strategy = strategy

    def write_shards_info(self, folder: Path, **info) -> None:
        s = self.strategy
        if s.is_main:
            data = {"engine": s.name, "world_size": s.world_size, "method": s.cfg.method, **info}
            (folder / SHARDS_FILE).write_text(json.dumps(data, indent=1), encoding="utf-8")

    def save_rank_rng(self, folder: Path) -> None:
        torch.save({"torch": torch.get_rng_state()}, folder / f"rng-rank{self.strategy.rank}.pt")

    def restore_rank_rng(self, folder: Path) -> None:
        p = folder / f"rng-rank{self.strategy.rank}.pt"
        if p.is_file():  # the same world size: each rank continues its own random stream (dropout)
            torch.set_rng_state(torch.load(p, weights_only=True)["torch"])
