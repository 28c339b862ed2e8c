"""Training from the token store: validation loss and the best checkpoint, exact resume mid-epoch on
a pretraining store, and two gloo processes reading disjoint rows of one memory-mapped store."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import write_jsonl, data_cache
from lmtune.config import load_config
from lmtune.train import checkpoint as ckpt
from lmtune.train.loop import Trainer


def _chat(n=24):
    return [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(n)]


def _docs(n=60):
    return [{"text": " ".join(f"word{(i * 13 + k) % 97}" for k in range(20 + (i * 37) % 130))} for i in range(n)]


def _cfg_file(path: Path, **kw) -> Path:
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in kw.items()) + "\n")
    return path


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    return dict(os.environ, LMTUNE_CACHE_DIR=data_cache(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_validation_loss_is_logged_and_the_best_checkpoint_kept(tmp_path, tiny_model_dir, cache_env):
    data = write_jsonl(tmp_path / "data.jsonl", _chat())
    cfg = load_config(str(_cfg_file(
        tmp_path / "cfg.py", model=tiny_model_dir, datasets=[str(data)], max_length=128, method="full", lr=3e-3,
        batch_size=2, accumulative_counts=1, max_steps=6, save_steps=100, save_total_limit=1, warmup_ratio=0.0,
        seed=0, mixed_precision="no", val_set_size=6, eval_steps=2, save_best=True)))
    t = Trainer(cfg, tmp_path / "work")
    t.setup()
    assert len(t.val_rows) >= 1 and t.data_stats["val"]["conversations"] == 6
    train_ids = {tuple(r["input_ids"]) for r in t.rows}
    assert not train_ids & {tuple(r["input_ids"]) for r in t.val_rows}
    t.train()
    log = [json.loads(x) for x in (tmp_path / "work/logs/train_log.jsonl").read_text().splitlines()]
    val = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6]
    for r in val:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]), rel=1e-4)
    assert val[-1]["val_loss"] < val[0]["val_loss"]
    assert (tmp_path / "work/loss_curve.png").stat().st_size > 0
    # The last validation loss is the plain mean cross-entropy of the final model over the
    # validation rows' loss tokens (float32 forward: a relative tolerance of 1e-4 covers the
    # different summation order of the packed, batched pass).
    t.model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in t.val_rows:
            bounds = [0] + list(torch.tensor(row.get("seq_lens", [len(row["input_ids"])])).cumsum(0).tolist())
            for a, b in zip(bounds[:-1], bounds[1:]):  # each sample on its own: no packing involved
                ids = torch.tensor([row["input_ids"][a:b]])
                labels = torch.tensor(row["labels"][a:b])
                logits = t.model(input_ids=ids, use_cache=False).logits[0, :-1].double()
                keep = labels[1:] != -100
                total += float(F.cross_entropy(logits[keep], labels[1:][keep], reduction="sum"))
                count += int(keep.sum())
    assert val[-1]["val_tokens"] == count
    assert val[-1]["val_loss"] == pytest.approx(total / count, rel=1e-4)
    best = json.loads((tmp_path / "work" / ckpt.BEST_FILE).read_text())
    assert best["step"] == min(val, key=lambda r: r["val_loss"])["step"]
    assert ckpt.verify_checkpoint(Path(best["path"])) is None  # kept despite save_total_limit = 1
    state = json.loads((Path(best["path"]) / "trainer_state.json").read_text())
    assert [s for s, _ in state["metrics"]["val_loss"]][-1] == best["step"]  # its own val_loss is in its state


def _train_cli(cfg_path, work, env, *extra):
    return subprocess.Popen([sys.executable, "-m", "lmtune.cli", "train", str(cfg_path), "--work-dir", str(work), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.mark.slow
def test_pretraining_resume_mid_epoch_equals_uninterrupted(tmp_path, tiny_model_dir, cache_env):
    data = write_jsonl(tmp_path / "docs.jsonl", _docs())
    cfg_path = _cfg_file(tmp_path / "cfg.py", model=tiny_model_dir, datasets=[str(data)], objective="pretrain",
                         max_length=64, method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.1, lr=5e-3, batch_size=2,
                         accumulative_counts=1, max_steps=8, save_steps=2, save_total_limit=0, seed=3, warmup_ratio=0.25)
    p = subprocess.run([sys.executable, "-m", "lmtune.cli", "data", "prepare", str(cfg_path)], env=cache_env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    n_rows = int(p.stdout.split(" rows")[0].rsplit(" ", 1)[1])
    assert n_rows > 8 * 2  # 8 steps of 2 rows stay inside the first epoch
    p = _train_cli(cfg_path, tmp_path / "full", cache_env)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    p = _train_cli(cfg_path, tmp_path / "cut", cache_env)
    deadline = time.time() + 300
    while not (tmp_path / "cut/iter_4/manifest.json").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    newest = ckpt.latest_checkpoint(tmp_path / "cut")
    st = json.loads((newest / "trainer_state.json").read_text())
    assert st["epoch"] == 0 and 0 < st["index"] < n_rows  # killed mid-epoch: the position is a row index
    p = _train_cli(cfg_path, tmp_path / "cut", cache_env, "--resume", "auto")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert f"resumed from {newest}" in out and "data: encoded" not in out  # the prepared store, reused
    a = load_file(str(tmp_path / "full/iter_8/model.safetensors"))
    b = load_file(str(tmp_path / "cut/iter_8/model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    full_log = [r["loss"] for r in map(json.loads, (tmp_path / "full/logs/train_log.jsonl").read_text().splitlines())
                if "loss" in r]
    cut_state = json.loads((tmp_path / "cut/iter_8/trainer_state.json").read_text())
    assert [loss for _, loss in cut_state["history"]] == pytest.approx(full_log, abs=1e-6)


RANK_SCRIPT = """
import json, os, sys
from lmtune.config import load_config
from lmtune.train.loop import Trainer, TrainState
from lmtune.train.strategies import make_strategy

