"""How the loop talks to the process group.

`SingleProcess` is the one-process case. Multi-process engines (DDP, FSDP2, DeepSpeed) provide
the same methods, so the loop reads the same for all of them.
"""

from __future__ import annotations

import contextlib
import sys

import torch


class SingleProcess:
    rank = 0
    world_size = 1
    is_main = True
    # True: every process saves and loads its own part of the weights and optimizer state
    # (save_shards / load_shards) instead of the main process writing the whole of them.
    sharded = False

    def device(self, preferred: torch.device) -> torch.device:
        return preferred

    def log(self, msg: str) -> None:
        if self.is_main:
            print(f"[lmtune] {msg}", file=sys.stderr, flush=True)

    def wrap(self, model, cfg):
        return model

    def make_optimizer(self, groups, factory):
        return factory(groups)

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss, model) -> None:
        loss.backward()

    def clip_and_step(self, model, optimizer, max_norm: float) -> None:
        if max_norm and max_norm > 0:
            params = [p for p in model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        optimizer.step()

    def sum_scalar(self, value: torch.Tensor) -> float:
        return float(value)

    def barrier(self) -> None:
        pass

    def trainable_state_dict(self, model) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, model, weights: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            from lmtune.errors import UserError

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
        """Sharded engines: write this process's part into `folder` (every process calls it)."""
        raise NotImplementedError

    def load_shards(self, model, optimizer, folder) -> None:
        """Sharded engines: read this process's part back from a checkpoint folder."""
        raise NotImplementedError
