"""The training loop on a tiny random Llama: learning, equivalences, checkpoints, bad input."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt
from lmtune.train.loop import Trainer, run_training
from lmtune.train.strategies import SingleProcess


def _records(n=24):
    return [
        {"messages": [
            {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
            {"role": "assistant", "content": f"The answer is {2 * i}."},
        ]}
        for i in range(n)
    ]


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", _records())


def make_cfg(tmp_path, model, data, **kw):
    base = dict(model=model, datasets=[str(data)], max_length=128, method="full", lr=1e-3, batch_size=2,
                accumulative_counts=1, max_steps=4, save_steps=100, logging_steps=1, warmup_ratio=0.0,
                lora_dropout=0.0, seed=0)
    base.update(kw)
    cfg_path = tmp_path / f"cfg_{len(list(tmp_path.glob('cfg_*.py')))}.py"
    cfg_path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(cfg_path))


def trained_weights(work: Path) -> dict:
    last = ckpt.latest_checkpoint(work)
    return load_file(str(last / "model.safetensors"))


def test_full_finetune_lowers_loss(tmp_path, tiny_model_dir, data_file):
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=12, lr=3e-3)
    run_training(cfg, tmp_path / "work")
    hist = [json.loads(line) for line in (tmp_path / "work/logs/train_log.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in hist if "loss" in h]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses
    assert (tmp_path / "work/hf/config.json").is_file()
    assert (tmp_path / "work/loss_curve.png").stat().st_size > 1000
    assert list((tmp_path / "work/logs/tensorboard").glob("events.out.tfevents.*"))


def test_lora_trains_only_adapter_and_exports_it(tmp_path, tiny_model_dir, data_file):
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, method="lora", lora_r=4, lora_alpha=8, max_steps=6, lr=1e-2)
    run_training(cfg, tmp_path / "work")
    weights = trained_weights(tmp_path / "work")
    assert weights and all("lora_" in k for k in weights)
    hf = tmp_path / "work/hf"
    assert (hf / "adapter_config.json").is_file() and (hf / "adapter_model.safetensors").is_file()
    meta = json.loads((hf / "lmtune.json").read_text())
    assert "<|im_end|>" in meta["stop_words"]
    gen = json.loads((hf / "generation_config.json").read_text())
    assert 2 in (gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]])


def test_packed_loss_equals_unpacked_loss(tmp_path, tiny_model_dir, data_file):
    """The same samples give the same summed loss and token count, packed or not."""
    from lmtune.train.objectives import flat_batch, loss_sum

    totals = {}
    for packed in (True, False):
        cfg = make_cfg(tmp_path, tiny_model_dir, data_file, pack_to_max_length=packed)
        t = Trainer(cfg, tmp_path / f"w{packed}")
        t.setup()
        s, n = torch.zeros(()), 0
        with torch.no_grad():
            for row in t.rows:
                ls, k = loss_sum(t.model, flat_batch([row]))
                s, n = s + ls, n + k
        totals[packed] = (float(s), n, len(t.rows))
    (sp, np_, rows_p), (su, nu, rows_u) = totals[True], totals[False]
    assert rows_p < rows_u  # packing really packed
    assert np_ == nu
    assert sp == pytest.approx(su, rel=1e-5)


def test_flat_batch_matches_padded_batch(tmp_path, tiny_model_dir, data_file):
    """Our padding-free flattened forward equals the ordinary padded forward with attention_mask."""
    import torch.nn.functional as F

    from lmtune.train.objectives import flat_batch, loss_sum

    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, pack_to_max_length=False)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    rows = t.rows[:4]
    with torch.no_grad():
        s, n = loss_sum(t.model, flat_batch(rows))
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((4, width), t.tokenizer.pad_token_id)
        labels = torch.full((4, width), -100)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"])
            mask[i, :len(r["input_ids"])] = 1
        logits = t.model(input_ids=ids, attention_mask=mask).logits
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                              reduction="sum", ignore_index=-100)
    assert n == int((labels[:, 1:] != -100).sum())
    assert float(s) == pytest.approx(float(ref), rel=1e-5)


class _CaptureGrads(SingleProcess):
    """A one-process strategy that records the step's gradients instead of stepping."""

    def clip_and_step(self, model, optimizer, max_norm):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_accumulation_8x1_equals_1x8(tmp_path, tiny_model_dir, data_file):
    """The claim is exact: a step's loss and gradients do not depend on how its rows are split into
    micro-batches. Checked in float64, where the only difference is summation order (~1e-16 relative)."""
    steps = []
    for bs, acc in ((8, 1), (1, 8)):
        cfg = make_cfg(tmp_path, tiny_model_dir, data_file, batch_size=bs, accumulative_counts=acc, max_steps=3,
                       pack_to_max_length=False, max_norm=0.0)
        dist = _CaptureGrads()
        t = Trainer(cfg, tmp_path / f"w{bs}x{acc}", dist=dist)
        t.setup()
        t.model.double()
        got = []
        for _ in range(2):  # two steps: the second draws the next rows of the same epoch order
            loss, _ = t.step()
            got.append((loss, dist.grads))
        steps.append(got)
    for (loss_a, ga), (loss_b, gb) in zip(*steps):
        assert loss_a == pytest.approx(loss_b, rel=1e-12)
        assert ga.keys() == gb.keys() and ga
        for k in ga:
            scale = float(ga[k].abs().max()) + 1e-30
            assert float((ga[k] - gb[k]).abs().max()) <= 1e-10 * scale, k


