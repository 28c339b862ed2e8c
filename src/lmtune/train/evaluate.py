"""Validation during training: loss and perplexity on the validation rows, and the best checkpoint.

Every `eval_steps` (and after the last step) the trainer validates (`validate_if_due`): each process
takes its share of the validation rows (row i goes to process i mod world_size), the objective's
loss sums and counts are added over processes, and

    val_loss = sum of losses / count (loss tokens for SFT and pretraining),  val_ppl = exp(val_loss)

are logged (train_log.jsonl, TensorBoard val/*, the loss curve) and kept in the run's metrics, so
a resumed run plots them too. With `save_best`, a checkpoint is saved at each new lowest val_loss
and named in work_dir/best_checkpoint.json; pruning (save_total_limit) spares it.
"""

from __future__ import annotations

import math

import torch

from lmtune.train import checkpoint as ckpt
from lmtune.train.batch import to_device


def validation_loss(trainer) -> tuple[float, int]:
    """(mean loss, count) over the validation rows, summed over all processes."""
    cfg, rows, dist = trainer.cfg, trainer.val_rows, trainer.dist
    model = trainer.train_model
    bs, world = cfg.batch_size, dist.world_size
    mine = list(range(dist.rank, len(rows), world))
    # Every process runs the same number of forward passes (sharded strategies gather weights in
    # each one); a process that has run out repeats its first row and does not count it.
    n_batches = math.ceil(math.ceil(len(rows) / world) / bs)
    total = torch.zeros((), dtype=torch.float64, device=trainer.device)
    count = 0
    model.eval()
    try:
        with torch.no_grad():
            for b in range(n_batches):
                picked = [rows[i] for i in mine[b * bs:(b + 1) * bs]]
                counted = bool(picked)
                picked = picked or [rows[mine[0] if mine else 0]]
                batch = to_device(trainer.objective.make_batch(picked), trainer.device)
                with torch.autocast(trainer.device.type, dtype=trainer.amp_dtype, enabled=trainer.amp_dtype is not None):
                    s, _ = trainer.objective.loss(model, batch, trainer.forward)
                if counted:
                    total += s.detach().to(torch.float64)
                    count += trainer.objective.count(picked)
    finally:
        model.train()
    sums = dist.sum_tensor(torch.stack([total, torch.tensor(float(count), dtype=torch.float64,
                                                             device=total.device)])).tolist()
    return sums[0] / max(sums[1], 1.0), int(sums[1])


def validate_if_due(trainer) -> bool:
    """After each step: validate when a validation set exists and the step is due (every eval_steps,
    and the last). Returns whether a checkpoint of this step was saved (a new best)."""
    cfg, step = trainer.cfg, trainer.state.step
    if trainer.val_rows is None or not ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == trainer.total_steps):
        return False
    if step == cfg.eval_steps or (not cfg.eval_steps and step == trainer.total_steps):
        trainer.dist.log(f"validation: {len(trainer.val_rows)} rows")
    return validate(trainer)


def validate(trainer) -> bool:
    """Evaluate and log; with save_best, save a checkpoint at a new lowest val_loss and record it.
    Returns whether it saved one (then the loop does not save this step again)."""
    loss, count = validation_loss(trainer)
    step = trainer.state.step
    ppl = math.exp(min(loss, 700.0))
    trainer.state.metrics.setdefault("val_loss", []).append((step, loss))
    trainer.dist.log(f"step {step}: validation loss {loss:.4f}, perplexity {ppl:.3f} ({count} tokens)")
    trainer.log.write({"step": step, "val_loss": round(loss, 6), "val_ppl": round(ppl, 4), "val_tokens": count})
    trainer.log.plot(trainer.state.history, trainer.state.metrics, force=True)
    if trainer.cfg.save_best:
        # The best so far, from the run's own record (the same in every process, kept on resume).
        earlier = [v for _, v in trainer.state.metrics["val_loss"][:-1]]
        if not earlier or loss < min(earlier):
            path = trainer.save_checkpoint()  # every process takes part; the main one gets the path
            if trainer.dist.is_main:
                ckpt.write_best(trainer.work_dir, {"step": step, "val_loss": loss, "path": str(path)})
                trainer.dist.log(f"new best validation loss {loss:.4f}: {path} (recorded in {ckpt.BEST_FILE})")
            return True
    return False
