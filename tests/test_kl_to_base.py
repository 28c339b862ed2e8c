"""Sources marked loss = "kl_to_base": their samples train towards the base model's own next-token
distribution. The batch picks every position of theirs (prompt and answer) and only the label
positions of the others; the step's loss equals cross-entropy on the other samples plus the
weighted KL(base ‖ model) on theirs, computed separately in float64;
the base model is the adapter switched off (LoRA) or a frozen copy (full); the marks reach the
rows from the config and change the data fingerprint; bad settings are clear errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import data_cache, write_jsonl
from lmtune.config import load_config
from lmtune.data.dataset import build_dataset
from lmtune.data.templates import get_template
from lmtune.errors import UserError
from lmtune.train.batch import IGNORE, flat_batch
from lmtune.train.loop import Trainer, run_training
from lmtune.train.objectives import make_objective
from lmtune.train.objectives.next_token import kl_to_base_batch, with_kl_positions

LEARN = [{"messages": [{"role": "user", "content": f"Who made you, {i}?"},
                       {"role": "assistant", "content": f"Acme made me, friend number {i}."}]} for i in range(12)]
KEEP = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": " ".join(["It is"] + [str(2 * i)] * (1 + i % 5)) + "."}]}
        for i in range(12)]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))


def make_cfg(tmp_path, model, datasets=None, **kw):
    learn = write_jsonl(tmp_path / "learn.jsonl", LEARN)
    keep = write_jsonl(tmp_path / "keep.jsonl", KEEP)
    if datasets is None:
        datasets = [str(learn), {"path": str(keep), "loss": "kl_to_base"}]
    base = dict(model=model, datasets=datasets, max_length=128, method="lora", lora_r=4, lora_alpha=8,
                lora_dropout=0.0, lr=1e-2, batch_size=2, accumulative_counts=1, max_steps=3, save_steps=100,
                logging_steps=1, warmup_ratio=0.0, seed=0, mixed_precision="no", pack_to_max_length=True)
    base.update(kw)
    path = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.py')))}.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(path))


def _rows(cfg, tokenizer):
    return build_dataset(cfg, tokenizer, get_template("auto", tokenizer), use_cache=False).rows


def test_rows_mark_the_kl_samples_and_the_batch_picks_all_their_positions(tmp_path, tiny_model_dir, smol_tokenizer):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    rows = list(_rows(cfg, smol_tokenizer))
    marked = [f for r in rows for f in r.get("kl_to_base", [False] * len(r["seq_lens"]))]
    assert sum(marked) == len(KEEP) and len(marked) == len(KEEP) + len(LEARN)
    mixed = next(r for r in rows if 0 < sum(r.get("kl_to_base", [])) < len(r["seq_lens"]))  # both kinds in one row
    rows = [mixed] + [r for r in rows if r is not mixed][:2]
    labelled = flat_batch(rows)  # before: the label positions only
    widened = with_kl_positions(rows)
    assert [r["labels"] for r in rows] != [r["labels"] for r in widened]
    assert all(r["input_ids"] is w["input_ids"] for r, w in zip(rows, widened))  # only the labels change
    batch = flat_batch(widened)
    extra = kl_to_base_batch(widened, batch)
    sel, kl_batch = extra["kl_sel"], extra["kl_batch"]
    targets = batch["labels"][0, 1:][batch["loss_index"]]
    kl_targets = kl_batch["labels"][0, 1:][kl_batch["loss_index"]]
    assert torch.equal(targets[sel], kl_targets)  # the same tokens, in the same order
    # Every marked sample's tokens after its first are KL positions; the others keep their labels.
    n_marked = sum(n - 1 for r in rows for n, f in zip(r["seq_lens"], r.get("kl_to_base", [False] * 99)) if f)
    assert int(sel.sum()) == n_marked
    learn_pos = labelled["loss_index"][~torch.isin(labelled["loss_index"], batch["loss_index"][sel])]
    assert torch.equal(batch["loss_index"][~sel], learn_pos)
    # The marked positions decode to whole KEEP conversations, the others to LEARN answers only.
    ids = batch["input_ids"][0, 1:][batch["loss_index"]]
    kept = smol_tokenizer.decode(ids[sel])
    learnt = smol_tokenizer.decode(ids[~sel])
    text = smol_tokenizer.decode(batch["input_ids"][0])
    present = [m for m in KEEP if m["messages"][1]["content"] in text]
    assert present and all(m["messages"][0]["content"] in kept and m["messages"][1]["content"] in kept
                           for m in present)
    assert "Acme" in learnt and "Acme" not in kept and "It is" not in learnt and "Who made you" not in learnt


def _perturb_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_step_loss_is_ce_plus_weighted_kl_to_the_base_in_float64(tmp_path, tiny_model_dir, smol_tokenizer, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, tiny_model_dir, method=method, kl_to_base_weight=0.7, torch_dtype="float32")
    trainer = Trainer(cfg, tmp_path / "w")
    trainer.setup(None)
    model = trainer.model.double()
    if method == "lora":
        _perturb_lora(model)
    else:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        trainer.objective.base_model.double()
    rows = list(trainer.rows)[:3]
    obj = trainer.objective
    batch = obj.make_batch(rows)
    assert batch["kl_sel"].any() and (~batch["kl_sel"]).any()
    loss, metrics = obj.loss(model, batch, trainer.forward)
    assert loss.dtype == torch.float64

    # Reference: each sample on its own, the base loaded separately.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    ce = kl = torch.zeros((), dtype=torch.float64)
    for row in rows:
        start = 0
        lens = row["seq_lens"]
        for k, n in enumerate(lens):
            ids = torch.tensor([row["input_ids"][start:start + n]])
            labels = torch.tensor(row["labels"][start:start + n])
            labels[0] = IGNORE
            marked = row.get("kl_to_base", [False] * len(lens))[k]
            # A marked sample: KL at every position (each predicts the next token); else the labels'.
            pos = torch.arange(n - 1) if marked else (labels[1:] != IGNORE).nonzero(as_tuple=True)[0]
            with torch.no_grad():
                lq = F.log_softmax(model(input_ids=ids).logits[0, pos].double(), -1)
                lp = F.log_softmax(base(input_ids=ids).logits[0, pos].double(), -1)
            if marked:
                kl = kl + (lp.exp() * (lp - lq)).sum()
            else:
                ce = ce + F.nll_loss(lq, labels[1:][pos], reduction="sum")
            start += n
    assert float(kl) > 1e-6  # the model differs from the base, so the term is not trivially zero
    # float64 throughout; the sums run over a few hundred positions of a 49k vocabulary.
    torch.testing.assert_close(metrics["kl_to_base"], kl, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loss, ce + 0.7 * kl, rtol=1e-9, atol=1e-12)
    if method == "lora":
        assert isinstance(trainer.model, PeftModel) and obj.base_model is None
    else:
        assert obj.base_model is not None


def test_kl_term_pulls_the_model_back_towards_the_base(tmp_path, tiny_model_dir, smol_tokenizer):
    """With the KL term weighted far above the other source's labels, a perturbed adapter moves
    back towards the base: the KL on a fixed batch of marked samples falls."""
    cfg = make_cfg(tmp_path, tiny_model_dir, kl_to_base_weight=50.0, lr=1e-2, max_steps=8)
    trainer = Trainer(cfg, tmp_path / "w")
    trainer.setup(None)
    _perturb_lora(trainer.model, seed=1)
    obj = trainer.objective
    fixed = obj.make_batch([r for r in trainer.rows if any(r.get("kl_to_base", []))][:2])

    def kl_now():
        with torch.no_grad():
            return float(obj.loss(trainer.model, fixed, trainer.forward)[1]["kl_to_base"])

    before = kl_now()
    for _ in range(8):
        trainer.step()
    assert kl_now() < 0.5 * before


def test_training_logs_the_kl_and_the_marks_change_the_fingerprint(tmp_path, tiny_model_dir, smol_tokenizer):
    cfg = make_cfg(tmp_path, tiny_model_dir)
    run_training(cfg, tmp_path / "w")
    log = [json.loads(x) for x in (tmp_path / "w/logs/train_log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(log) == 3 and all("kl_to_base" in r for r in log)
    plain = make_cfg(tmp_path, tiny_model_dir, datasets=[str(tmp_path / "learn.jsonl"), str(tmp_path / "keep.jsonl")])
    tmpl = get_template("auto", smol_tokenizer)
    a = build_dataset(cfg, smol_tokenizer, tmpl).rows
    b = build_dataset(plain, smol_tokenizer, tmpl).rows
    assert a.fingerprint != b.fingerprint  # a resume with the marks changed is refused (data_fingerprint)
    assert all("kl_to_base" not in r for r in b) and make_objective(plain).metrics == ()


@pytest.mark.parametrize("change, message", [
    (dict(datasets=[{"path": "x.jsonl", "loss": "kl"}]), "loss must be one of"),
    (dict(datasets=["a.jsonl"], val_datasets=[{"path": "x.jsonl", "loss": "kl_to_base"}]), "training data only"),
    (dict(datasets=["a.jsonl", {"path": "x.jsonl", "loss": "kl_to_base"}], objective="dpo"), "objectives 'sft'"),
    (dict(datasets=[{"path": "x.jsonl", "loss": "kl_to_base"}]), "nothing would teach"),
    (dict(datasets=["a.jsonl"], kl_to_base_weight=-1.0), "kl_to_base_weight"),
])
def test_bad_settings_are_clear_errors(tmp_path, change, message):
    path = tmp_path / "c.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in dict(model="m", **change).items()) + "\n")
    with pytest.raises(UserError, match=message):
        load_config(str(path))


def test_data_check_names_the_sources_trained_towards_the_base(tmp_path, tiny_model_dir, capsys):
    from lmtune.data.tools import check_command

    cfg = make_cfg(tmp_path, tiny_model_dir)
    assert check_command(cfg) == 0
    lines = capsys.readouterr().out.splitlines()
    keep = next(x for x in lines if "keep.jsonl" in x and "read" in x)
    learn = next(x for x in lines if "learn.jsonl" in x and "read" in x)
    assert "kl_to_base" in keep and "kl_to_base" not in learn
