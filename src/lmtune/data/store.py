"""The token store: encoded samples on disk, written once, mapped and read without copies in RAM.

A store is a folder of flat binary arrays and a meta.json that describes them:

    meta.json              magic, version, the key it was built for, the fields, counts, and for
                           every file its size, mtime and sha256 (and the store's fingerprint)
    <field>.bin            a field's values of all samples, back to back
    <field>.off            int64 offsets: sample i is values[off[i]:off[i+1]] (a "mask" field
                           shares the offsets of the tokens field it masks)
    conv.off               int64: the samples of conversation c are conv.off[c]:conv.off[c+1]
                           (a long pretraining text gives several samples, a skipped one none)
    conv_skip.bin          uint8 per conversation: 0, or 1 + the index of why it was skipped
    conv_trunc.bin         uint8 per conversation: a trained turn was cut to fit max_length
    conv_where.bin .off    UTF-8 "file:line" of each conversation's record (for messages and `data show`)
    sample_loss.bin        int32 per sample: tokens that carry loss (statistics without the tokens)

Fields are named int arrays per sample, declared by a schema, so other row kinds (preference
pairs: chosen and rejected ids and masks) fit the same store:

    {"input_ids": "tokens", "labels": "mask:input_ids"}

"tokens" are token ids (uint16 when the vocabulary has at most 65,536 entries, else uint32); "mask"
stores a labels array whose entries are the masked field's ids or -100 as one byte per token;
"int32" is any other int array.

Reading: every array is memory-mapped (offsets, which are small, are read into memory); a sample's
values are read with positional reads (os.pread) on the same files. Both go through the page cache,
which every process of a run shares. pread rather than the mapping for the tokens because a mapped
page counts in the RSS of each process that touched it — on recent kernels a whole large folio
(about 1 MB here) per touch — so the RSS of a run reading rows at random would climb towards the
size of the store, while with pread it stays flat.

Trust: a store is opened only if meta.json parses, names this key and version, and every file has
the recorded size; a file whose mtime differs from the recorded one is hashed in full and must
match its sha256 (then the store is resealed). The offsets arrays are checked for order and
bounds. Anything else makes `open_store` return None and the caller rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import weakref
from pathlib import Path
from typing import Optional

import numpy as np

MAGIC = "lmtune-token-store"
VERSION = 1
IGNORE_INDEX = -100
CONV_ARRAYS = {"conv_skip": np.uint8, "conv_trunc": np.uint8}


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def parse_schema(schema: dict) -> dict:
    """{"labels": "mask:input_ids"} -> {"labels": ("mask", "input_ids")}; checks the names."""
    out = {}
    for name, kind in schema.items():
        kind, _, of = kind.partition(":")
        if kind not in ("tokens", "mask", "int32") or (kind == "mask") != bool(of):
            raise ValueError(f"bad field kind {kind!r} for {name!r}")
        if of and schema.get(of, "").split(":")[0] != "tokens":
            raise ValueError(f"mask field {name!r} must name a tokens field, not {of!r}")
        out[name] = (kind, of or None)
    return out


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:  # read(), not a memory map: hashing must not grow the RSS
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- writing


class _Appender:
    """One output file written in appended pieces, hashed as it is written."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()
        self.count = 0

    def append(self, values: np.ndarray) -> None:
        data = np.ascontiguousarray(values, dtype=self.dtype).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.count += len(values)

    def close(self) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        st = self.path.stat()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": self.hash.hexdigest(),
                "dtype": self.dtype.str, "count": self.count}


def encode_samples(samples: list, schema: dict, tok_dtype) -> dict[str, np.ndarray]:
    """Flat arrays (and per-sample lengths) of a list of sample dicts, in the store's encoding."""
    fields = parse_schema(schema)
    raw: dict[str, np.ndarray] = {}
    out: dict[str, np.ndarray] = {}
    for name, (kind, _) in fields.items():
        flat: list[int] = []
        for s in samples:
            flat.extend(s[name])
        raw[name] = values = np.array(flat, dtype=np.int64)
        lengths = np.fromiter((len(s[name]) for s in samples), dtype=np.int64, count=len(samples))
        if kind == "tokens":
            if len(values) and (values.min() < 0 or values.max() > np.iinfo(tok_dtype).max):
                raise ValueError(f"token ids of {name!r} do not fit {np.dtype(tok_dtype).name}")
            out[name] = values.astype(tok_dtype)
            out[f"{name}.len"] = lengths
        elif kind == "mask":
            out[name] = (values != IGNORE_INDEX).astype(np.uint8)
        else:
            out[name] = values.astype(np.int32)
            out[f"{name}.len"] = lengths
    for name, (kind, of) in fields.items():  # a mask must mask its own tokens exactly
        if kind == "mask":
            keep = out[name].astype(bool)
            if len(raw[name]) != len(raw[of]) or np.any(raw[name][keep] != raw[of][keep]):
                raise ValueError(f"field {name!r} is not a mask of {of!r} (a label differs from its token)")
    return out


