"""`lmtune train`: resolve the config and work dir, start processes if asked, run the loop."""

from __future__ import annotations

import os
from pathlib import Path

from lmtune.errors import UserError


def default_work_dir(config: str) -> Path:
    return Path("work_dirs") / Path(config).stem


def train_command(args) -> int:
    from lmtune.config import load_config, parse_overrides

    overrides = parse_overrides(args.cfg_options)
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.deepspeed:
        overrides["deepspeed"] = args.deepspeed
        overrides.setdefault("strategy", "deepspeed")
    cfg = load_config(args.config, overrides)
    work_dir = Path(args.work_dir or cfg.work_dir or default_work_dir(args.config))
    nproc = args.nproc_per_node or int(os.environ.get("NPROC_PER_NODE", "0") or 0)
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        from lmtune.train.distributed_launch import relaunch_with_torchrun

        return relaunch_with_torchrun(nproc)
    dist = None
    launched = "LOCAL_RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1
    if launched or cfg.strategy not in ("auto", "single"):
        try:
            from lmtune.train.strategies import make_strategy
        except ImportError as e:
            raise UserError(f"strategy '{cfg.strategy}' is not available: {e}") from None
        dist = make_strategy(cfg)
    from lmtune.train.loop import run_training

    out = run_training(cfg, work_dir, resume=args.resume, dist=dist, overwrite=args.overwrite)
    if out is not None:
        print(f"[lmtune] done. Chat with it:  lmtune chat {out}")
    return 0
