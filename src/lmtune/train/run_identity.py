"""Runs that cannot mix: what identifies a run, and the checks before writing into a work dir.

A run's identity (model, method, objective, data fingerprint, rows per step, world size, ...) is
stored in every checkpoint's trainer_state.json. A new run refuses a work dir that holds another
run's checkpoints or final model; a resume refuses a checkpoint whose identity differs, naming the
key, and says how the schedule changes when the number of steps changed.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt

# Keys that must match for a resume to continue the same run, with what to do if one differs.
MUST_MATCH = {
    "model": "resume with the model the checkpoint was trained from",
    "method": "resume with the method (full / lora) the checkpoint was trained with",
    "objective": "resume with the objective the checkpoint was trained with",
    "quantization": "resume with the quantization the checkpoint was trained with",
    "lora": "resume with the same lora_r / lora_alpha / lora_target_modules / lora_layers",
    "data_fingerprint": "the training data (files, format, template, max_length, packing) changed; "
                        "resume with the data it was trained on, or start a new run in another --work-dir",
    "rows_per_step": "batch_size × accumulative_counts × processes must equal the checkpoint's",
}

# What lmtune itself writes into a work dir (and may remove with --overwrite).
OWN_FILES = ("hf", "logs", "config.py", "loss_curve.png", ".loss_curve.tmp.png", "best_checkpoint.json")


def data_fingerprint(rows) -> str:
    """A hash of every row's tokens, labels and positions (what training reads). Rows from the
    token store carry one already (a hash of the stores' contents and the rows index)."""
    import numpy as np

    if getattr(rows, "fingerprint", None):
        return rows.fingerprint

    h = hashlib.sha256()
    h.update(str(len(rows)).encode())
    for row in rows:
        for key in ("input_ids", "labels", "position_ids", "kl_to_base"):
            value = row.get(key)
            if value is not None:
                h.update(np.asarray(value, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def run_identity(cfg, rows, rows_per_step: int, world_size: int, strategy: str) -> dict:
    identity = {
        "model": cfg.model, "method": cfg.method, "objective": cfg.objective, "quantization": cfg.quantization,
        # lora_layers joins only when set, so that runs from before the key still resume.
        "lora": ([cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules]
                 + ([cfg.lora_layers] if cfg.lora_layers is not None else [])) if cfg.method == "lora" else None,
        "data_fingerprint": data_fingerprint(rows), "rows_per_step": rows_per_step,
        "world_size": world_size, "strategy": strategy,
    }
    parts = [cfg.vision_tower, cfg.vision_stage, cfg.train_llm, cfg.train_vision_tower, cfg.train_projector]
    if parts != [None, "finetune", True, "frozen", "auto"]:  # what trains in a vision-language model
        identity["vision"] = parts
    return identity


def _lmtune_entries(work_dir: Path) -> list[Path]:
    """Entries of a work dir that a previous lmtune run wrote."""
    out = [p for p in work_dir.iterdir() if p.name in OWN_FILES]
    out += ckpt.list_checkpoints(work_dir)
    out += [p for p in work_dir.iterdir() if p.name.startswith(".iter_")]
    return out


def prepare_work_dir(work_dir: Path, resume: str | None, overwrite: bool, log=print, remove: bool = True
                     ) -> Path | None:
    """Decide how this run uses `work_dir`; returns the checkpoint to resume from (or None).

    --resume auto with nothing to resume starts fresh and says so (one command for the first
    launch and every requeue). Without --resume, a work dir holding another run's checkpoints or
    final model is refused unless --overwrite, which removes only what lmtune wrote there.
    """
    work_dir = Path(work_dir)
    if resume == "auto":
        found = ckpt.latest_checkpoint(work_dir)
        if found is None:
            log(f"--resume auto: no complete checkpoint in {work_dir}; starting a new run")
            resume = None
        else:
            return found
    if resume is not None:
        return ckpt.resolve_resume(work_dir, resume)
    if not work_dir.is_dir():
        return None
    previous = [p for p in _lmtune_entries(work_dir) if p.name not in ("logs", "config.py")]
    if not previous:
        return None
    names = ", ".join(sorted(p.name for p in previous)[:5])
    if not overwrite:
        raise UserError(
            f"{work_dir} already holds another run ({names}); a new run there would mix with it",
            hint="continue it with --resume auto, start afresh with --overwrite (removes only what lmtune wrote "
                 "there: iter_*/, hf/, logs/), or pass another --work-dir",
        )
    if not remove:
        return None
    for p in _lmtune_entries(work_dir):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    log(f"--overwrite: removed the previous run in {work_dir} ({names})")
    return None


def check_resume(saved: dict, current: dict, saved_total: int, total: int, step: int, lr_at, sharded: bool,
                 log=print) -> None:
    """Refuse a checkpoint from another run; explain a changed schedule."""
    if not saved:  # a checkpoint from before identities were saved: nothing to compare
        log("resume: the checkpoint records no run identity; not checked")
        return
    for key, hint in MUST_MATCH.items():
        if key in saved and saved[key] != current[key]:
            raise UserError(f"the checkpoint does not fit this run: {key} was {saved[key]!r}, now {current[key]!r}",
                            hint=hint)
    if sharded and saved.get("world_size") != current["world_size"]:
        raise UserError(
            f"the checkpoint was written in shards by {saved.get('world_size')} processes, this run has "
            f"{current['world_size']}", hint=f"resume with {saved.get('world_size')} processes (--nproc-per-node)")
    if saved_total and saved_total != total:
        log(f"resume: the run now has {total} steps instead of {saved_total}; the learning-rate schedule "
            f"continues from step {step} on the {total}-step curve (lr {lr_at(saved_total):.3g} -> "
            f"{lr_at(total):.3g} at this step)")
