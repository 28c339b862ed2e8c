"""Next-token cross-entropy: supervised fine-tuning and continued pretraining.

Both are the same loss, summed over the positions whose labels are not -100; the data pipeline
decides which (assistant turns for SFT, every token for pretraining). Logits are computed only at
the positions that carry loss, never for the whole sequence × vocabulary.

Samples from a source marked `loss = "kl_to_base"` are trained towards the base model's own
next-token distribution instead of their labels: KL(base ‖ model) at every position of the sample
(system prompt, question and template tokens as well as the answer; all but its first token),
times `kl_to_base_weight`, added to the same sum. The sum is divided, as without such samples, by
the step's label tokens (`count`), so the KL at the prompt positions comes on top of the answers'.
Keeping the base's predictions on the prompt too keeps more of how the model reads an ordinary
question: on the quickstart it kept more held-out ordinary answers on the base than KL at the
answer tokens alone (docs/workflow.md has the figures). The base model is the policy with
its LoRA adapter switched off, or a frozen copy for full fine-tuning; only those samples are run
through it, without gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmtune.errors import UserError
from lmtune.train.batch import IGNORE, count_loss_tokens, flat_batch
from lmtune.train.objectives.base import Forward, Objective
from lmtune.train.objectives.reference import evaluating, load_frozen_reference


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


def kl_sum(logits: torch.Tensor, base_logits: torch.Tensor, chunk_tokens: int = 4096) -> torch.Tensor:
    """Sum over positions of KL(base ‖ model) between the next-token distributions, fp32 at least."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    total = logits.new_zeros((), dtype=dtype)
    for start in range(0, logits.shape[0], chunk_tokens):
        log_q = F.log_softmax(logits[start:start + chunk_tokens].to(dtype), dim=-1)
        log_p = F.log_softmax(base_logits[start:start + chunk_tokens].to(dtype), dim=-1)
        total = total + (log_p.exp() * (log_p - log_q)).sum()
    return total


def _sample_lengths(row: dict) -> list[int]:
    pos = row.get("position_ids")
    if pos is None:
        return [len(row["input_ids"])]
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [b - a for a, b in zip(starts[:-1], starts[1:])]


def with_kl_positions(rows: list[dict]) -> list[dict]:
    """The rows, with every token but the first of each sample marked kl_to_base made a loss
    position (its label the token itself); rows without such samples are returned as they are."""
    out = []
    for row in rows:
        flags = row.get("kl_to_base")
        if flags and any(flags):
            labels, ids, start = [int(t) for t in row["labels"]], row["input_ids"], 0
            for flag, n in zip(flags, _sample_lengths(row)):
                if flag:
                    labels[start + 1:start + n] = [int(t) for t in ids[start + 1:start + n]]
                start += n
            row = {**row, "labels": labels}
        out.append(row)
    return out


def kl_to_base_batch(rows: list[dict], batch: dict) -> dict:
    """What the KL term needs beside the flat batch: `kl_batch`, a flat batch of only the samples
    marked kl_to_base (what the base model scores), and `kl_sel`, which of the batch's loss
    positions are theirs (in the same order as `kl_batch`'s loss positions). `rows` and `batch`
    come from `with_kl_positions`, so a marked sample's loss positions are all of its positions."""
    picked, where = [], []  # the marked samples, and each one's offset in the flat batch
    offset = 0
    for row in rows:
        flags = row.get("kl_to_base")
        if flags and any(flags):
            start = 0
            for flag, n in zip(flags, _sample_lengths(row)):
                if flag:
                    picked.append({"input_ids": row["input_ids"][start:start + n], "labels": row["labels"][start:start + n]})
                    where.append(offset + start)
                start += n
        offset += len(row["input_ids"])
    keep = batch["loss_index"]
    if not picked:
        return {"kl_sel": torch.zeros(keep.shape[0], dtype=torch.bool)}
    kl_batch = flat_batch(picked)
    # kl_batch's loss position p lies in sample k (which starts at bounds[k] there) -> its position
    # in the flat batch: p - bounds[k] + where[k].
    bounds = kl_batch["cu_seq_lens"].long()
    sample = torch.searchsorted(bounds, kl_batch["loss_index"], right=True) - 1
    mapped = kl_batch["loss_index"] - bounds[sample] + torch.tensor(where, dtype=torch.long)[sample]
    return {"kl_batch": kl_batch, "kl_sel": torch.isin(keep, mapped)}


