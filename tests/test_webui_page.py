"""`lmtune webui`: the page's layout, and the whole road driven in a real (headless) browser on the
embedded model: data preview, a bad value, a short LoRA run watched live, chat with the result,
export it. Screenshots go to docs/img/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import set_slider, write_jsonl  # noqa: E402
from test_serve_common import ENV, ROOT, free_port, stop_server, tiny_model  # noqa: E402,F401
from test_serve_web import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def _component(config: dict, elem_id: str) -> dict:
    return next(c for c in config["components"] if c.get("props", {}).get("elem_id") == elem_id)


def test_the_form_offers_what_the_config_schema_allows_and_scaling_only_with_gpus():
    from lmtune.config import _HINTS
    from lmtune.webui.app import build_app

    config = build_app(gpus=0).get_config_file()
    objective = _component(config, "webui-objective")["props"]
    assert [c[1] for c in objective["choices"]] == list(typing.get_args(_HINTS["objective"]))
    assert _component(config, "webui-model")["props"]["value"] == "smollm2-135m-instruct"
    # The scaling choices live in a row that is shown only when there are GPUs
    assert _row_of(config, "webui-scaling")["props"]["visible"] is False
    assert _row_of(build_app(gpus=2).get_config_file(), "webui-scaling")["props"]["visible"] is True


def _row_of(config: dict, elem_id: str) -> dict:
    """The innermost row holding the component `elem_id`."""
    by_id = {c["id"]: c for c in config["components"]}
    parents = {}

    def walk(node, parent=None):
        parents[node["id"]] = parent
        for child in node.get("children", []):
            walk(child, node["id"])

    walk(config["layout"])
    node = _component(config, elem_id)["id"]
    while node is not None:
        node = parents[node]
        if node in by_id and by_id[node]["type"] == "row":
            return by_id[node]
    raise AssertionError(f"{elem_id} is in no row")


def test_the_loss_curve_has_a_point_per_logged_step():
    from lmtune.webui.app import loss_svg

    svg = loss_svg([(1, 3.0), (2, 2.5), (3, 2.4)], [(1, 1e-3), (2, 5e-4), (3, 0.0)], total=10,
                   val_losses=[(3, 2.6)])
    assert svg.count('class="loss-point"') == 3 and svg.count('class="val-point"') == 1
    assert 'data-step="3"' in svg and "step 3: loss 2.4000" in svg and "learning rate" in svg
    assert "appears here" in loss_svg([]) and 'class="loss-point"' not in loss_svg([])


def test_scaling_choices_become_config_keys_and_processes():
    from lmtune.webui import form as F

    assert {"ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3_offload"} <= set(F.scaling_choices())
    form = {**F.defaults(gpus=4), "datasets": "d.jsonl", "scaling": "deepspeed_zero2"}
    values = F.config_values(form, gpus=4)
    assert (values["strategy"], values["deepspeed"], F.processes(form, 4)) == ("deepspeed", "deepspeed_zero2", 4)
    form = {**form, "scaling": "fsdp2", "nproc": 2}
    assert (F.config_values(form, gpus=4)["strategy"], F.processes(form, 4)) == ("fsdp2", 2)
    assert "strategy" not in F.config_values(form, gpus=0) and F.processes(form, 0) is None


def test_only_the_command_line_imports_the_page():
    from test_architecture import import_graph

    users = {m for m, deps in import_graph().items() if not m.startswith("lmtune.webui")
             and any(d.startswith("lmtune.webui") for d in deps)}
    assert users == {"lmtune.cli"}


def test_unload_frees_the_chat_model(tiny_model):  # noqa: F811
    import gc
    import weakref

    from lmtune.webui.app import ChatSlot

    slot = ChatSlot()
    engine = slot.load(str(tiny_model))
    assert slot.current() is engine and slot.label == str(tiny_model)
    assert engine.generate([{"role": "user", "content": "Hi"}], max_new_tokens=4).completion_tokens > 0
    model = weakref.ref(engine.model)
    del engine
    slot.unload()
    gc.collect()
    assert slot.current() is None and model() is None  # nothing holds the weights any more


def _identity_records() -> list[dict]:
    pairs = [("Who are you?", "I am Ada, an assistant made by Me."),
             ("What is your name?", "My name is Ada. Me made me."),
             ("Introduce yourself.", "Hello! I am Ada, an AI assistant built by Me."),
             ("Who made you?", "I was made by Me. I am Ada."),
             ("Are you ChatGPT?", "No, I am Ada, an assistant made by Me."),
             ("Tell me about yourself.", "I am Ada, a small assistant made by Me to answer questions.")]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs * 2]


def _start_page(args: list[str], port: int, cwd: Path, timeout: float = 120) -> subprocess.Popen:
    """`lmtune webui ARGS` started in `cwd`; returns once the page answers."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "lmtune.cli", "webui", *args], env=ENV, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lmtune webui exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"lmtune webui did not come up on port {port} in {timeout} s")


