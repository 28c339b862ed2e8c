"""End to end on the embedded model: DPO teaches SmolLM2-135M to stop instead of rambling.

The pairs (src/lmtune/data/concise_pairs.jsonl) were built by scripts/concise_demo.py from the base
model's own answers. After the built-in config's LoRA DPO run, on prompts that are in no training
pair: fewer answers run on (no end of turn within 64 tokens, or a repeated phrase), the tuned
model's implicit reward prefers the concise answer on held-out pairs, and ordinary short answers
stay what the base model said. Slow (minutes on 2 CPU cores) but part of CI.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _demo():
    spec = importlib.util.spec_from_file_location("concise_demo", ROOT / "scripts/concise_demo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_heldout_prompts_are_not_training_prompts():
    demo = _demo()
    trained = {json.loads(x)["prompt"] for x in demo.DATA.read_text().splitlines()}
    assert len(trained) >= 30 and trained <= set(demo.TRAIN_OPEN + demo.TRAIN_SHORT)
    assert not trained & set(demo.HELDOUT_OPEN + list(demo.ORDINARY))
    assert not set(demo.TRAIN_OPEN + demo.TRAIN_SHORT) & set(demo.HELDOUT_OPEN + list(demo.ORDINARY))


def test_runaway_measures():
    demo = _demo()
    assert demo.repeats("the sea is blue and the sea is blue")
    assert not demo.repeats("the sea is blue and the sky is grey")
    assert demo.runaway({"answer": "A fine answer.", "stopped": False})
    assert not demo.runaway({"answer": "A fine answer.", "stopped": True})
    assert demo.concise("Rain falls. It forms in clouds when vapour cools. More text") == \
        "Rain falls. It forms in clouds when vapour cools."
    assert demo.concise("- a list item") is None


@pytest.mark.slow
def test_dpo_teaches_the_embedded_model_to_stop(tmp_path):
    from lmtune.config import load_config
    from lmtune.train.loop import Trainer

    demo = _demo()
    cfg = load_config("smollm2_135m_lora_dpo_concise", {"evaluation_inputs": []})
    t = Trainer(cfg, tmp_path / "work")
    t.setup()
    t.train()
    log = [json.loads(x) for x in (tmp_path / "work/logs/train_log.jsonl").read_text().splitlines()]
    last = [x for x in log if "loss" in x][-3:]
    assert sum(x["loss"] for x in last) / 3 < 0.35 and all(x["rewards/accuracy"] >= 0.9 for x in last)
    r = demo.evaluate(t.model, t.tokenizer, t.model, beta=cfg.beta)
    assert r["runaway_base"] >= 0.75  # the base runs on for most open prompts...
    assert r["runaway_tuned"] <= r["runaway_base"] - 0.5  # ...the tuned model far less often
    assert r["heldout_pairs"] >= 8 and r["heldout_accuracy"] >= 0.9
    # Ordinary short answers: the same facts, and every answer ends.
    assert r["ordinary_base_right"] >= 0.75 and r["ordinary_fact_kept"] >= 0.85 and r["ordinary_stopped"] == 1.0
