"""Preference data: every format to one Preference type; encoding with the chat template (the
answer ends with its end-of-turn token); truncation (prompt cut from the front, answers keep their
end of turn); units and packing; `lmtune data check` for preference data; bad input."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl, data_cache
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.data.conversation import Message
from lmtune.data.preference import (CHOSEN, DESIRABLE, KL, REJECTED, UNDESIRABLE, build_preference_dataset,
                                    encode_preferences, iter_preferences, make_units)
from lmtune.data.templates import get_template
from lmtune.errors import UserError

U, A = "user", "assistant"


def _cfg(tmp_path, data, **kw):
    base = dict(model="smollm2-135m-instruct", datasets=[str(data)], objective="dpo", max_length=256, seed=0)
    base.update(kw)
    p = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*.py')))}.py"
    p.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(p))


def _one(tmp_path, rec, fmt="auto"):
    path = write_jsonl(tmp_path / "one.jsonl", [rec])
    return list(iter_preferences(path, fmt))[0]


def _roles(msgs):
    return [(m.role, m.content) for m in msgs]


def test_formats_give_the_same_preference(tmp_path):
    want = ([(U, "What is 2+2?")], [(A, "4.")], [(A, "5, or maybe 6.")])
    recs = [
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "chosen": [{"role": "assistant", "content": "4."}],
         "rejected": [{"role": "assistant", "content": "5, or maybe 6."}]},
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5, or maybe 6."},
        # implicit prompt (TRL): whole conversations sharing their first messages
        {"chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}],
         "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5, or maybe 6."}]},
        {"conversations": [{"from": "human", "value": "What is 2+2?"}], "chosen": {"from": "gpt", "value": "4."},
         "rejected": {"from": "gpt", "value": "5, or maybe 6."}},
        {"instruction": "What is 2+2?", "input": "", "chosen": "4.", "rejected": "5, or maybe 6."},
    ]
    for rec in recs:
        p = _one(tmp_path, rec)
        assert (_roles(p.prompt), _roles(p.chosen), _roles(p.rejected)) == want, rec
        assert all(m.loss is False for m in p.prompt) and p.chosen[0].trains()
        assert p.source.endswith("one.jsonl:1")


def test_kto_records(tmp_path):
    p = _one(tmp_path, {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                     {"role": "assistant", "content": "good"}], "label": True})
    assert _roles(p.prompt) == [("system", "S"), (U, "Q")] and _roles(p.chosen) == [(A, "good")] and p.rejected is None
    p = _one(tmp_path, {"prompt": "Q", "completion": "bad", "label": False})
    assert p.chosen is None and _roles(p.rejected) == [(A, "bad")]


@pytest.mark.parametrize("rec,msg", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "not a preference"),
    ({"prompt": "Q", "chosen": "", "rejected": "b"}, "chosen answer is empty"),
    ({"prompt": "Q", "chosen": "a"}, "missing required field 'rejected'"),
    ({"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "must start with an assistant message"),
    ({"prompt": "Q", "completion": "a", "label": "yes"}, "'label' must be true or false"),
    ({"prompt": [{"role": "robot", "content": "Q"}], "chosen": "a", "rejected": "b"}, "unknown or missing role"),
])
def test_bad_records_are_clear_errors(tmp_path, rec, msg):
    with pytest.raises(UserError, match=msg) as e:
        _one(tmp_path, rec)
    assert "one.jsonl:1" in str(e.value)
    if "not a preference" in msg:
        assert "supervised (SFT) data" in e.value.hint


def test_sft_format_with_preference_objective_is_refused(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    with pytest.raises(UserError, match="holds no preference pairs"):
        _cfg(tmp_path, data, data_format="oasst1")
    with pytest.raises(UserError, match="'kto' is for objective 'kto'"):
        _cfg(tmp_path, data, objective="sft", data_format="kto")
    with pytest.raises(UserError, match="evaluation_inputs"):
        _cfg(tmp_path, data, objective="reward", evaluation_inputs=["hi"])
    with pytest.raises(UserError, match="label_smoothing applies"):
        _cfg(tmp_path, data, dpo_loss="ipo", label_smoothing=0.1)


def test_encoding_renders_with_the_template_and_ends_with_end_of_turn(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    tmpl = get_template("auto", tok)
    p = _one(tmp_path, {"prompt": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Capital of France?"}],
                        "chosen": "Paris.", "rejected": "It is Lyon, I think, or maybe Marseille."})
    (enc,) = encode_preferences([p], tok, tmpl)
    for answer, msgs in ((enc.chosen, p.chosen), (enc.rejected, p.rejected)):
        full = tok(tmpl.render(p.prompt + msgs), add_special_tokens=False)["input_ids"]
        assert enc.prompt + answer.ids == full[:len(enc.prompt) + len(answer.ids)]
        assert tok.decode(enc.prompt).endswith("<|im_start|>assistant\n")
        assert answer.ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and answer.n_eot == 1
        assert answer.labels == answer.ids  # every answer token is scored
        assert tok.decode(answer.ids) == msgs[0].content + "<|im_end|>"
    units, stats = make_units([enc], "dpo", 256)
    (chosen, rejected), = units
    assert (chosen["role"], rejected["role"]) == (CHOSEN, REJECTED)
    assert chosen["labels"][:len(enc.prompt)] == [-100] * len(enc.prompt)
    assert stats["prompt_cut"] == 0 and stats["answer_cut"] == 0


def test_truncation_cuts_the_prompt_from_the_front_and_keeps_end_of_turn(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    tmpl = get_template("auto", tok)
    long_prompt = " ".join(f"word{i}" for i in range(200))
    p = _one(tmp_path, {"prompt": long_prompt, "chosen": "Short answer.",
                        "rejected": " ".join(["on and on"] * 80)})
    (enc,) = encode_preferences([p], tok, tmpl)
    L = 96
    units, stats = make_units([enc], "dpo", L)
    (c, r), = units
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert len(c["input_ids"]) <= L and len(r["input_ids"]) <= L
    # the same prompt, cut from the front: it still ends with the assistant header
    pc = [t for t, lab in zip(c["input_ids"], c["labels"]) if lab == -100]
    pr = [t for t, lab in zip(r["input_ids"], r["labels"]) if lab == -100]
    assert pc == pr == enc.prompt[len(enc.prompt) - len(pc):] and len(pc) == L // 2
    # the chosen answer whole, the rejected one cut inside its content, both ending with <|im_end|>
    assert c["input_ids"][len(pc):] == enc.chosen.ids
    assert r["input_ids"][-1] == eot and r["labels"][-1] == eot and len(r["input_ids"]) == L
    assert stats["prompt_cut"] == 1 and stats["answer_cut"] == 1


def test_kto_units_hold_a_kl_sequence_with_another_answer(tmp_path, smol_tokenizer):
    tmpl = get_template("auto", smol_tokenizer)
    recs = [{"prompt": f"Q{i}", "completion": f"answer number {i}", "label": i % 2 == 0} for i in range(5)]
    prefs = list(iter_preferences(write_jsonl(tmp_path / "k.jsonl", recs)))
    units, stats = make_units(encode_preferences(prefs, smol_tokenizer, tmpl), "kto", 128, seed=3)
    assert len(units) == 5
    answers = set()
    for ex, kl in units:
        assert ex["role"] in (DESIRABLE, UNDESIRABLE) and kl["role"] == KL
        n_ex = sum(1 for x in ex["labels"] if x == -100)
        n_kl = sum(1 for x in kl["labels"] if x == -100)
        assert ex["input_ids"][:n_ex] == kl["input_ids"][:n_kl]  # the same prompt...
        assert ex["input_ids"][n_ex:] != kl["input_ids"][n_kl:]  # ...with another example's answer
        answers.add(tuple(kl["input_ids"][n_kl:]))
    assert len(answers) == 5  # a derangement: every answer used once
    # Pairs become two KTO examples (one desirable, one undesirable).
    pair = list(iter_preferences(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])))
    units, _ = make_units(encode_preferences(pair, smol_tokenizer, tmpl), "kto", 128)
    assert sorted(u[0]["role"] for u in units) == [DESIRABLE, UNDESIRABLE]
    # ...but single labelled answers cannot train DPO.
    units, stats = make_units(encode_preferences(prefs, smol_tokenizer, tmpl), "dpo", 128)
    assert units == [] and stats["skipped"] == {"not_a_pair": 5}


def test_packing_keeps_units_whole(tmp_path, smol_tokenizer):
    recs = [{"prompt": f"Question {i}?" + " more" * (i % 7), "chosen": "Yes." * (1 + i % 3),
             "rejected": "No, " * (2 + i % 5)} for i in range(30)]
    data = write_jsonl(tmp_path / "d.jsonl", recs)
    cfg = _cfg(tmp_path, data, max_length=128)
    tmpl = get_template("auto", smol_tokenizer)
    td = build_preference_dataset(cfg, smol_tokenizer, tmpl, use_cache=False)
    assert td.packed and len(td.rows) <= 15
    n_pairs = 0
    for row in td.rows:
        assert len(row["input_ids"]) <= 256 and sum(row["seq_lens"]) == len(row["input_ids"])
        roles = row["seq_roles"]
        assert roles == [CHOSEN, REJECTED] * (len(roles) // 2)
        n_pairs += len(roles) // 2
    assert n_pairs == 30
    unpacked = build_preference_dataset(_cfg(tmp_path, data, max_length=128, pack_to_max_length=False),
                                        smol_tokenizer, tmpl, use_cache=False)
    assert len(unpacked.rows) == 30 and all(r["seq_roles"] == [CHOSEN, REJECTED] for r in unpacked.rows)


def test_dataset_cache_round_trip(tmp_path, smol_tokenizer, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    from lmtune.data.build import build_training_data

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}", "chosen": "a", "rejected": "b b"} for i in range(6)])
    cfg = _cfg(tmp_path, data, objective="kto")
    tmpl = get_template("auto", smol_tokenizer)
    first = build_training_data(cfg, smol_tokenizer, tmpl)
    again = build_training_data(cfg, smol_tokenizer, tmpl)
    assert first.stats["cache"] == "miss" and again.stats["cache"] == "hit"
    assert again.rows == first.rows and again.packed


def test_data_check_reports_pairs_cuts_and_problems(tmp_path, capsys):
    recs = [{"prompt": f"Tell me about item {i}.", "chosen": f"Item {i} is fine.",
             "rejected": f"Item {i} is " + "very " * 40 + "bad."} for i in range(8)]
    recs[2] = {"prompt": "Same?", "chosen": "Same.", "rejected": "Same."}
    recs[5] = {"prompt": "Empty?", "chosen": "Fine.", "rejected": "  "}
    data = write_jsonl(tmp_path / "pairs.jsonl", recs)
    cfg_path = tmp_path / "c.py"
    cfg_path.write_text(f"objective = 'dpo'\ndatasets = [{str(data)!r}]\nmax_length = 40\n")
    assert main(["data", "check", str(cfg_path)]) == 2
    out = capsys.readouterr().out
    assert "records: 7 (7 pairs" in out
    assert "pairs: 6; skipped 1 (identical_answers: 1)" in out
    assert f"skipped {data}:3: identical answers" in out
    assert f"{data}:6" in out and "rejected answer is empty" in out
    assert "truncated: 6 prompt(s) cut from the front, 6 answer(s) cut" in out
    assert "chosen tokens: mean" in out and "packed:" in out and "PROBLEMS FOUND" in out
    data.write_text("\n".join(json.dumps(r) for i, r in enumerate(recs) if i not in (2, 5)) + "\n")
    assert main(["data", "check", str(cfg_path)]) == 0
    assert "data check: OK" in capsys.readouterr().out


def test_system_prompt_is_added_to_prompts(tmp_path):
    from lmtune.data.preference import load_preferences

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}])
    prefs, _ = load_preferences(_cfg(tmp_path, data, system="Be kind."))
    assert prefs[0].prompt[0] == Message("system", "Be kind.", False)


def test_data_show_prints_each_sequence_with_its_scored_part(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.",
                                               "rejected": "Lyon, I think."}])
    cfg_path = tmp_path / "c.py"
    cfg_path.write_text(f"objective = 'dpo'\ndatasets = [{str(data)!r}]\nsystem = 'Be brief.'\n")
    assert main(["data", "show", str(cfg_path)]) == 0
    out = capsys.readouterr().out
    assert f"=== {data}:1 chosen:" in out and f"=== {data}:1 rejected:" in out
    # outside [[ ]] is exactly what is scored: the answer and its end-of-turn token
    assert "]]Paris.<|im_end|>" in out and "]]Lyon, I think.<|im_end|>" in out
