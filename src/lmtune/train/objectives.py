"""Training objectives. SFT and continued pretraining share one loss: next-token cross-entropy
summed over the positions whose labels are not -100 (the data pipeline decides which).

Every micro-batch is flattened into one row: samples are concatenated without padding and
`position_ids` restart at 0 for each sample, so transformers builds a block-diagonal causal mask
(no sample sees another) and no compute is spent on padding. Logits are computed only at the
positions that carry loss, never for the whole sequence × vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def flat_batch(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Concatenate rows (packed or not) into a single (1, T) row with restarting position ids."""
    ids, labels, pos = [], [], []
    for row in rows:
        n = len(row["input_ids"])
        ids.extend(int(t) for t in row["input_ids"])
        lab = [int(t) for t in row["labels"]]
        lab[0] = IGNORE  # never predict a sample's first token from the previous sample
        labels.extend(lab)
        p = row.get("position_ids")
        pos.extend(range(n) if p is None else p)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([list(pos)], dtype=torch.long),
    }


def count_loss_tokens(rows: list[dict]) -> int:
    """Positions that contribute to the loss (labels shifted by one, first label of a row ignored)."""
    return sum(sum(1 for t in row["labels"][1:] if t != IGNORE) for row in rows)


def loss_sum(model, batch: dict[str, torch.Tensor], chunk_tokens: int = 4096) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's loss positions, and their count."""
    labels = batch["labels"]
    # Position t predicts token t+1: keep the hidden states whose *next* label counts.
    target = labels[0, 1:]
    keep = (target != IGNORE).nonzero(as_tuple=True)[0]
    n = int(keep.numel())
    if n == 0:
        # Still run the model so every parameter joins the graph (distributed engines expect it).
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=1,
                    use_cache=False)
        return out.logits.sum() * 0.0, 0
    # use_cache=False: with a cache transformers ignores the packed-sample boundaries.
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=keep,
                use_cache=False)
    logits = out.logits[0]  # (n, vocab)
    targets = target[keep]
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        chunk = logits[start:start + chunk_tokens].float()
        total = total + F.cross_entropy(chunk, targets[start:start + chunk_tokens], reduction="sum")
    return total, n
