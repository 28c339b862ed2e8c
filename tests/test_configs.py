"""Built-in configs: one preset table (configs/presets.py) that list-cfg, copy-cfg and train read."""

from __future__ import annotations

import pytest

from lmtune.cli import main
from lmtune.config import list_builtin, load_config
from lmtune.configs.presets import (DATA, METHODS, MODELS, PREFERENCE, VLM_DATA, VLM_METHODS, VLMS,
                                    preset_names, render)

SFT_PRESETS = [f"{m}_{meth}_{d}" for m in MODELS for meth in METHODS for d in DATA]
PREFERENCE_PRESETS = [(f"{m}_{meth}_{obj}_pairs", obj, meth) for m in MODELS for obj, (methods, *_) in PREFERENCE.items()
                      for meth in methods]


def test_every_model_method_data_combination_is_a_preset():
    vlm = [f"{m}_{meth}_{VLM_DATA}" for m in VLMS for meth in VLM_METHODS]
    assert sorted(SFT_PRESETS + [n for n, _, _ in PREFERENCE_PRESETS] + vlm) == preset_names()
    assert set(preset_names()) <= set(list_builtin())
    assert "smollm2_135m_lora_self_cognition" in list_builtin()  # hand-written files still listed


@pytest.mark.parametrize("name, objective, method", PREFERENCE_PRESETS)
def test_each_preference_preset_loads_with_its_objective(name, objective, method):
    cfg = load_config(name)
    assert cfg.objective == objective and cfg.method == ("full" if method == "full" else "lora")
    if objective == "dpo":  # no second model in memory: adapter-off reference, or precomputed for full FT
        assert cfg.precompute_reference == (method == "full")


@pytest.mark.parametrize("name", SFT_PRESETS)
def test_each_preset_loads_and_says_what_its_name_says(name):
    cfg = load_config(name)
    model, method, data = next((m, meth, d) for m in MODELS for meth in METHODS for d in DATA
                               if f"{m}_{meth}_{d}" == name)
    assert cfg.model == MODELS[model][0]
    assert cfg.method == METHODS[method]["method"] and cfg.quantization == METHODS[method]["quantization"]
    assert cfg.datasets[0]["format"] == DATA[data][1]
    assert cfg.prompt_template == "auto"  # instruct models: the tokenizer's own chat template


def test_copy_cfg_writes_the_preset_text_and_it_trains_the_same(tmp_path, capsys):
    name = "qwen2_5_1_5b_instruct_qlora_custom"
    assert main(["list-cfg", "-p", "qwen2_5_1_5b"]) == 0
    assert name in capsys.readouterr().out.split()
    assert main(["copy-cfg", name, str(tmp_path)]) == 0
    copied = tmp_path / f"{name}_copy.py"
    assert copied.read_text(encoding="utf-8") == render(name)
    a, b = load_config(name).to_dict(), load_config(str(copied)).to_dict()
    assert a == b


@pytest.mark.parametrize("name", [n for n in preset_names() if n.endswith(f"_{VLM_DATA}")])
def test_each_vision_language_preset_says_what_its_name_says(name):
    cfg = load_config(name)
    model, method = next((m, meth) for m in VLMS for meth in VLM_METHODS if f"{m}_{meth}_{VLM_DATA}" == name)
    assert cfg.model == VLMS[model][0] and cfg.method == "lora"
    assert cfg.quantization == ("nf4" if method == "qlora" else "none")
    assert cfg.datasets[0]["format"] == "sharegpt" and cfg.image_folder
    assert (cfg.train_vision_tower, cfg.train_projector) == ("frozen", "frozen")


@pytest.mark.parametrize("name", ["llava_internlm2_chat_1_8b_clip_vit_large_p14_336_pretrain",
                                  "llava_internlm2_chat_1_8b_clip_vit_large_p14_336_finetune",
                                  "llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_pretrain",
                                  "llava_qwen2_5_7b_instruct_siglip_so400m_p14_384_finetune"])
def test_llava_configs_compose_the_named_parts(name):
    cfg = load_config(name)
    assert cfg.vision_tower and cfg.vision_stage == name.rsplit("_", 1)[1]
    if cfg.vision_stage == "finetune":  # QLoRA on the LLM, LoRA on the tower, stage 1's projector
        assert cfg.quantization == "nf4" and cfg.train_vision_tower == "lora" and cfg.train_projector == "full"
        assert cfg.projector.endswith(name.replace("_finetune", "_pretrain"))
    assert name in list_builtin()


def test_xtuner_llava_names_resolve_to_the_llava_configs():
    for xtuner, ours in [("llava_internlm2_chat_1_8b_clip_vit_large_p14_336_e1_gpu8_pretrain", "pretrain"),
                         ("llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune", "finetune")]:
        cfg = load_config(xtuner)
        assert cfg._source == f"built-in:llava_internlm2_chat_1_8b_clip_vit_large_p14_336_{ours}" or \
            cfg._source.endswith(f"llava_internlm2_chat_1_8b_clip_vit_large_p14_336_{ours}.py")
        assert cfg.vision_stage == ours and cfg.max_epochs == 1
