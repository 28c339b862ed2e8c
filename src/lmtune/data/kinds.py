"""Row kinds: what a kind of training row stores in the token store and how it is read back.

    LM     next-token rows (SFT and continued pretraining): input_ids + labels, packable
    VLM    the same for a vision-language model, plus each sample's image references (their UTF-8
           bytes in an int32 field: the store keeps references, never pixels)

A kind names its fields (the store's schema, see store.py), encodes a chunk of conversations into
samples of those fields (tokenize.py's `Encoded`), gives each sample's length (for packing and
statistics), and turns the samples of one row back into the dict the objective's `make_batch`
takes. To add one (e.g. preference pairs): define a RowKind in its own module and return it from
`kind_for` below; the store, preparation, mixing, caching and lazy reading come with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from lmtune.data.conversation import Conversation, Message
from lmtune.data.tokenize import Encoded, encode_many
from lmtune.errors import UserError

# Why a conversation gave no sample; the store keeps 1 + the index (0 = it gave samples).
SKIP_REASONS = ("prompt_too_long", "no_loss_tokens", "too_short", "bad_image")


@dataclass(frozen=True)
class RowKind:
    name: str
    schema: dict  # field name -> "tokens" | "mask:<tokens field>" | "int32"
    encode: Callable  # (conversations, cfg, tokenizer, template) -> list[Encoded]
    make_row: Callable  # (samples: list[dict[str, np.ndarray]], packed: bool) -> row dict
    length_field: str = "input_ids"  # a sample's length (packing, statistics) is this field's


def prepare_conversation(conv: Conversation, cfg, template) -> Conversation:
    """What the config does to each conversation before encoding: pretraining renders chat records
    with the template (trained in full); SFT adds `cfg.system` where there is no system message."""
    if cfg.objective == "pretrain" and conv.images:
        raise UserError("objective 'pretrain' trains on plain text and cannot keep images", where=conv.source,
                        hint="use objective 'sft'; a LLaVA's projector pretraining is vision_stage = 'pretrain'")
    if cfg.objective == "pretrain" and not conv.is_pretrain:
        if template is None:
            raise UserError("objective 'pretrain' on chat data needs a template to render it")
        return Conversation(text=template.render(conv.messages), source=conv.source)
    if cfg.system and not conv.is_pretrain and conv.messages[0].role != "system":
        return Conversation([Message("system", cfg.system)] + conv.messages, source=conv.source, images=conv.images)
    return conv


def _encode_lm(convs, cfg, tokenizer, template):
    convs = [prepare_conversation(c, cfg, template) for c in convs]
    return encode_many(convs, tokenizer, template, cfg.max_length, add_eos=cfg.pretrain_add_eos)


def _lm_row(samples: list[dict], packed: bool) -> dict:
    """{"input_ids", "labels"}, and packed: "position_ids" restarting at 0 per sample and "seq_lens"."""
    if not packed:
        return {"input_ids": samples[0]["input_ids"].tolist(), "labels": samples[0]["labels"].tolist()}
    lens = [len(s["input_ids"]) for s in samples]
    return {"input_ids": np.concatenate([s["input_ids"] for s in samples]).tolist(),
            "labels": np.concatenate([s["labels"] for s in samples]).tolist(),
            "position_ids": np.concatenate([np.arange(n) for n in lens]).tolist(), "seq_lens": lens}


LM = RowKind("lm", {"input_ids": "tokens", "labels": "mask:input_ids"}, _encode_lm, _lm_row)


_IMAGE_TOKENS: dict = {}


def image_tokens(cfg, tokenizer):
    """The model's ImageTokens (data/images.py), once per config and tokenizer (and per process)."""
    from lmtune.models.kinds import model_kind

    key = (id(cfg), id(tokenizer))
    if key not in _IMAGE_TOKENS:
        _IMAGE_TOKENS.clear()
        _IMAGE_TOKENS[key] = model_kind(cfg).image_tokens(cfg, tokenizer)
    return _IMAGE_TOKENS[key]


def _refs_to_ints(refs: list[str]) -> list[int]:
    return list("\0".join(refs).encode("utf-8")) if refs else []


def _ints_to_refs(values) -> list[str]:
    data = bytes(np.asarray(values, dtype=np.uint8))
    return data.decode("utf-8").split("\0") if data else []


def _encode_vlm(convs, cfg, tokenizer, template):
    """As LM, the image tokens expanded; a conversation whose images cannot be tokenized (an
    unreadable header, a placeholder without an image) is skipped as "bad_image" (training stops on
    it with its file:line; `data check` lists it)."""
    images = image_tokens(cfg, tokenizer)
    convs = [prepare_conversation(c, cfg, template) for c in convs]
    try:
        encoded = encode_many(convs, tokenizer, template, cfg.max_length, add_eos=cfg.pretrain_add_eos, images=images)
    except UserError:
        encoded = []
        for c in convs:
            try:
                encoded += encode_many([c], tokenizer, template, cfg.max_length, images=images)
            except UserError:
                encoded.append(Encoded(skipped="bad_image"))
    for e in encoded:
        for sample in e.samples:
            sample["images"] = _refs_to_ints(sample.get("images", []))
    return encoded


def _vlm_row(samples: list[dict], packed: bool) -> dict:
    row = _lm_row(samples, packed)
    refs = [r for s in samples for r in _ints_to_refs(s["images"])]
    if refs:
        row["images"] = refs
    return row


VLM = RowKind("vlm", {"input_ids": "tokens", "labels": "mask:input_ids", "images": "int32"}, _encode_vlm, _vlm_row)


def kind_for(cfg) -> RowKind:
    """The row kind a config trains on: a vision-language model's rows keep their images."""
    from lmtune.models.kinds import model_kind

    return VLM if model_kind(cfg).name == "vision_language" else LM
