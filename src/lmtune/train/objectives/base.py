"""The objective interface: what a training objective needs from a batch, and how it turns the
model's output into (loss sum, metrics).

The loop knows nothing else about the loss. Per optimizer step it asks the objective

    count(rows)           how many units the step's loss is a mean over (loss tokens for SFT,
                          pairs for DPO); summed over micro-batches and processes
    make_batch(rows)      a CPU-side batch of one micro-batch (flat, padding-free)
    loss(model, batch, forward) -> (loss_sum, {metric: sum})
                          summed, never averaged: the loop divides by the step's count, so
                          accumulation and process count do not change the result
    setup(trainer)        optional, once the model is ready (e.g. reference log-probs)

`metrics` names what `loss` returns besides the loss; they are logged as means over the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Forward:
    """How a flat batch is fed to the model: the model kind's inputs plus the fast path's extras
    (sample boundaries for variable-length attention). Objectives call it instead of the model."""

    fast: object = None  # lmtune.train.fast_path.FastPath or None
    kind: object = None  # lmtune.models.kinds.ModelKind or None (a causal LM)
    extra: dict = field(default_factory=dict)

    def __call__(self, model, batch: dict, **kwargs):
        if self.kind is not None:
            inputs = self.kind.inputs(batch)
        else:
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        if self.fast is not None:
            inputs.update(self.fast.model_kwargs(batch))
        # use_cache=False: with a cache transformers ignores the packed-sample boundaries.
        return model(**inputs, use_cache=False, **self.extra, **kwargs)


class Objective:
    name = "objective"
    metrics: tuple[str, ...] = ()

    def setup(self, trainer) -> None:
        """Called once after the model, data and optimizer exist (and after a resume)."""

    def count(self, rows: list[dict]) -> int:
        raise NotImplementedError

    def make_batch(self, rows: list[dict]) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict, forward: Forward):
        raise NotImplementedError
