"""Conversation → input_ids + labels (the loss mask), packing, and collation.

The mask comes from the template's segments: the whole rendered string is tokenized once (so the
ids are exactly what the tokenizer gives for the text the model will see at chat time) and each
token's character span says which segment it came from. A token that overlaps a trained segment
carries loss; every other label is -100. labels[0] is always -100, so in a packed row no token is
ever trained to follow the previous sample.

Truncation works on whole turns: a conversation longer than max_length keeps the longest prefix
that ends right after a trained turn's end-of-turn token. When even the first trained reply does not
fit, its content is cut and its end-of-turn token(s) re-appended, so the model never learns to run
on. A conversation whose prompt alone leaves no room is skipped with reason "prompt_too_long".

Images (a vision-language model's `ImageTokens`, see data/images.py): each image token of the
tokenized text is replaced by the ids the model expands it into (one per image feature), before
truncation, so lengths and max_length count image tokens. They never carry loss. A sample keeps
the references of the images whose tokens it holds, in order ("images").
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from typing import Optional

from lmtune.data.conversation import Conversation, Message
from lmtune.data.images import IMAGE_PLACEHOLDER, ImageTokens
from lmtune.data.templates import ChatTemplate, Segment
from lmtune.errors import UserError

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """What encoding one conversation gave: samples (a long pretrain text gives several)."""

    samples: list = field(default_factory=list)
    skipped: Optional[str] = None  # reason, e.g. "prompt_too_long", when no sample was made
    truncated: bool = False  # a trained turn (or part of one) was dropped to fit max_length
    kept: int = 0  # how many leading tokens of the full encoding the (chat) sample holds


# --------------------------------------------------------------------------- chat


def _labels_from_spans(ids, spans, trained) -> list[int]:
    """Label each token whose character span overlaps one of the sorted `trained` intervals."""
    labels = [IGNORE_INDEX] * len(ids)
    j = 0
    for t, (s, e) in enumerate(spans):
        if e <= s:
            e = s + 1
        while j < len(trained) and trained[j][1] <= s:
            j += 1
        # Spans are non-decreasing but may overlap (bytes of one character); look ahead a little.
        k = j
        while k < len(trained) and trained[k][0] < e:
            if trained[k][1] > s:
                labels[t] = ids[t]
                break
            k += 1
    return labels


def _tokenize_segments(texts: list[str], segs_list: list[list[Segment]], tokenizer):
    """Token ids and per-token character spans for each rendered text."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(i), [tuple(o) for o in off]) for i, off in zip(enc["input_ids"], enc["offset_mapping"])]
    # Slow tokenizers have no offsets: tokenize segment by segment (each token spans its segment).
    out = []
    for segs in segs_list:
        ids, spans, pos = [], [], 0
        for s in segs:
            piece = tokenizer(s.text, add_special_tokens=False)["input_ids"]
            ids += piece
            spans += [(pos, pos + len(s.text))] * len(piece)
            pos += len(s.text)
        out.append((ids, spans))
    return out


def _finish(ids: list[int], labels: list[int], kept: int = -1) -> Encoded:
    if labels:
        labels[0] = IGNORE_INDEX
    if all(x == IGNORE_INDEX for x in labels):
        return Encoded(skipped="no_loss_tokens")
    return Encoded(samples=[{"input_ids": ids, "labels": labels}], kept=len(ids) if kept < 0 else kept)


def _expand_images(conv: Conversation, ids: list[int], spans: list, images: ImageTokens):
    """Replace each image token by the model's ids for that image. Returns the new ids and spans,
    and each image's [start, end) token range."""
    at = [i for i, t in enumerate(ids) if t == images.image_token_id]
    if len(at) != len(conv.images):
        raise UserError(
            f"the conversation has {len(conv.images)} image(s) but its rendered text has {len(at)} image "
            f"placeholder(s)", where=conv.source or None,
            hint=f"write exactly one {IMAGE_PLACEHOLDER} per image, and none in text without an image")
    if not at:
        return ids, spans, []
    new_ids, new_spans, ranges, prev = [], [], [], 0
    for k, ref in zip(at, conv.images):
        new_ids += ids[prev:k]
        new_spans += spans[prev:k]
        piece = images.ids_for(ref, conv.source)
        ranges.append((len(new_ids), len(new_ids) + len(piece)))
        new_ids += piece
        new_spans += [spans[k]] * len(piece)
        prev = k + 1
    return new_ids + ids[prev:], new_spans + spans[prev:], ranges


