"""Vision-language models: the LLaVA composition and its forward, against transformers' own.

Tiny random parts (a 2-layer Llama with the embedded tokenizer, a 2-layer CLIP or SigLIP tower on
30-pixel images) keep every test a few seconds on the CPU.
"""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from conftest import make_tiny_llama, make_tiny_tower, shape_image

from lmtune.config import validate
from lmtune.data.conversation import Conversation, Message
from lmtune.data.templates import get_template
from lmtune.data.tokenize import IGNORE_INDEX, encode_many, pack
from lmtune.models.kinds import model_kind
from lmtune.train.objectives import Forward, make_objective


@pytest.fixture(scope="module")
def parts(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("vision")
    llm = make_tiny_llama(root / "llm", smol_tokenizer)
    images = [shape_image(root / f"{c}.png", c) for c in ("red", "blue", "green")]
    return {"root": root, "llm": str(llm), "clip": str(make_tiny_tower(root / "clip")),
            "siglip": str(make_tiny_tower(root / "siglip", "siglip")), "images": images}


def llava_cfg(parts, tower="clip", **kw):
    return validate({"model": parts["llm"], "vision_tower": parts[tower], "prompt_template": "chatml",
                     "device": "cpu", "max_length": 512, **kw})


def two_conversations(images):
    return [
        Conversation([Message("user", "<image>\nWhat colour is the square?"), Message("assistant", "red")],
                     images=[images[0]]),
        Conversation([Message("user", "Compare <image> and <image>."), Message("assistant", "blue, then green")],
                     images=[images[1], images[2]]),
    ]


@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_packed_forward_equals_transformers_llava(parts, tower):
    """lmtune's packed forward (two samples, three images in one flat row) equals transformers'
    LlavaForConditionalGeneration on each sample alone, prompt built by its LlavaProcessor, on the
    same weights: the image features sit exactly at the image tokens."""
    from transformers import LlavaForConditionalGeneration

    cfg = llava_cfg(parts, tower)
    kind = model_kind(cfg)
    assert kind.name == "vision_language"
    tok = kind.load_tokenizer(cfg)
    model = kind.load(cfg, torch.device("cpu")).eval()
    template = get_template("chatml", tok)
    convs = two_conversations(parts["images"])
    encoded = encode_many(convs, tok, template, 512, images=kind.image_tokens(cfg, tok))
    samples = [e.samples[0] for e in encoded]
    batch = make_objective(cfg, kind=kind).make_batch(pack(samples, 512, shuffle=False))
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        packed = Forward(kind=kind)(model, batch).logits[0]

    reference = LlavaForConditionalGeneration(model.config).eval()
    reference.load_state_dict(model.state_dict())
    processor = kind.processor(cfg)
    start = 0
    for conv, sample in zip(convs, samples):
        images = [Image.open(p).convert("RGB") for p in conv.images]
        inputs = processor(text=template.render(conv.messages), images=images, add_special_tokens=False,
                           return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == sample["input_ids"]  # the same image token expansion
        with torch.no_grad():
            expected = reference(**inputs).logits[0]
        n = len(sample["input_ids"])
        torch.testing.assert_close(packed[start:start + n], expected, rtol=0, atol=1e-5)
        start += n


def test_image_features_replace_exactly_the_image_tokens(parts):
    """The embeddings the LLM receives are the projector's image features at the image-token
    positions (in order) and the token embeddings everywhere else."""
    cfg = llava_cfg(parts)
    kind = model_kind(cfg)
    tok = kind.load_tokenizer(cfg)
    model = kind.load(cfg, torch.device("cpu")).eval()
    convs = two_conversations(parts["images"])
    samples = [e.samples[0] for e in encode_many(convs, tok, get_template("chatml", tok), 512,
                                                  images=kind.image_tokens(cfg, tok))]
    batch = make_objective(cfg, kind=kind).make_batch(pack(samples, 512, shuffle=False))
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].detach().clone())

    hook = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        Forward(kind=kind)(model, batch)
        features = model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        features = torch.cat(list(features))
        tokens = model.get_input_embeddings()(batch["input_ids"])[0]
    hook.remove()
    ids = batch["input_ids"][0]
    at = ids == tok.convert_tokens_to_ids("<image>")
    assert int(at.sum()) == 3 * 25  # 25 patches per image, CLS dropped
    torch.testing.assert_close(seen["embeds"][0][at], features, rtol=0, atol=0)
    torch.testing.assert_close(seen["embeds"][0][~at], tokens[~at], rtol=0, atol=0)


def test_image_tokens_never_carry_loss_and_samples_keep_their_images(parts):
    cfg = llava_cfg(parts)
    kind = model_kind(cfg)
    tok = kind.load_tokenizer(cfg)
    images = kind.image_tokens(cfg, tok)
    enc = encode_many(two_conversations(parts["images"]), tok, get_template("chatml", tok), 512, images=images)
    for e, refs in zip(enc, ([parts["images"][0]], parts["images"][1:])):
        sample = e.samples[0]
        at = [i for i, t in enumerate(sample["input_ids"]) if t == images.image_token_id]
        assert len(at) == 25 * len(refs)
        assert all(sample["labels"][i] == IGNORE_INDEX for i in at)
        assert sample["images"] == refs
    rows = pack([e.samples[0] for e in enc], 512, shuffle=False)
    assert rows[0]["images"] == parts["images"]
