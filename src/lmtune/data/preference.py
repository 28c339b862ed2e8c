"""Preference data: records -> `Preference` (prompt + chosen + rejected, or one labelled answer
for KTO) -> token sequences -> packed rows.

Formats (one small converter each; "auto" looks at the first record of each file):

  openai    {"prompt": [messages] | "text", "chosen": [messages] | "text", "rejected": ...}
            (TRL / XTuner 0.2); without "prompt", chosen and rejected are whole conversations and
            their common first messages are the prompt
  sharegpt  {"conversations": [{"from", "value"}...], "chosen": {"from": "gpt", "value": ...},
             "rejected": {...}, "system"?}                                   (LLaMA-Factory)
  alpaca    {"instruction", "input"?, "chosen", "rejected", "system"?, "history"?}
  kto       {"messages": [...], "label": true|false}  or  {"prompt", "completion", "label"}
            (one answer, desirable or not: KTO's unpaired data)

Encoding renders `prompt + answer` with the same template as SFT and splits it where the answer's
first trained token starts; the answer ends with its end-of-turn token. A sequence longer than
`max_length` first loses prompt tokens from the front (the prompt keeps at least half of
`max_length`, or all it has); an answer still too long is cut inside its content and keeps its
end-of-turn token(s), so the model is never taught to run on. Chosen and rejected share the same
prompt cut.

A row holds whole units, never split: a pair (chosen, then rejected) or, for KTO, one answer and
its KL sequence (the same prompt with another example's answer, for KTO's reference point).
Packed rows hold up to 2 x max_length tokens (any unit fits); `position_ids` restart at every
sequence and `seq_roles` says what each sequence is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from lmtune.data.conversation import ROLES, Message
from lmtune.data.formats import _SHAREGPT_ROLES, _text, list_files, read_records
from lmtune.data.templates import ChatTemplate
from lmtune.data.tokenize import IGNORE_INDEX, _labels_from_spans, _tokenize_segments
from lmtune.errors import UserError

PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo", "kto", "reward")
PAIRED_OBJECTIVES = ("dpo", "orpo", "simpo", "reward")
FORMATS = ("openai", "sharegpt", "alpaca", "kto")

# What each sequence of a row is (`seq_roles`). A pair is CHOSEN then REJECTED; a KTO unit is
# DESIRABLE or UNDESIRABLE, then its KL sequence.
CHOSEN, REJECTED, DESIRABLE, UNDESIRABLE, KL = 0, 1, 2, 3, 4
UNIT_HEADS = (CHOSEN, DESIRABLE, UNDESIRABLE)  # one per pair / per KTO example: what a step averages over

CACHE_VERSION = 1


def is_preference(objective: str) -> bool:
    return objective in PREFERENCE_OBJECTIVES


@dataclass
class Preference:
    prompt: list[Message]
    chosen: Optional[list[Message]]  # None: an undesirable-only KTO record
    rejected: Optional[list[Message]]  # None: a desirable-only KTO record
    source: str = ""


# --------------------------------------------------------------------------- converters


def _message_list(value, where: str, key: str, default_role: str) -> list[Message]:
    """A text, one message, or a list of messages (OpenAI `role`/`content` or ShareGPT `from`/`value`)."""
    if isinstance(value, str):
        return [Message(default_role, value)]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UserError(f"field '{key}' must be a text or a non-empty list of messages, got {value!r:.80}",
                        where=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UserError(f"{key}[{i}] must be an object with 'role' and 'content'", where=where)
        if "from" in m and "role" not in m:
            who = m.get("from")
            if who not in _SHAREGPT_ROLES:
                raise UserError(f"unknown role {who!r} in {key}[{i}].from", where=where,
                                hint="'from' must be one of human, gpt, system")
            out.append(Message(_SHAREGPT_ROLES[who], _text(m, "value", f"{where} ({key}[{i}])")))
            continue
        role = m.get("role")
        if role not in ROLES:
            raise UserError(f"unknown or missing role {role!r} in {key}[{i}].role", where=where,
                            hint=f"roles must be one of {', '.join(ROLES)}")
        out.append(Message(role, _text(m, "content", f"{where} ({key}[{i}])")))
    return out


def _prompt(msgs: list[Message], where: str) -> list[Message]:
    if not msgs:
        raise UserError("the prompt is empty", where=where)
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise UserError(f"prompt message {i} is a system message; only the first message may be one", where=where)
    if msgs[-1].role == "assistant":
        raise UserError("the prompt ends with an assistant message; the answers should continue it",
                        where=where, hint="put the assistant replies under 'chosen' / 'rejected'")
    # Earlier assistant turns of the prompt are context, never trained.
    return [Message(m.role, m.content, False) for m in msgs]


def _answer(msgs: Optional[list[Message]], where: str, name: str) -> Optional[list[Message]]:
    if msgs is None:
        return None
    if msgs[0].role != "assistant":
        raise UserError(f"the {name} answer must start with an assistant message, not {msgs[0].role!r}",
                        where=where)
    for m in msgs:
        if m.role == "system":
            raise UserError(f"the {name} answer holds a system message", where=where)
        if m.role == "assistant" and not m.content.strip():
            raise UserError(f"the {name} answer is empty", where=where, hint="remove the record or write the answer")
    # Only the assistant messages of an answer are scored (a user turn inside it is context).
    return [Message(m.role, m.content, m.role == "assistant") for m in msgs]


def _field(rec: dict, key: str, where: str):
    if rec.get(key) is None:
        raise UserError(f"missing required field '{key}'", where=where,
                        hint=f"the record has fields: {', '.join(rec) or '(none)'}")
    return rec[key]


def from_openai(rec: dict, where: str) -> Preference:
    chosen = _message_list(_field(rec, "chosen", where), where, "chosen", "assistant")
    rejected = _message_list(_field(rec, "rejected", where), where, "rejected", "assistant")
    if rec.get("prompt") is not None:
        prompt = _message_list(rec["prompt"], where, "prompt", "user")
    else:
        # Implicit prompt: chosen and rejected are whole conversations sharing their first messages.
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        while k > 0 and chosen[k - 1].role == "assistant":  # the answers start at an assistant turn
            k -= 1
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
        if not chosen or not rejected:
            raise UserError("chosen and rejected are the same conversation", where=where)
    return Preference(_prompt(prompt, where), _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected"),
                      where)


def from_sharegpt(rec: dict, where: str) -> Preference:
    prompt = _message_list(_field(rec, "conversations", where), where, "conversations", "user")
    system = _text(rec, "system", where, required=False)
    if system and prompt[0].role != "system":
        prompt = [Message("system", system)] + prompt
    chosen = _message_list(_field(rec, "chosen", where), where, "chosen", "assistant")
    rejected = _message_list(_field(rec, "rejected", where), where, "rejected", "assistant")
    return Preference(_prompt(prompt, where), _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected"),
                      where)


def from_alpaca(rec: dict, where: str) -> Preference:
    instruction = _text(rec, "instruction", where)
    extra = _text(rec, "input", where, required=False) or ""
    system = _text(rec, "system", where, required=False)
    msgs = [Message("system", system)] if system else []
    for i, pair in enumerate(rec.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"history[{i}] must be a [question, answer] pair of strings", where=where)
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    msgs.append(Message("user", f"{instruction}\n{extra}" if extra.strip() else instruction))
    chosen = [Message("assistant", _text(rec, "chosen", where))]
    rejected = [Message("assistant", _text(rec, "rejected", where))]
    return Preference(_prompt(msgs, where), _answer(chosen, where, "chosen"), _answer(rejected, where, "rejected"),
                      where)


def from_kto(rec: dict, where: str) -> Preference:
    label = _field(rec, "label", where)
    if not isinstance(label, bool):
        raise UserError(f"field 'label' must be true or false, got {label!r}", where=where)
    if rec.get("messages") is not None:
        msgs = _message_list(rec["messages"], where, "messages", "user")
        last = max((i for i, m in enumerate(msgs) if m.role == "assistant"), default=None)
        if last is None:
            raise UserError("the conversation has no assistant reply to label", where=where)
        prompt, answer = msgs[:last], msgs[last:]
    else:
        prompt = _message_list(_field(rec, "prompt", where), where, "prompt", "user")
        answer = _message_list(_field(rec, "completion", where), where, "completion", "assistant")
    answer = _answer(answer, where, "labelled")
    return Preference(_prompt(prompt, where), answer if label else None, None if label else answer, where)


CONVERTERS: dict[str, Callable[[dict, str], Preference]] = {
    "openai": from_openai, "sharegpt": from_sharegpt, "alpaca": from_alpaca, "kto": from_kto,
}


def detect_format(rec: dict, where: str) -> str:
    if "label" in rec and ("messages" in rec or "completion" in rec):
        return "kto"
    if "chosen" in rec or "rejected" in rec:
        if "conversations" in rec:
            return "sharegpt"
        if "instruction" in rec:
            return "alpaca"
        return "openai"
    hint = ("preference records have 'chosen' and 'rejected' (with 'prompt', 'conversations' or 'instruction'), "
            "or 'messages' + 'label' (KTO); see docs/preference.md")
    if "messages" in rec or "conversations" in rec or "output" in rec:
        hint = "this looks like supervised (SFT) data: " + hint
    raise UserError(f"not a preference record (fields: {', '.join(rec) or 'none'})", where=where, hint=hint)


def check_format(fmt: str, where: str | None = None) -> str:
    if fmt != "auto" and fmt not in CONVERTERS:
        raise UserError(f"unknown preference data format '{fmt}'", where=where,
                        hint=f"use one of auto, {', '.join(FORMATS)}")
    return fmt


def iter_preferences(path, fmt: str = "auto", errors: Optional[list] = None) -> Iterator[Preference]:
    """The preference records of a file or folder; with `errors`, bad records are collected there."""
    check_format(fmt)
    for file in list_files(path):
        this = None if fmt == "auto" else fmt
        records = read_records(file)
        while True:
            try:
                rec, where = next(records)
            except StopIteration:
                break
            except UserError as e:
                if errors is None:
                    raise
                errors.append(e)
                break
            try:
                if this is None:
                    this = detect_format(rec, where)
                yield CONVERTERS[this](rec, where)
            except UserError as e:
                if errors is None:
                    raise
                errors.append(e)


def load_preferences(cfg, errors: Optional[list] = None) -> tuple[list[Preference], dict]:
    """Read, mix (repeat / weight), add cfg.system, shuffle and cap every source of cfg.datasets."""
    from lmtune.data.dataset import _factor, _repeat

    where = cfg._source or "config"
    if not cfg.datasets:
        raise UserError("no training data: the 'datasets' key is empty", where=where,
                        hint="set datasets = ['path/to/pairs.jsonl'] in the config")
    mixed, sources = [], {}
    for i, entry in enumerate(cfg.datasets):
        path = entry["path"]
        fmt = entry.get("format") or cfg.data_format
        if fmt in ("openai", "sharegpt", "alpaca", "kto", "auto"):
            check_format(fmt, where=f"{where} (datasets[{i}].format)")
        else:
            raise UserError(f"datasets[{i}].format '{fmt}' is not a preference format (objective "
                            f"'{cfg.objective}')", where=where, hint=f"use one of auto, {', '.join(FORMATS)}")
        factor = _factor(entry, i, where)
        n_errors = len(errors) if errors is not None else 0
        try:
            prefs = list(iter_preferences(path, fmt, errors))
        except UserError as e:
            if errors is None:
                raise
            errors.append(e)
            prefs = []
        if not prefs and (errors is None or len(errors) == n_errors):
            raise UserError(f"the dataset '{path}' holds no records", where=str(path))
        used = _repeat(prefs, factor, cfg.seed + i)
        sources[str(path)] = {"read": len(prefs), "used": len(used), "repeat": factor,
                              "errors": (len(errors) - n_errors) if errors is not None else 0}
        mixed += used
    out = []
    for p in mixed:
        if cfg.system and p.prompt[0].role != "system":
            p = Preference([Message("system", cfg.system, False)] + p.prompt, p.chosen, p.rejected, p.source)
        out.append(p)
    random.Random(cfg.seed).shuffle(out)
    if cfg.max_dataset_samples:
        out = out[: cfg.max_dataset_samples]
    return out, sources


# --------------------------------------------------------------------------- encoding


@dataclass
class Answer:
    ids: list  # the answer's tokens, through its end-of-turn token(s)
    labels: list
    n_eot: int  # trailing tokens that are the end of turn (kept when the answer is cut)
    prompt: Optional[list] = None  # its own prompt ids, where the tokenizer split it differently


@dataclass
class EncodedPreference:
    prompt: list = field(default_factory=list)  # prompt token ids (up to and with the assistant header)
    chosen: Optional[Answer] = None
    rejected: Optional[Answer] = None
    skipped: Optional[str] = None
    source: str = ""


def _split(segs, ids, spans, n_prompt_msgs: int) -> tuple[list, Answer]:
    """Token ids of `prompt + answer` rendered together -> (prompt ids, the answer)."""
    trained, pos, last_eot = [], 0, None
    for s in segs:
        end = pos + len(s.text)
        if s.trains and s.message >= n_prompt_msgs:
            if trained and trained[-1][1] == pos:
                trained[-1] = (trained[-1][0], end)
            else:
                trained.append((pos, end))
            if s.kind == "eot":
                last_eot = (pos, end)
        pos = end
    labels = _labels_from_spans(ids, spans, trained)
    marked = [i for i, x in enumerate(labels) if x != IGNORE_INDEX]
    a, b = marked[0], marked[-1] + 1
    n_eot = 0
    if last_eot is not None:
        n_eot = sum(1 for s, e in spans[a:b] if e > last_eot[0] and s < last_eot[1])
    return ids[:a], Answer(ids[a:b], labels[a:b], n_eot)


def encode_preferences(prefs: list[Preference], tokenizer, template: ChatTemplate) -> list[EncodedPreference]:
    """Tokenize every answer with its prompt (one batched tokenizer call); no truncation yet."""
    jobs, texts, segs_list = [], [], []
    for i, p in enumerate(prefs):
        for which in ("chosen", "rejected"):
            answer = getattr(p, which)
            if answer is None:
                continue
            segs = template.segments(p.prompt + answer)
            jobs.append((i, which))
            segs_list.append(segs)
            texts.append("".join(s.text for s in segs))
    out = [EncodedPreference(source=p.source) for p in prefs]
    for (i, which), segs, (ids, spans) in zip(jobs, segs_list, _tokenize_segments(texts, segs_list, tokenizer)):
        prompt, answer = _split(segs, ids, spans, len(prefs[i].prompt))
        enc = out[i]
        if enc.prompt and enc.prompt != prompt:
            answer.prompt = prompt  # a tokenizer merged across the boundary differently: keep its own
        enc.prompt = enc.prompt or prompt
        setattr(enc, which, answer)
    for p, enc in zip(prefs, out):
        if p.chosen is not None and p.rejected is not None and enc.chosen.ids == enc.rejected.ids:
            enc.skipped = "identical_answers"
    return out


def _prompt_of(enc: EncodedPreference, answer: Answer) -> list:
    return answer.prompt if answer.prompt is not None else enc.prompt


def fit(prompt: list, answers: list[Answer], max_length: int) -> tuple[list, list[tuple[list, list]], dict]:
    """Cut a prompt and its answers to max_length tokens per sequence (see the module doc).
    Returns the prompt, each answer's (ids, labels) and what was cut."""
    longest = max(len(a.ids) for a in answers)
    cut = {"prompt": 0, "answer": 0}
    if len(prompt) + longest <= max_length:
        return prompt, [(a.ids, a.labels) for a in answers], cut
    keep = min(len(prompt), max(max_length - longest, max_length // 2))
    cut["prompt"] = len(prompt) - keep
    prompt = prompt[len(prompt) - keep:]
    room = max_length - keep
    out = []
    for a in answers:
        if len(a.ids) <= room:
            out.append((a.ids, a.labels))
            continue
        cut["answer"] += 1
        head = room - a.n_eot
        out.append((a.ids[:head] + a.ids[len(a.ids) - a.n_eot:], a.labels[:head] + a.labels[len(a.labels) - a.n_eot:]))
    return prompt, out, cut


def _sequence(prompt: list, ids: list, labels: list, role: int) -> dict:
    return {"input_ids": prompt + ids, "labels": [IGNORE_INDEX] * len(prompt) + labels, "role": role}


def make_units(encoded: list[EncodedPreference], objective: str, max_length: int, seed: int = 0
               ) -> tuple[list[list[dict]], dict]:
    """Sequences grouped in units (a pair; or a KTO answer and its KL sequence), and statistics."""
    paired = objective in PAIRED_OBJECTIVES
    stats = {"records": len(encoded), "units": 0, "skipped": {}, "skipped_examples": [], "prompt_cut": 0,
             "answer_cut": 0, "prompt_lengths": [], "chosen_lengths": [], "rejected_lengths": []}

    def skip(enc, reason):
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        if len(stats["skipped_examples"]) < 20:
            stats["skipped_examples"].append({"source": enc.source, "reason": reason})

    units: list[list[dict]] = []
    kto_examples = []  # (prompt, answer, role) before the KL sequences are attached
    for enc in encoded:
        if enc.skipped:
            skip(enc, enc.skipped)
            continue
        have = [a for a in (enc.chosen, enc.rejected) if a is not None]
        if paired and len(have) != 2:
            skip(enc, "not_a_pair")
            continue
        stats["prompt_lengths"].append(len(enc.prompt))
        if enc.chosen is not None:
            stats["chosen_lengths"].append(len(enc.chosen.ids))
        if enc.rejected is not None:
            stats["rejected_lengths"].append(len(enc.rejected.ids))
        if paired and _prompt_of(enc, enc.chosen) == _prompt_of(enc, enc.rejected):
            prompt, fitted, cut = fit(enc.prompt, have, max_length)
            seqs = [_sequence(prompt, *fitted[0], CHOSEN), _sequence(prompt, *fitted[1], REJECTED)]
        else:
            seqs, cut = [], {"prompt": 0, "answer": 0}
            for a, role in ((enc.chosen, CHOSEN if paired else DESIRABLE),
                            (enc.rejected, REJECTED if paired else UNDESIRABLE)):
                if a is None:
                    continue
                prompt, fitted, c = fit(_prompt_of(enc, a), [a], max_length)
                seqs.append(_sequence(prompt, *fitted[0], role))
                cut = {k: cut[k] + c[k] for k in cut}
        stats["prompt_cut"] += bool(cut["prompt"])
        stats["answer_cut"] += cut["answer"]
        if paired:
            units.append(seqs)
        else:
            for a, s in zip(have, seqs):
                kto_examples.append((_prompt_of(enc, a), a, s))
    if not paired and kto_examples:
        # KTO's reference point: each example's prompt with another example's answer (a fixed
        # derangement of a seeded shuffle), scored in the same micro-batch.
        order = list(range(len(kto_examples)))
        random.Random(seed + 1).shuffle(order)
        partner = {order[k]: order[(k + 1) % len(order)] for k in range(len(order))}
        for i, (prompt, _, seq) in enumerate(kto_examples):
            other = kto_examples[partner[i]][1]
            kp, fitted, _ = fit(prompt, [other], max_length)
            units.append([seq, _sequence(kp, *fitted[0], KL)])
    stats["units"] = len(units)
    return units, stats


def pack_units(units: list[list[dict]], capacity: int, shuffle: bool = True, seed: int = 0) -> list[dict]:
    """Best-fit whole units into rows of at most `capacity` tokens (a unit is never split)."""
    order = list(range(len(units)))
    if shuffle:
        random.Random(seed).shuffle(order)
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin)
    for i in order:
        n = sum(len(s["input_ids"]) for s in units[i])
        k = bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
        else:
            room, b = max(capacity, n), len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            insort(free, (room - n, b))
    return [unit_row([s for i in members for s in units[i]]) for members in bins]


def unit_row(seqs: list[dict]) -> dict:
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": [], "seq_roles": []}
    for s in seqs:
        n = len(s["input_ids"])
        row["input_ids"] += s["input_ids"]
        row["labels"] += s["labels"]
        row["position_ids"] += range(n)
        row["seq_lens"].append(n)
        row["seq_roles"].append(s["role"])
    return row


# --------------------------------------------------------------------------- cache and entry point


def _save(path: Path, rows: list[dict], stats: dict, packed: bool) -> None:
    import numpy as np

    arrays = {
        "input_ids": np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int32),
        "labels": np.fromiter((t for r in rows for t in r["labels"]), dtype=np.int32),
        "seq_lens": np.fromiter((n for r in rows for n in r["seq_lens"]), dtype=np.int32),
        "seq_roles": np.fromiter((x for r in rows for x in r["seq_roles"]), dtype=np.int8),
        "row_seqs": np.array([len(r["seq_lens"]) for r in rows], dtype=np.int64),
        "meta": np.frombuffer(json.dumps({"stats": stats, "packed": packed, "v": CACHE_VERSION}).encode(),
                              dtype=np.uint8),
    }
    write_npz(path, arrays)


