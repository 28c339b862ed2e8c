"""Training objectives, one small module each, behind one interface (base.py).

    next_token.py   SFT and continued pretraining (next-token cross-entropy)

To add one: write a module with an `Objective` subclass, add its name to the config schema's
`objective` key and to `make_objective` below (see docs/architecture.md).
"""

from __future__ import annotations

from lmtune.train.batch import flat_batch
from lmtune.train.objectives.base import Forward, Objective
from lmtune.train.objectives.next_token import NextToken, loss_sum

__all__ = ["Forward", "Objective", "NextToken", "flat_batch", "loss_sum", "make_objective"]


def make_objective(cfg, kind=None) -> Objective:
    """The config's objective; `kind` (the model kind) adds what its batches need (images)."""
    if cfg.objective in ("sft", "pretrain"):
        return NextToken(cfg.objective, extra_inputs=getattr(kind, "vision_inputs", None))
    raise ValueError(f"unknown objective {cfg.objective!r}")  # the config schema already refused it
