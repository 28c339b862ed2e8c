"""`lmtune web`: the Gradio page, driven in a real (headless) browser on the embedded model."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import set_slider  # noqa: E402
from test_serve_common import ROOT, free_port, start_server, stop_server, tiny_model  # noqa: E402,F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def test_gradio_history_becomes_plain_messages():
    from lmtune.serve.web import to_messages

    chat = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello!", "metadata": None},
            {"role": "user", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "b"}]}]
    assert to_messages(chat) == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                 {"role": "user", "content": "a b"}]


def test_page_builds_with_the_model_settings(tiny_model):  # noqa: F811
    pytest.importorskip("gradio")
    from lmtune.serve.engine import Engine
    from lmtune.serve.web import build_demo

    engine = Engine.load(str(tiny_model), system="You are Tiny.")
    demo = build_demo(engine, title="My bot")
    assert demo.title == "My bot"
    config = demo.get_config_file()
    values = [c.get("props", {}).get("value") for c in config["components"]]
    assert "You are Tiny." in values


QUESTION = "Describe Paris, the capital of France, in a few sentences."  # a long answer: seen streaming


def watch_answer(page) -> list[str]:
    """The last answer's text each time it changed, until it has not changed for 4 s."""
    answer = page.locator("#lmtune-chat [data-testid='bot']").last
    answer.wait_for(timeout=60_000)
    seen, last_change, deadline = [], time.time(), time.time() + 120
    while time.time() < deadline:
        text = answer.inner_text().strip()
        if text and (not seen or text != seen[-1]):
            seen.append(text)
            last_change = time.time()
        elif seen and time.time() - last_change > 4:
            break
        time.sleep(0.1)
    return seen


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_browser_sees_a_streamed_answer(tmp_path):
    from playwright.sync_api import sync_playwright

    port = free_port()
    proc = start_server(["web", "smollm2-135m-instruct", "--port", str(port), "--title", "lmtune demo"], port,
                        path="/")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 720})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            box = page.locator("#lmtune-input textarea")
            box.wait_for(timeout=60_000)
            assert page.title() == "lmtune demo"
            # greedy, so the answer is the model's best and the test is repeatable
            page.get_by_text("Settings").click()
            set_slider(page, "lmtune-temperature", "0")
            box.fill(QUESTION)
            box.press("Enter")
            seen = watch_answer(page)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(tmp_path / "web.png"), full_page=True)
            assert len(seen) >= 2, f"the answer did not stream: {seen}"
            assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), "later text must extend earlier text"
            assert "Paris" in seen[-1] and len(seen[-1].split()) > 20
            assert page.locator("#lmtune-chat [data-testid='user']").last.inner_text().strip() == QUESTION
            # Clear empties the conversation
            page.locator("#lmtune-clear").click()
            page.locator("#lmtune-chat [data-testid='bot']").first.wait_for(state="detached", timeout=30_000)
            # Temperature 0 reached the engine: asked again, the page gives the same answer (two
            # answers sampled at the default 0.7 part within a few words)
            box.fill(QUESTION)
            box.press("Enter")
            again = watch_answer(page)[-1]
            assert again.split()[:25] == seen[-1].split()[:25], (seen[-1], again)
            browser.close()
    finally:
        log = stop_server(proc)
    docs_img = ROOT / "docs" / "img"
    docs_img.mkdir(parents=True, exist_ok=True)
    shutil.copy(tmp_path / "web.png", docs_img / "web.png")
    assert "Traceback" not in log, log
