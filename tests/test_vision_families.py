"""Existing vision-language models of several families through the one model kind: lmtune's packed
forward (two samples, three images of different sizes in one flat row) equals the family's own
transformers forward on each sample alone, its inputs made by its own processor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import shape_image

from lmtune.config import validate
from lmtune.data.conversation import Conversation, Message
from lmtune.data.templates import get_template
from lmtune.data.tokenize import encode_many, pack
from lmtune.models.kinds import model_kind
from lmtune.train.objectives import Forward, make_objective

PARTS_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
                  "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}IMG"
                  "{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _text_config(tok):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id)


def _tokenizer(special):
    from lmtune.models.loader import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    tok.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    return tok


def make_idefics3(out: Path) -> Path:
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    tok = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>"]
                     + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    cfg = Idefics3Config(text_config=_text_config(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=7), scale_factor=2)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(out)
    ip = getattr(transformers, "Idefics3ImageProcessorPil", transformers.Idefics3ImageProcessor)(
        size={"longest_edge": 56}, max_image_size={"longest_edge": 28}, do_image_splitting=True)
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4,
                      chat_template=PARTS_TEMPLATE.replace("IMG", "<image>")).save_pretrained(out)
    return out


def make_llava_next(out: Path) -> Path:
    import transformers
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    tok = _tokenizer(["<image>"])
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=7)
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    cfg = LlavaNextConfig(text_config=dict(model_type="llama", **_text_config(tok)), vision_config=vision,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                          vision_feature_layer=-1)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(out)
    ip = getattr(transformers, "LlavaNextImageProcessorPil", transformers.LlavaNextImageProcessor)(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
                       num_additional_image_tokens=1,
                       chat_template=PARTS_TEMPLATE.replace("IMG", "<image>")).save_pretrained(out)
    return out


FAMILIES = {"idefics3": make_idefics3, "llava_next": make_llava_next}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_forward_equals_the_family_forward(tmp_path, family):
    from transformers import AutoModelForImageTextToText

    folder = FAMILIES[family](tmp_path / family)
    images = [shape_image(tmp_path / "a.png", "red", size=(50, 30)), shape_image(tmp_path / "b.png", "blue"),
              shape_image(tmp_path / "c.png", "green", size=(30, 60))]
    cfg = validate({"model": str(folder), "prompt_template": "auto", "device": "cpu", "max_length": 1024})
    kind = model_kind(cfg)
    assert kind.name == "vision_language" and not kind.composed
    tok = kind.load_tokenizer(cfg)
    template = get_template("auto", tok)
    assert template.image_parts  # the family's template writes its own image placeholder
    model = kind.load(cfg, torch.device("cpu")).eval()
    convs = [Conversation([Message("user", "<image>\nWhat is it?"), Message("assistant", "A red square.")],
                          images=images[:1]),
             Conversation([Message("user", "<image>\nand <image>\nSame?"), Message("assistant", "No.")],
                          images=images[1:])]
    samples = [e.samples[0] for e in encode_many(convs, tok, template, 1024, images=kind.image_tokens(cfg, tok))]
    batch = make_objective(cfg, kind=kind).make_batch(pack(samples, 1024, shuffle=False))
    with torch.no_grad():
        packed = Forward(kind=kind)(model, batch).logits[0]

    reference = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = kind.processor(cfg)
    start = 0
    for conv, sample in zip(convs, samples):
        pics = [Image.open(p).convert("RGB") for p in conv.images]
        inputs = processor(text=template.render(conv.messages), images=[pics] if family == "idefics3" else pics,
                           add_special_tokens=False, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == sample["input_ids"]  # the processor's own expansion
        with torch.no_grad():
            expected = reference(**inputs).logits[0]
        n = len(sample["input_ids"])
        torch.testing.assert_close(packed[start:start + n], expected, rtol=0, atol=1e-5)
        start += n


def test_qwen2_vl_packed_rows_get_each_samples_3d_positions(tmp_path):
    """Qwen2-VL's rotary positions are 3-D around images. In a packed row each sample gets its own
    (text positions first, so attention stays in the sample); the packed forward equals the model's
    forward on each sample alone, where it computes the positions itself. (Its processor needs
    torchvision, absent here: the image-pad runs and pixel patches are made with its image
    processor directly.)"""
    import transformers
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from lmtune.models.vision import VisionLanguage
    from lmtune.train.batch import flat_batch

    tok = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                     "<|video_pad|>")}
    cfg = Qwen2VLConfig(
        text_config=dict(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, **_text_config(tok)),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    ip = getattr(transformers, "Qwen2VLImageProcessorPil", transformers.Qwen2VLImageProcessor)(
        min_pixels=56 * 56, max_pixels=112 * 112)
    pics = [Image.open(shape_image(tmp_path / f"{i}.png", c, size=s)).convert("RGB")
            for i, (c, s) in enumerate([("red", (60, 60)), ("blue", (112, 56)), ("green", (56, 84))])]

    def sample(text_parts, images):
        out = ip(images=images, return_tensors="pt")
        seq = []
        for k, part in enumerate(text_parts):
            seq += tok(part, add_special_tokens=False)["input_ids"]
            if k < len(images):
                n = int(out["image_grid_thw"][k].prod()) // 4
                seq += [ids["<|vision_start|>"]] + [ids["<|image_pad|>"]] * n + [ids["<|vision_end|>"]]
        return seq, out

    s1, o1 = sample(["<|im_start|>user\n", "What is it?<|im_end|>\n"], pics[:1])
    s2, o2 = sample(["<|im_start|>user\n", " and ", " same?<|im_end|>\n"], pics[1:])
    kind = VisionLanguage(validate({"model": "unused"}))
    kind.model = model
    batch = flat_batch([{"input_ids": s, "labels": s} for s in (s1, s2)])
    batch.update(pixel_values=torch.cat([o1["pixel_values"], o2["pixel_values"]]),
                 image_grid_thw=torch.cat([o1["image_grid_thw"], o2["image_grid_thw"]]))
    batch["position_ids"] = kind._mrope_positions(batch, batch["image_grid_thw"])
    assert batch["position_ids"].shape == (4, 1, len(s1) + len(s2))
    with torch.no_grad():
        packed = Forward(kind=kind)(model, batch).logits[0]
    start = 0
    for s, o in ((s1, o1), (s2, o2)):
        ids_t = torch.tensor([s])
        with torch.no_grad():
            model.model.rope_deltas = None
            expected = model(input_ids=ids_t, pixel_values=o["pixel_values"], image_grid_thw=o["image_grid_thw"],
                             mm_token_type_ids=(ids_t == ids["<|image_pad|>"]).int()).logits[0]
        torch.testing.assert_close(packed[start:start + len(s)], expected, rtol=0, atol=1e-5)
        start += len(s)
