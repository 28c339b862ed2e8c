"""Build the training data of a config: read and mix sources, encode, pack; cached on disk.

    cfg.datasets ──read (formats.py)──► conversations per source
                 ──repeat / weight, inject cfg.system, shuffle(cfg.seed), max_dataset_samples
                 ──encode (tokenize.py; batched, cfg.num_proc processes)──► samples
                 ──pack (when cfg.pack_to_max_length)──► rows

The result is cached under $LMTUNE_CACHE_DIR/data (default ~/.cache/lmtune/data), keyed by the data
files' contents and mtimes, the tokenizer, the template and every setting that changes the rows.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from lmtune.data.conversation import Conversation, Message
from lmtune.data.formats import check_format, list_files, read_conversations
from lmtune.data.templates import ChatTemplate
from lmtune.data.tokenize import IGNORE_INDEX, Encoded, encode_many, pack
from lmtune.errors import UserError

CACHE_VERSION = 1  # bump when the row layout or encoding rules change
_CHUNK = 512  # conversations per tokenizer call


@dataclass
class TrainData:
    # Each row: {"input_ids": [...], "labels": [...]} and, when packed, "position_ids" and
    # "seq_lens". Ready for tokenize.collate.
    rows: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    packed: bool = False


def cache_dir() -> Path:
    root = os.environ.get("LMTUNE_CACHE_DIR") or os.path.join("~", ".cache", "lmtune")
    return Path(os.path.expanduser(root)) / "data"


# --------------------------------------------------------------------------- reading and mixing


def _factor(entry: dict, i: int, where: str) -> float:
    repeat, weight = entry.get("repeat", 1), entry.get("weight", 1)
    for key, value in (("repeat", repeat), ("weight", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise UserError(f"datasets[{i}].{key} must be a number >= 0, got {value!r}", where=where)
    return float(repeat) * float(weight)


def _repeat(convs: list, factor: float, seed: int) -> list:
    """`factor` copies of the list: whole copies plus a deterministic sample for the fraction."""
    whole = int(factor)
    out = convs * whole
    extra = round((factor - whole) * len(convs))
    if extra:
        picked = sorted(random.Random(seed).sample(range(len(convs)), extra))
        out += [convs[j] for j in picked]
    return out


def load_conversations(cfg, template: Optional[ChatTemplate] = None, errors: Optional[list] = None):
    """Read, mix and shuffle every source of `cfg.datasets`.

    Returns (conversations, per-source stats). With `errors`, bad records are collected there and
    skipped rather than raised.
    """
    where = cfg._source or "config"
    if not cfg.datasets:
        raise UserError("no training data: the 'datasets' key is empty", where=where,
                        hint="set datasets = ['path/to/data.jsonl'] in the config")
    mixed: list[Conversation] = []
    sources: dict[str, dict] = {}
    for i, entry in enumerate(cfg.datasets):
        path = entry["path"]
        fmt = check_format(entry.get("format") or cfg.data_format, where=f"{where} (datasets[{i}].format)")
        factor = _factor(entry, i, where)
        n_errors = len(errors) if errors is not None else 0
        try:
            convs = read_conversations(path, fmt, errors, entry.get("image_folder") or cfg.image_folder)
        except UserError as e:
            if errors is None:
                raise
            errors.append(e)
            convs = []
        used = _repeat(convs, factor, cfg.seed + i)
        sources[str(path)] = {
            "read": len(convs), "used": len(used), "repeat": factor,
            "errors": (len(errors) - n_errors) if errors is not None else 0,
        }
        mixed += used
    out = []
    for conv in mixed:
        if cfg.objective == "pretrain" and conv.images:
            raise UserError("objective 'pretrain' trains on plain text and cannot keep images", where=conv.source,
                            hint="use objective 'sft'; a LLaVA's projector pretraining is vision_stage = 'pretrain'")
        if cfg.objective == "pretrain" and not conv.is_pretrain:
            if template is None:
                raise UserError("objective 'pretrain' on chat data needs a template to render it")
            conv = Conversation(text=template.render(conv.messages), source=conv.source)
        elif cfg.system and not conv.is_pretrain and conv.messages[0].role != "system":
            conv = Conversation([Message("system", cfg.system)] + conv.messages, source=conv.source)
        out.append(conv)
    random.Random(cfg.seed).shuffle(out)
    if cfg.max_dataset_samples:
        out = out[: cfg.max_dataset_samples]
    return out, sources


# --------------------------------------------------------------------------- encoding


_JOB: tuple = ()  # (convs, tokenizer, template, max_length, images), shared with forked workers


def _encode_range(bounds: tuple[int, int]) -> list[Encoded]:
    convs, tokenizer, template, max_length, images = _JOB
    return encode_many(convs[bounds[0] : bounds[1]], tokenizer, template, max_length, images)


def encode_all(convs: list, tokenizer, template: ChatTemplate, max_length: int, num_proc: int = 1,
               images=None) -> list[Encoded]:
    """Encode every conversation: batched through the fast tokenizer, in `num_proc` processes.
    `images`: the model's ImageTokens (data/images.py) when it sees images."""
    global _JOB
    ranges = [(i, min(i + _CHUNK, len(convs))) for i in range(0, len(convs), _CHUNK)]
    if num_proc > 1 and len(ranges) > 1 and "fork" in multiprocessing.get_all_start_methods():
        _JOB = (convs, tokenizer, template, max_length, images)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
        try:
            with multiprocessing.get_context("fork").Pool(min(num_proc, len(ranges))) as pool:
                parts = pool.map(_encode_range, ranges)
        finally:
            _JOB = ()
        return [e for part in parts for e in part]
    out = []
    for a, b in ranges:
        out += encode_many(convs[a:b], tokenizer, template, max_length, images)
    return out


