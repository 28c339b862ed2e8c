"""Preference objectives on a tiny random Llama: packed pair log-probabilities equal unpacked
ones; the fused per-token head equals the plain logits path; the adapter-off reference equals a
separately loaded base; the precomputed reference equals the live one; DPO / ORPO / SimPO / KTO /
reward train through the real Trainer, log their metrics, resume exactly and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl, data_cache
from lmtune.config import load_config
from lmtune.data.preference import build_preference_dataset
from lmtune.data.templates import get_template
from lmtune.train import checkpoint as ckpt
from lmtune.train.loop import Trainer, run_training
from lmtune.train.objectives import make_objective
from lmtune.train.objectives.base import Forward
from lmtune.train.objectives.dpo import DPO
from lmtune.train.objectives.preference import preference_batch, sequence_logps


def _pairs(n=24):
    return [{"prompt": f"What is {i} plus {i}?", "chosen": f"{2 * i}.",
             "rejected": f"The answer is {2 * i + 1}, I think, or maybe {2 * i + 3}."} for i in range(n)]


def _kto(n=24):
    return [{"prompt": f"What is {i} plus {i}?", "completion": f"{2 * i}." if i % 2 else f"Maybe {2 * i + 1}?",
             "label": bool(i % 2)} for i in range(n)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))


def make_cfg(tmp_path, model, records=None, **kw):
    data = write_jsonl(tmp_path / f"data{len(list(tmp_path.glob('data*.jsonl')))}.jsonl", records or _pairs())
    base = dict(model=model, datasets=[str(data)], objective="dpo", max_length=128, method="lora", lora_r=4,
                lora_alpha=8, lora_dropout=0.0, lr=1e-2, batch_size=2, accumulative_counts=1, max_steps=4,
                save_steps=100, logging_steps=1, warmup_ratio=0.0, seed=0, mixed_precision="no")
    base.update(kw)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.py')))}.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(path))


def _log(work: Path) -> list[dict]:
    return [json.loads(x) for x in (work / "logs/train_log.jsonl").read_text().splitlines() if '"loss"' in x]


def _f64(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    m.config.use_cache = False
    return m


def _rows(tmp_path, model_dir, tokenizer, packed: bool, records=None, **kw):
    cfg = make_cfg(tmp_path, model_dir, records, pack_to_max_length=packed, **kw)
    return build_preference_dataset(cfg, tokenizer, get_template("auto", tokenizer), use_cache=False).rows


def _by_sequence(rows, logps):
    """{(input_ids of a sequence): its log-prob}, to compare batches laid out differently."""
    out, k = {}, 0
    for r in rows:
        a = 0
        for n in r["seq_lens"]:
            out[tuple(r["input_ids"][a:a + n])] = float(logps[k])
            a += n
            k += 1
    return out


def test_packed_pair_logps_equal_unpacked(tmp_path, tiny_model_dir, smol_tokenizer):
    model = _f64(tiny_model_dir)
    packed = _rows(tmp_path, tiny_model_dir, smol_tokenizer, True)
    single = _rows(tmp_path, tiny_model_dir, smol_tokenizer, False)
    assert len(packed) < len(single) and any(len(r["seq_roles"]) > 2 for r in packed)
    with torch.no_grad():
        a = _by_sequence(packed, sequence_logps(model, preference_batch(packed), Forward()))
        b = {}
        for r in single:  # each pair alone
            b.update(_by_sequence([r], sequence_logps(model, preference_batch([r]), Forward())))
    assert a.keys() == b.keys() and len(a) == 48
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-10)


def test_fused_head_equals_plain_logits_path(tmp_path, tiny_model_dir, smol_tokenizer):
    """The DPO loss and its gradients through LossHead.token_logprobs equal the plain path (float64)."""
    from lmtune.train.fast_path import FastPath
    from lmtune.train.losses import LossHead

    rows = _rows(tmp_path, tiny_model_dir, smol_tokenizer, True)[:4]
    batch = preference_batch(rows)
    cfg = make_cfg(tmp_path, tiny_model_dir, method="full")
    ref = _f64(tiny_model_dir)
    results = []
    for fused in (False, True):
        model = _f64(tiny_model_dir)
        with torch.no_grad():  # a policy that differs from the reference
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype) * 0.02)
        fwd = Forward(fast=FastPath(loss="chunked", loss_head=LossHead(model.get_output_embeddings()))) \
            if fused else Forward()
        obj = DPO(cfg, reference_model=ref)
        s, metrics = obj.loss(model, batch, fwd)
        s.backward()
        results.append((float(s.detach()), {k: float(v) for k, v in metrics.items()}, model.lm_head.weight.grad.clone(),
                        model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    (s0, m0, w0, u0), (s1, m1, w1, u1) = results
    assert s1 == pytest.approx(s0, rel=1e-10) and m1 == pytest.approx(m0, rel=1e-10, abs=1e-12)
    assert float((w1 - w0).norm() / w0.norm()) < 1e-10 and float((u1 - u0).norm() / u0.norm()) < 1e-10


def test_adapter_off_reference_equals_separately_loaded_base(tmp_path, tiny_model_dir, smol_tokenizer):
    from peft import LoraConfig, get_peft_model

    rows = _rows(tmp_path, tiny_model_dir, smol_tokenizer, True)
    batch = preference_batch(rows)
    policy = get_peft_model(_f64(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                             init_lora_weights=False))  # random, non-zero B
    obj = DPO(make_cfg(tmp_path, tiny_model_dir))
    obj.adapter_model = policy
    policy.train()
    with torch.no_grad():
        ref = obj.reference_logps(policy, batch, Forward())
        with_adapter = sequence_logps(policy, batch, Forward())
        base = sequence_logps(_f64(tiny_model_dir), batch, Forward())
    assert policy.training  # switched back after the reference forward
    assert float((with_adapter - base).abs().max()) > 1e-3  # the adapter really changes the model
    assert torch.allclose(ref, base, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_precomputed_reference_equals_live(tmp_path, tiny_model_dir, method, capsys):
    pre = Trainer(make_cfg(tmp_path, tiny_model_dir, method=method, precompute_reference=True), tmp_path / "a")
    pre.setup()
    live = Trainer(make_cfg(tmp_path, tiny_model_dir, method=method), tmp_path / "b")
    live.setup()
    err = capsys.readouterr().err
    assert "precomputed and cached in" in err
    assert ("frozen copy" in err) == (method == "full")
    assert pre.objective.reference_model is None and pre.objective.adapter_model is not (method == "full")
    assert [r["input_ids"] for r in pre.rows] == [r["input_ids"] for r in live.rows]
    for i in range(0, len(pre.rows), 3):  # live micro-batches laid out differently from the precompute's
        rows = pre.rows[i:i + 3]
        batch = preference_batch(rows)
        assert "ref_logps" in batch
        with torch.no_grad():
            got = live.objective.reference_logps(live.train_model, preference_batch(live.rows[i:i + 3]), live.forward)
        assert torch.allclose(batch["ref_logps"], got.float(), rtol=1e-5, atol=1e-4), (batch["ref_logps"], got)
    files = list((tmp_path / "cache/data/reference").glob("*.npz"))
    assert len(files) == 1
    again = Trainer(make_cfg(tmp_path, tiny_model_dir, method=method, precompute_reference=True), tmp_path / "c")
    again.setup()
    assert "read from" in capsys.readouterr().err
    assert [r["ref_logps"] for r in again.rows] == [r["ref_logps"] for r in pre.rows]


def test_dpo_lora_trains_logs_probes_and_exports(tmp_path, tiny_model_dir):
    cfg = make_cfg(tmp_path, tiny_model_dir, max_steps=6, evaluation_inputs=["What is 2 plus 2?"],
                   eval_max_new_tokens=4, evaluation_freq=3)
    run_training(cfg, tmp_path / "w")
    work = tmp_path / "w"
    log = _log(work)
    assert len(log) == 6
    assert log[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy = reference at the start: log 2
    assert log[-1]["loss"] < log[0]["loss"] - 0.05
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert k in log[-1]
    assert log[-1]["rewards/margin"] > 0 and log[-1]["rewards/accuracy"] > 0.5
    assert log[-1]["rewards/margin"] == pytest.approx(log[-1]["rewards/chosen"] - log[-1]["rewards/rejected"],
                                                      abs=1e-5)
    probes = [json.loads(x) for x in (work / "logs/train_log.jsonl").read_text().splitlines() if '"probe"' in x]
    assert [p["step"] for p in probes] == [0, 3, 6]
    assert (work / "hf/adapter_model.safetensors").is_file()
    assert (work / "loss_curve.png").stat().st_size > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(work / "logs/tensorboard"))
    ea.Reload()
    assert "train/rewards/accuracy" in ea.Tags()["scalars"]


def test_full_dpo_with_precompute_resumes_exactly(tmp_path, tiny_model_dir):
    """An interrupted run (its iter_2 copied into a fresh work dir) resumed to step 4 gives the
    weights and losses of the uninterrupted run, with the reference rebuilt from the base model
    (the cache is gone, and the model in the checkpoint is no longer the reference)."""
    import shutil

    cfg = make_cfg(tmp_path, tiny_model_dir, method="full", precompute_reference=True, save_steps=2, lr=1e-3)
    run_training(cfg, tmp_path / "full")
    shutil.copytree(tmp_path / "full/iter_2", tmp_path / "cut/iter_2")
    for f in (tmp_path / "cache/data/reference").glob("*.npz"):
        f.unlink()
    run_training(cfg, tmp_path / "cut", resume="auto")
    a = load_file(str(ckpt.latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    b = load_file(str(ckpt.latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    assert [x["loss"] for x in _log(tmp_path / "full")][2:] == pytest.approx(
        [x["loss"] for x in _log(tmp_path / "cut")], abs=1e-6)


@pytest.mark.parametrize("objective,metric", [("orpo", "log_odds_ratio"), ("simpo", "rewards/margin"),
                                              ("kto", "kl"), ("dpo_ipo", "rewards/margin")])
def test_other_objectives_train(tmp_path, tiny_model_dir, objective, metric):
    kw = {"dpo_ipo": dict(objective="dpo", dpo_loss="ipo")}.get(objective, dict(objective=objective))
    records = _kto() if objective == "kto" else None
    cfg = make_cfg(tmp_path, tiny_model_dir, records, max_steps=6, **kw)
    run_training(cfg, tmp_path / "w")
    log = _log(tmp_path / "w")
    assert log[-1]["loss"] < log[0]["loss"], [x["loss"] for x in log]
    assert metric in log[-1] and all(k in log[-1] for k in make_objective(cfg).metrics)
    if objective == "kto":
        assert log[-1]["rewards/accuracy"] > 0.5


def test_reward_model_trains_and_exports_a_sequence_classifier(tmp_path, tiny_model_dir, smol_tokenizer):
    from transformers import AutoModelForSequenceClassification

    cfg = make_cfg(tmp_path, tiny_model_dir, objective="reward", method="full", lr=3e-3, max_steps=6)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    t.train()
    log = _log(tmp_path / "w")
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/accuracy"] > 0.5
    hf = tmp_path / "w/hf"
    exported = AutoModelForSequenceClassification.from_pretrained(hf)
    assert exported.config.num_labels == 1
    # The exported classifier, given prompt + answer, gives the score trained here.
    row = t.rows[0]
    batch = t.objective.make_batch([row])
    t.model.eval()
    with torch.no_grad():
        t.objective.loss(t.model, batch, t.forward)  # fills the captured head output
        t.objective._scores = None
        t.forward(t.model, batch)
        ours = t.objective._scores[0, batch["pool_index"], 0]
        a = 0
        for k, n in enumerate(row["seq_lens"]):
            ids = torch.tensor([row["input_ids"][a:a + n]])
            theirs = exported(input_ids=ids).logits[0, 0]
            assert float(theirs) == pytest.approx(float(ours[k]), rel=1e-4, abs=1e-5)
            a += n


def test_qlora_dpo_reference_is_the_4bit_base_with_adapter_off(tmp_path, tiny_model_dir):
    """QLoRA: the adapter-off reference of the NF4 model; DPO trains the adapter only."""
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(tmp_path, tiny_model_dir, quantization="nf4", max_steps=4, pack_to_max_length=False,
                   batch_size=4)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    assert t.objective.adapter_model is t.model and t.objective.reference_model is None
    batch = t.objective.make_batch(t.rows[:4])
    with torch.no_grad():
        ref = t.objective.reference_logps(t.train_model, batch, t.forward)
        now = sequence_logps(t.train_model, batch, t.forward)
    assert torch.allclose(ref, now, rtol=1e-6, atol=1e-5)  # LoRA B starts at zero: policy = reference
    t.train()
    log = _log(tmp_path / "w")
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["rewards/margin"] > 0
    assert all("lora_" in k for k in load_file(str(tmp_path / "w/iter_4/model.safetensors")))