def _with_images(enc: Encoded, conv: Conversation, ranges: list) -> Encoded:
    """No loss on image tokens; the sample keeps the images it holds whole."""
    if not ranges or not enc.samples:
        return enc
    sample = enc.samples[0]
    labels = sample["labels"]
    for a, b in ranges:
        for i in range(a, min(b, enc.kept)):
            labels[i] = IGNORE_INDEX
    if any(a < enc.kept < b for a, b in ranges):  # an image cut in half: nothing sensible to train
        return Encoded(skipped="prompt_too_long")
    if all(x == IGNORE_INDEX for x in labels):
        return Encoded(skipped="no_loss_tokens")
    sample["images"] = [ref for (a, b), ref in zip(ranges, conv.images) if b <= enc.kept]
    return enc


def _encode_chat(segs: list[Segment], ids: list[int], spans: list, max_length: int) -> Encoded:
    # Character intervals of trained text, and of each trained message's end.
    trained, pos = [], 0
    turn_ends: dict[int, int] = {}  # message index → char end of its last trained segment
    bounds = []
    for s in segs:
        bounds.append((pos, pos + len(s.text)))
        if s.trains:
            if trained and trained[-1][1] == pos:
                trained[-1] = (trained[-1][0], pos + len(s.text))
            else:
                trained.append((pos, pos + len(s.text)))
            turn_ends[s.message] = pos + len(s.text)
        pos += len(s.text)
    labels = _labels_from_spans(ids, spans, trained)
    if len(ids) <= max_length:
        return _finish(ids, labels)

    starts = [s for s, _ in spans]
    cuts = sorted(bisect_left(starts, end) for end in turn_ends.values())
    fitting = [c for c in cuts if c <= max_length]
    if fitting:
        cut = fitting[-1]
        enc = _finish(ids[:cut], labels[:cut], cut)
        enc.truncated = any(x != IGNORE_INDEX for x in labels[cut:])
        return enc

    # Not even the first trained turn fits: cut its reply, keep its end-of-turn token(s).
    for seg, (b0, b1) in zip(segs, bounds):
        if seg.trains and seg.kind == "content":
            first = seg.message
            eot = [bb for ss, bb in zip(segs, bounds) if ss.message == first and ss.kind == "eot"]
            content_start = bisect_left(starts, b0)
            eot_a = bisect_left(starts, eot[0][0]) if eot else bisect_left(starts, b1)
            eot_b = bisect_left(starts, eot[-1][1]) if eot else eot_a
            room = max_length - content_start - (eot_b - eot_a)
            if room < 1 or content_start + room > eot_a:
                break
            keep = content_start + room
            enc = _finish(ids[:keep] + ids[eot_a:eot_b], labels[:keep] + labels[eot_a:eot_b], keep)
            enc.truncated = True
            return enc
        if seg.trains:  # a trained non-assistant message comes first: nothing sensible to cut
            break
    return Encoded(skipped="prompt_too_long")


# --------------------------------------------------------------------------- pretrain


def _encode_pretrain_ids(ids: list[int], eos_id: Optional[int], max_length: int) -> Encoded:
    """A document as samples of at most max_length tokens: a longer one is split, never dropped
    (each piece attends only within itself: its positions restart at 0 in a packed row)."""
    if eos_id is not None and (not ids or ids[-1] != eos_id):
        ids = ids + [eos_id]
    samples = []
    for i in range(0, len(ids), max_length):
        chunk = ids[i : i + max_length]
        if len(chunk) < 2:  # a lone trailing token has nothing to be predicted from
            continue
        labels = list(chunk)
        labels[0] = IGNORE_INDEX
        samples.append({"input_ids": chunk, "labels": labels})
    return Encoded(samples=samples, skipped=None if samples else "too_short")


# --------------------------------------------------------------------------- public


def _image_messages(conv: Conversation, template: ChatTemplate, images: Optional[ImageTokens]) -> list:
    """The messages with `<image>` written as the model's placeholder (unless the template renders
    image parts itself)."""
    if images is None:
        if conv.images:
            raise UserError(f"the conversation has {len(conv.images)} image(s), but the model does not see images",
                            where=conv.source or None,
                            hint="set vision_tower (compose a LLaVA) or use a vision-language model")
        return conv.messages
    if getattr(template, "image_parts", False) or images.placeholder == IMAGE_PLACEHOLDER:
        return conv.messages
    return [Message(m.role, m.content.replace(IMAGE_PLACEHOLDER, images.placeholder), m.loss)
            for m in conv.messages]


