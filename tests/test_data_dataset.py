"""build_dataset: mixing, repeat, system injection, packing, pretrain, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import data_cache

from lmtune.config import validate
from lmtune.data.dataset import build_dataset, load_conversations
from lmtune.data.templates import get_template
from lmtune.data.tokenize import IGNORE_INDEX
from lmtune.errors import UserError


@pytest.fixture(autouse=True)
def cache_home(smol_tokenizer, tmp_path, monkeypatch):
    # smol_tokenizer first: the model cache must resolve under the real root, not this temporary one.
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    return tmp_path / "cache"


def write(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def chat(i):
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def alpaca(i):
    return {"instruction": f"do {i}", "input": "", "output": f"done {i}"}


def test_mixing_repeat_and_system(tmp_path, smol_tokenizer):
    a = write(tmp_path / "a.jsonl", [chat(i) for i in range(10)])
    b = write(tmp_path / "b.jsonl", [alpaca(i) for i in range(10)])
    cfg = validate({"datasets": [{"path": a, "repeat": 2}, {"path": b, "repeat": 0.5}], "system": "SYS",
                    "max_length": 128, "pack_to_max_length": False, "seed": 3})
    convs, sources = load_conversations(cfg)
    assert sources[a]["used"] == 20 and sources[b]["used"] == 5 and len(convs) == 25
    assert all(c.messages[0].role == "system" and c.messages[0].content == "SYS" for c in convs)
    again, _ = load_conversations(cfg)
    assert [c.source for c in again] == [c.source for c in convs]  # deterministic shuffle
    tpl = get_template("chatml", smol_tokenizer)
    data = build_dataset(cfg, smol_tokenizer, tpl)
    assert not data.packed and len(data.rows) == 25
    assert data.stats["samples"] == 25 and data.stats["skipped"] == {} and data.stats["truncated"] == 0
    assert data.stats["sources"][a]["read"] == 10
    assert data.stats["loss_tokens"] == sum(sum(x != IGNORE_INDEX for x in r["labels"]) for r in data.rows)
    assert "SYS" in smol_tokenizer.decode(data.rows[0]["input_ids"])


def test_packing_and_cache_hit(tmp_path, smol_tokenizer, cache_home):
    a = write(tmp_path / "a.jsonl", [chat(i) for i in range(40)])
    cfg = validate({"datasets": [a], "max_length": 128, "pack_to_max_length": True})
    tpl = get_template("auto", smol_tokenizer)
    first = build_dataset(cfg, smol_tokenizer, tpl)
    assert first.packed and first.stats["cache"] == "miss"
    assert len(first.rows) < 40 and all(len(r["input_ids"]) <= 128 for r in first.rows)
    assert sum(len(r["seq_lens"]) for r in first.rows) == 40
    # One token store and one rows index; no temporary folder or shard left behind.
    files = sorted(p.name.split("-")[0] for p in (cache_home / "data").iterdir())
    assert files == ["rows", "tok"]
    second = build_dataset(cfg, smol_tokenizer, tpl)
    assert second.stats["cache"] == "hit"
    assert second.rows == first.rows
    # A change to the data (or any setting) misses the cache.
    write(tmp_path / "a.jsonl", [chat(i) for i in range(41)])
    third = build_dataset(cfg, smol_tokenizer, tpl)
    assert third.stats["cache"] == "miss" and sum(len(r["seq_lens"]) for r in third.rows) == 41


def test_cache_key_changes_with_the_encoding_code(tmp_path, smol_tokenizer, monkeypatch):
    """lmtune's version, its data/ code and the tokenizer libraries all decide the rows: a change to
    any of them must miss the cache (a stale cache would train on the old encoding silently)."""
    import shutil

    import tokenizers
    import transformers

    import lmtune
    import lmtune.data.dataset as ds

    a = write(tmp_path / "a.jsonl", [chat(i) for i in range(3)])
    cfg = validate({"datasets": [a], "max_length": 128})
    tpl = get_template("auto", smol_tokenizer)
    base = ds.cache_key(cfg, smol_tokenizer, tpl)
    assert ds.cache_key(cfg, smol_tokenizer, tpl) == base
    for module in (lmtune, transformers, tokenizers):
        with monkeypatch.context() as m:
            m.setattr(module, "__version__", module.__version__ + ".post1")
            assert ds.cache_key(cfg, smol_tokenizer, tpl) != base, module.__name__
    # The same version, one line of the encoding code changed (a development install).
    code = tmp_path / "data_code"
    shutil.copytree(Path(ds.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(ds, "__file__", str(code / "dataset.py"))
    assert ds.cache_key(cfg, smol_tokenizer, tpl) == base
    (code / "tokenize.py").write_text((code / "tokenize.py").read_text() + "\n# changed\n")
    assert ds.cache_key(cfg, smol_tokenizer, tpl) != base


def test_cache_key_of_a_template_that_refuses_system_messages(tmp_path, smol_tokenizer):
    """Gemma's template refuses a system message: the key still builds (the refusal is part of it)."""
    import copy

    import lmtune.data.dataset as ds

    a = write(tmp_path / "a.jsonl", [chat(i) for i in range(3)])
    cfg = validate({"datasets": [a], "max_length": 128})
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (Path(__file__).parent / "fixtures/chat_templates/gemma2_it.jinja").read_text()
    key = ds.cache_key(cfg, tok, get_template("auto", tok))
    assert key != ds.cache_key(cfg, smol_tokenizer, get_template("auto", smol_tokenizer))


