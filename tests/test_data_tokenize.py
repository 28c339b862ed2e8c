"""Tokenize + mask + truncate + pack + collate, and packed rows = separate samples in a model."""

from __future__ import annotations

import random

import pytest
import torch

from lmtune.data.conversation import Conversation, Message
from lmtune.data.templates import get_template
from lmtune.data.tokenize import IGNORE_INDEX, collate, encode, encode_conversation, pack

MULTI = Conversation([
    Message("system", "You are Bob."),
    Message("user", "Who are you? 你是谁？"),
    Message("assistant", "I am Bob. 我是鲍勃。"),
    Message("user", "Really?"),
    Message("assistant", "Yes, really."),
], source="test:1")


def trained_runs(tok, sample) -> list[str]:
    """Decoded text of each maximal run of tokens that carry loss."""
    runs, cur = [], []
    for i, l in zip(sample["input_ids"], sample["labels"]):
        if l != IGNORE_INDEX:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


@pytest.mark.parametrize("name", ["auto", "chatml"])
def test_ids_equal_full_tokenization_and_exact_mask(smol_tokenizer, name):
    tok = smol_tokenizer
    tpl = get_template(name, tok)
    s = encode(MULTI, tok, tpl, 512)
    assert s["input_ids"] == tok(tpl.render(MULTI.messages), add_special_tokens=False)["input_ids"]
    assert trained_runs(tok, s) == ["I am Bob. 我是鲍勃。<|im_end|>", "Yes, really.<|im_end|>"]
    assert s["labels"][0] == IGNORE_INDEX
    # The newline after <|im_end|> is not trained; <|im_end|> is the last trained token.
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    last = max(i for i, l in enumerate(s["labels"]) if l != IGNORE_INDEX)
    assert s["input_ids"][last] == eot


def test_per_message_loss_flags_and_label_zero(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    conv = Conversation([Message("user", "Hi", loss=True), Message("assistant", "Hello", loss=False),
                         Message("user", "Bye"), Message("assistant", "Bye!")])
    s = encode(conv, tok, tpl, 512)
    assert s["labels"][0] == IGNORE_INDEX  # <|im_start|> of the trained user turn: never trained
    assert trained_runs(tok, s) == ["user\nHi<|im_end|>\n", "Bye!<|im_end|>"]


def test_pretrain_text_all_tokens_train_and_chunks(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    text = " ".join(f"word{i}" for i in range(100))
    enc = encode_conversation(Conversation(text=text), tok, tpl, 64)
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    assert [t for s in enc.samples for t in s["input_ids"]] == ids
    assert all(len(s["input_ids"]) <= 64 for s in enc.samples) and len(enc.samples) > 1
    for s in enc.samples:
        assert s["labels"][0] == IGNORE_INDEX and s["labels"][1:] == s["input_ids"][1:]
    assert enc.samples[-1]["input_ids"][-1] == tok.eos_token_id


# --------------------------------------------------------------------------- truncation


def test_truncation_drops_whole_trailing_turns(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    full = encode(MULTI, tok, tpl, 512)
    enc = encode_conversation(MULTI, tok, tpl, len(full["input_ids"]) - 3)
    (s,) = enc.samples
    assert enc.truncated
    assert trained_runs(tok, s) == ["I am Bob. 我是鲍勃。<|im_end|>"]
    assert s["input_ids"][-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert s["input_ids"] == full["input_ids"][: len(s["input_ids"])]


def test_truncation_cuts_a_long_reply_but_keeps_its_end_of_turn(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    conv = Conversation([Message("user", "Count."), Message("assistant", " ".join(str(i) for i in range(300)))])
    enc = encode_conversation(conv, tok, tpl, 40)
    (s,) = enc.samples
    assert enc.truncated and len(s["input_ids"]) == 40
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert s["input_ids"][-1] == eot and s["labels"][-1] == eot
    assert trained_runs(tok, s)[0].startswith("0 1 2")


def test_prompt_too_long_is_skipped(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("chatml", tok)
    conv = Conversation([Message("user", "long " * 100), Message("assistant", "ok")])
    assert encode(conv, tok, tpl, 32) is None
    assert encode_conversation(conv, tok, tpl, 32).skipped == "prompt_too_long"


def test_no_trained_turn_fits_after_prompt_is_not_trained_on(smol_tokenizer):
    tok = smol_tokenizer
    tpl = get_template("auto", tok)  # SmolLM2's default system prompt alone is ~20 tokens
    conv = Conversation([Message("user", "Hi"), Message("assistant", "Hello there")])
    assert encode_conversation(conv, tok, tpl, 20).skipped == "prompt_too_long"


# --------------------------------------------------------------------------- packing and collation


def fake_samples(n, seed=0, lo=3, hi=30):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        L = rng.randint(lo, hi)
        ids = [rng.randint(5, 99) for _ in range(L)]
        labels = [IGNORE_INDEX] + ids[1:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_pack_boundaries_and_positions():
    samples = fake_samples(200)
    rows = pack(samples, 64, shuffle=True, seed=1)
    assert len(rows) < len(samples) / 2
    seen = []
    for row in rows:
        n = len(row["input_ids"])
        assert n <= 64 and len(row["labels"]) == n == len(row["position_ids"]) == sum(row["seq_lens"])
        a = 0
        for L in row["seq_lens"]:
            assert row["position_ids"][a : a + L] == list(range(L))
            assert row["labels"][a] == IGNORE_INDEX  # no token trained on the previous sample's end
            seen.append(tuple(row["input_ids"][a : a + L]))
            a += L
    # Every sample exactly once, none split.
    assert sorted(seen) == sorted(tuple(s["input_ids"]) for s in samples)
    assert rows == pack(samples, 64, shuffle=True, seed=1)
    assert rows != pack(samples, 64, shuffle=True, seed=2)
    with pytest.raises(ValueError):
        pack(fake_samples(1, lo=70, hi=70), 64)


def test_collate_unpacked_and_packed():
    samples = fake_samples(3)
    batch = collate(samples, pad_token_id=0)
    width = max(len(s["input_ids"]) for s in samples)
    assert batch["input_ids"].shape == (3, width)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][b, n:].eq(IGNORE_INDEX).all()
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
    rows = pack(fake_samples(20), 64, shuffle=False)
    batch = collate(rows[:2], pad_token_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"][0].tolist()[: len(rows[0]["input_ids"])] == rows[0]["position_ids"]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_separate_logits(attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    samples = fake_samples(12, seed=3)
    rows = pack(samples, 64, shuffle=True, seed=0)
    assert any(len(r["seq_lens"]) > 2 for r in rows)
    batch = collate(rows, pad_token_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed_loss = model(**batch, use_cache=False).loss
    by_ids = {}
    for s in samples:
        with torch.no_grad():
            by_ids[tuple(s["input_ids"])] = model(input_ids=torch.tensor([s["input_ids"]]), use_cache=False).logits[0]
    for b, row in enumerate(rows):
        a = 0
        for L in row["seq_lens"]:
            alone = by_ids[tuple(row["input_ids"][a : a + L])]
            torch.testing.assert_close(packed[b, a : a + L], alone, atol=1e-5, rtol=1e-5)
            a += L
    # The same loss as the unpacked batch (mean over all trained tokens).
    unpacked = collate(samples, pad_token_id=0)
    with torch.no_grad():
        unpacked_loss = model(**unpacked, use_cache=False).loss
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-5, rtol=1e-5)
