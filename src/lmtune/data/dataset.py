"""Build the training data of a config: token stores on disk, rows as index arrays over them.

    cfg.datasets ──each source, streamed and encoded (prepare.py; cfg.num_proc processes)──►
                   one token store per source, tok-<key>/ (store.py)
                 ──repeat / weight, shuffle(cfg.seed), max_dataset_samples, validation split,
                   packing (mix.py)──► the rows index, rows-<key>/
                 ──► TrainData: rows (and val_rows) read lazily through memory maps

Everything lives under $LMTUNE_CACHE_DIR/data (default ~/.cache/lmtune/data). A source's key covers
its files (path, size, mtime, content) or its `datasets` identity, the tokenizer, the template and
every setting that changes its encoding; the rows' key adds the mixing and packing settings. So a
new seed or mixing weight re-packs without re-encoding, and `lmtune data prepare` builds exactly
what `lmtune train` then opens. A store is built under a lock (one process encodes, the others
of a run wait, then map the same files) and published by a rename, never half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import tempfile
import weakref
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from lmtune.data import hub
from lmtune.data.conversation import Conversation, Message
from lmtune.data.formats import check_format, list_files, read_conversations
from lmtune.data.mix import Sources, StoreRows, held_out, make_rows, mix_order, statistics
from lmtune.data.kinds import RowKind, kind_for, prepare_conversation
from lmtune.data.prepare import build_source_store
from lmtune.data.store import _Appender, _write_meta, read_meta, remove
from lmtune.data.templates import ChatTemplate
from lmtune.errors import UserError

CACHE_VERSION = 2  # bump when the encoding rules or the store layout change
ROWS_MAGIC = "lmtune-rows"


@dataclass
class TrainData:
    # rows[i]: {"input_ids": [...], "labels": [...]} and, when packed, "position_ids" and "seq_lens";
    # read from the store when indexed (StoreRows), ready for tokenize.collate / batch.flat_batch.
    rows: Sequence = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    packed: bool = False
    val_rows: Optional[object] = None  # the validation rows (val_datasets / val_set_size), or None

    def sample_lengths(self):
        return self.rows.sample_lengths()

    def samples_in_order(self, n: int):
        return self.rows.samples_in_order(n)


def cache_dir() -> Path:
    root = os.environ.get("LMTUNE_CACHE_DIR") or os.path.join("~", ".cache", "lmtune")
    return Path(os.path.expanduser(root)) / "data"


# --------------------------------------------------------------------------- mixing, in memory


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
    """Read, mix and shuffle every source of `cfg.datasets` into a list: the plain definition of
    the training order, which the store path (mix.py) follows with index arrays. For small data
    (tests compare the two); training never calls it.
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
        fmt = check_format(entry.get("format") or cfg.data_format, where=f"{where} (datasets[{i}].format)")
        factor = _factor(entry, i, where)
        n_errors = len(errors) if errors is not None else 0
        try:
            convs = read_conversations(entry["path"], fmt, errors)
        except UserError as e:
            if errors is None:
                raise
            errors.append(e)
            convs = []
        used = _repeat(convs, factor, cfg.seed + i)
        sources[str(entry["path"])] = {
            "read": len(convs), "used": len(used), "repeat": factor,
            "errors": (len(errors) - n_errors) if errors is not None else 0,
        }
        mixed += used
    out = [prepare_conversation(conv, cfg, template) for conv in mixed]
    random.Random(cfg.seed).shuffle(out)
    if cfg.max_dataset_samples:
        out = out[: cfg.max_dataset_samples]
    return out, sources


# --------------------------------------------------------------------------- cache keys


