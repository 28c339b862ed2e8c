"""Shared helpers for the serve tests: a tiny random Llama with the embedded tokenizer, a free
port, and a way to run `lmtune serve` / `lmtune web` in a subprocess. (No tests here.)"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}


def build_tiny_model(path: Path) -> Path:
    """A 2-layer, hidden-64 random Llama saved with SmolLM2's tokenizer (ChatML, eos <|im_end|>).
    A wide initialisation (0.5) makes its greedy outputs varied enough for stream tests."""
    if (path / "config.json").is_file():
        return path
    from transformers import GenerationConfig

    from conftest import make_tiny_llama
    from lmtune.models.loader import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    tmp = path.with_name(path.name + ".tmp")
    make_tiny_llama(tmp, tok, max_position_embeddings=1024, initializer_range=0.5)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id).save_pretrained(tmp)
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.getbasetemp() / "tiny-llama")


def make_adapter(base: Path, out: Path, seed: int, r: int = 4) -> Path:
    """A LoRA adapter on `base` with random (non-zero) weights: it changes the answers."""
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    peft_model = get_peft_model(model, cfg)
    peft_model.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, path: str = "/health", timeout: float = 120) -> subprocess.Popen:
    """Start `python -m lmtune.cli ARGS` and wait until http://127.0.0.1:PORT{path} answers."""
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "lmtune.cli", *args], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"server did not come up on port {port} in {timeout} s")


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""
