"""`lmtune serve BASE --adapter ada=DIR --adapter bob=DIR` with default limits, through the official
`openai` client: the request's model picks the adapter, concurrent streams equal their solo answers,
64 concurrent clients are all served, a client that disconnects frees its row at once."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, os.path.dirname(__file__))
from test_serve_common import free_port, make_adapter, start_server, stop_server, tiny_model  # noqa: E402,F401

NAMES = ["tiny", "ada", "bob"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("adapters")
    ada = make_adapter(tiny_model, root / "ada", seed=1)
    bob = make_adapter(tiny_model, root / "bob", seed=2)
    port = free_port()
    proc = start_server(["serve", str(tiny_model), "--port", str(port), "--model-name", "tiny",
                         "--adapter", f"ada={ada}", "--adapter", f"bob={bob}"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


def ask(client, model, content, max_tokens=8):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       temperature=0, max_tokens=max_tokens)
    assert r.model == model
    return r.choices[0].message.content


def test_models_lists_the_base_and_each_adapter(client):
    assert [m.id for m in client.models.list().data] == NAMES
    assert client.models.retrieve("ada").id == "ada"


def test_each_adapter_answers_as_its_own_and_streams_equal_solo(server, client):
    prompts = [f"Tell me about item {i}." for i in range(3)]
    solo = {(m, p): ask(client, m, p) for m in NAMES for p in prompts}
    for p in prompts:
        assert len({solo[(m, p)] for m in NAMES}) == 3  # the adapters really answer differently
    jobs = [(m, p) for m in NAMES for p in prompts]
    got: dict = {}
    barrier = threading.Barrier(len(jobs))

    def run(job):
        c = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)
        barrier.wait()
        s = c.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                      temperature=0, max_tokens=8, stream=True)
        got[job] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)

    threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert got == solo


def test_unknown_model_names_what_is_served(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "carol", "hi")
    assert all(f"'{n}'" in e.value.body["message"] for n in NAMES)


def test_64_concurrent_streaming_clients_are_all_served(server, client):
    prompts = [f"Client {i} asks: {'why ' * (i % 7)}?" for i in range(64)]
    solo = [ask(client, NAMES[i % 3], p, max_tokens=6) for i, p in enumerate(prompts)]

    async def one(http, i):
        body = {"model": NAMES[i % 3], "messages": [{"role": "user", "content": prompts[i]}], "temperature": 0,
                "max_tokens": 6, "stream": True}
        text, status = "", None
        async with http.stream("POST", server + "/v1/chat/completions", json=body) as r:
            status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    for c in json.loads(line[6:])["choices"]:
                        text += c["delta"].get("content") or ""
        return status, text

    async def all_of_them():
        limits = httpx.Limits(max_connections=80, max_keepalive_connections=80)
        async with httpx.AsyncClient(timeout=300, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert [s for s, _ in results] == [200] * 64  # queued when needed, never refused
    assert [t for _, t in results] == solo


def test_a_client_that_disconnects_frees_its_row_at_once(server):
    body = {"model": "ada", "messages": [{"role": "user", "content": "Go on forever."}], "temperature": 0,
            "max_tokens": 900, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert httpx.get(server + "/health").json()["running"] == 1
        t0 = time.time()  # the connection is closed now
    while True:
        h = httpx.get(server + "/health").json()
        if h["running"] == 0 and h["in_flight"] == 0:
            break
        assert time.time() - t0 < 10, h  # 900 tokens would take far longer
        time.sleep(0.05)


def test_adapter_flags_parse(tmp_path):
    from lmtune.errors import UserError
    from lmtune.serve.chat import parse_adapters

    assert parse_adapters(None) == (None, {})
    assert parse_adapters(["runs/a"]) == ("runs/a", {})  # the old meaning: one adapter, the model's name
    assert parse_adapters(["ada=runs/a", "bob=runs/b"]) == (None, {"ada": "runs/a", "bob": "runs/b"})
    odd = tmp_path / "x=y"  # a folder whose name holds '=' is a folder
    odd.mkdir()
    assert parse_adapters([str(odd)]) == (str(odd), {})
    for bad, msg in ([["ada=a", "ada=b"], "twice"], [["=a"], "NAME=DIR"], [["ada="], "NAME=DIR"]):
        with pytest.raises(UserError, match=msg):
            parse_adapters(bad)
