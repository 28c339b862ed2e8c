"""Multi-process training on CPU (gloo): DDP, FSDP2 and DeepSpeed ZeRO give the single-process
loss curve and weights; sharded checkpoints resume exactly after a kill and convert to HF;
launch helpers (torchrun command, SLURM variables, DeepSpeed config)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl, data_cache
from lmtune.errors import UserError


def _records(n=24):
    """Answers of 1 to ~100 tokens: with equal lengths a per-process (instead of global) loss
    normalisation would give the same result and go unnoticed."""
    return [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": " ".join(["yes"] * (1 + (i * 41) % 100))}]}
            for i in range(n)]


def _write_cfg(path: Path, model: str, data: Path, **kw) -> Path:
    # SGD: its update is linear in the gradient, so weights can be compared tightly on any CPU
    # (Adam turns summation-order noise in near-zero gradients into update-sized differences).
    base = dict(model=model, datasets=[str(data)], max_length=256, method="full", lr=0.05, optimizer="sgd",
                batch_size=2,
                accumulative_counts=2, max_steps=4, save_steps=100, logging_steps=1, warmup_ratio=0.0,
                lora_dropout=0.0, seed=0, pack_to_max_length=False, mixed_precision="no", save_total_limit=0)
    base.update(kw)
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return path


def _lmtune(args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "lmtune.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **popen)


def _run(args, timeout=600) -> str:
    p = _lmtune(args)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-6000:]
    return out


def _losses(work: Path) -> list[float]:
    lines = (work / "logs/train_log.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", _records())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir):
    """The reference: one process, 2 rows × 2 accumulation = 4 rows a step, full fine-tuning."""
    root = tmp_path_factory.mktemp("single")
    data = write_jsonl(root / "data.jsonl", _records())
    cfg = _write_cfg(root / "cfg.py", tiny_model_dir, data, save_steps=2)
    _run(["train", cfg, "--work-dir", root / "work"])
    return root, cfg


STRATEGIES = {
    "ddp": ["--cfg-options", "batch_size=1", "strategy=ddp"],
    "fsdp2": ["--cfg-options", "batch_size=1", "strategy=fsdp2"],
    "zero2": ["--deepspeed", "deepspeed_zero2", "--cfg-options", "batch_size=1"],
    "zero3": ["--deepspeed", "zero3", "--cfg-options", "batch_size=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_match_one(strategy, single_run, tmp_path):
    """2 processes × 1 row × 2 accumulation = the same global step as 1 process × 2 rows: the same
    loss curve and, after 4 steps (clipping on), the same exported weights."""
    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
    root, cfg = single_run
    work = tmp_path / "work"
    args = ["train", cfg, "--work-dir", work, "--nproc-per-node", 2, *STRATEGIES[strategy]]
    _run(args)
    ref, got = _losses(root / "work"), _losses(work)
    assert len(got) == 4
    assert got == pytest.approx(ref, abs=2e-5), (ref, got)
    a = load_file(str(root / "work/hf/model.safetensors"))
    b = load_file(str(work / "hf/model.safetensors"))
    assert _max_diff(a, b) < 1e-5
    if strategy in ("fsdp2", "zero3"):  # sharded checkpoint: every rank wrote its part
        info = json.loads((work / "iter_4/shards.json").read_text())
        assert info["engine"] == ("fsdp2" if strategy == "fsdp2" else "deepspeed") and info["world_size"] == 2
        assert (work / "iter_4/rng-rank1.pt").is_file()
        assert not [p for p in work.iterdir() if p.name.startswith(".iter_")]  # no staging left over


def _kill_at(p: subprocess.Popen, marker: Path, timeout=300) -> None:
    deadline = time.time() + timeout
    while not marker.exists():
        if p.poll() is not None:
            raise AssertionError(p.stdout.read()[-4000:])
        assert time.time() < deadline
        time.sleep(0.05)
    # torchrun starts its workers in sessions of their own: kill the whole tree we started.
    for pid in [p.pid, *_descendants(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp2", "zero3"])
def test_sharded_resume_after_kill_equals_uninterrupted(strategy, tmp_path, tiny_model_dir, data_file):
    """LoRA with dropout (per-rank random streams), 2 processes: kill after iter_4, resume, and the
    final adapter equals the uninterrupted run's; `convert pth_to_hf` reads the sharded iter_6."""
    if strategy == "zero3":
        pytest.importorskip("deepspeed")
    cfg = _write_cfg(tmp_path / "cfg.py", tiny_model_dir, data_file, method="lora", lora_r=4, lora_alpha=8,
                     lora_dropout=0.1, lr=5e-3, batch_size=1, max_steps=6, save_steps=2, warmup_ratio=0.25,
                     evaluation_inputs=["What is 2 plus 2?"], eval_max_new_tokens=4, evaluation_freq=3)
    how = ["--cfg-options", "strategy=fsdp2"] if strategy == "fsdp2" else ["--deepspeed", "zero3"]
    common = ["--nproc-per-node", 2, *how]
    _run(["train", cfg, "--work-dir", tmp_path / "full", *common])
    p = _lmtune(["train", cfg, "--work-dir", tmp_path / "cut", *common])
    _kill_at(p, tmp_path / "cut/iter_4/manifest.json")
    assert not (tmp_path / "cut/hf").exists()
    shutil.rmtree(tmp_path / "cut/iter_6", ignore_errors=True)  # in case the kill came a step late
    out = _run(["train", cfg, "--work-dir", tmp_path / "cut", "--resume", "auto", *common])
    assert "resumed from" in out and "iter_4" in out, out[-3000:]
    full, cut = (load_file(str(tmp_path / w / "hf/adapter_model.safetensors")) for w in ("full", "cut"))
    assert _max_diff(full, cut) <= 1e-6
    # The sharded checkpoint converts to the same adapter, in one process without a process group.
    _run(["convert", "pth_to_hf", tmp_path / "full/iter_6", tmp_path / "conv"])
    conv = load_file(str(tmp_path / "conv/adapter_model.safetensors"))
    assert _max_diff(full, conv) <= 1e-6


