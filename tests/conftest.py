"""Shared fixtures: the embedded tokenizer and tiny random models built from a config (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


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


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path
