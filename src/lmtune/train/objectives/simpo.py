"""SimPO (Meng et al. 2024): a reference-free margin loss on length-normalised log-probabilities.

    loss = −(1−ε)·log σ(β/|y_w|·log πθ(y_w|x) − β/|y_l|·log πθ(y_l|x) − γ) − ε·log σ(−(…))

γ = simpo_gamma (the target reward margin), ε = label_smoothing; with simpo_length_normalize =
False the rewards are β·(summed log-probability) instead. Logged: the rewards β·mean log p of
chosen and rejected answers, their margin and accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.preference import PreferenceObjective, pair_metrics, sequence_logps

DEFAULT_BETA = 2.0


def simpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0):
    """Per-pair losses and the rewards; the log-probabilities are already length-normalised or not."""
    chosen_rewards, rejected_rewards = beta * chosen_logp, beta * rejected_logp
    z = chosen_rewards - rejected_rewards - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


class SimPO(PreferenceObjective):
    name = "simpo"
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")

    def __init__(self, cfg, reference_model=None):
        super().__init__(cfg, reference_model)
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA

    def loss(self, model, batch: dict, forward: Forward):
        logps = sequence_logps(model, batch, forward)
        if self.cfg.simpo_length_normalize:
            logps = logps / batch["seq_tokens"].to(logps.dtype)
        c, r = batch["chosen_seq"], batch["rejected_seq"]
        losses, cr, rr = simpo_loss(logps[c], logps[r], self.beta, self.cfg.simpo_gamma, self.cfg.label_smoothing)
        return losses.sum(), pair_metrics(cr, rr)
