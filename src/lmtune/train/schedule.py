"""Learning-rate schedules: linear warmup, then cosine / linear decay / constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def make_scheduler(optimizer, total_steps: int, warmup_ratio: float, kind: str, min_ratio: float):
    warmup = int(round(total_steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, warmup, kind, min_ratio)
    )
