"""The base model as a fixed reference, for objectives that compare the policy with it
(DPO and KTO's reference, SFT's `loss = "kl_to_base"` data): scored without dropout, and, for full
fine-tuning, a frozen copy of the base model fed the way the policy is."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from lmtune.errors import UserError
from lmtune.train.objectives.base import Forward

PRECOMPUTE_HINT = ("set precompute_reference = True (reference log-probabilities computed once, no reference "
                   "model in memory), or train LoRA (the reference is the model with its adapter off)")


@contextlib.contextmanager
def evaluating(model):
    """The reference is scored without dropout, then the model goes back to training mode."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def load_frozen_reference(trainer, purpose: str | None = None, hint: str = PRECOMPUTE_HINT):
    """A frozen copy of the base model and how to feed it (the policy's attention and loss head).
    `purpose` names what needs it in the error under sharded strategies (default: the objective)."""
    from lmtune.train import fast_path
    from lmtune.train.losses import LossHead

    cfg = trainer.cfg
    if trainer.dist.name == "fsdp2" or getattr(trainer.dist, "stage", 0) == 3:
        raise UserError(
            f"full fine-tuning with {purpose or f'objective {cfg.objective!r}'} under {trainer.dist.name} would keep "
            "a whole reference model on every process", where=cfg._source, hint=hint)
    model = trainer.kind.load(cfg, trainer.device)
    model.config.use_cache = False
    fp = fast_path.setup_base_model(model, replace(cfg, gradient_checkpointing=False), trainer.device,
                                    trainer.amp_dtype)
    model.requires_grad_(False)
    model.eval()
    if cfg.quantization == "none":
        model.to(trainer.device)
        if trainer.device.type == "cuda" and trainer.amp_dtype is not None:
            model.to(trainer.amp_dtype)  # computed under autocast anyway: half the memory
    if trainer.fast.loss == "chunked":
        fp.loss, fp.loss_head = "chunked", LossHead(model.get_output_embeddings())
    return model, Forward(fast=fp, kind=trainer.kind)