def _token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of plain texts with the tokenizer's own special tokens (e.g. a BOS): the fast
    backend's batch call without offsets where there is one (what `tokenizer(texts)` does, less
    the per-token Python objects), else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=True)]
    return tokenizer(texts, add_special_tokens=True)["input_ids"]


def encode_many(convs: list[Conversation], tokenizer, template: ChatTemplate, max_length: int,
                add_eos: bool = True, images: Optional[ImageTokens] = None) -> list[Encoded]:
    """Encode a batch of conversations (one batched call into the fast tokenizer).

    `add_eos`: end every plain (pretraining) text with the EOS token, so documents stay apart.
    `images`: the model's image tokens, for conversations with images (a vision-language model).
    """
    results: list[Optional[Encoded]] = [None] * len(convs)
    chat_idx, texts, segs_list = [], [], []
    pre_idx, pre_texts = [], []
    for i, conv in enumerate(convs):
        if conv.is_pretrain:
            pre_idx.append(i)
            pre_texts.append(conv.text)
        else:
            segs = template.segments(_image_messages(conv, template, images))
            chat_idx.append(i)
            segs_list.append(segs)
            texts.append("".join(s.text for s in segs))
    if chat_idx:
        for i, segs, (ids, spans) in zip(chat_idx, segs_list, _tokenize_segments(texts, segs_list, tokenizer)):
            ranges = []
            if images is not None:
                ids, spans, ranges = _expand_images(convs[i], ids, spans, images)
            results[i] = _with_images(_encode_chat(segs, ids, spans, max_length), convs[i], ranges)
    if pre_idx:
        # Plain text: the tokenizer's own special tokens (e.g. a BOS) + EOS; every token trains.
        eos = tokenizer.eos_token_id if add_eos else None
        for i, ids in zip(pre_idx, _token_ids(tokenizer, pre_texts)):
            results[i] = _encode_pretrain_ids(list(ids), eos, max_length)
    return results  # type: ignore[return-value]


def encode_conversation(conv: Conversation, tokenizer, template: ChatTemplate, max_length: int,
                        images: Optional[ImageTokens] = None) -> Encoded:
    return encode_many([conv], tokenizer, template, max_length, images=images)[0]


def encode(conv: Conversation, tokenizer, template: ChatTemplate, max_length: int) -> Optional[dict]:
    """{"input_ids", "labels"} for one conversation, or None when it must be skipped.

    A pretrain text longer than max_length gives several chunks; this returns the first (use
    `encode_conversation` for all of them).
    """
    enc = encode_conversation(conv, tokenizer, template, max_length)
    return enc.samples[0] if enc.samples else None


# --------------------------------------------------------------------------- packing


def pack(samples: list[dict], max_length: int, shuffle: bool = True, seed: int = 0) -> list[dict]:
    """Put several samples in each row (best fit), never splitting one, never over max_length.

    Each row has input_ids, labels, position_ids (restarting at 0 for every sample) and seq_lens;
    and "images" (in order) when its samples have any.
    """
    order = list(range(len(samples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in order:
        n = len(samples[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}")
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            insort(free, (room - n, b))
    rows = []
    for members in bins:
        row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            s = samples[i]
            n = len(s["input_ids"])
            row["input_ids"] += s["input_ids"]
            row["labels"] += s["labels"]
            row["position_ids"] += range(n)
            row["seq_lens"].append(n)
            if s.get("images"):
                row.setdefault("images", []).extend(s["images"])
        rows.append(row)
    return rows


def collate(rows: list[dict], pad_token_id: int):
    """Pad a batch of rows (right padding) into tensors.

    Unpacked rows: input_ids, labels (-100 on padding), position_ids, attention_mask.
    Packed rows (from `pack`, they carry position_ids): input_ids, labels, position_ids and NO
    attention_mask: transformers then finds the sample boundaries from the restarting position ids
    and builds a block-diagonal causal mask, so samples in a row never see each other. The model
    must be called with use_cache=False (a cache turns that detection off). Padding gets positions
    0, 1, 2, … of its own, so it forms a block of its own as well.
    """
    import torch

    if pad_token_id is None:
        pad_token_id = 0
    packed = all("position_ids" in r for r in rows)
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(r["labels"], dtype=torch.long)
        if packed:
            pos[b, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
            pos[b, n:] = torch.arange(width - n)
        else:
            pos[b, :n] = torch.arange(n)
            mask[b, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packed:
        batch["attention_mask"] = mask
    return batch
