"""Small text renderings shared by `lmtune data check` / `data show` (SFT and preference data)."""

from __future__ import annotations

MASK_OPEN, MASK_CLOSE = "[[", "]]"  # `data show --show masked_text` wraps text without loss in these


def histogram(lengths, max_length: int, buckets: int = 8, width: int = 40) -> str:
    """A text histogram of token lengths (a sequence or an array), in equal buckets up to max_length."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return "  (no samples)"
    step = max(1, -(-max_length // buckets))
    counts = np.bincount(np.minimum((lengths - 1) // step, buckets - 1), minlength=buckets).tolist()
    top = max(counts)
    lines = []
    for b, c in enumerate(counts):
        lo, hi = b * step + 1, min((b + 1) * step, max_length)
        bar = "█" * (round(width * c / top) if top else 0)
        lines.append(f"  {lo:>6}–{hi:<6} {c:>7}  {bar}")
    return "\n".join(lines)


def print_sources_and_problems(sources: dict, errors: list, read_noun: str) -> None:
    """The `data check` lines for each source (read / used / repeat / bad) and the first 20 problems."""
    print("sources:")
    for path, s in sources.items():
        bad = f", {s['errors']} bad record(s)" if s["errors"] else ""
        towards = ", trained towards the base model (loss kl_to_base)" if s.get("loss") == "kl_to_base" else ""
        print(f"  {path}: {s['read']} {read_noun} read, {s['used']} used (repeat {s['repeat']:g}){towards}{bad}")
    if errors:
        print(f"problems ({len(errors)}):")
        for e in errors[:20]:
            print(f"  {e}".replace("\n", "\n  "))
        if len(errors) > 20:
            print(f"  … and {len(errors) - 20} more")


def skipped_text(skipped: dict) -> str:
    """'skipped N' and, when N > 0, the count per reason."""
    n = sum(skipped.values())
    return f"skipped {n}" + (f" ({', '.join(f'{k}: {v}' for k, v in skipped.items())})" if n else "")


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
