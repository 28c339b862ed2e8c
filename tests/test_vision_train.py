"""Training a vision-language model: the projector-only stage, the finetune stage (LoRA on the LLM
and the tower, the projector whole), an existing VLM's adapter + merge, and the exported folders
loaded with plain transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tower, shape_image, write_jsonl

from lmtune.config import validate
from lmtune.train.loop import Trainer, run_training

COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def vt(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("vtrain")
    (root / "imgs").mkdir()
    records = []
    for i, c in enumerate(COLOURS * 2):
        shape = "square" if i < 4 else "circle"
        shape_image(root / "imgs" / f"{c}_{shape}.png", c, shape=shape)
        records.append({"image": f"{c}_{shape}.png", "conversations": [
            {"from": "human", "value": f"<image>\nWhat colour is the {shape}?"}, {"from": "gpt", "value": c}]})
    data = write_jsonl(root / "data.jsonl", records)
    return {"root": root, "llm": str(make_tiny_llama(root / "llm", smol_tokenizer)),
            "clip": str(make_tiny_tower(root / "clip")), "data": str(data),
            "image_folder": str(root / "imgs")}


def vcfg(vt, **kw):
    base = {"model": vt["llm"], "vision_tower": vt["clip"], "prompt_template": "chatml", "device": "cpu",
            "datasets": [vt["data"]], "image_folder": vt["image_folder"], "max_length": 256, "batch_size": 2,
            "accumulative_counts": 1, "max_steps": 3, "lr": 1e-2, "warmup_ratio": 0.0, "save_steps": 100,
            "mixed_precision": "no", "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
    return validate({**base, **kw})


def _weights(model) -> dict:
    from lmtune.models.vision import base_model

    return {k: v.detach().clone() for k, v in base_model(model).state_dict().items()}


def test_pretrain_stage_changes_only_the_projector(tmp_path, vt):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    cfg = vcfg(vt, vision_stage="pretrain")
    trainer = Trainer(cfg, tmp_path / "work")
    trainer.setup()
    before = _weights(trainer.model)
    trained = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trained and all(n.startswith("model.multi_modal_projector.") for n in trained)
    out = trainer.train()
    after = _weights(trainer.model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["model.multi_modal_projector.linear_1.bias", "model.multi_modal_projector.linear_1.weight",
                       "model.multi_modal_projector.linear_2.bias", "model.multi_modal_projector.linear_2.weight"]
    # The result is a whole LLaVA folder plain transformers loads, with the same weights.
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, after[k], rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == loaded.config.image_token_id
    meta = json.loads((Path(out) / "lmtune.json").read_text())
    assert meta["llava"] == {"llm": vt["llm"], "vision_tower": vt["clip"]}


def test_finetune_stage_lora_on_llm_and_tower_exports_the_merged_llava(tmp_path, vt):
    from transformers import LlavaForConditionalGeneration

    cfg = vcfg(vt, train_vision_tower="lora")
    trainer = Trainer(cfg, tmp_path / "work")
    trainer.setup()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any(".language_model." in n and "lora_A" in n for n in trained)
    assert any(".vision_tower." in n and "lora_A" in n for n in trained)
    assert any("multi_modal_projector.modules_to_save" in n for n in trained)
    assert all("lora_" in n or "multi_modal_projector" in n for n in trained)
    trainer.train()
    # The merged export computes what the trained adapter model computes.
    batch = trainer.objective.make_batch(trainer.rows[:2])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.forward(trainer.model, batch).logits
    merged = LlavaForConditionalGeneration.from_pretrained(tmp_path / "work" / "hf").eval()
    assert not (tmp_path / "work" / "hf" / "adapter_config.json").exists()
    with torch.no_grad():
        got = trainer.forward(merged, batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_existing_vlm_lora_adapter_then_merge(tmp_path, vt):
    """Stage two from stage one's folder (an existing LLaVA): the adapter (with the projector)
    and `lmtune convert merge` into a full folder, as for text."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lmtune.cli import main

    stage1 = run_training(vcfg(vt, vision_stage="pretrain", max_steps=1), tmp_path / "stage1")
    cfg = vcfg(vt, vision_tower=None, model=str(stage1), train_projector="full")
    trainer = Trainer(cfg, tmp_path / "stage2")
    trainer.setup()
    out = trainer.train()
    assert (out / "adapter_config.json").is_file()
    assert AutoProcessor.from_pretrained(out).image_processor is not None
    batch = trainer.objective.make_batch(trainer.rows[:2])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.forward(trainer.model, batch).logits
    assert main(["convert", "merge", str(stage1), str(out), str(tmp_path / "merged")]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_processor is not None
    with torch.no_grad():
        got = trainer.forward(merged, batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pth_to_hf_writes_the_same_merged_llava(tmp_path, vt):
    from safetensors.torch import load_file

    from lmtune.cli import main

    run_training(vcfg(vt, train_vision_tower="lora", max_steps=2), tmp_path / "work")
    assert main(["convert", "pth_to_hf", str(tmp_path / "work" / "iter_2"), str(tmp_path / "out")]) == 0
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    trained = load_file(str(tmp_path / "work" / "hf" / "model.safetensors"))
    assert ours.keys() == trained.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], trained[k], rtol=0, atol=1e-6)


