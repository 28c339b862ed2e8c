"""The `lmtune data` commands: self-cognition, replace, prepare, check, show."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from lmtune.atomic import check_out_file, write_text_atomic
from lmtune.data import self_cognition_train_phrases as P
from lmtune.data.report import (  # noqa: F401 (used by data show/check)
    MASK_CLOSE, MASK_OPEN, histogram, masked_text, print_sources_and_problems, skipped_text)
from lmtune.data.tokenize import IGNORE_INDEX
from lmtune.errors import UserError



# --------------------------------------------------------------------------- self-cognition


def _identity_conversation(rng: random.Random, name: str, author: str, chinese: float = 0.5) -> list[dict]:
    zh = rng.random() < chinese
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
                         overwrite: bool = False, chinese: float = 0.5) -> int:
    """Write `n` diverse identity conversations (openai-format JSONL) to `path`; returns n.
    `chinese`: the share of conversations in Chinese (the rest English).
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
        line = json.dumps({"messages": _identity_conversation(rng, name, author, chinese)}, ensure_ascii=False)
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


def check_images(cfg, errors: list) -> tuple[int, int]:
    """Decode every image the config's data names; each unreadable one becomes an error naming its
    record (file:line). Returns (distinct images, images named). Each image is decoded once."""
    from lmtune.data.images import check_image
    from lmtune.data.prepare import iter_source

    seen: dict[str, str | None] = {}
    named = 0
    for i, entry in enumerate(cfg.datasets):
        for conv in iter_source(entry, cfg.data_format, f"datasets[{i}]", errors=[]):  # (read errors: reported below)
            named += len(conv.images)
            for ref in conv.images:
                if ref not in seen:
                    seen[ref] = check_image(ref)
                if seen[ref] is not None:
                    name = f"{ref[:40]}…" if ref.startswith("data:") else ref
                    errors.append(UserError(f"image '{name}' cannot be read: {seen[ref]}", where=conv.source or None,
                                            hint="replace the file, or remove the record"))
                    break
    return len(seen), named


def prepare_command(cfg) -> int:
    """Build (or find) the token stores and rows of a config's data, ahead of training."""
    from lmtune.data import preference
    from lmtune.data.dataset import build_dataset

    tokenizer, template = _load(cfg)
    if preference.is_preference(cfg.objective):  # pairs are encoded and cached as training does
        data = preference.build_preference_dataset(cfg, tokenizer, template, True)
        print(f"data: {len(data.rows)} rows of preference pairs; cached at {data.stats.get('cache_path')}")
        return 0
    data = build_dataset(cfg, tokenizer, template, verify=True)  # an existing store is hashed in full
    st = data.stats
    print(f"data: {st['conversations']} conversations -> {st['samples']} samples, {st['tokens']} tokens "
          f"({st['loss_tokens']} carry loss) -> {st['rows']} rows"
          + (f" ({'packed' if data.packed else 'unpacked'}, max_length {cfg.max_length})"))
    if data.val_rows is not None:
        v = st["val"]
        print(f"validation: {v['conversations']} conversations, {v['tokens']} tokens, {v['rows']} rows")
    print(f"store: {st['cache_path']} ({'already prepared' if st['cache'] == 'hit' else 'prepared now'}); "
          "`lmtune train` with this config uses it as it is")
    return 0


def check_command(cfg) -> int:
    """Validate every record of the config's data and print statistics; 0 if fine, 2 if not.

    The data is encoded into token stores as for training (with bad records skipped and reported);
    stores of clean data go into the cache, so training reuses them."""
    from lmtune.data import preference
    from lmtune.data.dataset import build_dataset

    tokenizer, template = _load(cfg)
    if preference.is_preference(cfg.objective):
        return preference.check_command(cfg, tokenizer, template)
    errors: list[UserError] = []
    images = check_images(cfg, errors)
    data = build_dataset(cfg, tokenizer, template, errors=errors)
    stats, sources = data.stats, data.stats["sources"]

    print(f"template: {template.name}   stop words: {', '.join(template.stop_words)}   max_length: {cfg.max_length}")
    print_sources_and_problems(sources, errors, "conversations")
    print(f"samples: {stats['samples']} from {stats['conversations']} conversations; {skipped_text(stats['skipped'])}")
    for ex in stats["skipped_examples"][:5]:
        print(f"  skipped {ex['source']}: {ex['reason']}")
    print(f"truncated: {stats['truncated']} (a trained turn or part of one was cut to fit max_length)")
    share = stats["loss_tokens"] / stats["tokens"] if stats["tokens"] else 0.0
    print(f"tokens: {stats['tokens']}, carrying loss: {stats['loss_tokens']} ({share:.1%})")
    if images[1]:
        from lmtune.data.kinds import image_tokens

        image_id = image_tokens(cfg, tokenizer).image_token_id
        in_rows = [data.rows[i] for i in range(len(data.rows))]
        n_tokens = sum(sum(1 for t in r["input_ids"] if t == image_id) for r in in_rows)
        print(f"images: {images[0]} distinct, {sum(len(r.get('images', ())) for r in in_rows)} in samples; "
              f"{n_tokens} image tokens (counted in the lengths below)")
    if stats["samples"] and cfg.pack_to_max_length:
        fill = stats["tokens"] / (stats["rows"] * cfg.max_length)
        print(f"packed: {stats['rows']} rows of {cfg.max_length} tokens, {fill:.1%} full")
    if "val" in stats:
        v = stats["val"]
        print(f"validation: {v['conversations']} conversations, {v['samples']} samples, {v['tokens']} tokens")
    print("token length histogram:")
    print(histogram(data.sample_lengths(), cfg.max_length))
    if errors or not stats["samples"]:
        print("data check: PROBLEMS FOUND" if errors else "data check: no usable samples")
        return 2
    print("data check: OK")
    return 0


def _runs_of_images(text: str) -> str:
    """"<image><image>…" (one token per image feature) shown as "<image>×576"."""
    import re

    return re.sub(r"(?:<image>){2,}", lambda m: f"<image>×{len(m.group(0)) // len('<image>')}", text)


def show_command(cfg, mode: str = "masked_text", n: int = 2) -> int:
    """Print the first `n` samples in training order (before packing), as the trainer sees them.

    masked_text prints the decoded text with every part that carries NO loss wrapped in [[ ]], so
    what is outside the brackets is exactly what the model is trained to produce.
    """
    from lmtune.data.dataset import build_dataset

    if mode not in ("text", "masked_text", "input_ids", "labels"):
        raise UserError(f"unknown --show mode '{mode}'", hint="use text, masked_text, input_ids or labels")
    tokenizer, template = _load(cfg)
    from lmtune.data import preference

    if preference.is_preference(cfg.objective):
        return preference.show_command(cfg, tokenizer, template, mode, n)
    data = build_dataset(cfg, tokenizer, template)
    for shown, sample in enumerate(data.samples_in_order(n)):
        ids, labels = sample["input_ids"], sample["labels"]
        k = sum(1 for x in labels if x != IGNORE_INDEX)
        print(f"=== sample {shown + 1} ({sample['source']}): {len(ids)} tokens, {k} carry loss"
              + (", truncated" if sample["truncated"] else "") + " ===")
        if mode == "text":
            print(tokenizer.decode(ids))
        elif mode == "input_ids":
            print(ids)
        elif mode == "labels":
            print(labels)
        else:
            print(_runs_of_images(masked_text(ids, labels, tokenizer)))
    for ex in data.stats["skipped_examples"][:n]:
        print(f"=== {ex['source']}: skipped ({ex['reason']})")
    return 0

