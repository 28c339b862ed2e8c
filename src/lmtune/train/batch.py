"""Rows -> one flat micro-batch on the device.

Every micro-batch is flattened into one row: samples are concatenated without padding and
`position_ids` restart at 0 for each sample, so attention stays within each sample (a block-diagonal
causal mask on CPU, variable-length kernels on GPU) and no compute is spent on padding.
"""

from __future__ import annotations

import torch

IGNORE = -100


def flat_batch(rows: list[dict]) -> dict:
    """Concatenate rows (packed or not) into a single (1, T) row with restarting position ids.

    Also returns, computed here on the CPU so the GPU step never waits on the host:
    `loss_index` (positions whose next label counts), `cu_seq_lens` (int32 sample boundaries, for
    variable-length attention kernels) and `max_length` (the longest sample, an int).
    """
    ids, labels, pos = [], [], []
    for row in rows:
        n = len(row["input_ids"])
        ids.extend(int(t) for t in row["input_ids"])
        lab = [int(t) for t in row["labels"]]
        lab[0] = IGNORE  # never predict a sample's first token from the previous sample
        labels.extend(lab)
        p = row.get("position_ids")
        pos.extend(range(n) if p is None else p)
    labels_t = torch.tensor([labels], dtype=torch.long)
    pos_t = torch.tensor([list(pos)], dtype=torch.long)
    starts = (pos_t[0] == 0).nonzero(as_tuple=True)[0].tolist()
    bounds = [0] + [s for s in starts if s > 0] + [pos_t.shape[1]]
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": labels_t,
        "position_ids": pos_t,
        "loss_index": (labels_t[0, 1:] != IGNORE).nonzero(as_tuple=True)[0],
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        "max_length": max(lengths) if lengths else 0,
    }


def micro_batches(picked: list[dict], batch_size: int, accum: int, world: int, rank: int,
                  batch_tokens: int | None = None) -> list[list[dict]]:
    """This process's share of a step's rows, as micro-batches.

    Without `batch_tokens`: `accum` micro-batches of `batch_size` rows. With it: the same rows
    regrouped (first fit, longest first) into as few micro-batches of at most `batch_tokens` tokens
    as that gives; a longer row goes alone. The step's loss is a sum over all its rows divided by
    their count, so the grouping changes memory and speed, not the result.
    """
    blocks = [picked[(i * world + rank) * batch_size:(i * world + rank + 1) * batch_size] for i in range(accum)]
    if not batch_tokens:
        return blocks
    groups: list[list] = []  # [tokens, rows]
    for row in sorted((r for b in blocks for r in b), key=lambda r: -len(r["input_ids"])):
        n = len(row["input_ids"])
        group = next((g for g in groups if g[0] + n <= batch_tokens), None)
        if group is None:
            groups.append([n, [row]])
        else:
            group[0] += n
            group[1].append(row)
    return [g[1] for g in groups]


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a batch to the device without stalling the host (pinned, non-blocking copies)."""
    cuda = torch.device(device).type == "cuda"

    def move(v):
        if isinstance(v, dict):  # a batch inside the batch (e.g. the samples scored by the base model)
            return to_device(v, device)
        if torch.is_tensor(v):
            return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)
        return v

    return {k: move(v) for k, v in batch.items()}


def count_loss_tokens(rows: list[dict]) -> int:
    """Positions that contribute to the loss (labels shifted by one, first label of a row ignored)."""
    return sum(sum(1 for t in row["labels"][1:] if t != IGNORE) for row in rows)
