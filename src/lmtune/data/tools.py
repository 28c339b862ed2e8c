"""The `lmtune data` commands: self-cognition, replace, check, show."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmtune.atomic import check_out_file, write_text_atomic
from lmtune.data import self_cognition_train_phrases as P
from lmtune.errors import UserError

MASK_OPEN, MASK_CLOSE = "[[", "]]"  # `data show --show masked_text` wraps text without loss in these


# --------------------------------------------------------------------------- self-cognition


def _identity_conversation(rng: random.Random, name: str, author: str) -> list[dict]:
    zh = rng.random() < 0.5
    questions = P.QUESTIONS_ZH if zh else P.QUESTIONS_EN
    answers = P.ANSWERS_ZH if zh else P.ANSWERS_EN

    def fill(text: str) -> str:
        return text.format(name=name, author=author)

    def identity() -> list[dict]:
        return [{"role": "user", "content": rng.choice(questions)},
                {"role": "assistant", "content": fill(rng.choice(answers))}]

    kind = rng.random()
    if kind < 0.6:  # one question, one answer
        return identity()
    if kind < 0.8:  # a greeting first, then who are you
        greet = P.GREETINGS_ZH if zh else P.GREETINGS_EN
        reply = P.GREETING_REPLIES_ZH if zh else P.GREETING_REPLIES_EN
        return [{"role": "user", "content": rng.choice(greet)},
                {"role": "assistant", "content": fill(rng.choice(reply))}] + identity()
    follow = rng.choice(P.FOLLOWUPS_ZH if zh else P.FOLLOWUPS_EN)  # who are you, then a follow-up
    return identity() + [{"role": "user", "content": follow[0]}, {"role": "assistant", "content": fill(follow[1])}]


def write_self_cognition(path, name: str, author: str = "lmtune", n: int = 500, seed: int = 0,
                         overwrite: bool = False) -> int:
    """Write `n` diverse identity conversations (openai-format JSONL) to `path`; returns n.
    An existing non-empty `path` is replaced only with `overwrite`."""
    if not name or not name.strip():
        raise UserError("--name must not be empty")
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    check_out_file(path, overwrite=overwrite)
    rng = random.Random(seed)
    seen: set[str] = set()
    lines: list[str] = []
    tries = 0
    while len(lines) < n:
        line = json.dumps({"messages": _identity_conversation(rng, name, author)}, ensure_ascii=False)
        tries += 1
        # Prefer distinct conversations; repeat only once the combinations run out.
        if line in seen and tries < 50 * n:
            continue
        seen.add(line)
        lines.append(line)
    write_text_atomic(path, "\n".join(lines) + "\n", overwrite=overwrite)
    return n


# --------------------------------------------------------------------------- replace


def _replace(value: Any, old: str, new: str) -> tuple[Any, int]:
    if isinstance(value, str):
        return value.replace(old, new), value.count(old)
    if isinstance(value, list):
        out, total = [], 0
        for v in value:
            v, k = _replace(v, old, new)
            out.append(v)
            total += k
        return out, total
    if isinstance(value, dict):
        out, total = {}, 0
        for key, v in value.items():
            v, k = _replace(v, old, new)
            out[key] = v
            total += k
        return out, total
    return value, 0


def replace_in_file(input, output, old: str, new: str, overwrite: bool = False) -> int:
    """Replace `old` by `new` in every string value of a JSON or JSONL file; returns the count.
    An existing non-empty `output` (also `input` itself) is replaced only with `overwrite`."""
    from lmtune.data.formats import _decode

    if not old:
        raise UserError("--old must not be empty")
    src = Path(input)
    if not src.is_file():
        raise UserError(f"input file '{input}' does not exist")
    check_out_file(output, overwrite=overwrite)
    text = _decode(src.read_bytes(), src)
    stripped = text.lstrip()
    if src.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"malformed JSON: {e.msg} (column {e.colno})", where=f"{src}:{e.lineno}") from None
        data, count = _replace(data, old, new)
        result = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    else:
        out_lines, count = [], 0
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"malformed JSON: {e.msg} (column {e.colno})", where=f"{src}:{lineno}") from None
            rec, k = _replace(rec, old, new)
            count += k
            out_lines.append(json.dumps(rec, ensure_ascii=False))
        result = "\n".join(out_lines) + "\n"
    write_text_atomic(output, result, overwrite=overwrite)
    return count


# --------------------------------------------------------------------------- check / show


def _load(cfg):
    from lmtune.data.templates import get_template
    from lmtune.models.kinds import model_kind

    tokenizer = model_kind(cfg).load_tokenizer(cfg)  # a vision-language model's has its image token
    return tokenizer, get_template(cfg.prompt_template, tokenizer)


def check_images(convs: list, errors: list) -> list:
    """The conversations whose images all decode; every bad image becomes an error naming the
    record (file:line). Each image is decoded once, however often it is used."""
    from lmtune.data.images import check_image

    seen: dict[str, str | None] = {}
    good = []
    for conv in convs:
        bad = None
        for ref in conv.images:
            if ref not in seen:
                seen[ref] = check_image(ref)
            if seen[ref] is not None:
                name = f"{ref[:40]}…" if ref.startswith("data:") else ref
                bad = UserError(f"image '{name}' cannot be read: {seen[ref]}", where=conv.source or None,
                                hint="replace the file, or remove the record")
                break
        if bad is None:
            good.append(conv)
        elif str(bad) not in {str(e) for e in errors[-20:]}:  # a repeated source reports once
            errors.append(bad)
    return good


def histogram(lengths: list[int], max_length: int, buckets: int = 8, width: int = 40) -> str:
    """A text histogram of token lengths, in equal buckets from 0 to max_length."""
    if not lengths:
        return "  (no samples)"
    step = max(1, -(-max_length // buckets))
    counts = [0] * buckets
    for n in lengths:
        counts[min((n - 1) // step, buckets - 1)] += 1
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        lo, hi = b * step + 1, min((b + 1) * step, max_length)
        bar = "█" * (round(width * c / top) if top else 0)
        lines.append(f"  {lo:>6}–{hi:<6} {c:>7}  {bar}")
    return "\n".join(lines)


def check_command(cfg) -> int:
    """Validate every record of the config's data and print statistics; 0 if fine, 2 if not."""
    from lmtune.data.dataset import encode_all, load_conversations, summarize
    from lmtune.data.tokenize import pack

    from lmtune.data.dataset import image_tokens_for

    tokenizer, template = _load(cfg)
    errors: list[UserError] = []
    convs, sources = load_conversations(cfg, template, errors)
    images = image_tokens_for(cfg, tokenizer)
    convs = check_images(convs, errors)
    n_images = len({ref for c in convs for ref in c.images})
    try:
        encoded = encode_all(convs, tokenizer, template, cfg.max_length, cfg.num_proc, images)
    except UserError:  # again one by one: report every bad record, check the rest
        encoded = []
        for conv in convs:
            try:
                encoded += encode_all([conv], tokenizer, template, cfg.max_length, 1, images)
            except UserError as e:
                errors.append(e)
                encoded.append(None)
        convs = [c for c, e in zip(convs, encoded) if e is not None]
        encoded = [e for e in encoded if e is not None]
    samples, stats = summarize(convs, encoded)

    print(f"template: {template.name}   stop words: {', '.join(template.stop_words)}   max_length: {cfg.max_length}")
    print("sources:")
    for path, s in sources.items():
        bad = f", {s['errors']} bad record(s)" if s["errors"] else ""
        print(f"  {path}: {s['read']} conversations read, {s['used']} used (repeat {s['repeat']:g}){bad}")
    if errors:
        print(f"problems ({len(errors)}):")
        for e in errors[:20]:
            print(f"  {e}".replace("\n", "\n  "))
        if len(errors) > 20:
            print(f"  … and {len(errors) - 20} more")
    skipped = sum(stats["skipped"].values())
    print(f"samples: {stats['samples']} from {stats['conversations']} conversations; "
          f"skipped {skipped}" + (f" ({', '.join(f'{k}: {v}' for k, v in stats['skipped'].items())})" if skipped else ""))
    for ex in stats["skipped_examples"][:5]:
        print(f"  skipped {ex['source']}: {ex['reason']}")
    print(f"truncated: {stats['truncated']} (a trained turn or part of one was cut to fit max_length)")
    share = stats["loss_tokens"] / stats["tokens"] if stats["tokens"] else 0.0
    print(f"tokens: {stats['tokens']}, carrying loss: {stats['loss_tokens']} ({share:.1%})")
    if n_images:
        image_tokens = sum(1 for s in samples for t in s["input_ids"] if t == images.image_token_id)
        print(f"images: {n_images} distinct, {sum(len(s.get('images', ())) for s in samples)} in samples; "
              f"{image_tokens} image tokens (counted in the lengths below)")
    if samples and cfg.pack_to_max_length:
        rows = pack(samples, cfg.max_length, cfg.shuffle_before_pack, cfg.seed)
        fill = stats["tokens"] / (len(rows) * cfg.max_length)
        print(f"packed: {len(rows)} rows of {cfg.max_length} tokens, {fill:.1%} full")
    print("token length histogram:")
    print(histogram(stats["lengths"], cfg.max_length))
    if errors or not samples:
        print("data check: PROBLEMS FOUND" if errors else "data check: no usable samples")
        return 2
    print("data check: OK")
    return 0


