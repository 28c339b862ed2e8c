"""Sources → rows, as index arrays over the token stores (no token is copied or held in a list).

    per source: its conversations, minus those held out for validation (val_set_size),
                repeated `repeat × weight` times (whole copies, plus a fixed sample for a fraction)
    all sources: shuffled together (seed), cut to max_dataset_samples
    samples:    each conversation's samples in that order (a long text gives several)
    rows:       packed best-fit into rows of at most max_length tokens (pack_to_max_length), or one
                sample a row

The order and the packing are exactly those of the simple in-memory definition (Python's
random.Random(seed) shuffles, best fit with the smallest room that fits, ties to the oldest row),
so a row does not depend on whether the data came from memory or from the store.

`StoreRows` is what training reads: a sequence of row dicts, built on access from the memory-mapped
stores and the rows index by the row kind (kinds.py; next-token rows: {"input_ids", "labels"} and,
packed, "position_ids" and "seq_lens").
"""

from __future__ import annotations

import bisect
import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lmtune.data.kinds import LM, SKIP_REASONS, RowKind
from lmtune.data.store import TokenStore

_BLOCK = 1 << 16  # values walked in Python a block at a time (never a list of all of them)


def repeat_indices(n: int, factor: float, seed: int) -> np.ndarray:
    """`factor` copies of range(n): whole copies plus a deterministic sample for the fraction."""
    whole = int(factor)
    parts = [np.tile(np.arange(n, dtype=np.int64), whole)]
    extra = round((factor - whole) * n)
    if extra:
        parts.append(np.array(sorted(random.Random(seed).sample(range(n), extra)), dtype=np.int64))
    return np.concatenate(parts)


def shuffle(a: np.ndarray, seed: int) -> np.ndarray:
    """random.Random(seed).shuffle, in place, on an array (the permutation Python gives a list)."""
    random.Random(seed).shuffle(a)
    return a


def pack_lengths(lengths: np.ndarray, max_length: int, shuffle_first: bool = True, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit packing of samples (by length) into rows of at most max_length tokens.

    Returns (row_offsets, members): row r holds the samples members[row_offsets[r]:row_offsets[r+1]]
    (indices into `lengths`), in the order they were placed.
    """
    n = len(lengths)
    order = np.arange(n, dtype=np.int64)
    if shuffle_first:
        shuffle(order, seed)
    if n and int(lengths.max()) > max_length:
        raise ValueError(f"a sample has {int(lengths.max())} tokens, more than max_length={max_length}")
    row_of = np.empty(n, dtype=np.int64)  # the row of the k-th placed sample
    rooms: list[int] = []  # sorted distinct room values that some open row has
    rows_with: dict[int, list[int]] = {}  # room -> heap of the rows with that room left
    n_rows = 0
    k = 0
    for start in range(0, n, _BLOCK):
        for n_tok in lengths[order[start:start + _BLOCK]].tolist():
            j = bisect.bisect_left(rooms, n_tok)
            if j < len(rooms):
                room = rooms[j]
                heap = rows_with[room]
                b = heapq.heappop(heap)
                if not heap:
                    del rows_with[room]
                    rooms.pop(j)
            else:
                room, b = max_length, n_rows
                n_rows += 1
            row_of[k] = b
            k += 1
            left = room - n_tok
            if left > 0:
                if left not in rows_with:
                    rows_with[left] = []
                    bisect.insort(rooms, left)
                heapq.heappush(rows_with[left], b)
    by_row = np.argsort(row_of, kind="stable")  # rows in creation order, samples in placement order
    members = order[by_row]
    counts = np.bincount(row_of, minlength=n_rows)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), members


@dataclass
class Sources:
    """The opened token stores of some sources, seen as one: global conversation and sample ids."""

    stores: list[TokenStore]
    kind: RowKind = LM
    conv_base: np.ndarray = field(init=False)
    sample_base: np.ndarray = field(init=False)

    def __post_init__(self):
        self.conv_base = np.cumsum([0] + [s.n_convs for s in self.stores]).astype(np.int64)
        self.sample_base = np.cumsum([0] + [s.n_samples for s in self.stores]).astype(np.int64)

    def concat(self, get) -> np.ndarray:
        parts = [np.asarray(get(s)) for s in self.stores]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def samples_of(self, convs: np.ndarray) -> np.ndarray:
        """Global sample ids of the given global conversations, in order."""
        start = self.concat(lambda s: s.conv_off[:-1]) + np.repeat(self.sample_base[:-1], [s.n_convs for s in self.stores])
        count = self.concat(lambda s: np.diff(s.conv_off))
        starts, counts = start[convs], count[convs]
        total = int(counts.sum())
        first = np.repeat(np.cumsum(counts) - counts, counts)
        return np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - first)

    def lengths(self) -> np.ndarray:
        """Every sample's length (the row kind's length field)."""
        return self.concat(lambda s: np.diff(s.offsets[self.kind.length_field]).astype(np.int32))

    def locate(self, gid: int) -> tuple[TokenStore, int]:
        s = int(np.searchsorted(self.sample_base, gid, side="right")) - 1
        return self.stores[s], int(gid - self.sample_base[s])

    def where(self, conv: int) -> str:
        s = int(np.searchsorted(self.conv_base, conv, side="right")) - 1
        return self.stores[s].where(int(conv - self.conv_base[s]))


def held_out(n_total: int, val_set_size: float, seed: int) -> np.ndarray:
    """Sorted global conversation ids held out for validation: a fraction (< 1) or a count."""
    if not val_set_size:
        return np.zeros(0, np.int64)
    k = int(round(val_set_size * n_total)) if val_set_size < 1 else int(val_set_size)
    k = min(max(k, 1), max(n_total - 1, 0))
    return np.sort(np.random.default_rng(seed).choice(n_total, size=k, replace=False)).astype(np.int64)


def mix_order(sources: Sources, factors: list[float], seed: int, max_samples: int = 0,
              exclude: np.ndarray | None = None, source_ids: list[int] | None = None) -> tuple[np.ndarray, list[int]]:
    """Global conversation ids in training order, and how many each source contributes.
    `source_ids`: each store's index in cfg.datasets (its repeat sample is seeded with seed + index)."""
    parts, used = [], []
    for i, (store, factor) in enumerate(zip(sources.stores, factors)):
        ids = np.arange(store.n_convs, dtype=np.int64) + sources.conv_base[i]
        if exclude is not None and len(exclude):
            ids = np.setdiff1d(ids, exclude, assume_unique=True)
        picked = ids[repeat_indices(len(ids), factor, seed + (source_ids[i] if source_ids else i))]
        parts.append(picked)
        used.append(len(picked))
    order = shuffle(np.concatenate(parts) if parts else np.zeros(0, np.int64), seed)
    if max_samples:
        order = order[:max_samples]
    return order, used


