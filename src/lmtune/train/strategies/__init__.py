"""Distributed strategies, one file each, behind the interface in base.py.

    base.py           the interface; SingleProcess (one process, the default)
    process_group.py  joining the process group; what the multi-process strategies share
    ddp.py            DistributedDataParallel
    fsdp2.py          FSDP2 (fully_shard per decoder layer)
    deepspeed.py      DeepSpeed ZeRO 1/2/3 (+ CPU offload)
"""

from __future__ import annotations

from lmtune.errors import UserError
from lmtune.train.strategies.base import SingleProcess


def make_strategy(cfg):
    """The strategy for `cfg.strategy` (auto/single under torchrun: DDP; with `deepspeed` set: DeepSpeed)."""
    strategy = cfg.strategy
    if strategy in ("auto", "single"):
        strategy = "deepspeed" if cfg.deepspeed else "ddp"
    if strategy == "deepspeed":
        from lmtune.train.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg)
    if cfg.deepspeed:
        raise UserError(f"deepspeed = {cfg.deepspeed!r} is set but strategy = {cfg.strategy!r}",
                        where=cfg._source, hint="set strategy = 'deepspeed' (or drop the deepspeed key)")
    if strategy == "fsdp2":
        from lmtune.train.strategies.fsdp2 import FSDP2Strategy

        return FSDP2Strategy(cfg)
    from lmtune.train.strategies.ddp import DDPStrategy

    return DDPStrategy(cfg)


__all__ = ["SingleProcess", "make_strategy"]
