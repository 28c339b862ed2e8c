"""The strategy interface, and the one-process strategy.

A strategy has two sides, kept apart:

  training  (the Strategy):  device, wrap, make_optimizer, no_sync, backward, clip_and_step,
                             sum_scalar, barrier, log
  state     (its `.state`):  reading and writing trainable weights and optimizer state for
                             checkpoints, and gathering the whole model for the final export

Multi-process strategies (ddp.py, fsdp2.py, deepspeed.py) subclass these two classes, so the
loop reads the same for all of them.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from lmtune.errors import UserError


class WholeState:
    """Checkpoint I/O when every process holds the whole model: the main process writes it."""

    # True: every process saves and loads its own part of the weights and optimizer state
    # (save_shards / load_shards) instead of the main process writing the whole of them.
    sharded = False

    def trainable_state_dict(self, model) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise UserError(
                "the checkpoint's weights do not match this model "
                f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                f"{sorted(missing or unexpected)[0]})",
                hint="resume with the same config (model, method, lora_* keys) the checkpoint was trained with",
            )
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))

    def optimizer_state_dict(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def full_state_dict_for_export(self, model):
        return None  # the model in memory is already whole

    def save_shards(self, model, optimizer, folder) -> None:
        """Sharded strategies: write this process's part into `folder` (every process calls it)."""
        raise NotImplementedError

    def load_shards(self, model, optimizer, folder) -> None:
        """Sharded strategies: read this process's part back from a checkpoint folder."""
        raise NotImplementedError


class SingleProcess:
    name = "single"
    rank = 0
    world_size = 1
    is_main = True

    def __init__(self):
        self.state = WholeState()
        self.scaler = None  # torch.amp.GradScaler with fp16 autocast

    @property
    def sharded(self) -> bool:
        return self.state.sharded

    def device(self, preferred: torch.device) -> torch.device:
        return preferred

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lmtune] {msg}", file=sys.stderr, flush=True)

    def setup_precision(self, amp_dtype, device: torch.device) -> None:
        """fp16 gradients underflow without loss scaling: scale the loss, unscale before clipping,
        skip steps whose gradients overflowed (torch's GradScaler)."""
        if amp_dtype == torch.float16:
            self.scaler = torch.amp.GradScaler(device.type)
            self.log("fp16: dynamic loss scaling (GradScaler) on")

    def wrap(self, model, cfg):
        return model

    def make_optimizer(self, groups, factory):
        return factory(groups)

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss, model) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_step(self, model, optimizer, max_norm: float) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if max_norm and max_norm > 0:
            params = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)  # DTensor-aware under FSDP2
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def sum_scalar(self, value: torch.Tensor) -> float:
        return float(value)

    def sum_tensor(self, value: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (metrics of a step)."""
        return value

    def barrier(self) -> None:
        pass