def test_qlora_llava_merges_onto_the_full_precision_base(tmp_path, vt):
    """QLoRA trains against a 4-bit LLM; the exported LLaVA holds the *unquantized* LLM weights plus
    the LoRA update (XTuner cannot export from a quantized LLM at all)."""
    pytest.importorskip("bitsandbytes")  # an optional extra of lmtune, not part of it
    from safetensors.torch import load_file
    from transformers import LlavaForConditionalGeneration

    cfg = vcfg(vt, quantization="nf4", max_steps=2, lora_target_modules=["q_proj", "v_proj"])
    trainer = Trainer(cfg, tmp_path / "work")
    trainer.setup()
    out = trainer.train()
    lora = {n: p.detach().float() for n, p in trainer.model.named_parameters() if "lora_" in n}
    exported = LlavaForConditionalGeneration.from_pretrained(out).state_dict()
    base = load_file(str(Path(vt["llm"]) / "model.safetensors"))
    name = "layers.0.self_attn.q_proj"
    a = lora[f"base_model.model.model.language_model.{name}.lora_A.default.weight"]
    b = lora[f"base_model.model.model.language_model.{name}.lora_B.default.weight"]
    expected = base[f"model.{name}.weight"].float() + (cfg.lora_alpha / cfg.lora_r) * (b @ a)
    torch.testing.assert_close(exported[f"model.language_model.{name}.weight"].float(), expected,
                               rtol=0, atol=1e-6)
    assert not torch.equal(b, torch.zeros_like(b))  # the adapter did train


def test_bad_images_stop_training_clearly_and_keep_checkpoints(tmp_path, vt, capsys):
    from lmtune.cli import main
    from lmtune.errors import UserError
    from lmtune.train.checkpoint import verify_checkpoint

    data = write_jsonl(tmp_path / "d.jsonl", [
        {"image": str(tmp_path / "missing.png"), "conversations": [
            {"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]}])
    config = tmp_path / "cfg.py"
    config.write_text(f"model = {vt['llm']!r}\nvision_tower = {vt['clip']!r}\ndatasets = [{str(data)!r}]\n"
                      "prompt_template = 'chatml'\nmax_steps = 1\n")
    assert main(["train", str(config), "--work-dir", str(tmp_path / "w1")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1: image '{tmp_path / 'missing.png'}' does not exist" in err
    assert not list((tmp_path / "w1").glob("iter_*"))

    # An image that breaks after the data was built (header fine, pixels gone) stops the run at
    # its batch, naming it; the checkpoints already written stay whole.
    images = tmp_path / "imgs"
    shutil.copytree(vt["image_folder"], images)
    trainer = Trainer(vcfg(vt, image_folder=str(images), max_steps=4, save_steps=1), tmp_path / "w2")
    trainer.setup()
    trainer.step()
    first = trainer.save_checkpoint()
    for p in images.iterdir():
        p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(UserError) as e:
        trainer.step()
    assert "cannot be read: image file is truncated" in str(e.value) and "lmtune data check" in str(e.value)
    assert verify_checkpoint(first) is None
