"""DPO (Rafailov et al. 2023) and two of its variants, on packed pairs.

With h = log πθ(y_w|x)/πref(y_w|x) − log πθ(y_l|x)/πref(y_l|x), the log-ratio margin of a pair:

    sigmoid   −(1−ε)·log σ(β·h) − ε·log σ(−β·h)      DPO; ε = label_smoothing (conservative DPO)
    ipo       (h − 1/(2β))²                          IPO (Azar et al. 2023), summed log-probs as in
                                                     the paper
    hinge     max(0, 1 − β·h)                        SLiC-HF's hinge (Zhao et al. 2023) on the margin

The implicit rewards β·log πθ/πref of chosen and rejected answers are logged with their margin
and the share of pairs where the chosen reward is the higher ("accuracy").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.preference import PreferenceObjective, pair_metrics, sequence_logps

DEFAULT_BETA = 0.1


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair losses and the (detached) implicit rewards of chosen and rejected answers."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * margin) - label_smoothing * F.logsigmoid(-beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}")
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses, chosen_rewards, rejected_rewards


class DPO(PreferenceObjective):
    name = "dpo"
    uses_reference = True
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")

    def __init__(self, cfg, reference_model=None):
        super().__init__(cfg, reference_model)
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA

    def loss(self, model, batch: dict, forward: Forward):
        ref = self.reference_logps(model, batch, forward)
        logps = sequence_logps(model, batch, forward)
        c, r = batch["chosen_seq"], batch["rejected_seq"]
        losses, cr, rr = dpo_loss(logps[c], logps[r], ref[c].to(logps.dtype), ref[r].to(logps.dtype), self.beta,
                                  self.cfg.dpo_loss, self.cfg.label_smoothing)
        return losses.sum(), pair_metrics(cr, rr)
