"""Row kinds: what a kind of training row stores in the token store and how it is read back.

    LM     next-token rows (SFT and continued pretraining): input_ids + labels, packable

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
from lmtune.data.tokenize import encode_many
from lmtune.errors import UserError

# Why a conversation gave no sample; the store keeps 1 + the index (0 = it gave samples).
SKIP_REASONS = ("prompt_too_long", "no_loss_tokens", "too_short")


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
    if cfg.objective == "pretrain" and not conv.is_pretrain:
        if template is None:
            raise UserError("objective 'pretrain' on chat data needs a template to render it")
        return Conversation(text=template.render(conv.messages), source=conv.source)
    if cfg.system and not conv.is_pretrain and conv.messages[0].role != "system":
        return Conversation([Message("system", cfg.system)] + conv.messages, source=conv.source)
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


def kind_for(cfg) -> RowKind:
    """The row kind a config trains on."""
    return LM
