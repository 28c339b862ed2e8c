"""`lora_layers`: LoRA on some decoder layers only. The config checks the form; the model kind
resolves it against the model's layers (clear errors for a layer it lacks, or none picked); only
the picked layers get adapters and gradients; the saved adapter loads back with them."""

from __future__ import annotations

import re

import pytest
import torch

from conftest import make_tiny_llama, write_jsonl
from lmtune.config import lora_layer_indices, parse_lora_layers
from lmtune.errors import UserError
from lmtune.train.loop import Trainer, run_training
from test_train import _records
from test_train import make_cfg as _make_cfg


def make_cfg(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    return _make_cfg(tmp_path, model, data, **dict(dict(method="lora", lora_r=4, lora_alpha=8), **kw))


@pytest.mark.parametrize("spec, n, want", [("5:", 8, [5, 6, 7]), (":2", 8, [0, 1]), ("1:-1", 4, [1, 2]),
                                           (" 2 : 3 ", 8, [2]), ([3, 0, 3], 8, [0, 3]), (":", 3, [0, 1, 2])])
def test_specs_pick_these_layers(spec, n, want):
    assert lora_layer_indices(spec, n) == want


@pytest.mark.parametrize("spec, message", [("5", "not a slice"), ("a:b", "not a slice"), ([], "non-empty list"),
                                           ([1, -2], "non-empty list"), ([True], "non-empty list")])
def test_malformed_specs_are_refused_when_the_config_loads(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        parse_lora_layers(spec)
    path = tmp_path / "c.py"
    path.write_text(f"model = 'm'\nlora_layers = {spec!r}\n")
    with pytest.raises(UserError, match="lora_layers") as e:
        from lmtune.config import load_config
        load_config(str(path))
    assert f"{path}:2" in str(e.value)  # names the line


def test_the_key_needs_method_lora(tmp_path):
    from lmtune.config import load_config

    path = tmp_path / "c.py"
    path.write_text("model = 'm'\nmethod = 'full'\nlora_layers = '2:'\n")
    with pytest.raises(UserError, match="method is 'full'") as e:
        load_config(str(path))
    assert f"{path}:3" in str(e.value)


@pytest.mark.parametrize("spec, message", [([0, 7], "has 3 layers .* no layer 7"), ("5:", "picks none")])
def test_specs_the_model_cannot_meet_are_clear_errors(tmp_path, smol_tokenizer, spec, message):
    model = make_tiny_llama(tmp_path / "m", smol_tokenizer, layers=3)
    cfg = make_cfg(tmp_path, str(model), lora_layers=spec)
    with pytest.raises(UserError, match=message):
        Trainer(cfg, tmp_path / "w").setup(None)


def test_only_the_picked_layers_get_adapters_and_gradients_and_the_adapter_loads_back(tmp_path, smol_tokenizer):
    from lmtune.models.loader import load_model

    model = make_tiny_llama(tmp_path / "m", smol_tokenizer, layers=3)
    cfg = make_cfg(tmp_path, str(model), lora_layers="1:", max_steps=2, save_steps=2)
    trainer = Trainer(cfg, tmp_path / "w")
    trainer.setup(None)
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    layers = {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in lora}
    assert layers == {1, 2} and all(p.requires_grad for p in lora.values())
    # Every linear of layers 1-2 has its adapter (as "all-linear" gives on every layer without the key).
    assert len(lora) == 2 * 2 * 7  # 2 layers x (A, B) x 7 projections
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.step()
    moved = {n for n, p in lora.items() if not torch.equal(p, before[n])}
    assert {n for n in lora if "lora_B" in n} <= moved  # every adapter of the picked layers trained

    run_training(make_cfg(tmp_path, str(model), lora_layers="1:", max_steps=2, save_steps=2), tmp_path / "w2")
    loaded = load_model(str(tmp_path / "w2" / "hf"), dtype="float32")
    names = [n for n, _ in loaded.named_parameters() if "lora_" in n]
    assert names and {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in names} == {1, 2}


def test_vision_language_models_refuse_the_key(tmp_path):
    from lmtune.models.vision import VisionLanguage

    class Cfg:
        lora_layers = "1:"
        _source = "cfg.py"

    with pytest.raises(UserError, match="lora_layers applies to text models"):
        VisionLanguage.add_lora(VisionLanguage.__new__(VisionLanguage), None, Cfg())