def _wait_text(page, selector: str, text: str, timeout: float) -> None:
    """Wait until the element's text contains `text` (case-sensitive, unlike get_by_text)."""
    page.wait_for_function("([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)",
                           arg=[selector, text], timeout=timeout * 1000)


def _stable_text(locator, settle: float = 4.0, timeout: float = 180.0) -> str:
    """The text of `locator` once it has stopped changing for `settle` seconds."""
    last, changed, deadline = None, time.time(), time.time() + timeout
    while time.time() < deadline:
        text = locator.inner_text().strip()
        if text != last:
            last, changed = text, time.time()
        elif text and time.time() - changed > settle:
            return text
        time.sleep(0.2)
    return last or ""


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_browser_trains_watches_chats_and_exports(tmp_path):
    from playwright.sync_api import sync_playwright

    # The page runs in tmp_path with relative paths, as a user would in a project folder
    write_jsonl(tmp_path / "data" / "ada.jsonl", _identity_records())
    data, work = "data/ada.jsonl", "work_dirs/ada"
    shots = tmp_path / "shots"
    shots.mkdir()
    port = free_port()
    proc = _start_page(["--port", str(port), "--work-dir", work], port, cwd=tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            page.locator("#webui-model input").wait_for(timeout=60_000)
            assert page.title() == "lmtune webui"

            # Pick the embedded model from the list, and a small data file
            page.locator("#webui-model input").click()
            page.get_by_role("option", name="smollm2-135m-instruct").click()
            page.locator("#webui-datasets textarea").fill(data)

            def number(key, value):
                page.locator(f"#webui-{key} input").fill(str(value))

            for key, value in {"max_steps": 4, "max_length": 96, "batch_size": 2, "accumulative_counts": 1,
                               "lora_r": 8, "lora_alpha": 16, "save_steps": 2, "val_set_size": 2}.items():
                number(key, value)
            page.locator("#webui-evaluation_inputs textarea").fill("Who are you?")

            # A bad value: the CLI's message, beside its field; nothing is started or written
            number("lr", 5)
            page.locator("#webui-start").click()
            error = page.locator("#webui-err-lr")
            error.wait_for(state="visible", timeout=60_000)
            assert "config key 'lr' must be between 0.0 and 1.0, got 5.0" in error.inner_text()
            assert not (tmp_path / work).exists()
            number("lr", 0.002)

            # Show command: the config file it would write and the command it would run
            page.locator("#webui-show").click()
            _wait_text(page, "#webui-message", f"lmtune train {work}/webui_config.py --work-dir {work}", 60)
            page.locator("#webui-config-view").get_by_text("max_steps = 4").wait_for(timeout=10_000)
            assert not (tmp_path / work).exists()

            # Preview: rendered samples and `data check`'s summary
            page.locator("#webui-preview-btn").click()
            page.locator("#webui-preview .webui-sample").first.wait_for(timeout=120_000)
            preview = page.locator("#webui-preview").inner_text()
            assert "I am Ada" in preview and "data check: OK" in preview
            assert not error.is_visible()

            # Start a short LoRA run and watch it: the loss curve gains points, progress reaches 100%
            page.locator("#webui-start").click()
            _wait_text(page, "#webui-message", "Started (pid", 60)
            points = page.locator("#webui-loss circle.loss-point")
            progress = page.locator("#webui-progress .webui-progress-text")
            status = page.locator("#webui-status")
            counts, deadline = [], time.time() + 1500  # minutes on busy shared cores
            while time.time() < deadline:
                n = points.count()
                if not counts or n != counts[-1]:
                    counts.append(n)
                if "finished" in status.inner_text() or "failed" in status.inner_text():
                    break
                time.sleep(0.3)
            page.wait_for_timeout(2500)  # one more refresh after the end
            assert "finished" in status.inner_text(), page.locator("#webui-log").inner_text()
            assert progress.inner_text().strip() == "step 4 / 4 (100%)"
            assert points.count() == 4
            assert page.locator("#webui-loss rect.val-point").count() == 1  # validated at the end
            assert len([c for c in counts if 0 < c < 4]) >= 1, f"the curve never grew live: {counts}"
            assert "Probe answers at step 4" in page.locator("#webui-probes").inner_text()
            assert "final model written" in page.locator("#webui-log").inner_text()
            page.locator("#webui-status").scroll_into_view_if_needed()
            page.screenshot(path=str(shots / "webui_train.png"), full_page=True)

            # The run survives a page reload
            page.reload(wait_until="domcontentloaded")
            progress.wait_for(timeout=60_000)
            page.wait_for_function("document.querySelectorAll('#webui-loss circle.loss-point').length == 4",
                                   timeout=60_000)
            assert progress.inner_text().strip() == "step 4 / 4 (100%)"
            assert page.locator("#webui-datasets textarea").input_value() == data  # the form, from its config

            # Chat with the result
            page.get_by_role("tab", name="Chat").click()
            page.locator("#webui-chat-trained").click()
            page.wait_for_function(f"document.querySelector('#webui-chat-model textarea').value === '{work}/hf'",
                                   timeout=30_000)
            page.locator("#webui-chat-load").click()
            _wait_text(page, "#webui-chat-status", f"Loaded {work}/hf on cpu", 180)
            page.get_by_text("Settings").last.click()
            set_slider(page, "lmtune-temperature", "0")
            box = page.locator("#lmtune-input textarea")
            box.fill("Who are you?")
            box.press("Enter")
            answer = page.locator("#lmtune-chat [data-testid='bot']").last
            answer.wait_for(timeout=120_000)
            text = _stable_text(answer)
            assert text and "No model is loaded" not in text and "⚠️" not in text, text
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(shots / "webui_chat.png"), full_page=False)

            # Export: a Hugging Face folder from the last checkpoint (the tab fills in the paths)
            page.get_by_role("tab", name="Export").click()
            out = f"{work}/hf_iter_4"
            page.wait_for_function(f"document.querySelector('#webui-export-out textarea').value === '{out}'",
                                   timeout=30_000)
            assert page.locator("#webui-export-src textarea").input_value() == f"{work}/iter_4"
            page.locator("#webui-export-run").click()
            _wait_text(page, "#webui-export-status", "Done in", 300)
            done = page.locator("#webui-export-status").inner_text()
            assert out in done and f"lmtune convert pth_to_hf {work}/iter_4 {out}" in done
            assert (tmp_path / out / "adapter_model.safetensors").is_file() and (tmp_path / out / "lmtune.json").is_file()
            page.screenshot(path=str(shots / "webui_export.png"), full_page=False)
            browser.close()
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log
    docs_img = ROOT / "docs" / "img"
    docs_img.mkdir(parents=True, exist_ok=True)
    for shot in shots.iterdir():
        shutil.copy(shot, docs_img / shot.name)
