"""Continuous batching in the engine: requests join a running batch, every answer equals its solo
answer, cancelled requests free their row at once, limits hold; several adapters on one base."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_serve_common import make_adapter, tiny_model  # noqa: E402,F401  (fixture)

from lmtune.serve.engine import Engine  # noqa: E402

# Prompts of different lengths, so rows of one batch are padded differently.
PROMPTS = [[{"role": "user", "content": f"Prompt number {i}: {'abc ' * (3 * i)}"}] for i in range(8)]


@pytest.fixture(scope="module")
def engine(tiny_model):  # noqa: F811
    return Engine.load(str(tiny_model))


@pytest.fixture(scope="module")
def solo(engine):
    """Each prompt's greedy answer when it is the only request (a batch of one throughout)."""
    return [engine.generate(p, max_new_tokens=12).text for p in PROMPTS]


def run_concurrently(fn, n: int) -> list:
    out: list = [None] * n
    errors: list = []

    def run(i):
        try:
            out[i] = fn(i)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return out


def wait_until(cond, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def test_requests_join_a_running_batch_and_equal_their_solo_answers(engine, solo):
    assert len(set(solo)) > len(solo) // 2  # the prompts really get different answers
    long = engine.stream(PROMPTS[0], max_new_tokens=400)
    it = iter(long)  # held: a dropped iterator cancels its request
    next(it)  # the long request is decoding now
    steps_before = engine.scheduler.steps
    got = run_concurrently(lambda i: "".join(engine.stream(PROMPTS[i], max_new_tokens=12)), len(PROMPTS))
    assert got == solo
    # they were decoded together with the long one, not after it
    assert engine.scheduler.max_rows_seen >= 4
    assert not long.done.is_set()
    assert engine.scheduler.steps - steps_before < 12 * len(PROMPTS)
    long.cancel()


def test_a_cancelled_request_frees_its_row_at_once(engine, solo):
    wait_until(lambda: engine.scheduler.running() == 0)
    gens = [engine.stream(PROMPTS[i], max_new_tokens=1000) for i in range(3)]
    its = [iter(g) for g in gens]  # held: a dropped iterator cancels its request
    assert all(next(it) for it in its)
    wait_until(lambda: engine.scheduler.running() == 3)
    sched = engine.scheduler
    freed_at = {}  # the scheduler's step count when it let go of each request (polling here would lag)
    on_finish = sched.on_finish
    sched.on_finish = lambda req, reason: (freed_at.setdefault(id(req.gen), sched.steps), on_finish(req, reason))
    try:
        steps = sched.steps
        gens[1].cancel()
        wait_until(lambda: sched.running() == 2, timeout=10)
    finally:
        sched.on_finish = on_finish
    assert freed_at[id(gens[1])] - steps <= 2  # freed at the next step, not after 1000 tokens
    assert gens[1].done.is_set() and gens[1].finish_reason == "stop"
    # the others go on, and a new request is answered as if alone
    assert engine.generate(PROMPTS[5], max_new_tokens=12).text == solo[5]
    for g in (gens[0], gens[2]):
        g.cancel()
    wait_until(lambda: engine.scheduler.running() == 0, timeout=10)


def test_max_batch_limits_the_rows_and_the_rest_wait(tiny_model, solo):  # noqa: F811
    e = Engine.load(str(tiny_model), max_batch=2)
    got = run_concurrently(lambda i: "".join(e.stream(PROMPTS[i], max_new_tokens=12)), len(PROMPTS))
    assert got == solo
    assert e.scheduler.max_rows_seen == 2


def test_memory_budget_admits_only_what_fits(tiny_model, solo):  # noqa: F811
    e = Engine.load(str(tiny_model))
    # room for the KV cache of about three rows of (longest prompt + 12 new tokens), counted twice
    longest = max(len(e.encode_chat(e.with_system(p))) for p in PROMPTS) + 12
    e.scheduler.kv_budget_bytes = 2 * 3 * longest * e.scheduler.kv_bytes_per_token
    got = run_concurrently(lambda i: "".join(e.stream(PROMPTS[i], max_new_tokens=12)), len(PROMPTS))
    assert got == solo
    assert 1 <= e.scheduler.max_rows_seen <= 3


def test_seeded_sampling_is_the_same_in_a_batch_and_alone(engine):
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=10, seed=1234)
    alone = engine.generate(PROMPTS[2], **kw).text
    batched = run_concurrently(
        lambda i: engine.generate(PROMPTS[2], **kw).text if i == 0 else
        engine.generate(PROMPTS[i], temperature=1.5, max_new_tokens=10).text, 5)
    assert batched[0] == alone
    # and unseeded requests are not made repeatable by a seeded one before them
    a = [engine.generate(PROMPTS[3], temperature=2.0, max_new_tokens=20).text for _ in range(2)]
    assert a[0] != a[1]


