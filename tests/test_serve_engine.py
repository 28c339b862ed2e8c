"""The inference engine: stop words, EOS, length limits, history fitting, concurrency."""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_serve_common import tiny_model  # noqa: E402,F401  (fixture)

from lmtune.serve.engine import ContextTooLong, Engine  # noqa: E402

Q = [{"role": "user", "content": "Tell me something."}]


@pytest.fixture(scope="module")
def engine(tiny_model):  # noqa: F811
    return Engine.load(str(tiny_model))


def test_loads_template_stop_words_and_eos(engine):
    assert engine.device == "cpu"
    assert "<|im_end|>" in engine.stop_words
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids
    assert engine.context_window == 1024
    assert next(engine.model.parameters()).dtype.is_floating_point


def test_max_new_tokens_gives_length(engine):
    r = engine.generate(Q, max_new_tokens=6)
    assert r.finish_reason == "length"
    assert r.completion_tokens == 6
    assert r.prompt_tokens == len(engine.encode_chat(engine.with_system(Q)))
    assert r.text


def test_stream_pieces_join_to_the_same_text(engine):
    full = engine.generate(Q, max_new_tokens=8).text
    gen = engine.stream(Q, max_new_tokens=8)
    pieces = list(gen)
    assert len(pieces) > 1
    assert "".join(pieces) == full == gen.text


def test_stop_word_cuts_output_and_finishes_with_stop(engine):
    full = engine.generate(Q, max_new_tokens=12).text
    cut = len(full) // 2
    word = full[cut:cut + 4]
    expected = full[: full.find(word)]
    gen = engine.stream(Q, max_new_tokens=12, stop=[word])
    pieces = list(gen)
    assert "".join(pieces) == expected
    assert word not in "".join(pieces)
    assert gen.finish_reason == "stop"
    assert gen.completion_tokens < 12


def test_eos_token_finishes_with_stop(engine, monkeypatch):
    gen = engine.stream(Q, max_new_tokens=10)
    list(gen)
    ids = gen.token_ids
    assert len(ids) == 10 and gen.finish_reason == "length"
    # Declare the 4th generated token an end-of-sequence id: generation must stop right on it.
    monkeypatch.setattr(engine, "eos_ids", [ids[3]])
    r = engine.generate(Q, max_new_tokens=10)
    assert r.finish_reason == "stop"
    assert r.completion_tokens == ids.index(ids[3]) + 1


def test_lmtune_json_sets_system_and_stop_words(tiny_model, tmp_path):  # noqa: F811
    model = tmp_path / "m"
    shutil.copytree(tiny_model, model)
    (model / "lmtune.json").write_text(json.dumps(
        {"prompt_template": "chatml", "system": "You are Tiny.", "stop_words": ["<|endoftext|>", "###"]}))
    e = Engine.load(str(model))
    assert e.system == "You are Tiny."
    assert {"###", "<|im_end|>"} <= set(e.stop_words)
    assert e.tokenizer.convert_tokens_to_ids("<|endoftext|>") in e.eos_ids
    assert "You are Tiny." in e.template.render(e.with_system(Q), add_generation_prompt=True)
    # --system overrides the file
    e2 = Engine.load(str(model), system="Be brief.")
    assert e2.system == "Be brief."


def test_history_is_trimmed_oldest_first_keeping_system(engine, monkeypatch):
    monkeypatch.setattr(engine, "context_window", 160)
    msgs = [{"role": "system", "content": "SYSTEM PROMPT"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 10},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 10}]
    msgs.append({"role": "user", "content": "last question"})
    kept, ids = engine.fit_messages(msgs, max_new_tokens=20)
    assert kept[0]["content"] == "SYSTEM PROMPT"
    assert kept[-1]["content"] == "last question"
    assert kept[1]["role"] == "user"
    assert len(kept) < len(msgs)
    assert kept[1:] == msgs[len(msgs) - len(kept) + 1:]  # a suffix of the conversation
    assert len(ids) + 20 <= 160
    with pytest.raises(ContextTooLong):
        engine.fit_messages([{"role": "user", "content": "word " * 400}], max_new_tokens=20)


def test_concurrent_streams_do_not_mix(engine):
    prompts = [[{"role": "user", "content": f"Prompt number {i}: {'abc' * i}"}] for i in range(6)]
    expected = [engine.generate(p, max_new_tokens=6).text for p in prompts]
    assert len(set(expected)) > 1
    got = [None] * len(prompts)

    def run(i):
        got[i] = "".join(engine.stream(prompts[i], max_new_tokens=6))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected


def test_abandoned_stream_frees_the_worker(engine):
    gen = engine.stream(Q, max_new_tokens=1000)
    next(iter(gen))
    gen.cancel()
    t0 = time.time()
    r = engine.generate(Q, max_new_tokens=2)
    assert r.completion_tokens == 2
    assert time.time() - t0 < 30  # not waiting for 1000 tokens


def test_embedded_model_answers_and_stops():
    """The real 135M chat model ends its answer with <|im_end|>: finish_reason 'stop'."""
    e = Engine.load("smollm2-135m-instruct")
    r = e.generate([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=60)
    assert "Paris" in r.text
    assert r.finish_reason == "stop"
    assert "<|im_end|>" not in r.text and "<|im_start|>" not in r.text
