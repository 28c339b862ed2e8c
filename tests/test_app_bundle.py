"""`lmtune export app`: merged weights, standalone app.py, atomic writes, overwrite rules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_serve_common import ENV, ROOT, free_port, tiny_model  # noqa: E402,F401

from lmtune.export.app import export_app  # noqa: E402
from lmtune.errors import UserError  # noqa: E402

TORCH_WHEEL_DIR = "/opt/wheels"  # where these machines keep the CPU torch wheel


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):  # noqa: F811
    """A LoRA adapter on the tiny model with non-zero B, so merging changes the outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    (out / "lmtune.json").write_text(json.dumps({"prompt_template": "auto", "system": "You are Tiny.",
                                                 "stop_words": ["<|im_end|>", "###"]}))
    return out


def test_export_merges_the_adapter(tiny_model, adapter, tmp_path):  # noqa: F811
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = export_app(str(tiny_model), str(tmp_path / "app"), adapter=str(adapter), title="Tiny bot",
                     max_shard_size="5MB")
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "app.py", "app_config.json", "lmtune-app.json", "model", "requirements.txt"]
    model_dir = out / "model"
    shards = list(model_dir.glob("*.safetensors"))
    assert len(shards) > 1 and (model_dir / "model.safetensors.index.json").is_file()  # sharded at 5MB
    assert not list(model_dir.glob("adapter_*")) and not list(model_dir.glob("*.bin"))
    assert (model_dir / "tokenizer.json").is_file() and (model_dir / "generation_config.json").is_file()
    cfg = json.loads((out / "app_config.json").read_text())
    assert cfg == {"title": "Tiny bot", "system": "You are Tiny.", "stop_words": ["<|im_end|>", "###"]}
    # merged weights give the same logits as base + adapter
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    merged = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert merged.dtype == torch.float32
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        a, b, c = merged(ids).logits, ref(ids).logits, base(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)
    reqs = (out / "requirements.txt").read_text().split()
    assert {r.split(">")[0].split("=")[0] for r in reqs} == {"torch", "transformers", "gradio", "safetensors",
                                                             "accelerate"}
    assert "python app.py" in (out / "README.md").read_text()
    app = (out / "app.py").read_text()
    assert "lmtune" not in app.replace("lmtune export app", "")  # standalone
    compile(app, "app.py", "exec")


def test_refuses_to_overwrite_a_foreign_folder(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not lose me")
    with pytest.raises(UserError, match=r"not empty \(1 entries: thesis.tex\) and is not a previous app bundle") as e:
        export_app(str(tiny_model), str(out))
    assert "--overwrite" in str(e.value)
    assert (out / "thesis.tex").read_text() == "do not lose me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]  # no temp leftovers
    export_app(str(tiny_model), str(out), overwrite=True)
    assert (out / "app.py").is_file() and not (out / "thesis.tex").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_cli_message_and_re_export_replaces_a_previous_export(tiny_model, tmp_path):  # noqa: F811
    out = tmp_path / "app"
    export_app(str(tiny_model), str(out), max_shard_size="5MB")
    assert len(list((out / "model").glob("model-*.safetensors"))) > 1
    p = subprocess.run([sys.executable, "-m", "lmtune.cli", "export", "app", str(tiny_model), str(out),
                        "--title", "Again"], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "replacing the previous app bundle" in p.stderr
    assert not list((out / "model").glob("model-*.safetensors"))  # the old shards went with the old export
    assert json.loads((out / "app_config.json").read_text())["title"] == "Again"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["app"]
    (out / ".venv").mkdir()  # the README's `python -m venv .venv`, made inside the bundle
    (out / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin")
    p = subprocess.run([sys.executable, "-m", "lmtune.cli", "export", "app", str(tiny_model), str(out)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "1 file(s) in it were not written by lmtune (.venv/pyvenv.cfg)" in p.stderr and "--overwrite" in p.stderr
    assert (out / ".venv" / "pyvenv.cfg").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    p = subprocess.run([sys.executable, "-m", "lmtune.cli", "export", "app", str(tiny_model), str(foreign)],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and "refusing to replace" in p.stderr and "Traceback" not in p.stderr
    assert str(foreign) in p.stderr and "--overwrite" in p.stderr and (foreign / "x").read_text() == "x"


def test_crash_mid_export_keeps_the_previous_bundle(tiny_model, tmp_path, monkeypatch):  # noqa: F811
    import lmtune.export.app as app

    out = tmp_path / "app"
    export_app(str(tiny_model), str(out), title="First")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def disk_full(tokenizer, folder):  # the weights are written, then the disk is full
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(app, "save_tokenizer", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_app(str(tiny_model), str(out), title="Second")
    assert {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app"]


def test_exported_app_runs_in_this_environment(tiny_model, tmp_path):  # noqa: F811
    """app.py starts from its own folder (no lmtune on the path) and answers through Gradio's API."""
    pytest.importorskip("gradio")
    out = export_app(str(tiny_model), str(tmp_path / "app"), title="Tiny bot")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    _run_app_and_chat([sys.executable, "app.py"], out, env, timeout=180)


@pytest.mark.slow
def test_exported_app_runs_in_a_fresh_venv(tiny_model, tmp_path):  # noqa: F811
    """Only requirements.txt (+ a local CPU torch wheel) in a clean venv: no lmtune, no site packages."""
    out = export_app(str(tiny_model), str(tmp_path / "app"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    wheel = sorted(Path(TORCH_WHEEL_DIR).glob("torch-*cpu*.whl"))
    torch_src = [str(wheel[-1])] if wheel else ["torch==2.13.0"]  # pip here finds the CPU build on disk
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    subprocess.run([py, "-m", "pip", "install", "-q", *torch_src], check=True, env=env, timeout=900)
    subprocess.run([py, "-m", "pip", "install", "-q", "-r", str(out / "requirements.txt")], check=True, env=env,
                   timeout=900)
    p = subprocess.run([py, "-c", "import lmtune"], capture_output=True, env=env, cwd=str(out))
    assert p.returncode != 0  # really without lmtune
    _run_app_and_chat([py, "app.py"], out, env, timeout=300)


def _run_app_and_chat(cmd, cwd, env, timeout):
    import httpx

    port = free_port()
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("app.py did not start")
        page = httpx.get(url + "/", timeout=10).text
        assert "<html" in page.lower()
        # Gradio's HTTP API: POST .../call/chat, then read the SSE result
        r = httpx.post(f"{url}/gradio_api/call/chat", json={"data": ["Hello!", "", 0.0, 1.0, 16]}, timeout=30)
        assert r.status_code == 200, r.text
        event_id = r.json()["event_id"]
        with httpx.stream("GET", f"{url}/gradio_api/call/chat/{event_id}", timeout=120) as s:
            body = "".join(s.iter_text())
        assert "event: complete" in body, body
        data = json.loads(body.split("event: complete")[1].split("data:", 1)[1].strip().splitlines()[0])
        assert isinstance(data[0], str) and data[0].strip(), body
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
