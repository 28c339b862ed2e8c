"""Encode one data source into a token store, streaming, in `num_proc` processes, resumably.

    records ──chunks of R conversations (read in this process, never all at once)──►
    workers: the row kind's encoding (kinds.py: system prompt / pretraining render, tokenize.py)
             ──► shard-<i>.npz
    all shards present ──► one token store (store.py), published by a rename; shards removed

The store's content does not depend on R, on `num_proc`, or on which run wrote which shard: a
shard holds exactly the encoding of its conversations, and the store is their concatenation in
order. An interrupted preparation (Ctrl-C, a kill, a lost node) leaves its shards in
`tok-<key>.partial/`; the next run with the same key encodes only the chunks that are missing.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from lmtune.data import hub
from lmtune.data.conversation import Conversation
from lmtune.data.formats import _conversations, check_format, iter_conversations
from lmtune.data.kinds import LM, SKIP_REASONS, RowKind
from lmtune.data.store import encode_samples, open_store, remove, token_dtype, write_store
from lmtune.errors import UserError
CHUNK_CHARS = 2_000_000  # aim for about this much text per chunk (bounds each worker's memory)
CHUNK_MAX = 4096  # conversations per chunk, at most


def _chars(conv: Conversation) -> int:
    return len(conv.text) if conv.is_pretrain else sum(len(m.content) for m in conv.messages)


# --------------------------------------------------------------------------- reading a source


def iter_source(entry: dict, default_format: str, where: str, skip: int = 0, errors: Optional[list] = None
                ) -> Iterator[Conversation]:
    """The conversations of one `datasets` entry (a file, a folder, or a `datasets` source)."""
    fmt = check_format(entry.get("format") or default_format, where=f"{where} (format)")
    if not hub.is_datasets_source(entry):
        yield from iter_conversations(entry["path"], fmt, errors, skip=skip, image_folder=entry.get("image_folder"))
        return
    ds = hub.open_dataset(entry, where)
    first = next(hub.iter_records(ds, entry), None) if skip and fmt == "auto" else None
    yield from _conversations(hub.iter_records(ds, entry, skip), fmt, errors, first)


# --------------------------------------------------------------------------- encoding a chunk


# (cfg, tokenizer, template, kind, vocab_size, shard folder): set before the workers fork, so only
# the chunk's conversations travel to them.
_JOB: tuple = ()


def encode_chunk(convs: list[Conversation], cfg, tokenizer, template, kind: RowKind = LM,
                 vocab_size: Optional[int] = None) -> dict[str, np.ndarray]:
    """The store arrays of one chunk of conversations (see store.write_store)."""
    schema = kind.schema
    encoded = kind.encode(convs, cfg, tokenizer, template)
    samples = [s for e in encoded for s in e.samples]
    piece = encode_samples(samples, schema, token_dtype(vocab_size or len(tokenizer)))
    try:
        skip = [0 if e.skipped is None else 1 + SKIP_REASONS.index(e.skipped) for e in encoded]
    except ValueError:
        raise ValueError(f"unknown skip reason in {[e.skipped for e in encoded]}; add it to SKIP_REASONS") from None
    piece["conv_nsamples"] = np.array([len(e.samples) for e in encoded], dtype=np.int64)
    piece["conv_skip"] = np.array(skip, dtype=np.uint8)
    piece["conv_trunc"] = np.array([bool(e.truncated) for e in encoded], dtype=np.uint8)
    where = [c.source.encode("utf-8") for c in convs]
    piece["conv_where"] = np.frombuffer(b"".join(where), dtype=np.uint8)
    piece["conv_where.len"] = np.array([len(w) for w in where], dtype=np.int64)
    mask_field = next((n for n, k in schema.items() if k.startswith("mask:")), None)
    if mask_field is not None:  # loss tokens per sample, from the (first) mask
        mask, lengths = piece[mask_field], piece[f"{schema[mask_field].split(':')[1]}.len"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        total = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        piece["sample_loss"] = total[ends] - total[starts]
        if np.any(mask[starts[ends > starts]]):  # labels[0] is -100 by construction: keep it so
            raise ValueError("a sample's first token carries loss")
    else:
        piece["sample_loss"] = np.zeros(len(samples), np.int64)
    return piece


def _encode_shard(task: tuple[int, list]) -> int:
    i, convs = task
    cfg, tokenizer, template, kind, vocab_size, folder = _JOB
    piece = encode_chunk(convs, cfg, tokenizer, template, kind, vocab_size)
    _save_shard(folder, i, piece)
    return i


def _shard_path(folder: Path, i: int) -> Path:
    return folder / f"shard-{i:06d}.npz"


def _save_shard(folder: Path, i: int, piece: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".shard-{i:06d}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _shard_path(folder, i))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_shard(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# --------------------------------------------------------------------------- the entry point


def _chunk_size(entry, fmt, where) -> int:
    """Conversations per chunk, from the size of the first ones (recorded, so a resume agrees)."""
    first = list(islice(iter_source(entry, fmt, where, errors=[]), 256))  # the encoding pass reports errors
    if not first:
        return CHUNK_MAX
    avg = max(1, sum(_chars(c) for c in first) // len(first))
    return int(min(CHUNK_MAX, max(16, CHUNK_CHARS // avg)))


def build_source_store(entry: dict, where: str, cfg, tokenizer, template, key: str, root: Path,
                       errors: Optional[list] = None, kind: RowKind = LM, log=None, verify: bool = False):
    """The token store of one source (`where` names it in messages, e.g. "cfg.py (datasets[0])"),
    encoded now unless a valid one exists under `root`.

    With `errors` (data check), bad records are collected and skipped, and a store made from data
    with errors is built in a temporary folder (returned, never published to the cache).
    `verify`: hash an existing store's files in full before trusting it (`data prepare` does).
    """
    log = log or (lambda msg: print(f"[lmtune] {msg}", file=sys.stderr, flush=True))
    schema = kind.schema
    fmt = entry.get("format") or cfg.data_format
    final = root / f"tok-{key}"
    store = open_store(final, key, verify=verify)
    if store is not None:
        return store
    if final.exists():
        log(f"data: the store {final} is damaged or not this data's; rebuilding it")
        remove(final)
    root.mkdir(parents=True, exist_ok=True)
    if errors is not None:  # a check run: its own folder, never resumed from or published
        partial = Path(tempfile.mkdtemp(prefix=f".tok-{key}.check.", dir=root))
        R, done = _chunk_size(entry, fmt, where), set()
    else:
        partial, R, done = _resume(root / f"tok-{key}.partial", key, schema, entry, fmt, where)
        if done:
            log(f"data: resuming the preparation of {entry['path']}: {len(done)} chunk(s) of {R} conversations "
                "already encoded")
    vocab = len(tokenizer)
    n_errors = len(errors) if errors is not None else 0
    t0 = time.time()
    global _JOB
    _JOB = (cfg, tokenizer, template, kind, vocab, partial)
    tmp = Path(tempfile.mkdtemp(prefix=f".tok-{key}.", dir=root))
    try:
        n_chunks = _encode_chunks(entry, fmt, where, R, partial, done, cfg.num_proc, errors)
        shards = (_load_shard(_shard_path(partial, i)) for i in range(n_chunks))
        meta = write_store(tmp / "store", key, schema, vocab, shards, _meta(entry, R))
        with_errors = errors is not None and len(errors) > n_errors
        if meta["n_convs"] == 0 and not with_errors:
            raise UserError(f"the dataset '{entry['path']}' holds no records", where=where,
                            hint="check the file; an empty file or a folder of empty files trains nothing")
        if with_errors:
            # Made from data with errors (a check run): kept out of the cache, deleted at exit.
            store = open_store(tmp / "store", key)
            _remove_at_exit(tmp)
            tmp = None
            return store
        os.replace(tmp / "store", final)
        remove(partial)
    except UserError:
        remove(partial)  # the data must change, and with it the key: these shards are of no use
        raise
    finally:
        _JOB = ()
        if tmp is not None:
            remove(tmp)
        if errors is not None:
            remove(partial)
    store = open_store(final, key)
    if store is None:
        raise RuntimeError(f"the token store just written to {final} does not verify")
    n_tokens = sum(store.meta["files"][f"{n}.bin"]["count"] for n, k in schema.items() if k == "tokens")
    dt = time.time() - t0
    log(f"data: encoded {entry['path']}: {store.n_convs} conversations, {n_tokens} tokens in {dt:.1f}s "
        f"({n_tokens / max(dt, 1e-9) / 1e6:.2f}M tokens/s, {cfg.num_proc} process(es)) -> {final}")
    return store


def _remove_at_exit(path: Path) -> None:
    import atexit

    atexit.register(remove, path)


def _resume(partial: Path, key: str, schema: dict, entry, fmt, where) -> tuple[Path, int, set]:
    """The shard folder, chunk size and finished chunks of an earlier, interrupted run (if any)."""
    manifest = {"key": key, "schema": schema}
    try:
        old = json.loads((partial / "manifest.json").read_text(encoding="utf-8"))
        if {k: old.get(k) for k in manifest} != manifest:
            raise ValueError("another key")
        manifest["chunk"] = int(old["chunk"])
    except (OSError, ValueError, KeyError, TypeError):
        remove(partial)
        manifest["chunk"] = _chunk_size(entry, fmt, where)
    partial.mkdir(exist_ok=True)
    (partial / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    done = set()
    for p in partial.glob("shard-*.npz"):
        try:
            with np.load(p, allow_pickle=False) as z:  # reads the zip directory only
                if "conv_skip" in z.files:
                    done.add(int(p.name[6:12]))
        except (OSError, ValueError):
            p.unlink(missing_ok=True)
    return partial, manifest["chunk"], done


def _meta(entry: dict, chunk: int) -> dict:
    return {"source": {k: v for k, v in entry.items() if k in ("path", "format", *hub.HUB_KEYS)}, "chunk": chunk}


def _encode_chunks(entry, fmt, where, R: int, folder: Path, done: set, num_proc: int, errors) -> int:
    """Encode every chunk of R conversations that is not `done` into a shard; returns the number
    of chunks of the source."""
    last = [max(done) if done else -1]

    def chunks() -> Iterator[tuple[int, list]]:
        i, reader = 0, None
        while True:
            if i in done:
                reader = None  # the next missing chunk starts a reader at its own first record
                with np.load(_shard_path(folder, i), allow_pickle=False) as z:
                    short = len(z["conv_skip"]) < R
                i += 1
                if short:  # a finished chunk with fewer than R conversations was the last one
                    return
                continue
            if reader is None:
                reader = iter_source(entry, fmt, where, skip=i * R, errors=errors)
            convs = list(islice(reader, R))
            if not convs and i > 0:  # the source ended at a chunk boundary
                return
            last[0] = max(last[0], i)
            yield i, convs
            i += 1
            if len(convs) < R:
                return

    from tqdm.auto import tqdm

    bar = tqdm(desc=f"encode {entry['path']}", unit="chunk", file=sys.stderr, dynamic_ncols=True, mininterval=2,
               disable=None)
    try:
        if num_proc > 1 and "fork" in multiprocessing.get_all_start_methods():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers are the parallelism
            with multiprocessing.get_context("fork").Pool(num_proc) as pool:
                pending: deque = deque()
                for task in chunks():
                    pending.append(pool.apply_async(_encode_shard, (task,)))
                    while len(pending) >= 2 * num_proc:  # bounded: the reader never runs far ahead
                        pending.popleft().get()
                        bar.update(1)
                while pending:
                    pending.popleft().get()
                    bar.update(1)
        else:
            for task in chunks():
                _encode_shard(task)
                bar.update(1)
    finally:
        bar.close()
    return last[0] + 1