@pytest.mark.slow
def test_resume_with_other_strategy_is_a_clear_error(single_run, tmp_path):
    root, cfg = single_run
    shutil.copytree(root / "work/iter_2", tmp_path / "w/iter_2")
    p = _lmtune(["train", cfg, "--work-dir", tmp_path / "w", "--resume", "auto", "--nproc-per-node", 2,
                 "--cfg-options", "batch_size=1", "strategy=fsdp2"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "written whole" in out and "strategy (fsdp2)" in out


# --------------------------------------------------------------------------- launch helpers (fast)


def test_torchrun_command_single_and_multi_node():
    from lmtune.train.distributed_launch import torchrun_command

    cmd = torchrun_command(4, ["train", "c.py"], environ={})
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--standalone"]
    assert cmd[-4:] == ["-m", "lmtune.cli", "train", "c.py"]
    cmd = torchrun_command(8, ["train", "c.py"], environ={"NNODES": "2", "NODE_RANK": "1", "ADDR": "10.0.0.1",
                                                            "PORT": "12345"})
    assert "--nnodes=2" in cmd and "--node-rank=1" in cmd and "--master-addr=10.0.0.1" in cmd
    assert "--master-port=12345" in cmd
    with pytest.raises(UserError, match="no master address"):
        torchrun_command(8, ["train", "c.py"], environ={"NNODES": "2"})
    # One SLURM task per node running torchrun: nodes, node rank and master from SLURM.
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09]"}
    cmd = torchrun_command(8, ["train", "c.py"], environ=env)
    assert "--nnodes=3" in cmd and "--node-rank=2" in cmd and "--master-addr=gpu07" in cmd


def test_env_from_slurm_sets_ranks():
    from lmtune.train.distributed_launch import env_from_slurm, first_slurm_host

    assert first_slurm_host("gpu[03-05,09],cpu1") == "gpu03"
    assert first_slurm_host("node7,node8") == "node7"
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "a[1-2]",
           "SLURM_NTASKS_PER_NODE": "4(x2)"}
    assert env_from_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("5", "8", "1", "a1", "29500")
    assert env["LOCAL_WORLD_SIZE"] == "4"
    assert not env_from_slurm({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # a single task: nothing to do
    assert not env_from_slurm({"RANK": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})  # torchrun decided


def _cfg(tmp_path, **kw):
    from lmtune.config import load_config

    p = tmp_path / "c.py"
    p.write_text("\n".join(f"{k} = {v!r}" for k, v in kw.items()) + "\n")
    return load_config(str(p))


def test_deepspeed_config_takes_batch_clipping_precision_from_lmtune(tmp_path):
    from lmtune.train.strategies.deepspeed import deepspeed_config

    for name in ("deepspeed_zero1", "zero2", "deepspeed_zero2_offload", "zero3", "deepspeed_zero3_offload"):
        cfg = _cfg(tmp_path, deepspeed=name, batch_size=3, accumulative_counts=4, max_norm=0.5)
        ds, notes = deepspeed_config(cfg, world_size=2, amp_dtype=torch.bfloat16)
        assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 4
        assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == 0.5
        assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
        assert ds["zero_optimization"]["stage"] == int(name.split("zero")[1][0]) and not notes
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": "auto",
                                "fp16": {"enabled": True}, "optimizer": {"type": "Adam"},
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))
    cfg = _cfg(tmp_path, deepspeed=str(user), batch_size=1, accumulative_counts=8)
    ds, notes = deepspeed_config(cfg, world_size=1, amp_dtype=None)
    assert ds["train_micro_batch_size_per_gpu"] == 1 and ds["gradient_accumulation_steps"] == 8
    assert ds["fp16"]["enabled"] is False and "optimizer" not in ds
    assert "reduce_bucket_size" not in ds["zero_optimization"]
    text = "\n".join(notes)
    assert "train_micro_batch_size_per_gpu: 16" in text and "fp16.enabled" in text and "'optimizer'" in text


