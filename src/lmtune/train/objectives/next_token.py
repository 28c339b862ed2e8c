"""Next-token cross-entropy: supervised fine-tuning and continued pretraining.

Both are the same loss, summed over the positions whose labels are not -100; the data pipeline
decides which (assistant turns for SFT, every token for pretraining). Logits are computed only at
the positions that carry loss, never for the whole sequence × vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.train.batch import IGNORE, count_loss_tokens, flat_batch
from lmtune.train.objectives.base import Forward, Objective


def loss_sum(model, batch: dict, chunk_tokens: int = 4096, fast=None, forward: Forward | None = None
             ) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's loss positions, and their count.

    `fast` (a `lmtune.train.fast_path.FastPath`, optional) adds the sample boundaries for
    variable-length attention and computes the loss with the fused linear + cross-entropy head.
    `forward` (optional) is how the model kind feeds a batch; by default a causal LM's.
    """
    forward = forward or Forward(fast=fast)
    fast = forward.fast
    labels = batch["labels"]
    # Position t predicts token t+1: keep the hidden states whose *next* label counts.
    target = labels[0, 1:]
    keep = batch.get("loss_index")
    if keep is None:
        keep = (target != IGNORE).nonzero(as_tuple=True)[0]
    n = int(keep.numel())  # shape metadata: no device sync
    if n == 0:
        # Still run the model so every parameter joins the graph (distributed engines expect it).
        out = forward(model, batch, logits_to_keep=1)
        return out.logits.sum() * 0.0, 0
    targets = target[keep]
    head = fast.loss_head if fast is not None else None
    if head is not None:
        with head.targets(targets):
            out = forward(model, batch, logits_to_keep=keep)
        return out.logits.reshape(()), n
    out = forward(model, batch, logits_to_keep=keep)
    logits = out.logits[0]  # (n, vocab)
    dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    total = logits.new_zeros((), dtype=dtype)
    for start in range(0, n, chunk_tokens):
        chunk = logits[start:start + chunk_tokens].to(dtype)
        total = total + F.cross_entropy(chunk, targets[start:start + chunk_tokens], reduction="sum")
    return total, n


class NextToken(Objective):
    """The step loss is the mean over every loss token of the whole optimizer step."""

    def __init__(self, name: str = "sft", extra_inputs=None):
        self.name = name
        # (rows, batch) -> more batch tensors, e.g. a vision-language kind's pixel values
        self.extra_inputs = extra_inputs

    def count(self, rows: list[dict]) -> int:
        return count_loss_tokens(rows)

    def make_batch(self, rows: list[dict]) -> dict:
        batch = flat_batch(rows)
        if self.extra_inputs is not None:
            batch.update(self.extra_inputs(rows, batch))
        return batch

    def loss(self, model, batch: dict, forward: Forward):
        s, _ = loss_sum(model, batch, forward=forward)
        return s, {}