def write_store(out: Path, key: str, schema: dict, vocab_size: int, pieces, meta: Optional[dict] = None) -> dict:
    """Write a store into the (new) folder `out` from `pieces`: an iterable of dicts with the
    arrays of `encode_samples` plus "conv_nsamples", the CONV_ARRAYS, "conv_where" (+ ".len") and
    "sample_loss", one dict per chunk of conversations, in order. Returns meta (also written as meta.json, last)."""
    fields = parse_schema(schema)
    tok = token_dtype(vocab_size)
    out.mkdir(parents=True, exist_ok=False)
    files: dict[str, _Appender] = {}
    offsets: dict[str, _Appender] = {}
    ends: dict[str, int] = {}
    for name, (kind, _) in fields.items():
        files[name] = _Appender(out / f"{name}.bin", tok if kind == "tokens" else np.uint8 if kind == "mask" else np.int32)
        if kind != "mask":
            offsets[name] = _Appender(out / f"{name}.off", np.int64)
            offsets[name].append(np.zeros(1, np.int64))
            ends[name] = 0
    conv_off = _Appender(out / "conv.off", np.int64)
    conv_off.append(np.zeros(1, np.int64))
    conv = {k: _Appender(out / f"{k}.bin", t) for k, t in CONV_ARRAYS.items()}
    where, where_off, where_end = _Appender(out / "conv_where.bin", np.uint8), _Appender(out / "conv_where.off", np.int64), 0
    where_off.append(np.zeros(1, np.int64))
    sample_loss = _Appender(out / "sample_loss.bin", np.int32)
    n_samples = 0
    for piece in pieces:
        for name in fields:
            files[name].append(piece[name])
        for name, app in offsets.items():
            lengths = piece[f"{name}.len"]
            app.append(ends[name] + np.cumsum(lengths))
            ends[name] += int(lengths.sum())
        conv_off.append(n_samples + np.cumsum(piece["conv_nsamples"]))
        n_samples += int(piece["conv_nsamples"].sum())
        for k, app in conv.items():
            app.append(piece[k])
        where.append(piece["conv_where"])
        where_off.append(where_end + np.cumsum(piece["conv_where.len"]))
        where_end += int(piece["conv_where.len"].sum())
        sample_loss.append(piece["sample_loss"])
    written = {}
    for app in [*files.values(), *offsets.values(), conv_off, *conv.values(), where, where_off, sample_loss]:
        written[app.path.name] = app.close()
    digest = hashlib.sha256(json.dumps([schema, {k: v["sha256"] for k, v in sorted(written.items())}],
                                       sort_keys=True).encode()).hexdigest()
    meta = {"magic": MAGIC, "version": VERSION, "key": key, "schema": schema, "vocab_size": vocab_size,
            "n_samples": n_samples, "n_convs": conv_off.count - 1, "files": written, "fingerprint": digest,
            **(meta or {})}
    _write_meta(out, meta)
    return meta


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / ".meta.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "meta.json")


# --------------------------------------------------------------------------- reading