class NextToken(Objective):
    """The step loss is the mean over every loss token of the whole optimizer step."""

    def __init__(self, name: str = "sft", extra_inputs=None, kl_to_base_weight: float | None = None):
        self.name = name
        # (rows, batch) -> more batch tensors, e.g. a vision-language kind's pixel values
        self.extra_inputs = extra_inputs
        # None: no source trains towards the base model. Else the KL term's weight; its metric is
        # then logged every step (also by processes whose rows have no such sample).
        self.kl_weight = kl_to_base_weight
        self.metrics = ("kl_to_base",) if kl_to_base_weight is not None else ()
        self.adapter_model = self.base_model = self.base_forward = None

    def setup(self, trainer) -> None:
        if self.kl_weight is None or self.adapter_model is not None or self.base_model is not None:
            return
        cfg = trainer.cfg
        if getattr(trainer.kind, "name", None) == "vision_language":
            raise UserError("loss 'kl_to_base' is for text models; this model takes images", where=cfg._source,
                            hint="remove loss = 'kl_to_base' from the data source")
        if cfg.method == "lora":
            self.adapter_model = trainer.model
            trainer.dist.log("kl_to_base: the base model is this model with its LoRA adapter switched off")
        else:
            self.base_model, self.base_forward = load_frozen_reference(
                trainer, purpose="loss 'kl_to_base'", hint="train LoRA (the base model is then the model with its "
                                                           "adapter switched off), or use strategy 'ddp'")
            trainer.dist.log("kl_to_base: the base model is a frozen copy of it")

    def count(self, rows: list[dict]) -> int:
        return count_loss_tokens(rows)  # label tokens only, also for marked samples (see the module's note)

    def make_batch(self, rows: list[dict]) -> dict:
        if self.kl_weight is not None:
            rows = with_kl_positions(rows)
        batch = flat_batch(rows)
        if self.extra_inputs is not None:
            batch.update(self.extra_inputs(rows, batch))
        if self.kl_weight is not None:
            batch.update(kl_to_base_batch(rows, batch))
        return batch

    def loss(self, model, batch: dict, forward: Forward):
        if "kl_batch" not in batch:  # nothing here trains towards the base: the plain (fused) path
            s, _ = loss_sum(model, batch, forward=forward)
            return s, ({} if self.kl_weight is None else {"kl_to_base": s.detach().new_zeros(())})
        keep, sel = batch["loss_index"], batch["kl_sel"]
        targets = batch["labels"][0, 1:][keep]
        logits = forward(model, batch, logits_to_keep=keep).logits[0]  # no fused head: the KL needs them
        dtype = torch.promote_types(logits.dtype, torch.float32)
        ce = F.cross_entropy(logits[~sel].to(dtype), targets[~sel], reduction="sum")
        with torch.no_grad():
            base = self._base_logits(model, batch["kl_batch"], forward)
        kl = kl_sum(logits[sel], base)
        return ce + self.kl_weight * kl, {"kl_to_base": kl.detach()}

    def _base_logits(self, model, kl_batch: dict, forward: Forward) -> torch.Tensor:
        keep = kl_batch["loss_index"]
        if self.base_model is not None:
            return self.base_forward(self.base_model, kl_batch, logits_to_keep=keep).logits[0]
        with evaluating(model), self.adapter_model.disable_adapter():
            return forward(model, kl_batch, logits_to_keep=keep).logits[0]
