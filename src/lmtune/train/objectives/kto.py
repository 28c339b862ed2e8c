"""KTO (Ethayarajh et al. 2024): single answers labelled desirable or not, no pairs needed.

With r(x, y) = log πθ(y|x)/πref(y|x) and the reference point z0 = max(0, mean over the
micro-batch of r(x, y')) for answers y' that belong to other prompts (KTO's KL estimate; no
gradient flows through it):

    desirable     λ_D · (1 − σ(β·(r − z0)))
    undesirable   λ_U · (1 − σ(β·(z0 − r)))

which is the paper's λ_y − v(x, y). λ_D, λ_U = kto_desirable_weight, kto_undesirable_weight. Each
example's KL sequence (its prompt with another example's answer) is packed right after it, so z0
is estimated from the same micro-batch. Logged: the KL estimate, the mean signed reward
(r for desirable, −r for undesirable answers, times β) and accuracy (the reward's sign agrees with
the label).
"""

from __future__ import annotations

import torch

from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.preference import PreferenceObjective, sequence_logps

DEFAULT_BETA = 0.1


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl_policy: torch.Tensor,
             kl_ref: torch.Tensor, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Per-example losses, the rewards β·r (detached) and z0 (the KL estimate)."""
    z0 = (kl_policy - kl_ref).mean().clamp(min=0).detach()
    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses, beta * r.detach(), z0


class KTO(PreferenceObjective):
    name = "kto"
    uses_reference = True
    metrics = ("kl", "rewards/signed", "rewards/accuracy")

    def __init__(self, cfg, reference_model=None):
        super().__init__(cfg, reference_model)
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA

    def loss(self, model, batch: dict, forward: Forward):
        ref = self.reference_logps(model, batch, forward)
        logps = sequence_logps(model, batch, forward)
        ref = ref.to(logps.dtype)
        e, k, d = batch["example_seq"], batch["kl_seq"], batch["desirable"]
        losses, rewards, z0 = kto_loss(logps[e], ref[e], d, logps[k], ref[k], self.beta,
                                       self.cfg.kto_desirable_weight, self.cfg.kto_undesirable_weight)
        signed = torch.where(d, rewards, -rewards)
        n = float(e.numel())
        # z0 is one number per micro-batch: weighted by its examples, the loop's mean is per example.
        return losses.sum(), {"kl": z0 * n, "rewards/signed": signed.sum(),
                              "rewards/accuracy": (signed > 0).float().sum()}