def test_repetition_penalty_and_greedy_mix_in_one_batch(engine):
    kw = dict(repetition_penalty=0.1, max_new_tokens=12)  # < 1 favours tokens already seen
    alone = engine.generate(PROMPTS[4], **kw).text
    assert alone != engine.generate(PROMPTS[4], max_new_tokens=12).text  # the penalty does something
    got = run_concurrently(lambda i: engine.generate(PROMPTS[4], **kw).text if i % 2 else
                           engine.generate(PROMPTS[i], max_new_tokens=12).text, 4)
    assert got[1] == got[3] == alone


# ---------------------------------------------------------------- several adapters on one base


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("adapters")
    return {"ada": str(make_adapter(tiny_model, root / "ada", seed=1)),
            "bob": str(make_adapter(tiny_model, root / "bob", seed=2))}


def test_several_adapters_batch_together_and_answer_as_alone(tiny_model, adapters, engine):  # noqa: F811
    multi = Engine.load(str(tiny_model), adapters=adapters, model_name="tiny")
    assert multi.model_names == ["tiny", "ada", "bob"]
    assert multi.scheduler.mixed  # LoRA rows of different adapters share a forward pass
    # the reference: each adapter loaded alone (the old single --adapter path), and the bare base
    solo = {name: Engine.load(str(tiny_model), adapter=d) for name, d in adapters.items()}
    expected = {name: [solo[name].generate(p, max_new_tokens=10).text for p in PROMPTS[:3]] for name in adapters}
    expected["tiny"] = [engine.generate(p, max_new_tokens=10).text for p in PROMPTS[:3]]
    assert expected["ada"] != expected["bob"] != expected["tiny"] != expected["ada"]
    jobs = [(name, i) for name in ("tiny", "ada", "bob") for i in range(3)]
    got = run_concurrently(lambda j: multi.generate(PROMPTS[jobs[j][1]], model=jobs[j][0], max_new_tokens=10).text,
                           len(jobs))
    assert got == [expected[name][i] for name, i in jobs]
    assert multi.scheduler.max_rows_seen > 3  # rows of different adapters were in one batch


def test_adapters_take_turns_when_they_cannot_share_a_batch(tiny_model, adapters):  # noqa: F811
    multi = Engine.load(str(tiny_model), adapters=adapters, model_name="tiny")
    expected = {name: multi.generate(PROMPTS[1], model=name, max_new_tokens=8).text for name in ("tiny", "ada", "bob")}
    multi.scheduler.mixed = False  # what happens for adapter kinds peft cannot mix
    names = ["ada", "bob", "tiny"] * 3
    got = run_concurrently(lambda j: multi.generate(PROMPTS[1], model=names[j], max_new_tokens=8).text, len(names))
    assert got == [expected[n] for n in names]


def test_shared_prompt_head_is_computed_once_and_answers_are_unchanged(tiny_model, solo):  # noqa: F811
    """The system prompt and turn header every request shares get their KV cache computed once;
    whether it was cached or not, each answer is the same as alone."""
    e = Engine.load(str(tiny_model))
    ids = e.encode_chat(e.with_system(PROMPTS[1]))
    assert 8 <= e._shared_prefix_len(e.with_system(PROMPTS[1]), ids, None) < len(ids)
    first = e.generate(PROMPTS[1], max_new_tokens=12).text  # computes the shared head
    assert first == solo[1] and e.scheduler.prefix_hits == 0
    got = run_concurrently(lambda i: "".join(e.stream(PROMPTS[i], max_new_tokens=12)), len(PROMPTS))
    assert got == solo
    assert e.scheduler.prefix_hits >= len(PROMPTS) - 1
    sys_solo = [e.generate(p, system="You are Tiny.", max_new_tokens=8).text for p in PROMPTS[:3]]
    assert sys_solo != got[:3]  # another system prompt: another head, other answers
