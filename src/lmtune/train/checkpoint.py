"""The one place that writes and finds training checkpoints.

A checkpoint is a directory `work_dir/iter_N/` holding
    model.safetensors         trainable weights (the LoRA adapter, or the full model)
    optimizer.pt, scheduler.pt, rng.pt   (torch.save of plain state dicts/tensors)
    trainer_state.json        step, epoch, data position, loss history
    config.py                 the resolved config (so `convert pth_to_hf` needs no CONFIG)
    manifest.json             written last: every file with its size
It is written under a temporary name and renamed into place, so a kill or a full disk during a
save never leaves a broken `iter_N/`; the previous checkpoints stay untouched.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

from lmtune.errors import UserError

MANIFEST = "manifest.json"
SHARDS_FILE = "shards.json"  # in a sharded checkpoint: which strategy wrote it, how, by how many ranks
_ITER_RE = re.compile(r"^iter_(\d+)$")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(work_dir: Path, step: int, writers: dict[str, Callable[[Path], None]]) -> Path:
    """Write `iter_{step}` atomically. `writers` maps file name -> function writing that file."""
    work_dir = Path(work_dir)
    final = work_dir / f"iter_{step}"
    tmp = work_dir / f".iter_{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        for name, write in writers.items():
            write(tmp / name)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = tmp / MANIFEST
        with open(manifest, "w", encoding="utf-8") as f:
            json.dump({"step": step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after resume): replace it whole
            old = work_dir / f".iter_{step}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(work_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(work_dir, quiet=True)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(
                f"the disk filled up while saving checkpoint iter_{step}; {kept}",
                where=str(work_dir),
                hint="free some space (or lower save_total_limit) and resume with --resume auto",
            ) from None
        raise UserError(f"could not save checkpoint iter_{step}: {e}; {kept}", where=str(work_dir)) from None
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` is a complete checkpoint, else the reason it is not."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        files = info["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for name, size in files.items():
        p = path / name
        if not p.is_file():
            return f"missing {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, expected {size}"
    return None


def list_checkpoints(work_dir: Path) -> list[Path]:
    """All iter_N directories, newest (highest N) first, complete or not."""
    work_dir = Path(work_dir)
    if not work_dir.is_dir():
        return []
    found = []
    for p in work_dir.iterdir():
        m = _ITER_RE.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(work_dir: Path, quiet: bool = False) -> Path | None:
    """The newest complete checkpoint; broken ones are skipped with a message."""
    for path in list_checkpoints(work_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if not quiet:
            print(f"[lmtune] skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None


def diverged(work_dir: Path, loss: float, step: int) -> UserError:
    """The error for a non-finite loss: nothing is saved for this step; the last good checkpoint stays."""
    prev = latest_checkpoint(work_dir, quiet=True)
    kept = f"the last good checkpoint is {prev}" if prev else "no checkpoint had been saved yet"
    return UserError(f"the loss became {loss} at step {step}; training stopped and nothing was saved for this "
                     f"step ({kept})",
                     hint="lower lr, enable gradient clipping (max_norm), or check the data of this step; "
                          "resume with --resume auto")


def resolve_resume(work_dir: Path, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = latest_checkpoint(work_dir)
        if found is None:
            raise UserError(
                f"--resume auto: no complete checkpoint in {work_dir}",
                hint="start without --resume, or pass --work-dir of the run you want to continue",
            )
        return found
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint '{resume}' does not exist")
    problem = verify_checkpoint(path)
    if problem:
        fallback = latest_checkpoint(path.parent, quiet=True)
        hint = f"the newest complete one is {fallback}" if fallback else None
        raise UserError(f"--resume: checkpoint '{resume}' is incomplete: {problem}", hint=hint)
    return path


BEST_FILE = "best_checkpoint.json"  # the checkpoint with the lowest validation loss (save_best)


def write_best(work_dir: Path, record: dict) -> None:
    tmp = work_dir / f".{BEST_FILE}.tmp"
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, work_dir / BEST_FILE)


def best_checkpoint(work_dir: Path) -> Path | None:
    try:
        return work_dir / Path(json.loads((work_dir / BEST_FILE).read_text(encoding="utf-8"))["path"]).name
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0 = keep all), and the best one (save_best)."""
    if keep <= 0:
        return
    best = best_checkpoint(work_dir)
    complete = [p for p in list_checkpoints(work_dir) if verify_checkpoint(p) is None and p != best]
    for old in complete[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- reading state back


def python_rng_state() -> list:
    import random

    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def python_rng_tuple(state) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def load_plain(path: Path, map_location=None):
    """torch.load without pickle: tensors, numbers, strings and containers only. A file that needs
    more (a foreign or tampered checkpoint) is refused instead of running its code."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError (or RuntimeError) for disallowed objects
        raise UserError(f"{path} holds more than plain tensors and numbers, so it was not loaded ({type(e).__name__})",
                        hint="resume only from checkpoints lmtune wrote; a checkpoint from elsewhere may run code "
                             "when unpickled") from None


# --------------------------------------------------------------------------- sharded checkpoints


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDS_FILE).is_file()


def load_sharded_weights(folder: Path, params: dict) -> dict:
    """The trainable weights of a sharded checkpoint, whole, in one process (no process group):
    for `lmtune convert pth_to_hf`. `params` are the model's parameters by name; for DCP files the
    values are read straight into them (no second copy of the model in memory)."""
    folder = Path(folder)
    info = json.loads((folder / SHARDS_FILE).read_text(encoding="utf-8"))
    if info.get("format") == "dcp":
        import torch.distributed.checkpoint as dcp

        meta = dcp.FileSystemReader(str(folder)).read_metadata()
        saved = {k[len("model."):] for k in meta.state_dict_metadata if k.startswith("model.")}
        wanted = {n: p for n, p in params.items() if n in saved}
        if not wanted:
            raise UserError(f"checkpoint {folder} holds no weights of this model",
                            hint="pass the config the checkpoint was trained with, or omit CONFIG")
        target = {n: p.detach() for n, p in wanted.items()}
        dcp.load({"model": target}, checkpoint_id=str(folder), no_dist=True)
        return target
    if info.get("format") == "deepspeed":
        from lmtune.train.runtime import import_deepspeed

        import_deepspeed()
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The fp32 master weights, put together from every rank's partition file.
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=""))
    raise UserError(f"checkpoint {folder}: unknown shard format {info.get('format')!r}")