def _train_cli(cfg_path, work, *extra, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "lmtune.cli", "train", str(cfg_path), "--work-dir", str(work), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_model_dir, data_file):
    cfg_text = "\n".join(f"{k} = {v!r}" for k, v in dict(
        model=tiny_model_dir, datasets=[str(data_file)], max_length=128, method="lora", lora_r=4, lora_alpha=8,
        lora_dropout=0.1, lr=5e-3, batch_size=2, accumulative_counts=1, max_steps=8, save_steps=2,
        save_total_limit=0, seed=3, warmup_ratio=0.25).items())
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(cfg_text + "\n")
    # Uninterrupted run.
    p = _train_cli(cfg_path, tmp_path / "full")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    # Interrupted run: SIGKILL once iter_4 exists, then resume.
    p = _train_cli(cfg_path, tmp_path / "cut")
    deadline = time.time() + 300
    while not (tmp_path / "cut/iter_4/manifest.json").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "cut/hf").exists()
    newest = ckpt.latest_checkpoint(tmp_path / "cut")  # iter_4, or a later one saved before the kill landed
    assert newest is not None and int(newest.name.split("_")[1]) >= 4
    p = _train_cli(cfg_path, tmp_path / "cut", "--resume", "auto")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    assert f"resumed from {newest} at step {newest.name.split('_')[1]}" in out
    a = load_file(str(tmp_path / "full/iter_8/model.safetensors"))
    b = load_file(str(tmp_path / "cut/iter_8/model.safetensors"))
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst


def test_corrupt_newest_checkpoint_is_skipped(tmp_path, tiny_model_dir, data_file, capsys):
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=4, save_steps=2, save_total_limit=0)
    run_training(cfg, tmp_path / "w")
    newest = tmp_path / "w/iter_4"
    with open(newest / "optimizer.pt", "r+b") as f:  # a partial file
        f.truncate(10)
    found = ckpt.latest_checkpoint(tmp_path / "w")
    assert found == tmp_path / "w/iter_2"
    assert "skipping checkpoint" in capsys.readouterr().err
    # A save interrupted before its manifest is never picked either.
    (tmp_path / "w/iter_6").mkdir()
    assert ckpt.resolve_resume(tmp_path / "w", "auto") == tmp_path / "w/iter_2"


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path, tiny_model_dir, data_file, capsys):
    """The requeue pattern: one command (--resume auto) for the first launch and every restart."""
    from lmtune.cli import main

    cfg = tmp_path / "c.py"
    cfg.write_text(f"model = {tiny_model_dir!r}\ndatasets = [{str(data_file)!r}]\nmax_steps = 1\n")
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "empty"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "starting a new run" in err
    assert (tmp_path / "empty/hf/adapter_config.json").is_file()
    # An explicit checkpoint path that does not exist is still an error.
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w2"), "--resume", str(tmp_path / "nope")]) == 2
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_resume(tmp_path / "empty2", "auto")