def _map(path: Path, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenStore:
    """An opened store: memory-mapped fields, offsets and per-conversation arrays."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta = Path(path), meta
        self.schema = meta["schema"]
        self.fields = parse_schema(self.schema)
        self.n_samples, self.n_convs = meta["n_samples"], meta["n_convs"]
        self.fingerprint = meta["fingerprint"]
        files = meta["files"]

        def arr(name):
            info = files[name]
            if name.endswith(".off"):  # offsets are small: read them into memory
                return np.fromfile(self.path / name, dtype=np.int64)
            return _map(self.path / name, np.dtype(info["dtype"]), info["count"])

        self.values = {name: arr(f"{name}.bin") for name in self.fields}
        self._fds = {}
        if hasattr(os, "pread"):
            self._fds = {name: os.open(self.path / f"{name}.bin", os.O_RDONLY) for name in self.fields}
            weakref.finalize(self, _close_all, list(self._fds.values()))
        self.offsets: dict[str, np.ndarray] = {}
        for name, (_, of) in self.fields.items():  # a mask shares its tokens' offsets (one array)
            base = of or name
            self.offsets[name] = self.offsets.get(base) if base in self.offsets else arr(f"{base}.off")
        self.conv_off = arr("conv.off")
        self.conv = {k: arr(f"{k}.bin") for k in CONV_ARRAYS}
        self.where_off = arr("conv_where.off")
        self.where_bytes = arr("conv_where.bin")
        self.sample_loss = arr("sample_loss.bin")

    def lengths(self, field: str = "input_ids") -> np.ndarray:
        return np.diff(self.offsets[field])

    def where(self, c: int) -> str:
        """The "file:line" of conversation c."""
        return bytes(self.where_bytes[self.where_off[c]:self.where_off[c + 1]]).decode("utf-8")

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample i as int64 arrays; a mask field comes back as labels (its tokens or -100)."""
        out = {}
        for name in self.fields:
            a, b = int(self.offsets[name][i]), int(self.offsets[name][i + 1])
            out[name] = self._read(name, a, b).astype(np.int64)
        for name, (kind, of) in self.fields.items():
            if kind == "mask":
                out[name] = np.where(out[name] != 0, out[of], IGNORE_INDEX)
        return out

    def _read(self, name: str, a: int, b: int) -> np.ndarray:
        values = self.values[name]
        fd = self._fds.get(name)
        if fd is None:  # no pread (Windows): through the mapping
            return np.asarray(values[a:b])
        size = values.dtype.itemsize
        data = os.pread(fd, (b - a) * size, a * size)
        if len(data) != (b - a) * size:
            raise OSError(f"short read from {self.path / name}.bin: the store changed under this run")
        return np.frombuffer(data, dtype=values.dtype)

    def _check(self) -> None:
        """Offsets in order and within bounds (raises ValueError)."""
        for name in self.fields:
            off = self.offsets[name]
            if len(off) != self.n_samples + 1 or off[0] != 0 or off[-1] != len(self.values[name]) \
                    or np.any(np.diff(off) < 0):
                raise ValueError(f"offsets of {name} are inconsistent")
        c = self.conv_off
        if len(c) != self.n_convs + 1 or c[0] != 0 or c[-1] != self.n_samples or np.any(np.diff(c) < 0):
            raise ValueError("conversation offsets are inconsistent")
        w = self.where_off
        if len(w) != self.n_convs + 1 or w[0] != 0 or w[-1] != len(self.where_bytes) or np.any(np.diff(w) < 0):
            raise ValueError("record positions are inconsistent")
        if any(len(a) != self.n_convs for a in self.conv.values()) or len(self.sample_loss) != self.n_samples:
            raise ValueError("per-conversation or per-sample arrays have the wrong length")


def _close_all(fds: list) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def read_meta(path: Path, key: str, magic: str = MAGIC, version: int = VERSION, verify: bool = False
              ) -> Optional[dict]:
    """meta.json of a sealed folder, or None if it is missing, foreign, or a file differs from it.

    A file with the recorded size and mtime is taken as written (`verify`: hashed all the same);
    one whose mtime changed (a copy, an edit) is hashed in full: if its content still matches,
    the folder is resealed."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("magic") != magic or meta.get("version") != version or meta.get("key") != key:
            return None
        changed = False
        for name, info in meta["files"].items():
            st = (path / name).stat()
            if st.st_size != info["size"]:
                return None
            if st.st_mtime_ns != info["mtime_ns"] or verify:
                if _sha256_file(path / name) != info["sha256"]:
                    return None
            if st.st_mtime_ns != info["mtime_ns"]:
                info["mtime_ns"] = st.st_mtime_ns
                changed = True
        if changed:
            _write_meta(path, meta)
        return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def open_store(path: Path, key: str, verify: bool = False) -> Optional[TokenStore]:
    """The store at `path` if it is whole and was built for `key`; None otherwise."""
    meta = read_meta(path, key, verify=verify)
    if meta is None:
        return None
    try:
        store = TokenStore(path, meta)
        store._check()
        return store
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