def write_npz(path: Path, arrays: dict) -> None:
    """np.savez to a temporary file in the same folder, then rename: never a half-written file."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path):
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        if meta.get("v") != CACHE_VERSION:
            raise ValueError("old cache layout")
        ids, labels = z["input_ids"].tolist(), z["labels"].tolist()
        seq_lens, roles, row_seqs = z["seq_lens"].tolist(), z["seq_roles"].tolist(), z["row_seqs"].tolist()
    rows, a, s = [], 0, 0
    for k in row_seqs:
        lens = seq_lens[s:s + k]
        n = sum(lens)
        rows.append({"input_ids": ids[a:a + n], "labels": labels[a:a + n],
                     "position_ids": [p for m in lens for p in range(m)], "seq_lens": lens,
                     "seq_roles": roles[s:s + k]})
        a += n
        s += k
    return rows, meta["stats"], meta["packed"]


def summarize_lengths(stats: dict) -> dict:
    """The cached statistics keep counts, not one number per record."""
    out = {k: v for k, v in stats.items() if not k.endswith("_lengths")}
    for k in ("prompt_lengths", "chosen_lengths", "rejected_lengths"):
        xs = stats.get(k) or []
        out[k.replace("_lengths", "_tokens")] = {"mean": round(sum(xs) / len(xs), 1) if xs else 0,
                                                 "max": max(xs) if xs else 0}
    return out


def build_preference_dataset(cfg, tokenizer, template: ChatTemplate, use_cache: bool = True):
    """The rows to train a preference objective on (see the module doc), cached on disk."""
    from lmtune.data.dataset import TrainData, cache_dir, cache_key

    path = None
    if use_cache:
        key = hashlib.sha256(f"{cache_key(cfg, tokenizer, template)}|pref{CACHE_VERSION}".encode()).hexdigest()[:32]
        path = cache_dir() / f"{key}.pref.npz"
        if path.is_file():
            try:
                rows, stats, packed = _load(path)
                stats.update(cache="hit", cache_path=str(path))
                return TrainData(rows=rows, stats=stats, packed=packed)
            except Exception:  # a damaged or old cache file is rebuilt, never trusted
                path.unlink(missing_ok=True)
    prefs, sources = load_preferences(cfg)
    units, stats = make_units(encode_preferences(prefs, tokenizer, template), cfg.objective, cfg.max_length, cfg.seed)
    if not units:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
        raise UserError(f"no usable preference records: all {len(prefs)} were skipped ({reasons})",
                        where=cfg._source or "config", hint="check the data with `lmtune data check CONFIG`")
    packed = bool(cfg.pack_to_max_length)
    if packed:
        rows = pack_units(units, 2 * cfg.max_length, cfg.shuffle_before_pack, cfg.seed)
    else:
        rows = [unit_row(u) for u in units]
    stats = summarize_lengths(stats)
    stats.update(sources=sources, rows=len(rows), tokens=sum(len(r["input_ids"]) for r in rows))
    if path is not None:
        _save(path, rows, stats, packed)
        stats.update(cache="miss", cache_path=str(path))
    return TrainData(rows=rows, stats=stats, packed=packed)


# --------------------------------------------------------------------------- data check


def check_command(cfg, tokenizer, template) -> int:
    """`lmtune data check` for preference data: records, pairs, lengths, cuts, skipped (file:line)."""
    from lmtune.data.report import histogram, print_sources_and_problems, skipped_text

    errors: list[UserError] = []
    prefs, sources = load_preferences(cfg, errors)
    encoded = encode_preferences(prefs, tokenizer, template)
    units, stats = make_units(encoded, cfg.objective, cfg.max_length, cfg.seed)
    unit = "pairs" if cfg.objective in PAIRED_OBJECTIVES else "examples"
    print(f"objective: {cfg.objective}   template: {template.name}   max_length: {cfg.max_length} per sequence")
    print_sources_and_problems(sources, errors, "records")
    n_pairs = sum(1 for p in prefs if p.chosen is not None and p.rejected is not None)
    print(f"records: {len(prefs)} ({n_pairs} pairs, {len(prefs) - n_pairs} single labelled answers)")
    print(f"{unit}: {stats['units']}; {skipped_text(stats['skipped'])}")
    for ex in stats["skipped_examples"][:10]:
        print(f"  skipped {ex['source']}: {ex['reason'].replace('_', ' ')}")
    print(f"truncated: {stats['prompt_cut']} prompt(s) cut from the front, {stats['answer_cut']} answer(s) cut "
          "(each keeps its end-of-turn token)")
    for name in ("prompt", "chosen", "rejected"):
        xs = stats[f"{name}_lengths"]
        if xs:
            xs = sorted(xs)
            print(f"{name} tokens: mean {sum(xs) / len(xs):.1f}, median {xs[len(xs) // 2]}, max {xs[-1]}")
    seqs = [len(s["input_ids"]) for u in units for s in u]
    if units and cfg.pack_to_max_length:
        rows = pack_units(units, 2 * cfg.max_length, cfg.shuffle_before_pack, cfg.seed)
        fill = sum(seqs) / (len(rows) * 2 * cfg.max_length)
        print(f"packed: {len(rows)} rows of up to {2 * cfg.max_length} tokens, {fill:.1%} full")
    print("sequence length histogram (prompt + answer):")
    print(histogram(seqs, cfg.max_length))
    if errors or not units:
        print("data check: PROBLEMS FOUND" if errors else "data check: no usable records")
        return 2
    print("data check: OK")
    return 0


def show_command(cfg, tokenizer, template, mode: str = "masked_text", n: int = 2) -> int:
    """`lmtune data show` for preference data: the first `n` units' sequences as the trainer sees them."""
    from lmtune.data.report import masked_text

    prefs, _ = load_preferences(cfg)
    encoded = encode_preferences(prefs[:n], tokenizer, template)
    names = {CHOSEN: "chosen", REJECTED: "rejected", DESIRABLE: "desirable", UNDESIRABLE: "undesirable", KL: "KL"}
    for enc in encoded:
        units, stats = make_units([enc], cfg.objective, cfg.max_length, cfg.seed)
        if not units:
            print(f"=== {enc.source}: skipped ({', '.join(stats['skipped'])})")
            continue
        for seq in units[0]:
            ids, labels = seq["input_ids"], seq["labels"]
            k = sum(1 for x in labels if x != IGNORE_INDEX)
            print(f"=== {enc.source} {names[seq['role']]}: {len(ids)} tokens, {k} scored ===")
            if mode == "text":
                print(tokenizer.decode(ids))
            elif mode == "input_ids":
                print(ids)
            elif mode == "labels":
                print(labels)
            else:
                print(masked_text(ids, labels, tokenizer))
    return 0