def test_missing_paths_are_named(tmp_path, tiny_model_dir, data_file, capsys):
    from lmtune.cli import main

    cfg = tmp_path / "c.py"
    cfg.write_text(f"model = {tiny_model_dir!r}\ndatasets = ['{tmp_path}/nope.jsonl']\n")
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "datasets[0]" in err and "nope.jsonl" in err and "does not exist" in err
    cfg.write_text(f"model = '{tmp_path}/no_model'\ndatasets = [{str(data_file)!r}]\n")
    assert main(["train", str(cfg), "--work-dir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "model" in err and "no_model" in err and "does not exist" in err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_model_dir, data_file):
    from lmtune.train.objectives import NextToken

    class Poisoned(NextToken):  # the third step's loss is NaN
        calls = 0

        def loss(self, model, batch, forward):
            Poisoned.calls += 1
            s, metrics = super().loss(model, batch, forward)
            return (s * float("nan") if Poisoned.calls == 3 else s), metrics

    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=5, save_steps=2)
    t = Trainer(cfg, tmp_path / "w", objective=Poisoned())
    t.setup()
    with pytest.raises(UserError) as e:
        t.train()
    assert "step 3" in str(e.value) and "iter_2" in str(e.value)
    assert ckpt.latest_checkpoint(tmp_path / "w") == tmp_path / "w/iter_2"
    assert not (tmp_path / "w/iter_3").exists() and not (tmp_path / "w/hf").exists()


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, tiny_model_dir, data_file, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=4, save_steps=2, save_total_limit=1)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    real_save = torch.save
    saves = {"n": 0}

    def full_disk(obj, f, *a, **kw):
        saves["n"] += 1
        if saves["n"] > 3:  # the first checkpoint (3 torch.save files) fits; the next one does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError) as e:
        t.train()
    msg = str(e.value)
    assert "disk filled up" in msg and "iter_4" in msg and "iter_2 is intact" in msg
    assert ckpt.latest_checkpoint(tmp_path / "w") == tmp_path / "w/iter_2"
    assert ckpt.verify_checkpoint(tmp_path / "w/iter_2") is None
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".iter_")]


@pytest.mark.parametrize("optimizer", ["adamw_8bit", "paged_adamw_8bit"])
def test_bitsandbytes_optimizers_train(tmp_path, tiny_model_dir, data_file, optimizer):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=8, lr=3e-3, optimizer=optimizer)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    assert "8bit" in type(t.optimizer).__name__
    t.train()
    losses = [loss for _, loss in t.state.history]
    assert losses[-1] < losses[0] - 0.5, losses


def test_given_rows_need_no_data_files(tmp_path, tiny_model_dir, data_file):
    """A Trainer given its rows (benchmarks, notebooks) does not ask for the config's data files."""
    made = Trainer(make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=2), tmp_path / "a")
    made.setup()
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=2)
    cfg.datasets = [dict(cfg.datasets[0], path=str(tmp_path / "missing.jsonl"))]
    with pytest.raises(UserError, match="missing.jsonl"):
        Trainer(cfg, tmp_path / "b").setup()
    given = Trainer(cfg, tmp_path / "c", rows=made.rows)
    given.setup()
    loss, _ = given.step()
    assert loss == pytest.approx(made.step()[0], rel=1e-6)
