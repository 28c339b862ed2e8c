"""Read data files and convert every record into the one `Conversation` type.

Files: .jsonl, .json (a list of records), .parquet, .csv, or a folder of them (read in sorted
order). Formats (one small converter each, chosen per file; "auto" looks at the first record):

  openai    {"messages": [{"role": "system"|"user"|"assistant", "content": "...", "loss": bool?}]}
            (content may be a list of parts: {"type": "text", "text"}, {"type": "image_url", "image_url":
            {"url"}}, {"type": "image", "image"|"path"|"url"})
  alpaca    {"instruction": "...", "input": "...", "output": "...", "system": "..."?, "history": [[q, a]]?}
  sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}], "system": "..."?}
            (LLaVA's json is this shape with "image": "rel/path.jpg"; LLaMA-Factory's with "images": [...])
  oasst1    {"text": "### Human: ... ### Assistant: ... ### Human: ..."}   (guanaco style)
  pretrain  {"text": "..."}                                                 (every token trains)

Images: every chat format takes "images" (a list) or "image" (one or a list) beside a text that has
one `<image>` per image, or image parts in openai content; an image part becomes "<image>\n" in the
text. Relative image paths are relative to the dataset's `image_folder` (default: the data file's
folder). Images are only referenced here (see data/images.py).

Every problem is a `UserError` whose `where` is "file:line" (for parquet "file:row N").
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

from lmtune.data.conversation import ROLES, Conversation, Message
from lmtune.data.images import IMAGE_PLACEHOLDER, resolve_ref
from lmtune.errors import UserError

FORMATS = ("openai", "alpaca", "sharegpt", "oasst1", "pretrain")
EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")

_UTF8_HINT = "save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8 in.jsonl > out.jsonl`)"


# --------------------------------------------------------------------------- files → records


def list_files(path: str | os.PathLike) -> list[Path]:
    """The data files under `path` (a file, or a folder searched recursively)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise UserError(f"data path '{path}' does not exist", hint="check the 'datasets' key of the config")
    if p.is_file():
        if p.suffix.lower() not in EXTENSIONS:
            raise UserError(
                f"unsupported data file type '{p.suffix}'", where=str(p),
                hint=f"use one of {', '.join(EXTENSIONS)}",
            )
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in EXTENSIONS)
    if not files:
        raise UserError(f"folder '{path}' holds no data files", hint=f"expected files ending in {', '.join(EXTENSIONS)}")
    return files


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"the file is not valid UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start})",
            where=f"{path}:{line}", hint=_UTF8_HINT,
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _json_error(e: json.JSONDecodeError) -> str:
    return f"malformed JSON: {e.msg} (column {e.colno})"


def read_records(path: Path) -> Iterator[tuple[dict, str]]:
    """Yield (record, "file:line") for every record of one file, streaming: a .jsonl, .csv or
    .parquet file is never read whole (a .json list is: use .jsonl for very large data)."""
    for rec, where, _ in _records_with_skip(path):
        yield rec, where