def test_deepspeed_unknown_name_and_bad_json(tmp_path):
    from lmtune.train.strategies.deepspeed import deepspeed_template

    with pytest.raises(UserError, match="neither a built-in name") as e:
        deepspeed_template("deepspeed_zero4")
    assert "deepspeed_zero3_offload" in e.value.hint
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(UserError, match="not valid JSON"):
        deepspeed_template(str(bad))


def test_missing_deepspeed_is_a_clear_message(tmp_path, monkeypatch):
    import builtins

    from lmtune.train import strategies

    real_import = builtins.__import__

    def no_deepspeed(name, *a, **kw):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ImportError("No module named 'deepspeed'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_deepspeed)
    with pytest.raises(UserError, match="needs the deepspeed package") as e:
        strategies.make_strategy(_cfg(tmp_path, strategy="deepspeed", deepspeed="zero2"))
    assert "DS_BUILD_OPS=0" in e.value.hint


# --------------------------------------------------------------------------- preference (DPO)


def _pairs(n=16):
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"The answer is {2 * i + 1}, or maybe {2 * i + 3}."} for i in range(n)]


DPO_CASES = {
    # LoRA: the reference is the DDP-wrapped policy with its adapter switched off.
    "ddp-lora": (dict(method="lora", lora_r=4, lora_alpha=8, lr=1e-2), ["--cfg-options", "strategy=ddp"]),
    # Full fine-tuning, sharded: the reference is precomputed, its forwards dealt over both ranks.
    "fsdp2-full-precompute": (dict(method="full", precompute_reference=True),
                              ["--cfg-options", "strategy=fsdp2"]),
    # ZeRO-3: the adapter-off reference forward gathers the partitioned weights like the policy's.
    "zero3-lora": (dict(method="lora", lora_r=4, lora_alpha=8, lr=1e-2), ["--deepspeed", "zero3", "--cfg-options"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DPO_CASES))
def test_two_process_dpo_matches_one(case, tmp_path, tiny_model_dir):
    """DPO with 2 processes x 1 row x 2 accumulation = 1 process x 2 rows x 2: the same losses,
    metrics and weights (each row packs whole pairs, so a pair never straddles processes)."""
    kw, how = DPO_CASES[case]
    if case.startswith("zero"):
        pytest.importorskip("deepspeed")
    data = write_jsonl(tmp_path / "pairs.jsonl", _pairs())
    cfg = _write_cfg(tmp_path / "cfg.py", tiny_model_dir, data, objective="dpo", max_steps=3, **kw)
    env_cache = dict(os.environ, LMTUNE_CACHE_DIR=data_cache(tmp_path / "cache"))
    for work, extra in (("one", []), ("two", ["--nproc-per-node", 2, *how, "batch_size=1"])):
        p = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "train", str(cfg), "--work-dir", str(tmp_path / work),
                              *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(env_cache, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-6000:]
    logs = [[json.loads(x) for x in (tmp_path / w / "logs/train_log.jsonl").read_text().splitlines() if '"loss"' in x]
            for w in ("one", "two")]
    assert len(logs[1]) == 3
    for a, b in zip(*logs):
        for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy"):
            assert b[k] == pytest.approx(a[k], abs=2e-5), (k, a, b)
    assert logs[0][-1]["loss"] < logs[0][0]["loss"]
    name = "adapter_model.safetensors" if kw["method"] == "lora" else "model.safetensors"
    a, b = (load_file(str(tmp_path / w / "hf" / name)) for w in ("one", "two"))
    assert _max_diff(a, b) < 1e-5
