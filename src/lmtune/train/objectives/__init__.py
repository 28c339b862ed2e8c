"""Training objectives, one small module each, behind one interface (base.py).

    next_token.py   SFT and continued pretraining (next-token cross-entropy)
    preference.py   what the preference objectives share: packed pairs, per-sequence
                    log-probabilities, the reference (precomputed, adapter off, or a frozen copy)
    dpo.py          DPO (sigmoid), IPO, hinge
    orpo.py         ORPO (no reference)
    simpo.py        SimPO (no reference)
    kto.py          KTO (single answers labelled desirable or not)
    reward.py       a reward model (scalar head, Bradley–Terry loss)

To add one: write a module with an `Objective` subclass, add its name to the config schema's
`objective` key and to `make_objective` below (see docs/architecture.md).
"""

from __future__ import annotations

from lmtune.train.batch import flat_batch
from lmtune.train.objectives.base import Forward, Objective
from lmtune.train.objectives.next_token import NextToken, loss_sum

__all__ = ["Forward", "Objective", "NextToken", "flat_batch", "loss_sum", "make_objective"]


def make_objective(cfg, reference_model=None, kind=None) -> Objective:
    """The objective of `cfg`; `reference_model` (DPO, KTO) is a frozen reference to use instead of
    the one the objective would find itself; `kind` (the model kind) adds what its batches need
    (a vision-language model's images)."""
    if cfg.objective in ("sft", "pretrain"):
        kl = any(d.get("loss") == "kl_to_base" for d in cfg.datasets)
        return NextToken(cfg.objective, extra_inputs=getattr(kind, "vision_inputs", None),
                         kl_to_base_weight=cfg.kl_to_base_weight if kl else None)
    if cfg.objective == "dpo":
        from lmtune.train.objectives.dpo import DPO

        return DPO(cfg, reference_model)
    if cfg.objective == "orpo":
        from lmtune.train.objectives.orpo import ORPO

        return ORPO(cfg)
    if cfg.objective == "simpo":
        from lmtune.train.objectives.simpo import SimPO

        return SimPO(cfg)
    if cfg.objective == "kto":
        from lmtune.train.objectives.kto import KTO

        return KTO(cfg, reference_model)
    if cfg.objective == "reward":
        from lmtune.train.objectives.reward import Reward

        return Reward(cfg)
    raise ValueError(f"unknown objective {cfg.objective!r}")  # the config schema already refused it
