"""`lmtune serve`: the OpenAI client against the real server, every error case, concurrency."""

from __future__ import annotations

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
from test_serve_common import free_port, start_server, stop_server, tiny_model  # noqa: E402,F401

KEY = "test-key-123"
MAX_CONCURRENCY = 8


@pytest.fixture(scope="module")
def server(tiny_model):  # noqa: F811
    port = free_port()
    proc = start_server(["serve", str(tiny_model), "--port", str(port), "--api-key", KEY,
                         "--max-concurrency", str(MAX_CONCURRENCY), "--model-name", "tiny"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def post(server, path, body, key=KEY, **kw):
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server + path, content=content, headers={**auth(key), "Content-Type": "application/json"},
                      **({"timeout": 120} | kw))


def assert_openai_error(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def chat_body(content="Hello!", **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 6, **kw}


# ---------------------------------------------------------------- the official client


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_completion(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello!"}],
                                       temperature=0, max_tokens=6)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_streaming_chat_completion_matches_non_streaming(client):
    msgs = [{"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=6)
    stream = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_stop_sequence_gives_finish_reason_stop(client):
    msgs = [{"role": "user", "content": "Hello!"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12)
    text = full.choices[0].message.content
    word = text[len(text) // 2:len(text) // 2 + 3]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=12, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.find(word)]
    assert r.usage.completion_tokens < 12


def test_completions_plain_text(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    s = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                  stream=True)
    chunks = list(s)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Hi"}], temperature=1.0, top_p=0.9,
              max_tokens=6, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_a_seeded_request_leaves_later_requests_random(client):
    """A request's seed is its own: it must not reseed the server, or every unseeded request after
    a seeded one would get the same "random" answer."""
    msgs = [{"role": "user", "content": "Say anything."}]
    unseeded = []
    for _ in range(2):
        client.chat.completions.create(model="tiny", messages=msgs, temperature=1.0, max_tokens=4, seed=11)
        r = client.chat.completions.create(model="tiny", messages=msgs, temperature=2.0, max_tokens=24)
        unseeded.append(r.choices[0].message.content)
    # 24 tokens drawn at temperature 2 from a random model: equal only if the RNG was reset.
    assert unseeded[0] != unseeded[1]


def test_response_format_text_is_accepted_others_refused(client):
    msgs = [{"role": "user", "content": "Hello!"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=3,
                                       response_format={"type": "text"})
    assert r.choices[0].finish_reason == "length"
    for fmt in ({"type": "json_object"},
                {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, response_format=fmt)
        assert e.value.status_code == 400
        err = e.value.body
        assert err["param"] == "response_format" and err["code"] == "unsupported_parameter"
        assert fmt["type"] in err["message"]


# ---------------------------------------------------------------- errors, OpenAI-shaped


def test_401_without_or_with_a_wrong_key(server):
    r = httpx.post(server + "/v1/chat/completions", json=chat_body(), timeout=30)
    assert_openai_error(r, 401, "invalid_api_key")
    assert_openai_error(post(server, "/v1/chat/completions", chat_body(), key="wrong"), 401, "invalid_api_key")
    assert_openai_error(httpx.get(server + "/v1/models", timeout=30), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()


def test_400_bad_json(server):
    err = assert_openai_error(post(server, "/v1/chat/completions", b"{not json"), 400, "invalid_json")
    assert "JSON" in err["message"]
    assert_openai_error(post(server, "/v1/chat/completions", b"[1, 2]"), 400, "invalid_json")


def test_400_deeply_nested_json(server):
    """A body nested far deeper than any real request: a 400 in OpenAI's shape, no internal text."""
    for raw in ("[" * 100_000 + "]" * 100_000,
                '{"model": "tiny", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}",
                '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": '
                + '{"a": ' * 200 + "1" + "}" * 200 + "}"):
        err = assert_openai_error(post(server, "/v1/chat/completions", raw.encode()), 400, "invalid_json")
        assert "deep" in err["message"]
        assert "Recursion" not in err["message"]
    # the server is still fine
    assert post(server, "/v1/chat/completions", chat_body()).status_code == 200


def test_400_missing_or_wrong_fields(server):
    body = chat_body()
    del body["messages"]
    assert_openai_error(post(server, "/v1/chat/completions", body), 400, "missing_required_parameter", "messages")
    assert_openai_error(post(server, "/v1/chat/completions", {"messages": chat_body()["messages"]}), 400,
                        "missing_required_parameter", "model")
    assert_openai_error(post(server, "/v1/chat/completions", chat_body() | {"messages": []}), 400, None, "messages")
    assert_openai_error(post(server, "/v1/chat/completions", chat_body() | {"messages": "hi"}), 400, None, "messages")
    bad_role = chat_body() | {"messages": [{"role": "robot", "content": "hi"}]}
    assert_openai_error(post(server, "/v1/chat/completions", bad_role), 400, "invalid_value", "messages[0].role")
    no_content = chat_body() | {"messages": [{"role": "user"}]}
    assert_openai_error(post(server, "/v1/chat/completions", no_content), 400, "invalid_type", "messages[0].content")
    assert_openai_error(post(server, "/v1/chat/completions", chat_body(temperature="hot")), 400, "invalid_type",
                        "temperature")
    assert_openai_error(post(server, "/v1/chat/completions", chat_body(stream="yes")), 400, "invalid_type", "stream")
    assert_openai_error(post(server, "/v1/completions", {"model": "tiny"}), 400, "missing_required_parameter",
                        "prompt")


def test_400_values_out_of_range(server):
    for field, value in [("temperature", 3), ("temperature", -1), ("top_p", 0), ("top_p", 1.5),
                         ("max_tokens", 0), ("max_tokens", 2.5), ("n", 2)]:
        r = post(server, "/v1/chat/completions", chat_body(**{field: value}))
        err = assert_openai_error(r, 400, None, field)
        assert field in err["message"]


def test_400_prompt_longer_than_the_context(server):
    r = post(server, "/v1/chat/completions", chat_body("word " * 2000))
    assert_openai_error(r, 400, "context_length_exceeded")


def test_404_unknown_model_and_route(server):
    err = assert_openai_error(post(server, "/v1/chat/completions", chat_body() | {"model": "gpt-9"}), 404,
                              "model_not_found", "model")
    assert "gpt-9" in err["message"] and "tiny" in err["message"]
    assert_openai_error(httpx.get(server + "/v1/models/gpt-9", headers=auth(), timeout=30), 404)
    assert_openai_error(httpx.get(server + "/v1/nothing", headers=auth(), timeout=30), 404)


def test_429_when_over_capacity_then_recovers(server):
    """MAX_CONCURRENCY long streams in flight: the next request is refused with 429, not queued
    without bound; closing the streams frees the capacity (and the worker) again."""
    streams = []
    with httpx.Client(timeout=120) as http:
        try:
            for i in range(MAX_CONCURRENCY):
                cm = http.stream("POST", server + "/v1/chat/completions", headers=auth(),
                                 json=chat_body(f"long {i}", max_tokens=900, stream=True))
                resp = cm.__enter__()
                assert resp.status_code == 200
                streams.append((cm, resp))
            first = streams[0][1].iter_lines()  # keep a reference: dropping it closes the stream
            assert next(first).startswith("data: ")
            r = post(server, "/v1/chat/completions", chat_body())
            err = assert_openai_error(r, 429, "rate_limit_exceeded")
            assert r.headers.get("retry-after")
            assert "busy" in err["message"]
        finally:
            for cm, _ in streams:
                cm.__exit__(None, None, None)
    deadline = time.time() + 60
    while True:
        r = post(server, "/v1/chat/completions", chat_body(), timeout=httpx.Timeout(120, read=30))
        print(httpx.get(server + "/health").json())
        if r.status_code == 200 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_concurrent_streams_are_not_mixed(server, client):
    prompts = [f"Question {i}: {'why ' * i}?" for i in range(MAX_CONCURRENCY)]
    expected = [client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": p}],
                                               temperature=0, max_tokens=8).choices[0].message.content
                for p in prompts]
    assert len(set(expected)) > len(prompts) // 2
    got: list = [None] * len(prompts)
    errors = []
    barrier = threading.Barrier(len(prompts))

    def run(i):
        try:
            c = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=300)
            barrier.wait()
            s = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompts[i]}],
                                          temperature=0, max_tokens=8, stream=True)
            got[i] = "".join(ch.choices[0].delta.content or "" for ch in s if ch.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert got == expected


def test_health_needs_no_key(server):
    r = httpx.get(server + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tiny"
