"""Shared fixtures: the embedded tokenizer and tiny random models built from a config (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.models.loader import cache_root

# The machine's cache as the test run starts: models are fetched and converted there once.
MACHINE_CACHE = cache_root()


def data_cache(root: Path) -> str:
    """A cache folder for one test's data stores that shares the machine's model cache: without the
    shared models every such test would fetch and convert the embedded model again (~15 s)."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("models", "downloads"):
        (MACHINE_CACHE / sub).mkdir(parents=True, exist_ok=True)
        if not (root / sub).exists():
            (root / sub).symlink_to(MACHINE_CACHE / sub, target_is_directory=True)
    return str(root)


@pytest.fixture(scope="session")
def smol_dir() -> str:
    """The embedded SmolLM2-135M-Instruct folder (fetched once per machine, then cached)."""
    from lmtune.models.loader import resolve_model_path

    return resolve_model_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from lmtune.models.loader import load_tokenizer

    return load_tokenizer(smol_dir)


def make_tiny_llama(out: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0, **overrides) -> Path:
    """A randomly initialised Llama with the given tokenizer, saved as a HF folder.
    `overrides` replace LlamaConfig fields (e.g. max_position_embeddings, initializer_range)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> str:
    return str(make_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smol_tokenizer))


def make_tiny_tower(out: Path, kind: str = "clip", seed: int = 0) -> Path:
    """A random CLIP (or SigLIP) vision tower on 30-pixel images (patch 6: 25 patches) + its image processor."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    torch.manual_seed(seed)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=30,
                 patch_size=6)
    if kind == "clip":
        CLIPVisionModel(CLIPVisionConfig(**sizes)).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(out)
    else:
        SiglipVisionModel(SiglipVisionConfig(**sizes)).save_pretrained(out)
        SiglipImageProcessor(size={"height": 30, "width": 30}).save_pretrained(out)
    return out


def shape_image(path: Path, colour: str, size=(40, 36), shape: str = "square") -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)([5, 5, 22, 22], fill=colour)
    img.save(path)
    return str(path)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def set_slider(page, elem_id: str, value: str, timeout: float = 20.0) -> None:
    """Set a Gradio slider in a Playwright page and wait until the value holds: a value set before
    the page's scripts have settled can be put back to the default, so set it again until it stays."""
    import time

    slider = page.locator(f"#{elem_id} input[type='range']")
    deadline = time.time() + timeout
    while time.time() < deadline:
        slider.fill(value)  # sets the range and fires its input/change events
        page.wait_for_timeout(500)
        if slider.input_value() == value:
            return
    raise AssertionError(f"slider #{elem_id} did not keep the value {value}")
