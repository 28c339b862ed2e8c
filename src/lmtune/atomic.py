"""Writing folders and files so that nothing the user owns is lost.

One rule for every command that writes an output (`convert pth_to_hf`, `convert merge`, `export
app`, training's `hf/`, the model cache, `data self-cognition`, `data replace`, `copy-cfg`):

- The output is built under a temporary name beside its destination and renamed into place only
  when complete, so a crash or a full disk never leaves a half-written output where a good one was.
- A folder is replaced only when it does not exist, is empty, or is lmtune's own previous output
  of the same kind. lmtune recognises its output by a marker file (one name per kind, below) that
  lists every file it wrote with its size and modification time; a folder whose marker is missing,
  of another kind, or that holds files the marker does not list or that changed since (the user's
  own work) is refused unless `overwrite` is given.
- A file is replaced only when it does not exist or is empty, unless `overwrite` is given.

`atomic_dir` always writes the marker itself (keeping what the writer put in it), so no command
can forget it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lmtune.errors import UserError

# One marker per kind of output: a folder is replaced without --overwrite only by output of its kind.
HF_MARKER = "lmtune.json"           # a Hugging Face model or adapter folder (train's hf/, pth_to_hf, merge)
APP_MARKER = "lmtune-app.json"      # an app bundle (`lmtune export app`)
CACHE_MARKER = "lmtune-cache.json"  # a converted model in lmtune's cache (GGUF -> safetensors)
KINDS = {
    HF_MARKER: "Hugging Face folder written by lmtune",
    APP_MARKER: "app bundle written by `lmtune export app`",
    CACHE_MARKER: "model converted into lmtune's cache",
}
FILES_KEY = "files_written"  # in the marker: {relative POSIX path: [size, mtime_ns]} of every other file

OVERWRITE_DIR_HINT = "pass --overwrite to replace it and everything in it, or choose another (new or empty) folder"
OVERWRITE_FILE_HINT = "pass --overwrite to replace it, or choose another file name"


def _log(msg: str) -> None:
    print(f"[lmtune] {msg}", file=sys.stderr, flush=True)


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _some(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f", … ({len(names) - k} more)" if len(names) > k else "")


def _files_under(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file under `folder` (links are not followed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_dir() or p.is_symlink():
            st = p.lstat()
            out[p.relative_to(folder).as_posix()] = [st.st_size, st.st_mtime_ns]
    return out


def _read_marker(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _check_parent(path: Path) -> None:
    """The nearest existing parent must be a folder we may write in (the temporary copy goes there)."""
    for parent in Path(os.path.abspath(path)).parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"cannot write '{path}': '{parent}' is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"cannot write '{path}': no permission to write in '{parent}'",
                                hint="choose a folder you can write to")
            return


def check_out_dir(out: str | Path, *, marker: str, overwrite: bool = False, hint: str | None = None) -> str:
    """Raise a UserError unless `out` may be replaced by a new output of the kind `marker` names.

    Returns why it may: "new", "empty", "previous" (lmtune's own output of this kind) or
    "overwrite". Commands call it before slow work so a refusal comes at once; `atomic_dir`
    calls it again just before the swap.
    """
    out = Path(out)
    kind = KINDS.get(marker, f"lmtune output ({marker})")
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' is a file, but a folder is expected here",
                        hint="give a folder path (a new or empty folder)")
    _check_parent(out)
    if not out.exists():
        return "new"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    if not entries:
        return "empty"
    meta = _read_marker(out / marker) if (out / marker).is_file() else None
    if meta is None:
        others = [m for m in KINDS if m != marker and (out / m).is_file()]
        what = f"{_a(KINDS[others[0]])}, not {_a(kind)}" if others else f"not a previous {kind}"
        problem = f"'{out}' is not empty ({len(entries)} entries: {_some(entries)}) and is {what}"
    else:  # a file the marker does not list, or one that changed since, is someone else's work
        written = meta.get(FILES_KEY)
        present = _files_under(out)
        present.pop(marker, None)
        if not isinstance(written, dict):  # written before file lists were kept: trust the marker
            return "previous"
        added = [f for f in present if f not in written]
        changed = [f for f, stat in present.items() if f in written and list(written[f]) != stat]
        if not added and not changed:
            return "previous"
        parts = ([f"{len(added)} file(s) in it were not written by lmtune ({_some(added)})"] if added else []) + \
                ([f"{len(changed)} file(s) changed since lmtune wrote them ({_some(changed)})"] if changed else [])
        problem = f"'{out}' is a previous {kind}, but " + " and ".join(parts)
    if overwrite:
        return "overwrite"
    raise UserError(f"{problem}; refusing to replace it", hint=hint or OVERWRITE_DIR_HINT)


def check_not_input(out: str | Path, **inputs: str | Path | None) -> None:
    """Refuse an output folder that is, or contains, one of the command's inputs: replacing it
    would delete what the command reads (`convert merge BASE work/hf work/hf`)."""
    out_real = Path(os.path.realpath(out))
    for name, value in inputs.items():
        if value is None or not Path(value).exists():
            continue
        src = Path(os.path.realpath(value))
        if src == out_real or out_real in src.parents:
            raise UserError(f"the output folder '{out}' {'is' if src == out_real else 'contains'} "
                            f"{name.upper()} '{value}', which this command reads",
                            hint="choose another output folder")


@contextmanager
def atomic_dir(out: str | Path, *, marker: str, overwrite: bool = False, hint: str | None = None):
    """Yield a fresh temporary folder beside `out` to write the output into; when the block
    succeeds, `out` is checked again (`check_out_dir`) and replaced whole by it. The previous
    `out`, if any, is removed only after the new one is in place. On an error the temporary folder
    is removed and `out` is left as it was.

    The writer may write `marker` itself (its content is kept); the list of written files is added.
    """
    out = Path(os.path.realpath(out))  # a link to a folder: write where it points
    check_out_dir(out, marker=marker, overwrite=overwrite, hint=hint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        yield tmp
        meta = _read_marker(tmp / marker) if (tmp / marker).is_file() else None
        meta = dict(meta or {})
        (tmp / marker).unlink(missing_ok=True)
        meta[FILES_KEY] = _files_under(tmp)
        (tmp / marker).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is a normal folder
        why = check_out_dir(out, marker=marker, overwrite=overwrite, hint=hint)  # again: things may have appeared
        if why == "previous":
            _log(f"replacing the previous {KINDS.get(marker, 'lmtune output')} in {out}")
        elif why == "overwrite":
            _log(f"replacing {out} and everything in it (--overwrite)")
        if out.exists():
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- single files


def check_out_file(path: str | Path, *, overwrite: bool = False) -> None:
    """Raise a UserError if writing `path` would replace a non-empty file without `overwrite`,
    or if `path` is a folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"'{path}' is a folder, but a file is expected here", hint="give a file path")
    _check_parent(path)
    if path.exists() and path.stat().st_size > 0 and not overwrite:
        size = path.stat().st_size
        raise UserError(f"'{path}' already exists ({size:,} byte{'s' * (size != 1)}); refusing to replace it",
                        hint=OVERWRITE_FILE_HINT)


@contextmanager
def atomic_file(path: str | Path, *, overwrite: bool = False):
    """Yield a temporary path beside `path` to write; when the block succeeds it replaces `path`
    (checked with `check_out_file` before and after). On an error the temporary file is removed."""
    path = Path(os.path.realpath(path))
    check_out_file(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        check_out_file(path, overwrite=overwrite)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the output is a normal file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> None:
    """Write `text` (UTF-8) to `path` through `atomic_file`."""
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