def test_num_proc_gives_the_same_rows(tmp_path, smol_tokenizer, monkeypatch):
    import lmtune.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_MAX", 16)  # several chunks, so two processes share the work
    a = write(tmp_path / "a.jsonl", [chat(i) for i in range(100)])
    tpl = get_template("auto", smol_tokenizer)
    one = build_dataset(validate({"datasets": [a], "max_length": 64, "num_proc": 1}), smol_tokenizer, tpl,
                        use_cache=False)
    two = build_dataset(validate({"datasets": [a], "max_length": 64, "num_proc": 2}), smol_tokenizer, tpl,
                        use_cache=False)
    assert one.rows == two.rows


def test_skipped_conversations_are_counted(tmp_path, smol_tokenizer):
    long = {"messages": [{"role": "user", "content": "very long " * 50}, {"role": "assistant", "content": "ok"}]}
    a = write(tmp_path / "a.jsonl", [chat(1), long, chat(2)])
    cfg = validate({"datasets": [a], "max_length": 40, "pack_to_max_length": False})
    data = build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))
    assert len(data.rows) == 2
    assert data.stats["skipped"] == {"prompt_too_long": 1}
    assert data.stats["skipped_examples"][0]["source"] == f"{a}:2"


def test_all_skipped_is_an_error(tmp_path, smol_tokenizer):
    long = {"messages": [{"role": "user", "content": "very long " * 50}, {"role": "assistant", "content": "ok"}]}
    a = write(tmp_path / "a.jsonl", [long])
    cfg = validate({"datasets": [a], "max_length": 16})
    with pytest.raises(UserError, match="no usable training samples.*prompt_too_long: 1"):
        build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))


def test_empty_dataset_names_the_file(tmp_path, smol_tokenizer, cache_home):
    a = tmp_path / "empty.jsonl"
    a.write_text("")
    cfg = validate({"datasets": [str(a)]})
    with pytest.raises(UserError) as info:
        build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))
    assert str(a) in str(info.value) and "no records" in str(info.value)
    assert not (cache_home / "data").exists() or not list((cache_home / "data").iterdir())


def test_pretrain_objective(tmp_path, smol_tokenizer):
    a = write(tmp_path / "a.jsonl", [{"text": f"plain text number {i}. " * 20} for i in range(5)])
    b = write(tmp_path / "b.jsonl", [chat(1)])
    cfg = validate({"datasets": [a, b], "objective": "pretrain", "max_length": 64})
    data = build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer), use_cache=False)
    assert data.packed
    for row in data.rows:
        a0 = 0
        for L in row["seq_lens"]:
            seg = row["labels"][a0 : a0 + L]
            assert seg[0] == IGNORE_INDEX and seg[1:] == row["input_ids"][a0 + 1 : a0 + L]
            a0 += L
    # The chat record was rendered with the template and trained on in full.
    text = smol_tokenizer.decode([t for r in data.rows for t in r["input_ids"]])
    assert "<|im_start|>assistant\nanswer 1<|im_end|>" in text