def make_rows(sources: Sources, convs: np.ndarray, packed: bool, max_length: int, shuffle_first: bool,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row_offsets, row_samples, samples) for the conversations `convs` in order."""
    samples = sources.samples_of(convs)
    if not packed:
        return np.arange(len(samples) + 1, dtype=np.int64), samples, samples
    offsets, members = pack_lengths(sources.lengths()[samples], max_length, shuffle_first, seed)
    return offsets, samples[members], samples


def statistics(sources: Sources, convs: np.ndarray, samples: np.ndarray) -> dict:
    """Counts over the conversations used (repeats counted each time), as `data check` prints."""
    skip = sources.concat(lambda s: s.conv["conv_skip"])[convs]
    skipped = {SKIP_REASONS[c - 1]: int(n) for c, n in enumerate(np.bincount(skip, minlength=len(SKIP_REASONS) + 1))
               if c and n}
    examples = [{"source": sources.where(int(c)), "reason": SKIP_REASONS[int(r) - 1]}
                for c, r in zip(convs[skip > 0][:20], skip[skip > 0][:20])]
    return {
        "conversations": int(len(convs)), "samples": int(len(samples)), "skipped": skipped,
        "skipped_examples": examples, "truncated": int(sources.concat(lambda s: s.conv["conv_trunc"])[convs].sum()),
        "tokens": int(sources.lengths()[samples].sum()),
        "loss_tokens": int(sources.concat(lambda s: s.sample_loss)[samples].sum()),
    }


# --------------------------------------------------------------------------- what training reads


class StoreRows(Sequence):
    """Rows read lazily from token stores through a rows index (offsets into sample ids)."""

    def __init__(self, sources: Sources, offsets: np.ndarray, samples: np.ndarray, convs: np.ndarray, packed: bool,
                 fingerprint: str):
        # row r = samples[offsets[r]:offsets[r+1]] (global sample ids); convs: the conversations
        # in training order (before packing), for `data show`.
        self.sources, self.offsets, self.samples, self.convs = sources, offsets, samples, convs
        self.packed, self.fingerprint = packed, fingerprint

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        parts = [self.sources.locate(int(g)) for g in self.samples[self.offsets[i]:self.offsets[i + 1]]]
        row = self.sources.kind.make_row([store.sample(local) for store, local in parts], self.packed)
        kl = [getattr(store, "loss", "labels") == "kl_to_base" for store, _ in parts]
        if any(kl):  # per sample: trained towards the base model's distribution, not its labels
            row["kl_to_base"] = kl
        return row

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def sample_lengths(self) -> np.ndarray:
        """Token count of every sample in the rows."""
        return self.sources.lengths()[self.samples]

    def samples_in_order(self, n: int):
        """The first n samples in training order before packing, with their record and flags."""
        trunc = self.sources.concat(lambda s: s.conv["conv_trunc"])
        shown = 0
        for c in self.convs[: max(n, 0) * 4 + 64].tolist():  # a skipped conversation gives none
            for g in self.sources.samples_of(np.array([c], dtype=np.int64)).tolist():
                if shown >= n:
                    return
                store, local = self.sources.locate(g)
                sample = store.sample(local)
                yield {"input_ids": sample["input_ids"].tolist(), "labels": sample["labels"].tolist(),
                       "source": self.sources.where(c), "truncated": bool(trunc[c])}
                shown += 1