def summarize(convs: list, encoded: list[Encoded]) -> tuple[list[dict], dict]:
    """The samples, and counts: skipped (by reason, with examples), truncated, tokens, loss tokens."""
    samples, skipped, examples, truncated = [], {}, [], 0
    for conv, enc in zip(convs, encoded):
        if enc.skipped:
            skipped[enc.skipped] = skipped.get(enc.skipped, 0) + 1
            if len(examples) < 20:
                examples.append({"source": conv.source, "reason": enc.skipped})
        truncated += enc.truncated
        samples += enc.samples
    lengths = [len(s["input_ids"]) for s in samples]
    loss_tokens = sum(sum(1 for x in s["labels"] if x != IGNORE_INDEX) for s in samples)
    stats = {
        "conversations": len(convs), "samples": len(samples), "skipped": skipped,
        "skipped_examples": examples, "truncated": truncated, "tokens": sum(lengths),
        "loss_tokens": loss_tokens, "lengths": lengths,
    }
    return samples, stats


# --------------------------------------------------------------------------- cache


def _file_digest(path: Path, h) -> None:
    st = path.stat()
    h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.eos_token, tokenizer.bos_token, getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def _encoder_versions() -> dict:
    """The code that turns data into rows: lmtune's version and its data/ sources (a change to the
    encoding code invalidates the cache even without a version bump), and the tokenizer libraries."""
    import tokenizers
    import transformers

    import lmtune

    code = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        code.update(f.name.encode() + f.read_bytes())
    return {"lmtune": lmtune.__version__, "data_code": code.hexdigest(),
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def _probe(template: ChatTemplate) -> list[str]:
    # Rendering probes catches any change in the template's text (a template may refuse a system
    # message: that is part of what it does).
    out = []
    for msgs in ([Message("user", "U"), Message("assistant", "A")],
                 [Message("system", "S"), Message("user", "U"), Message("assistant", "A")]):
        try:
            out.append(template.render(msgs))
        except UserError as e:
            out.append(f"refused: {e}")
    return out


def image_tokens_for(cfg, tokenizer):
    """The model's ImageTokens when it sees images (a vision-language model kind), else None."""
    from lmtune.models.kinds import model_kind

    return model_kind(cfg).image_tokens(cfg, tokenizer)


def cache_key(cfg, tokenizer, template: ChatTemplate, images=None) -> str:
    h = hashlib.sha256()
    settings = {
        "v": CACHE_VERSION, "datasets": cfg.datasets, "data_format": cfg.data_format,
        "max_length": cfg.max_length, "pack": cfg.pack_to_max_length, "shuffle": cfg.shuffle_before_pack,
        "system": cfg.system, "objective": cfg.objective, "seed": cfg.seed,
        "max_dataset_samples": cfg.max_dataset_samples, "template": template.name,
        "probe": _probe(template), "encoder": _encoder_versions(),
        "images": images.fingerprint if images is not None else None, "image_folder": cfg.image_folder,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for entry in cfg.datasets:
        for file in list_files(entry["path"]):
            _file_digest(file, h)
    return h.hexdigest()[:32]


def _save(path: Path, data: TrainData) -> None:
    import numpy as np

    rows = data.rows
    arrays = {
        "input_ids": np.fromiter((t for r in rows for t in r["input_ids"]), dtype=np.int32),
        "labels": np.fromiter((t for r in rows for t in r["labels"]), dtype=np.int32),
        "row_lens": np.array([len(r["input_ids"]) for r in rows], dtype=np.int64),
        "seq_lens": np.fromiter((n for r in rows for n in r.get("seq_lens", [len(r["input_ids"])])), dtype=np.int32),
        "row_seqs": np.array([len(r.get("seq_lens", [0])) for r in rows], dtype=np.int64),
        "meta": np.frombuffer(json.dumps({"stats": data.stats, "packed": data.packed}).encode(), dtype=np.uint8),
    }
    if any(r.get("images") for r in rows):  # image references stay references (read when batched)
        arrays["images"] = np.frombuffer(json.dumps([r.get("images", []) for r in rows]).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> TrainData:
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes().decode())
        ids, labels = z["input_ids"].tolist(), z["labels"].tolist()
        row_lens, seq_lens, row_seqs = z["row_lens"].tolist(), z["seq_lens"].tolist(), z["row_seqs"].tolist()
        images = json.loads(z["images"].tobytes().decode()) if "images" in z.files else None
    rows, a, s = [], 0, 0
    for n, k in zip(row_lens, row_seqs):
        row = {"input_ids": ids[a : a + n], "labels": labels[a : a + n]}
        if meta["packed"]:
            lens = seq_lens[s : s + k]
            row["position_ids"] = [p for m in lens for p in range(m)]
            row["seq_lens"] = lens
        if images is not None and images[len(rows)]:
            row["images"] = images[len(rows)]
        rows.append(row)
        a += n
        s += k
    return TrainData(rows=rows, stats=meta["stats"], packed=meta["packed"])


# --------------------------------------------------------------------------- the entry point


def build_dataset(cfg, tokenizer, template: ChatTemplate, use_cache: bool = True) -> TrainData:
    """The rows to train on, with statistics (see TrainData). Cached on disk."""
    path = None
    images = image_tokens_for(cfg, tokenizer)
    if use_cache:
        path = cache_dir() / f"{cache_key(cfg, tokenizer, template, images)}.npz"
        if path.is_file():
            try:
                data = _load(path)
                data.stats["cache"] = "hit"
                data.stats["cache_path"] = str(path)
                return data
            except Exception:  # a damaged cache file is rebuilt, never trusted
                path.unlink(missing_ok=True)

    convs, sources = load_conversations(cfg, template)
    encoded = encode_all(convs, tokenizer, template, cfg.max_length, cfg.num_proc, images)
    samples, stats = summarize(convs, encoded)
    stats["sources"] = sources
    if not samples:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
        raise UserError(
            f"no usable training samples: all {len(convs)} conversations were skipped ({reasons})",
            where=cfg._source or "config",
            hint="raise max_length, or check the data with `lmtune data check CONFIG`",
        )
    packed = bool(cfg.pack_to_max_length)
    rows = pack(samples, cfg.max_length, cfg.shuffle_before_pack, cfg.seed) if packed else samples
    stats["rows"] = len(rows)
    data = TrainData(rows=rows, stats=stats, packed=packed)
    if path is not None:
        _save(path, data)
        stats["cache"] = "miss"
        stats["cache_path"] = str(path)
    return data