def _file_digest(path: Path) -> str:
    """sha256 of a file's content, remembered by (path, size, mtime, inode) so an unchanged large
    corpus is not read again at every start."""
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    memo = cache_dir().with_name("data-file-digests.json")
    try:
        known = json.loads(memo.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    if ident in known:
        return known[ident]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    known = {k: v for k, v in known.items() if not k.startswith(f"{path.resolve()}|")}
    known[ident] = h.hexdigest()
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=".file_digests.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(known, f)
        os.replace(tmp, memo)
    except OSError:
        pass  # only a memo
    return known[ident]


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


def cache_key(cfg, tokenizer, template: ChatTemplate) -> str:
    """One key for a config's whole data (the preference-pair cache uses it; token stores are keyed
    per source by `source_key`)."""
    h = hashlib.sha256()
    settings = {
        "v": CACHE_VERSION, "datasets": cfg.datasets, "data_format": cfg.data_format,
        "max_length": cfg.max_length, "pack": cfg.pack_to_max_length, "shuffle": cfg.shuffle_before_pack,
        "system": cfg.system, "objective": cfg.objective, "seed": cfg.seed,
        "max_dataset_samples": cfg.max_dataset_samples, "template": template.name,
        "probe": _probe(template), "encoder": _encoder_versions(),
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(_tokenizer_fingerprint(tokenizer).encode())
    for entry in cfg.datasets:
        if Path(os.path.expanduser(str(entry["path"]))).exists():
            for file in list_files(entry["path"]):
                h.update(_file_digest(file).encode())
    return h.hexdigest()[:32]


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


def source_key(entry: dict, cfg, tokenizer, template: ChatTemplate, schema: dict, tok_fp: str, where: str) -> str:
    """What one source's token store depends on: its data, the tokenizer, template and settings."""
    settings = {
        "v": CACHE_VERSION, "path": str(entry["path"]), "format": entry.get("format") or cfg.data_format,
        "hub": {k: entry.get(k) for k in hub.HUB_KEYS}, "max_length": cfg.max_length, "system": cfg.system,
        "objective": cfg.objective, "eos": cfg.pretrain_add_eos, "schema": schema, "template": template.name,
        "probe": _probe(template), "encoder": _encoder_versions(), "tokenizer": tok_fp,
    }
    if "images" in schema:  # what an image becomes in tokens, and where relative paths start
        from lmtune.data.kinds import image_tokens

        settings["images"] = [image_tokens(cfg, tokenizer).fingerprint, entry.get("image_folder")]
    path = hub.local_path(entry)
    if path.exists():
        files = sorted(p for p in path.rglob("*") if p.is_file()) if hub.is_datasets_source(entry) and path.is_dir() \
            else list_files(path)
        settings["files"] = [(str(p.resolve()), _file_digest(p)) for p in files]
    elif not entry.get("streaming"):
        settings["hub_fingerprint"] = hub.fingerprint(hub.open_dataset(entry, where))
    return _digest(settings)


@contextmanager
def _lock(name: str):
    """An exclusive lock (flock) on $CACHE/locks/NAME: one process builds, the others wait."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): builds still publish atomically
        yield
        return
    folder = cache_dir().with_name("locks")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the rows index


_ROW_ARRAYS = ("off", "idx", "conv")  # row offsets, the rows' sample ids, conversations in order


def _write_rows(folder: Path, key: str, splits: dict, meta: dict) -> dict:
    """rows-<key>/: <split>.off, .idx and .conv (int64) for each split, and meta.json (last)."""
    folder.mkdir(parents=True)
    files = {}
    for name, arrays in splits.items():
        for suffix, arr in zip(_ROW_ARRAYS, arrays):
            app = _Appender(folder / f"{name}.{suffix}", np.int64)
            app.append(arr)
            files[f"{name}.{suffix}"] = app.close()
    meta = {"magic": ROWS_MAGIC, "version": CACHE_VERSION, "key": key, "files": files, **meta}
    meta["fingerprints"] = {
        name: _digest([meta["stores"], files[f"{name}.off"]["sha256"], files[f"{name}.idx"]["sha256"], meta["packed"]])
        for name in splits}
    _write_meta(folder, meta)
    return meta


def _read_rows(folder: Path, key: str, n_samples: int, verify: bool = False) -> Optional[tuple[dict, dict]]:
    """The rows index at `folder` if it is whole, built for `key`, and within the stores' samples."""
    meta = read_meta(folder, key, magic=ROWS_MAGIC, version=CACHE_VERSION, verify=verify)
    if meta is None:
        return None
    try:
        splits = {}
        for name in meta["fingerprints"]:
            off, idx, conv = (np.fromfile(folder / f"{name}.{s}", dtype=np.int64) for s in _ROW_ARRAYS)
            if len(off) < 1 or off[0] != 0 or off[-1] != len(idx) or np.any(np.diff(off) < 0) \
                    or (len(idx) and (idx.min() < 0 or idx.max() >= n_samples)):
                return None
            splits[name] = (off, idx, conv)
        return meta, splits
    except (OSError, ValueError, KeyError):
        return None


# --------------------------------------------------------------------------- the entry point


def _no_samples(cfg, stats: dict) -> UserError:
    reasons = ", ".join(f"{k}: {v}" for k, v in stats["skipped"].items()) or "none"
    return UserError(
        f"no usable training samples: all {stats['conversations']} conversations were skipped ({reasons})",
        where=cfg._source or "config",
        hint="raise max_length, or check the data with `lmtune data check CONFIG`",
    )


def _open_sources(entries: list, cfg, tokenizer, template, root: Path, use_lock: bool, errors, log, tok_fp,
                  kind: RowKind, name: str = "datasets", verify: bool = False):
    """The token store of each entry (built if needed); with `errors`, a source that cannot be read
    at all is reported there and left out. Returns (Sources, keys, [(index, path, read, errors, opened)])."""
    where = cfg._source or "config"
    stores, keys, info = [], [], []
    for i, entry in enumerate(entries):
        n_errors = len(errors) if errors is not None else 0
        here = f"{where} ({name}[{i}])"
        try:
            check_format(entry.get("format") or cfg.data_format, where=f"{here[:-1]}.format)")
            key = source_key(entry, cfg, tokenizer, template, kind.schema, tok_fp, here)
            with (_lock(f"tok-{key}") if use_lock else _nolock()):
                store = build_source_store(entry, here, cfg, tokenizer, template, key, root, errors=errors, kind=kind,
                                           log=log, verify=verify)
        except UserError as e:
            if errors is None:
                raise
            errors.append(e)
            info.append((i, str(entry["path"]), 0, len(errors) - n_errors, False))
            continue
        store.loss = entry.get("loss", "labels")  # what its samples train towards (not part of the store)
        stores.append(store)
        keys.append(key)
        info.append((i, str(entry["path"]), store.n_convs, len(errors) - n_errors if errors is not None else 0, True))
    return Sources(stores, kind), keys, info


def _log(log, msg: str) -> None:
    (log or (lambda m: print(f"[lmtune] {m}", file=sys.stderr, flush=True)))(msg)


@contextmanager
def _nolock():
    yield


def build_dataset(cfg, tokenizer, template: ChatTemplate, use_cache: bool = True, errors: Optional[list] = None,
                  log=None, verify: bool = False) -> TrainData:
    """The rows to train on (and validation rows), with statistics. See the module docstring.

    use_cache=False builds in a temporary folder, removed when the rows are no longer used.
    With `errors` (data check), bad records are collected and skipped (such a store is never cached).
    `verify`: hash cached stores in full before using them (by default a store whose files keep
    their recorded size and mtime is trusted; see store.py).
    """
    where = cfg._source or "config"
    if not cfg.datasets:
        raise UserError("no training data: the 'datasets' key is empty", where=where,
                        hint="set datasets = ['path/to/data.jsonl'] in the config")
    factors = [_factor(entry, i, where) for i, entry in enumerate(cfg.datasets)]
    root = cache_dir() if use_cache else Path(tempfile.mkdtemp(prefix="lmtune-data-"))
    tok_fp = _tokenizer_fingerprint(tokenizer)
    kind = kind_for(cfg)
    try:
        train_src, train_keys, info = _open_sources(cfg.datasets, cfg, tokenizer, template, root, use_cache, errors,
                                                    log, tok_fp, kind, verify=verify)
        val_src, val_keys, _ = _open_sources(cfg.val_datasets, cfg, tokenizer, template, root, use_cache, errors,
                                             log, tok_fp, kind, name="val_datasets", verify=verify)
        packed = bool(cfg.pack_to_max_length)
        settings = {"v": CACHE_VERSION, "train": train_keys, "val": val_keys, "factors": factors, "seed": cfg.seed,
                    "pack": packed, "shuffle": cfg.shuffle_before_pack, "max_length": cfg.max_length,
                    "max_dataset_samples": cfg.max_dataset_samples, "val_set_size": cfg.val_set_size}
        losses = [entry.get("loss", "labels") for entry in cfg.datasets]
        if set(losses) != {"labels"}:  # rows carry which samples train towards the base model
            settings["losses"] = losses
        key = _digest(settings)
        folder = root / f"rows-{key}"
        n_samples = int(train_src.sample_base[-1] + val_src.sample_base[-1])
        with (_lock(f"rows-{key}") if use_cache else _nolock()):
            found = _read_rows(folder, key, n_samples, verify) if errors is None else None
            if found is None:
                if errors is None and folder.exists():  # (a check run neither reads nor writes the cache)
                    _log(log, f"data: the rows index {folder} is damaged or not this data's; rebuilding it")
                    remove(folder)
                meta, splits = _mix(cfg, train_src, val_src, factors, train_keys + val_keys, info)
                if errors is None:
                    tmp = Path(tempfile.mkdtemp(prefix=f".rows-{key}.", dir=root))
                    try:
                        meta = _write_rows(tmp / "rows", key, splits, meta)
                        os.replace(tmp / "rows", folder)
                    finally:
                        remove(tmp)
                else:
                    meta["fingerprints"] = {name: "" for name in splits}
                cache = "miss"
            else:
                (meta, splits), cache = found, "hit"
    except BaseException:
        if not use_cache:
            remove(root)
        raise
    stats = dict(meta["stats"])
    if stats["skipped"].get("bad_image") and errors is None:
        bad = next(e["source"] for e in stats["skipped_examples"] if e["reason"] == "bad_image")
        raise UserError(f"{stats['skipped']['bad_image']} conversation(s) have images that cannot be tokenized "
                        "(an unreadable image, or an <image> placeholder without an image)", where=bad,
                        hint="run `lmtune data check CONFIG` for what is wrong with each")
    if stats["samples"] == 0 and errors is None:
        raise _no_samples(cfg, stats)
    all_src = Sources(train_src.stores + val_src.stores, kind)
    if not use_cache:  # the temporary folder goes when nothing reads it any more
        weakref.finalize(all_src, remove, root)
    train_fp = meta["fingerprints"]["train"]
    if "losses" in settings and train_fp:  # which samples train towards the base is part of what training reads
        train_fp = _digest([train_fp, settings["losses"]])
    rows = StoreRows(all_src, *splits["train"], packed=packed, fingerprint=train_fp)
    val_rows = None
    if "val" in splits and len(splits["val"][0]) > 1:
        val_rows = StoreRows(all_src, *splits["val"], packed=packed, fingerprint=meta["fingerprints"]["val"])
    stats["cache"] = cache if use_cache else "off"
    stats["cache_path"] = str(folder)
    return TrainData(rows=rows, stats=stats, packed=packed, val_rows=val_rows)


def _mix(cfg, train: Sources, val: Sources, factors: list, store_keys: list, info: list):
    """Order, validation split and packing as index arrays; returns (meta, splits)."""
    hold = held_out(int(train.conv_base[-1]), cfg.val_set_size, cfg.seed)
    kept = [i for i, _, _, _, opened in info if opened]
    order, used = mix_order(train, [factors[i] for i in kept], cfg.seed, cfg.max_dataset_samples, exclude=hold,
                            source_ids=kept)
    packed = bool(cfg.pack_to_max_length)
    offsets, row_samples, samples = make_rows(train, order, packed, cfg.max_length, cfg.shuffle_before_pack, cfg.seed)
    if len(row_samples) and (row_samples.min() < 0 or row_samples.max() >= train.sample_base[-1]):
        raise RuntimeError("rows index out of range")
    stats = statistics(train, order, samples)
    stats["rows"] = int(len(offsets) - 1)
    used_by = dict(zip(kept, used))
    stats["sources"] = {path: {"read": read, "used": used_by.get(i, 0), "repeat": factors[i], "errors": n_err,
                               "loss": cfg.datasets[i].get("loss", "labels")}
                        for i, path, read, n_err, _ in info}
    splits = {"train": (offsets, row_samples, order)}
    # Validation: the held-out conversations and every val_datasets conversation, once each, in
    # global ids over train + val stores (val stores follow the train stores).
    val_convs = np.concatenate([hold, np.arange(int(val.conv_base[-1]), dtype=np.int64) + int(train.conv_base[-1])])
    if len(val_convs):
        both = Sources(train.stores + val.stores, train.kind)
        v_off, v_rows, v_samples = make_rows(both, val_convs, packed, cfg.max_length, cfg.shuffle_before_pack, cfg.seed)
        splits["val"] = (v_off, v_rows, val_convs)
        stats["val"] = {"conversations": int(len(val_convs)), "samples": int(len(v_samples)), "rows": int(len(v_off) - 1),
                        "tokens": int(both.lengths()[v_samples].sum())}
    return {"stores": store_keys, "packed": packed, "stats": stats}, splits
