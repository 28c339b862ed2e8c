"""ORPO (Hong et al. 2024): supervised fine-tuning plus an odds-ratio preference term, no reference.

With P(y|x) = exp(mean log-probability per answer token) and odds(y|x) = P / (1 − P):

    loss = NLL(y_w) + λ · (−log σ(log odds(y_w|x) − log odds(y_l|x)))

NLL(y_w) is the chosen answer's mean negative log-likelihood per token (the paper's L_SFT);
λ = orpo_lambda. Logged: the chosen answer's NLL, the log odds ratio, and accuracy (the chosen
answer has the higher odds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.preference import PreferenceObjective, sequence_logps


def log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(P / (1 − P)) from log P (< 0), stable near P = 1."""
    return mean_logp - torch.log1p(-torch.exp(mean_logp.clamp(max=-1e-6)))


def orpo_loss(chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, lam: float):
    """Per-pair losses, the chosen NLL and the log odds ratio (both detached)."""
    ratio = log_odds(chosen_mean_logp) - log_odds(rejected_mean_logp)
    nll = -chosen_mean_logp
    losses = nll - lam * F.logsigmoid(ratio)
    return losses, nll.detach(), ratio.detach()


class ORPO(PreferenceObjective):
    name = "orpo"
    metrics = ("nll", "log_odds_ratio", "rewards/accuracy")

    def loss(self, model, batch: dict, forward: Forward):
        logps = sequence_logps(model, batch, forward)
        mean = logps / batch["seq_tokens"].to(logps.dtype)
        c, r = batch["chosen_seq"], batch["rejected_seq"]
        losses, nll, ratio = orpo_loss(mean[c], mean[r], self.cfg.orpo_lambda)
        return losses.sum(), {"nll": nll.sum(), "log_odds_ratio": ratio.sum(),
                              "rewards/accuracy": (ratio > 0).float().sum()}
