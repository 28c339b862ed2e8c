"""DDP: every process holds the whole model; gradients are all-reduced (averaged) after backward.
Checkpoints are written like one process's (rank 0 writes the whole trainable state)."""

from __future__ import annotations

import contextlib

from lmtune.train.strategies.process_group import ProcessGroupStrategy


class DDPStrategy(ProcessGroupStrategy):
    name = "ddp"

    def wrap(self, model, cfg):
        from torch.nn.parallel import DistributedDataParallel

        device = next(p.device for p in model.parameters())
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model, last: bool):
        # Skip the all-reduce for all but the last micro-batch of a step (gradients accumulate locally).
        return contextlib.nullcontext() if last else model.no_sync()