def _records_with_skip(path: Path, skip: int = 0) -> Iterator[tuple[dict, str, int]]:
    """(record, where, index) for the records of one file from the `skip`-th on; the records
    before are passed over without decoding where the file type allows (.jsonl: not parsed)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, skip)
    elif suffix == ".csv":
        yield from _read_csv(path, skip)
    elif suffix == ".json" and _starts_with_bracket(path):
        yield from _read_json_list(path, skip)
    else:  # .jsonl (and a .json file that holds one object per line)
        yield from _read_jsonl(path, skip)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")


def _read_jsonl(path: Path, skip: int) -> Iterator[tuple[dict, str, int]]:
    # Split on b"\n" only: str.splitlines() would also split inside strings at U+2028 and friends.
    index, offset = 0, 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3
            if not raw.strip():
                continue
            index += 1
            if index <= skip:
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(
                    f"the file is not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte offset {start + e.start})",
                    where=f"{path}:{lineno}", hint=_UTF8_HINT,
                ) from None
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(_json_error(e), where=f"{path}:{lineno}",
                                hint="each line of a .jsonl file must be one complete JSON object") from None
            if not isinstance(rec, dict):
                raise UserError(f"expected a JSON object, got a {type(rec).__name__}", where=f"{path}:{lineno}")
            yield rec, f"{path}:{lineno}", index - 1


def _read_csv(path: Path, skip: int) -> Iterator[tuple[dict, str, int]]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            for index, row in enumerate(reader):
                if index >= skip:
                    yield dict(row), f"{path}:{reader.line_num}", index
    except UnicodeDecodeError:
        _decode(path.read_bytes(), path)  # raises the error with the exact line and byte offset
        raise


def _read_json_list(path: Path, skip: int) -> Iterator[tuple[dict, str, int]]:
    text = _decode(path.read_bytes(), path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(_json_error(e), where=f"{path}:{e.lineno}") from None
    # Line numbers of each top-level record, so later errors can point into the file (a scan in
    # Python: for very large files records are named by index instead).
    starts = _top_level_object_lines(text) if len(text) < 20_000_000 else []
    del text
    for i in range(skip, len(data)):
        rec = data[i]
        where = f"{path}:{starts[i]}" if i < len(starts) else f"{path}:[{i}]"
        if not isinstance(rec, dict):
            raise UserError(f"record {i} is a {type(rec).__name__}, expected a JSON object", where=where)
        yield rec, where, i


def _top_level_object_lines(text: str) -> list[int]:
    """Line number where each element of a top-level JSON array starts (a cheap scan)."""
    lines, depth, line, in_str, esc = [], 0, 1, False, False
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
            if depth == 1:
                lines.append(line)
        elif ch in "[{":
            if depth == 1:
                lines.append(line)
            depth += 1
        elif ch in "]}":
            depth -= 1
    return lines


def _read_parquet(path: Path, skip: int = 0) -> Iterator[tuple[dict, str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for broken files
        raise UserError(f"cannot read parquet file: {e}", where=str(path)) from None
    index = 0
    try:
        for batch in pf.iter_batches(batch_size=1024):
            if index + batch.num_rows <= skip:
                index += batch.num_rows
                continue
            for rec in batch.to_pylist():
                if index >= skip:
                    yield rec, f"{path}:row {index + 1}", index
                index += 1
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read parquet file: {e}", where=str(path)) from None


# --------------------------------------------------------------------------- converters


IMAGE_PART_TEXT = IMAGE_PLACEHOLDER + "\n"  # what an image content part becomes in message text
_IMAGE_PART_TYPES = ("image_url", "image", "input_image")


def image_part_ref(part: dict) -> Optional[str]:
    """The image reference of an openai-style content part, or None if it is not an image part."""
    kind = part.get("type")
    if kind not in _IMAGE_PART_TYPES:
        return None
    value = part.get(kind) if kind != "input_image" else part.get("image_url")
    if isinstance(value, dict):
        value = value.get("url")
    for key in ("image", "path", "url"):
        if value is None:
            value = part.get(key)
    return value


def _text(rec: dict, key: str, where: str, required: bool = True, images: Optional[list] = None) -> Optional[str]:
    value = rec.get(key)
    if value is None:
        if required:
            raise UserError(f"missing required field '{key}'", where=where,
                            hint=f"the record has fields: {', '.join(rec) or '(none)'}")
        return None
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI content parts: [{"type": "text", "text": "..."}, {"type": "image_url", ...}]
        pieces = []
        for p in value:
            ref = image_part_ref(p)
            if p.get("type") in _IMAGE_PART_TYPES:
                if images is None:
                    raise UserError(f"field '{key}' holds an image part where only text is allowed", where=where)
                if ref is None:
                    raise UserError(f"an image part of field '{key}' names no image", where=where,
                                    hint='write {"type": "image_url", "image_url": {"url": "path/or/data-url"}}')
                images.append(ref)
                pieces.append(IMAGE_PART_TEXT)
            elif p.get("type", "text") == "text":
                pieces.append(p.get("text", ""))
        value = "".join(pieces)
    if not isinstance(value, str):
        raise UserError(f"field '{key}' must be a string, got {type(value).__name__}", where=where)
    return value


def _record_images(rec: dict, where: str) -> list:
    """The images a record lists in "images" (or LLaVA's "image"): one reference or a list."""
    value = rec.get("images", rec.get("image"))
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise UserError(f"field '{'images' if 'images' in rec else 'image'}' must be a path or a list of paths, "
                    f"got {type(value).__name__}", where=where)


def _finish(messages: list[Message], where: str, images: Optional[list] = None) -> Conversation:
    images = images or []
    if not messages:
        raise UserError("the conversation has no messages", where=where)
    for i, m in enumerate(messages):
        if m.role == "system" and i != 0:
            raise UserError(f"message {i} is a system message; only the first message may be one", where=where)
        if m.role == "assistant" and not m.content.strip():
            raise UserError(f"message {i} is an empty assistant reply", where=where,
                            hint="remove the record or write the reply")
    if not any(m.trains() for m in messages):
        raise UserError("the conversation has no assistant reply to train on", where=where)
    if images:
        n = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
        if n != len(images):
            raise UserError(
                f"the record has {len(images)} image(s) but {n} {IMAGE_PLACEHOLDER} placeholder(s) in its text",
                where=where, hint=f"put one {IMAGE_PLACEHOLDER} in the text where each image goes (LLaVA: "
                                  f"\"{IMAGE_PLACEHOLDER}\\n\" before the first question), one per image")
    return Conversation(messages=messages, source=where, images=images)


def from_openai(rec: dict, where: str) -> Conversation:
    msgs = rec.get("messages")
    if msgs is None:
        raise UserError("missing required field 'messages'", where=where)
    if not isinstance(msgs, list):
        raise UserError(f"field 'messages' must be a list, got {type(msgs).__name__}", where=where)
    out, images = [], _record_images(rec, where)
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UserError(f"messages[{i}] must be an object with 'role' and 'content'", where=where)
        role = m.get("role")
        if role is None:
            raise UserError(f"missing required field 'messages[{i}].role'", where=where)
        if role not in ROLES:
            raise UserError(f"unknown role {role!r} in messages[{i}].role", where=where,
                            hint=f"roles must be one of {', '.join(ROLES)}")
        content = _text(m, "content", f"{where} (messages[{i}])", images=images)
        loss = m.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise UserError(f"messages[{i}].loss must be true or false, got {loss!r}", where=where)
        out.append(Message(role, content, loss))
    return _finish(out, where, images)


def from_alpaca(rec: dict, where: str) -> Conversation:
    instruction = _text(rec, "instruction", where)
    output = _text(rec, "output", where)
    extra = _text(rec, "input", where, required=False) or ""
    system = _text(rec, "system", where, required=False)
    msgs = [Message("system", system)] if system else []
    for i, pair in enumerate(rec.get("history") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise UserError(f"history[{i}] must be a [question, answer] pair of strings", where=where)
        msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    msgs += [Message("user", prompt), Message("assistant", output)]
    return _finish(msgs, where, _record_images(rec, where))


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def from_sharegpt(rec: dict, where: str) -> Conversation:
    turns = rec.get("conversations")
    if turns is None:
        raise UserError("missing required field 'conversations'", where=where)
    if not isinstance(turns, list):
        raise UserError(f"field 'conversations' must be a list, got {type(turns).__name__}", where=where)
    system = _text(rec, "system", where, required=False)
    msgs = [Message("system", system)] if system else []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise UserError(f"conversations[{i}] must be an object with 'from' and 'value'", where=where)
        who = t.get("from")
        if who is None:
            raise UserError(f"missing required field 'conversations[{i}].from'", where=where)
        if who not in _SHAREGPT_ROLES:
            raise UserError(f"unknown role {who!r} in conversations[{i}].from", where=where,
                            hint="'from' must be one of human, gpt, system")
        msgs.append(Message(_SHAREGPT_ROLES[who], _text(t, "value", f"{where} (conversations[{i}])")))
    return _finish(msgs, where, _record_images(rec, where))


_OASST_SPLIT = re.compile(r"###\s*(Human|Assistant)\s*:")


def from_oasst1(rec: dict, where: str) -> Conversation:
    text = _text(rec, "text", where)
    parts = _OASST_SPLIT.split(text)
    if parts[0].strip():
        raise UserError("text must start with '### Human:'", where=where)
    msgs = []
    for who, content in zip(parts[1::2], parts[2::2]):
        role = "user" if who == "Human" else "assistant"
        if msgs and msgs[-1].role == role:
            raise UserError(f"two '### {who}:' turns in a row", where=where)
        msgs.append(Message(role, content.strip()))
    if not msgs or msgs[0].role != "user":
        raise UserError("text must contain '### Human: …' followed by '### Assistant: …'", where=where)
    return _finish(msgs, where)


def from_pretrain(rec: dict, where: str) -> Conversation:
    text = _text(rec, "text", where)
    if not text.strip():
        raise UserError("field 'text' is empty", where=where)
    return Conversation(text=text, source=where)


CONVERTERS: dict[str, Callable[[dict, str], Conversation]] = {
    "openai": from_openai,
    "alpaca": from_alpaca,
    "sharegpt": from_sharegpt,
    "oasst1": from_oasst1,
    "pretrain": from_pretrain,
}


def detect_format(rec: dict, where: str) -> str:
    if "messages" in rec:
        return "openai"
    if "conversations" in rec:
        return "sharegpt"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if isinstance(rec.get("text"), str):
        return "oasst1" if _OASST_SPLIT.search(rec["text"]) else "pretrain"
    raise UserError(
        f"cannot tell the data format from the fields ({', '.join(rec) or 'none'})", where=where,
        hint="expected 'messages' (openai), 'conversations' (sharegpt), 'instruction'+'output' (alpaca) or "
             "'text' (oasst1 / pretrain); or set format= for this dataset",
    )


def check_format(format: str, where: str | None = None) -> str:
    if format != "auto" and format not in CONVERTERS:
        raise UserError(f"unknown data format '{format}'", where=where,
                        hint=f"use one of auto, {', '.join(FORMATS)}")
    return format


# --------------------------------------------------------------------------- the entry point


def _resolve_images(conv: Conversation, folder: Path) -> Conversation:
    """Image references made absolute; a file that does not exist is an error here, where the
    record's file:line is known (a cheap stat: pixels are read later)."""
    refs = [resolve_ref(r, folder, conv.source) for r in conv.images]
    for r in refs:
        if not r.startswith("data:") and not os.path.isfile(r):
            raise UserError(f"image '{r}' does not exist", where=conv.source,
                            hint="fix the path, or set image_folder (in the config or on this dataset) to the "
                                 "folder the relative image paths start from")
    conv.images = refs
    return conv


def count_records(path: Path) -> int:
    """How many records a file holds (.jsonl lines are counted, not parsed)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise UserError(f"cannot read parquet file: {e}", where=str(path)) from None
    if suffix == ".csv" or (suffix == ".json" and _starts_with_bracket(path)):
        return sum(1 for _ in _records_with_skip(path))
    with open(path, "rb") as f:
        return sum(1 for raw in f if raw.strip() and raw.strip() != b"\xef\xbb\xbf")


def _conversations(records: Iterator, format: str, errors: Optional[list], first: Optional[tuple] = None,
                   image_folder: Optional[Path] = None) -> Iterator[Conversation]:
    """Convert (record, where, ...) tuples of one file; "auto" detects the format from the file's
    first record (`first`, when the records start later in the file). Relative image paths start
    from `image_folder`."""
    fmt = None if format == "auto" else format
    while True:
        try:
            rec, where, *_ = next(records)
        except StopIteration:
            return
        except UserError as e:
            # A file-level problem (bad bytes, bad JSON) ends that file.
            if errors is None:
                raise
            errors.append(e)
            return
        try:
            if fmt is None:
                fmt = detect_format(*(first or (rec, where))[:2])
            conv = CONVERTERS[fmt](rec, where)
            yield _resolve_images(conv, image_folder) if conv.images else conv
        except UserError as e:
            if errors is None:
                raise
            errors.append(e)


def iter_conversations(path, format: str = "auto", errors: Optional[list] = None, skip: int = 0,
                       image_folder: Optional[str] = None) -> Iterator[Conversation]:
    """Yield the conversations of a file or folder, from the `skip`-th record on.

    With `errors` (a list), a bad record is appended there as a UserError and skipped instead of
    raised (used by `lmtune data check` to report every problem at once). Relative image paths
    start from `image_folder` (default: the folder of the data file).
    """
    check_format(format)
    for file in list_files(path):
        if skip:
            n = count_records(file)
            if skip >= n:
                skip -= n
                continue
        first = next(_records_with_skip(file), None) if skip and format == "auto" else None
        folder = Path(os.path.expanduser(image_folder)) if image_folder else file.parent
        yield from _conversations(_records_with_skip(file, skip), format, errors, first, folder)
        skip = 0


def read_conversations(path, format: str = "auto", errors: Optional[list] = None,
                       image_folder: Optional[str] = None) -> list[Conversation]:
    """All conversations of a file or folder (small data: tests and tools); an empty result is an
    error naming the path."""
    n_errors = len(errors) if errors is not None else 0
    convs = list(iter_conversations(path, format, errors, image_folder=image_folder))
    if not convs and (errors is None or len(errors) == n_errors):
        raise UserError(f"the dataset '{path}' holds no records", where=str(path),
                        hint="check the file; an empty file or a folder of empty files trains nothing")
    return convs