cfg = load_config(sys.argv[1])
dist = make_strategy(cfg)
t = Trainer(cfg, sys.argv[2], dist=dist)
t.setup()  # every process opens the store; the first to take the lock encodes it
steps = [[[r["input_ids"] for r in mb] for mb in t._next_step_rows()] for _ in range(3)]
store = t.rows.sources.stores[0]
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if line.rstrip().endswith(".bin")})
with open(os.path.join(sys.argv[3], f"rank{dist.rank}.json"), "w") as f:
    json.dump({"steps": steps, "store": str(store.path), "ino": os.stat(store.path / "input_ids.bin").st_ino,
               "maps": maps, "fingerprint": t.identity["data_fingerprint"], "rows": len(t.rows)}, f)
t.state = TrainState()  # from the start again, and train for real
t.train()
"""


@pytest.mark.slow
def test_two_gloo_processes_read_disjoint_rows_of_one_store(tmp_path, tiny_model_dir, cache_env):
    data = write_jsonl(tmp_path / "docs.jsonl", _docs(40))
    cfg_path = _cfg_file(tmp_path / "cfg.py", model=tiny_model_dir, datasets=[str(data)], objective="pretrain",
                         max_length=64, method="full", lr=1e-3, batch_size=1, accumulative_counts=2, max_steps=2,
                         save_steps=100, seed=0, strategy="ddp", mixed_precision="no", num_proc=2)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(script), str(cfg_path), str(tmp_path / "work"), str(out_dir)],
                       env=cache_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    assert (p.stdout + p.stderr).count("data: encoded") == 1  # one process encoded; the other waited
    r0, r1 = (json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    # One store, mapped (not copied) by both processes.
    assert r0["store"] == r1["store"] and r0["ino"] == r1["ino"] and r0["fingerprint"] == r1["fingerprint"]
    assert str(Path(r0["store"]) / "input_ids.bin") in r0["maps"] and r0["maps"] == r1["maps"]
    cache = Path(cache_env["LMTUNE_CACHE_DIR"]) / "data"
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["rows", "tok"]
    # Each step: 2 processes × 2 micro-batches × 1 row; the processes' rows never overlap.
    seen = []
    for s0, s1 in zip(r0["steps"], r1["steps"]):
        a = [tuple(r) for mb in s0 for r in mb]
        b = [tuple(r) for mb in s1 for r in mb]
        assert len(a) == len(b) == 2 and not set(a) & set(b)
        seen += a + b
    assert len(set(seen)) == len(seen) == 12 <= r0["rows"]  # 3 steps, 12 distinct rows of one epoch
    log = [json.loads(x) for x in (tmp_path / "work/logs/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
