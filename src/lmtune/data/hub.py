"""Data sets read through Hugging Face `datasets`: hub ids, `save_to_disk` folders, script-free
dataset folders.

    datasets = [dict(path="tatsu-lab/alpaca", split="train")]              # the hub (downloaded once)
    datasets = [dict(path="HuggingFaceFW/fineweb", name="sample-10BT", split="train",
                     revision="<commit>", streaming=True)]                   # read as it downloads
    datasets = ["/data/alpaca_saved"]                                        # a `save_to_disk` folder
    datasets = [dict(path="/data/my_dataset_repo", split="train")]           # a dataset repo's layout

A source goes through `datasets` when its path is a `save_to_disk` folder, when the entry names a
`name`, `split`, `revision` or `streaming`, or when the path does not exist locally and looks like
a hub id ("org/name"). Every other path is read by lmtune's own readers (formats.py). Rows become
records as from a file (the same formats and auto-detection); a row is named "path[split]:row N".
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterator

from lmtune.errors import UserError

HUB_KEYS = ("name", "split", "revision", "streaming")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def local_path(entry: dict) -> Path:
    return Path(os.path.expanduser(str(entry["path"])))


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def looks_like_hub_id(path: str) -> bool:
    """'org/name' or 'name', without a file suffix: what the hub accepts."""
    if path.startswith((".", "/", "~")) or Path(path).suffix.lower() in (".jsonl", ".json", ".parquet", ".csv"):
        return False
    return bool(_HUB_ID.match(path))


def is_datasets_source(entry: dict) -> bool:
    path = local_path(entry)
    if any(entry.get(k) not in (None, False) for k in HUB_KEYS):
        return True
    if path.exists():
        return is_saved_dataset(path)
    return looks_like_hub_id(str(entry["path"]))


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("this data source needs the `datasets` package", hint="pip install datasets") from None
    return datasets


def label(entry: dict) -> str:
    split = entry.get("split")
    return f"{entry['path']}[{split}]" if split else str(entry["path"])


def open_dataset(entry: dict, where: str):
    """The `datasets` Dataset (or IterableDataset when streaming) of one source."""
    datasets = _import_datasets()
    path = local_path(entry)
    split = entry.get("split")
    try:
        if is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                split = split or ("train" if "train" in ds else next(iter(ds)))
                if split not in ds:
                    raise UserError(f"the saved dataset has no split '{split}'", where=where,
                                    hint=f"its splits: {', '.join(ds)}")
                ds = ds[split]
            return ds
        return datasets.load_dataset(str(path) if path.exists() else entry["path"], entry.get("name"),
                                     split=split or "train", revision=entry.get("revision"),
                                     streaming=bool(entry.get("streaming")))
    except UserError:
        raise
    except Exception as e:  # datasets raises many kinds (not found, offline, bad split, bad files)
        local = "" if path.exists() else f" (and there is no local file or folder '{path}')"
        raise UserError(f"cannot load dataset '{entry['path']}'{local}: {type(e).__name__}: {e}", where=where,
                        hint="check path / name / split / revision; a hub id needs network access (or a "
                             "local copy: `datasets.load_dataset(...).save_to_disk(DIR)`, then path=DIR)") from None


def fingerprint(ds) -> str | None:
    """What identifies a loaded (non-streaming) dataset's contents; None for a stream."""
    return getattr(ds, "_fingerprint", None)


def iter_records(ds, entry: dict, skip: int = 0) -> Iterator[tuple[dict, str, int]]:
    """(record, "path[split]:row N", index) for the rows of `ds` from the `skip`-th on."""
    name = label(entry)
    if hasattr(ds, "__len__") and hasattr(ds, "select"):
        n = len(ds)
        for start in range(skip, n, 1000):
            batch = ds[start:min(start + 1000, n)]
            keys = list(batch)
            for j, values in enumerate(zip(*(batch[k] for k in keys))):
                yield dict(zip(keys, values)), f"{name}:row {start + j + 1}", start + j
        return
    stream = ds.skip(skip) if skip else ds
    for j, rec in enumerate(stream):
        yield dict(rec), f"{name}:row {skip + j + 1}", skip + j


def count_rows(ds) -> int | None:
    return len(ds) if hasattr(ds, "__len__") else None