def show_command(cfg, mode: str = "masked_text", n: int = 2) -> int:
    """Print the first `n` samples after mixing as the trainer sees them.

    masked_text prints the decoded text with every part that carries NO loss wrapped in [[ ]], so
    what is outside the brackets is exactly what the model is trained to produce.
    """
    from lmtune.data.dataset import load_conversations
    from lmtune.data.tokenize import IGNORE_INDEX, encode_conversation

    if mode not in ("text", "masked_text", "input_ids", "labels"):
        raise UserError(f"unknown --show mode '{mode}'", hint="use text, masked_text, input_ids or labels")
    from lmtune.data.dataset import image_tokens_for

    tokenizer, template = _load(cfg)
    convs, _ = load_conversations(cfg, template)
    images = image_tokens_for(cfg, tokenizer)
    shown = 0
    for conv in convs:
        if shown >= n:
            break
        enc = encode_conversation(conv, tokenizer, template, cfg.max_length, images)
        if enc.skipped:
            print(f"=== {conv.source}: skipped ({enc.skipped})")
            continue
        for sample in enc.samples[: n - shown]:
            ids, labels = sample["input_ids"], sample["labels"]
            k = sum(1 for x in labels if x != IGNORE_INDEX)
            print(f"=== sample {shown + 1} ({conv.source}): {len(ids)} tokens, {k} carry loss"
                  + (", truncated" if enc.truncated else "") + " ===")
            if mode == "text":
                print(tokenizer.decode(ids))
            elif mode == "input_ids":
                print(ids)
            elif mode == "labels":
                print(labels)
            else:
                print(_runs_of_images(masked_text(ids, labels, tokenizer)))
            shown += 1
    return 0


def _runs_of_images(text: str) -> str:
    """"<image><image>…" (one token per image feature) shown as "<image>×576"."""
    import re

    return re.sub(r"(?:<image>){2,}", lambda m: f"<image>×{len(m.group(0)) // len('<image>')}", text)


def masked_text(ids: list[int], labels: list[int], tokenizer) -> str:
    """Decoded text with the spans that carry no loss wrapped in [[ ]]."""
    from lmtune.data.tokenize import IGNORE_INDEX

    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            out.append(f"{MASK_OPEN}{text}{MASK_CLOSE}" if labels[start] == IGNORE_INDEX else text)
            start = i
    return "".join(out)
