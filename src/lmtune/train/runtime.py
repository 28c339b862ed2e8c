"""Runtime helpers every training part shares: device, precision, seeding, optimizer factory.

Kept apart from the loop so that export, strategies and benchmarks import them without importing
the loop (data flows forward: nothing here imports another part of `lmtune.train`).
"""

from __future__ import annotations

import random

import torch

from lmtune.errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' was asked for, but no CUDA GPU is available", hint="set device = 'auto'")
    return torch.device(name)


def pick_precision(cfg, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    mode = cfg.mixed_precision
    if mode == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass


def make_optimizer(groups, cfg, device: torch.device):
    """The optimizer the config asks for: torch's AdamW (fused on GPU), bitsandbytes' 8-bit / paged
    AdamW (state in 8 bits and/or paged to host memory under pressure), or plain SGD (no momentum:
    its update is linear in the gradient, which the equivalence tests rely on)."""
    kind = cfg.optimizer
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"optimizer '{kind}' needs bitsandbytes", where=cfg._source,
                        hint="pip install 'lmtune[qlora]', or set optimizer = 'adamw'") from None
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[kind]
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def param_groups(params, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases)."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def import_deepspeed():
    try:
        import deepspeed
    except ImportError:
        raise UserError(
            "strategy 'deepspeed' needs the deepspeed package",
            hint="pip install 'lmtune[deepspeed]'  (on a machine without CUDA: DS_BUILD_OPS=0 pip install deepspeed)",
        ) from None
    return deepspeed
