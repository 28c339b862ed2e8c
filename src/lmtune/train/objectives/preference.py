"""What the preference objectives (dpo.py, orpo.py, simpo.py, kto.py, reward.py) share.

A row (lmtune.data.preference) packs whole units: a pair (chosen, then rejected) or a KTO answer
and its KL sequence. A micro-batch is those rows flattened into one padding-free sequence like
SFT's (`flat_batch`), plus, per packed sequence, its role and the index tensors that pick the
pairs out; so chosen and rejected of a pair are always in the same micro-batch and one forward
scores both.

`sequence_logps` sums each packed sequence's answer-token log-probabilities. On the fast path the
model's output layer computes them chunk by chunk (`LossHead.token_logprobs`): the
(tokens x vocabulary) logits never exist. Otherwise logits exist only at answer positions.

The reference (DPO, KTO) comes, in this order of preference, from
  - log-probabilities precomputed once before training (`precompute_reference = true`), cached
    beside the data cache: no reference forward during training and no reference model;
  - with LoRA / QLoRA, the policy itself with its adapter switched off (peft's
    `disable_adapter()`): no second copy of the model;
  - with full fine-tuning, a frozen copy of the base model (not under FSDP2 / ZeRO-3, where a whole
    copy on every process would undo the sharding: precompute there).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from lmtune.data.preference import CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, UNIT_HEADS
from lmtune.errors import UserError
from lmtune.train.batch import flat_batch, to_device
from lmtune.train.losses import plain_token_logprobs
from lmtune.train.objectives.base import Forward, Objective
from lmtune.train.objectives.reference import evaluating, load_frozen_reference


def preference_batch(rows: list[dict]) -> dict:
    """`flat_batch` of preference rows, plus per packed sequence: `seq_roles`, `loss_seq` (the
    sequence of each answer position), `seq_tokens`, the pair / example indices and, when the rows
    carry them, the precomputed reference log-probabilities."""
    b = flat_batch(rows)
    roles = [x for r in rows for x in r["seq_roles"]]
    cu = b["cu_seq_lens"].long()
    if len(cu) - 1 != len(roles):
        raise ValueError(f"{len(cu) - 1} packed sequences but {len(roles)} roles")  # a bug, not user input
    keep = b["loss_index"]
    b["loss_seq"] = torch.searchsorted(cu[1:], keep + 1, right=True)  # position k predicts token k+1
    b["n_seqs"] = len(roles)
    b["seq_tokens"] = torch.bincount(b["loss_seq"], minlength=len(roles)).float()
    b["seq_roles"] = torch.tensor(roles, dtype=torch.long)
    b["last_token"] = cu[1:] - 1
    chosen = [i for i, x in enumerate(roles) if x == CHOSEN]
    if any(roles[i + 1] != REJECTED for i in chosen):
        raise ValueError("a chosen sequence not followed by its rejected one")
    b["chosen_seq"] = torch.tensor(chosen, dtype=torch.long)
    b["rejected_seq"] = b["chosen_seq"] + 1
    examples = [i for i, x in enumerate(roles) if x in (DESIRABLE, UNDESIRABLE)]
    if any(roles[i + 1] != KL for i in examples):
        raise ValueError("a KTO example not followed by its KL sequence")
    b["example_seq"] = torch.tensor(examples, dtype=torch.long)
    b["kl_seq"] = b["example_seq"] + 1
    b["desirable"] = torch.tensor([roles[i] == DESIRABLE for i in examples], dtype=torch.bool)
    if rows and all("ref_logps" in r for r in rows):
        b["ref_logps"] = torch.tensor([x for r in rows for x in r["ref_logps"]], dtype=torch.float32)
    return b


def sequence_logps(model, batch: dict, forward: Forward) -> torch.Tensor:
    """Sum of log p(answer token) for each packed sequence, shape (n_seqs,), fp32 at least."""
    targets = batch["labels"][0, 1:][batch["loss_index"]]
    keep = batch["loss_index"]
    head = forward.fast.loss_head if forward.fast is not None else None
    if head is not None:
        with head.token_logprobs(targets):
            out = forward(model, batch, logits_to_keep=keep)
        tok = out.logits.reshape(-1)
    else:
        out = forward(model, batch, logits_to_keep=keep)
        tok = plain_token_logprobs(out.logits[0], targets)
    return tok.new_zeros(batch["n_seqs"]).index_add(0, batch["loss_seq"], tok)


class PreferenceObjective(Objective):
    """The count (pairs, or KTO examples), the batch and the reference; subclasses add `loss`."""

    uses_reference = False

    def __init__(self, cfg, reference_model=None):
        self.cfg = cfg
        # A frozen reference given by the caller (tests, benchmarks); else see `setup`.
        self.reference_model = reference_model
        self.ref_forward = Forward() if reference_model is not None else None
        self.adapter_model = None  # the peft model whose adapter is switched off for the reference

    def count(self, rows: list[dict]) -> int:
        return sum(1 for r in rows for x in r["seq_roles"] if x in UNIT_HEADS)

    def make_batch(self, rows: list[dict]) -> dict:
        return preference_batch(rows)

    # ------------------------------------------------------------------ the reference
    def setup(self, trainer) -> None:
        if not self.uses_reference:
            return
        cfg, log = self.cfg, trainer.dist.log
        if cfg.method == "lora" and self.reference_model is None:
            self.adapter_model = trainer.model
        if cfg.precompute_reference:
            self.precompute(trainer)
            return
        if self.reference_model is not None or self.adapter_model is not None:
            log("reference: " + ("the given frozen model" if self.reference_model is not None else
                                 "the policy with its LoRA adapter switched off (no second model)"))
            return
        self.reference_model, self.ref_forward = load_frozen_reference(trainer)
        log("reference: a frozen copy of the base model (precompute_reference = true keeps none in memory)")

    def reference_logps(self, model, batch: dict, forward: Forward) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with torch.no_grad():
            if self.reference_model is not None:
                return sequence_logps(self.reference_model, batch, self.ref_forward)
            with evaluating(model), self.adapter_model.disable_adapter():
                return sequence_logps(model, batch, forward)

    def precompute(self, trainer) -> None:
        """Reference log-probabilities of every packed sequence, once; cached beside the data cache."""
        from lmtune.data.dataset import cache_dir
        from lmtune.data.preference import write_npz

        import numpy as np

        rows, log = trainer.rows, trainer.dist.log
        n = sum(len(r["seq_roles"]) for r in rows)
        path = cache_dir() / "reference" / f"{reference_key(trainer)}.npz"
        values = None
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    values = z["logps"].astype(np.float32).tolist()
                if len(values) != n:
                    values = None
            except Exception:  # damaged: recomputed, never trusted
                values = None
        # Every process must take the same branch (scoring is collective under sharded engines),
        # also when the cache sits on disks of their own: recompute unless all of them found it.
        found = trainer.dist.sum_tensor(torch.tensor(float(values is not None)))
        if int(found) < trainer.dist.world_size:
            values = None
        if values is None:
            model, forward, adapter_off = trainer.train_model, trainer.forward, self.adapter_model is not None
            if self.reference_model is not None:
                model, forward = self.reference_model, self.ref_forward
            elif not adapter_off and trainer.state.step > 0:
                # A resumed full fine-tune: the model is no longer the reference; score with a
                # temporary copy of the base, freed before training goes on.
                model, forward = load_frozen_reference(trainer)
            values = self._score_all(trainer, model, forward, adapter_off)
            del model
            if trainer.dist.is_main:
                write_npz(path, {"logps": np.asarray(values, dtype=np.float32)})
            log(f"reference: log-probabilities of {n} sequences precomputed and cached in {path}")
        else:
            log(f"reference: precomputed log-probabilities read from {path}")
        k = 0
        for r in rows:
            m = len(r["seq_roles"])
            r["ref_logps"] = values[k:k + m]
            k += m

    def _score_all(self, trainer, model, forward, adapter_off: bool) -> list[float]:
        """Every row scored once, the micro-batches dealt round-robin over the processes (each
        process runs the same number of forwards: sharded engines gather weights collectively)."""
        rows, dist, bs = trainer.rows, trainer.dist, trainer.cfg.batch_size
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + len(r["seq_roles"]))
        groups = [list(range(i, min(i + bs, len(rows)))) for i in range(0, len(rows), bs)]
        out = torch.zeros(offsets[-1], dtype=torch.float64)
        rounds = math.ceil(len(groups) / dist.world_size)
        amp = trainer.amp_dtype
        for k in range(rounds):
            g = k * dist.world_size + dist.rank
            mine = g < len(groups)
            idx = groups[g] if mine else groups[0]  # a forward that is thrown away keeps step with the others
            batch = to_device(preference_batch([rows[i] for i in idx]), trainer.device)
            with torch.no_grad(), evaluating(model), torch.autocast(trainer.device.type, dtype=amp,
                                                                     enabled=amp is not None):
                if adapter_off:
                    with self.adapter_model.disable_adapter():
                        lp = sequence_logps(model, batch, forward)
                else:
                    lp = sequence_logps(model, batch, forward)
            if mine:
                out[offsets[idx[0]]:offsets[idx[-1] + 1]] = lp.double().cpu()
        return dist.sum_tensor(out).tolist()


def reference_key(trainer) -> str:
    """What the reference log-probabilities depend on: the rows, the base model (name, local
    files, parameter shapes), quantization and precision."""
    from lmtune.models.loader import resolve_model_path

    cfg = trainer.cfg
    files = []
    try:
        folder = Path(resolve_model_path(cfg.model))
        if folder.is_dir():
            files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir()
                           if f.suffix in (".safetensors", ".json", ".bin"))
    except (UserError, OSError):
        pass
    shapes = [(n.replace("base_model.model.", "", 1).replace(".base_layer", ""),
               list(getattr(p, "ds_shape", None) or p.shape))
              for n, p in trainer.model.named_parameters() if "lora_" not in n and "modules_to_save" not in n]
    info = {"data": trainer.identity["data_fingerprint"], "model": cfg.model, "files": files, "shapes": shapes,
            "quantization": cfg.quantization, "torch_dtype": cfg.torch_dtype, "amp": str(trainer.amp_dtype),
            "device": trainer.device.type, "v": 1}
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:32]


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict:
    """Sums over the micro-batch's pairs (the loop divides by the step's pair count)."""
    c, r = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margin": (c - r).sum(),
            "rewards/accuracy": (c > r).float().sum()}
