"""What the training page does, without the page: config files, `lmtune` subprocesses, progress.

The page never trains in its own process. It writes a normal config file and runs
`lmtune train CONFIG --work-dir W` (or an export command) as a subprocess in a process group of
its own, so the page holds no model memory, Stop reaches exactly that run and its workers, and
everything started here can be run again from a shell.

What a run leaves in its work dir (so the page shows it again after a reload or a restart):

    webui_config.py        the config the page wrote (plain assignments, first line says so)
    webui_run.json         the process the page started: pid, command, exit status, stopped?
    webui_train.log        that process's output (stdout and stderr)
    logs/train_log.jsonl   the trainer's own log: steps (loss, lr, tokens/s), probe answers
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmtune.errors import UserError

CONFIG_NAME = "webui_config.py"
RUN_FILE = "webui_run.json"
OUTPUT_LOG = "webui_train.log"
_DIGEST_LINE = "# webui-digest: "  # sha256 of the assignments below it: an edited file is not replaced
_RUN_HEADER = "=== webui: "  # opens each attempt in the output log

_LOCK = threading.Lock()  # start/stop and the run files, within the page process
_WAITERS: dict[int, threading.Thread] = {}  # pid -> the thread that reaps it and records its exit status


# --------------------------------------------------------------------------- commands


def cli(args: list[str]) -> list[str]:
    """The argv that runs `lmtune ARGS` with the lmtune (and Python) the page itself runs on."""
    return [sys.executable, "-m", "lmtune.cli", *args]


def shell_command(args: list[str]) -> str:
    """`lmtune ARGS` as a user types it in a shell."""
    return "lmtune " + shlex.join(args)


def train_args(config: str | Path, work_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
               nproc: int | None = None) -> list[str]:
    args = ["train", str(config), "--work-dir", str(work_dir)]
    if resume:
        args += ["--resume", "auto"]
    if overwrite:
        args.append("--overwrite")
    if nproc and nproc > 1:
        args += ["--nproc-per-node", str(nproc)]
    return args


def export_kinds() -> dict[str, str]:
    """The exports this lmtune offers, {kind: label}. GGUF appears once lmtune has its exporter
    (`lmtune export gguf`, module lmtune.export.gguf)."""
    from importlib.util import find_spec

    kinds = {"pth_to_hf": "Hugging Face folder from a checkpoint (convert pth_to_hf)",
             "merge": "LoRA merged into its base (convert merge)",
             "app": "app bundle: model + app.py (export app)"}
    if find_spec("lmtune.export.gguf") is not None:
        kinds["gguf"] = "one GGUF file for llama.cpp / Ollama (export gguf)"
    return kinds


def export_args(kind: str, *, source: str, out: str, base: str | None = None, overwrite: bool = False) -> list[str]:
    """The `lmtune` arguments of an export. `source`: a checkpoint (pth_to_hf), an adapter (merge),
    a model, adapter or work dir (app, gguf)."""
    if not source:
        raise UserError("choose what to export (a checkpoint, adapter or model)")
    if not out:
        raise UserError("choose where the export goes (the output path)")
    if kind == "pth_to_hf":
        args = ["convert", "pth_to_hf", source, out]
    elif kind == "merge":
        if not base:
            raise UserError("merge needs the base model the adapter was trained on")
        args = ["convert", "merge", base, source, out]
    elif kind == "app":
        args = ["export", "app", source, out]
    elif kind == "gguf":
        args = ["export", "gguf", source, out]
    else:
        raise UserError(f"unknown export '{kind}'", hint=f"one of {', '.join(export_kinds())}")
    return args + (["--overwrite"] if overwrite else [])


# --------------------------------------------------------------------------- config files


def config_text(values: dict, base: str | None = None) -> str:
    """A config file of plain assignments: the base config's keys (a built-in name or a file),
    then the page's values over them, in the schema's order."""
    from lmtune.config import ALIASES, FIELD_NAMES, load_raw

    raw: dict = {}
    if base:
        base_raw, _, _ = load_raw(base)
        raw = {ALIASES.get(k, k): v for k, v in base_raw.items()}
    raw.update(values)
    keys = [k for k in FIELD_NAMES if k in raw] + [k for k in raw if k not in FIELD_NAMES]
    body = "".join(f"{k} = {raw[k]!r}\n" for k in keys)
    digest = hashlib.sha256(body.encode()).hexdigest()[:16]
    head = ("# Written by `lmtune webui`" + (f", starting from '{base}'" if base else "") + ".\n"
            "# A normal lmtune config: `lmtune train THIS_FILE --work-dir WORK_DIR` runs it from a shell.\n"
            "# The page replaces this file when it saves again, unless you edited it (then it refuses).\n"
            f"{_DIGEST_LINE}{digest}\n")
    return head + body


def _written_by_page(path: Path) -> bool:
    """True if `path` is a config this page wrote and nobody changed since."""
    text = path.read_text(encoding="utf-8", errors="replace")
    head, sep, body = text.partition("\n" + _DIGEST_LINE)
    if not sep:
        return False
    digest, _, body = body.partition("\n")
    return hashlib.sha256(body.encode()).hexdigest()[:16] == digest.strip()


def check_config(path: Path, text: str):
    """Load `text` as the config file `path` would be loaded (same folder, so relative data paths
    resolve the same way), with lmtune's own checks; returns the Config or raises its UserError,
    naming `path`. Nothing is left on disk."""
    from lmtune.config import check_paths, load_config

    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]  # folders the check creates
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.check-{os.getpid()}-{threading.get_ident()}.py")
    try:
        tmp.write_text(text, encoding="utf-8")
        cfg = load_config(str(tmp))
        cfg._source = str(path)
        check_paths(cfg)
    except UserError as e:
        where = e.where.replace(str(tmp), str(path)) if e.where else e.where
        raise UserError(e.message.replace(str(tmp), str(path)), where=where, hint=e.hint) from None
    finally:
        tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first; only those made here, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
    return cfg


def write_config(path: str | Path, values: dict, base: str | None = None) -> Path:
    """Check the config the page's `values` make, then write it to `path` (atomically). A file
    there is replaced only if the page wrote it and it was not edited since."""
    from lmtune.atomic import atomic_file

    path = Path(path)
    text = config_text(values, base)
    check_config(path, text)
    exists = path.is_file() and path.stat().st_size > 0
    if exists and not _written_by_page(path):
        raise UserError(f"'{path}' exists and was not written by this page (or was edited since); "
                        "refusing to replace it",
                        hint="load it as the base config (Config file), or use another work dir")
    with atomic_file(path, overwrite=exists) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


# Errors about a key the page sets through another field.
_FIELD_OF = {"quantization": "method", "strategy": "scaling", "deepspeed": "scaling"}


def error_field(err: UserError) -> str | None:
    """The config key a UserError is about (so the page shows it beside that field), or None."""
    text = f"{err.where or ''} {err.message}"
    m = re.search(r"config key '([A-Za-z_]\w*)", err.message)
    if m:
        return _FIELD_OF.get(m.group(1), m.group(1))
    if re.search(r"datasets\[\d+\]|'datasets'|no training data", text):
        return "datasets"
    if "key 'model'" in text or err.message.startswith("model path"):
        return "model"
    return None


# --------------------------------------------------------------------------- processes


@dataclass
class RunInfo:
    """A process the page started (its own process group: pgid == pid)."""

    pid: int
    command: list[str]  # the `lmtune` arguments
    started: float
    start_ticks: int | None = None  # /proc start time: a reused pid is not mistaken for this run
    returncode: int | None = None
    stopped: bool = False
    log: str = OUTPUT_LOG

    @property
    def shell(self) -> str:
        return shell_command(self.command)


def _start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _group_alive(pgid: int) -> bool:
    """Is any process (not counting zombies) still in process group `pgid`?"""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc/self/stat").exists():
        return True
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def is_alive(info: RunInfo) -> bool:
    """Is the run (any process of its group) still going? A pid now used by another program is not."""
    if info.start_ticks is not None:
        ticks = _start_ticks(info.pid)
        if ticks is not None and ticks != info.start_ticks:
            return False  # the pid was reused by something else; our group is gone
    return _group_alive(info.pid)


def read_run(work_dir: str | Path) -> RunInfo | None:
    path = Path(work_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return RunInfo(**{k: data[k] for k in RunInfo.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _write_run(work_dir: Path, info: RunInfo) -> None:
    path = Path(work_dir) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _update_run(work_dir: Path, pid: int, **changes) -> None:
    with _LOCK:
        info = read_run(work_dir)
        if info is not None and info.pid == pid:
            for k, v in changes.items():
                setattr(info, k, v)
            _write_run(work_dir, info)


def spawn(args: list[str], log_path: Path) -> subprocess.Popen:
    """Start `lmtune ARGS` in a new session (its own process group), output appended to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"{_RUN_HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')}  {shell_command(args)}\n")
        log.flush()
        return subprocess.Popen(cli(args), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def start_train(config: str | Path, work_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                nproc: int | None = None) -> RunInfo:
    """Run `lmtune train CONFIG --work-dir W` in the background; refuses while a run this page
    started in W is alive. (`lmtune train` itself refuses a work dir holding another run unless
    resuming or overwriting; its message appears in the output log.)"""
    work = Path(work_dir)
    args = train_args(config, work_dir, resume=resume, overwrite=overwrite, nproc=nproc)
    with _LOCK:
        previous = read_run(work)
        if previous is not None and is_alive(previous):
            raise UserError(f"a training started from this page is still running in {work} (pid {previous.pid}: "
                            f"{previous.shell})", hint="stop it first, or choose another work dir")
        proc = spawn(args, work / OUTPUT_LOG)
        info = RunInfo(pid=proc.pid, command=args, started=time.time(), start_ticks=_start_ticks(proc.pid))
        _write_run(work, info)

    def wait() -> None:  # record the exit status (the page process is the parent)
        _update_run(work, proc.pid, returncode=proc.wait())

    waiter = threading.Thread(target=wait, daemon=True, name=f"webui-wait-{proc.pid}")
    waiter.start()
    _WAITERS[proc.pid] = waiter
    return info


def stop_group(pid: int, grace: float = 15.0) -> bool:
    """SIGTERM to process group `pid`, then SIGKILL after `grace` seconds; True once it is gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.time() + wait
        while time.time() < deadline:
            if not _group_alive(pid):
                return True
            time.sleep(0.1)
    return not _group_alive(pid)


def stop_train(work_dir: str | Path, grace: float = 15.0) -> str:
    """Stop the run this page started in `work_dir` (its process group only). Checkpoints are
    written atomically, so the newest complete one stays loadable; returns what happened."""
    from lmtune.train.checkpoint import latest_checkpoint

    work = Path(work_dir)
    info = read_run(work)
    if info is None or not is_alive(info):
        return f"no training started from this page is running in {work}"
    _update_run(work, info.pid, stopped=True)
    gone = stop_group(info.pid, grace)
    if not gone:
        raise UserError(f"the training in {work} (process group {info.pid}) did not end after SIGKILL")
    waiter = _WAITERS.pop(info.pid, None)
    if waiter is not None:  # our child: reaped and its exit status recorded before we answer
        waiter.join(10)
    last = latest_checkpoint(work, quiet=True)
    return (f"stopped. The last complete checkpoint is {last.name}: Resume continues from it." if last else
            "stopped before the first checkpoint was saved; Start begins again.")


# --------------------------------------------------------------------------- progress


@dataclass
class Progress:
    state: str = "none"  # none | running | finished | stopped | failed | ended (exit status unknown)
    step: int = 0
    total: int | None = None
    losses: list = field(default_factory=list)  # [(step, loss)]
    lrs: list = field(default_factory=list)  # [(step, lr)]
    val_losses: list = field(default_factory=list)  # [(step, validation loss)]
    tokens_per_s: float | None = None
    epoch: float | None = None
    probes: list = field(default_factory=list)  # the newest answers: [{"question", "answer", ...}]
    probe_step: int | None = None
    log_tail: str = ""
    error: str | None = None  # lmtune's error message (or the end of a traceback) of the last attempt
    command: str | None = None
    returncode: int | None = None

    @property
    def percent(self) -> float:
        return 100.0 * min(self.step, self.total) / self.total if self.total else 0.0


def read_train_log(path: Path) -> dict:
    """Steps, learning rates, tokens/s and probe answers from logs/train_log.jsonl. A resume that
    starts at step s redoes the steps after s, so those are dropped when its start record comes."""
    out = {"losses": {}, "lrs": {}, "val_losses": {}, "total": None, "tokens_per_s": None, "epoch": None, "probes": [],
           "probe_step": None}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line being written
        if not isinstance(r, dict) or "step" not in r:
            continue
        step = int(r["step"])
        if "total_steps" in r and "loss" not in r:  # a (re)start
            out["total"] = int(r["total_steps"])
            for key in ("losses", "lrs", "val_losses"):
                out[key] = {s: v for s, v in out[key].items() if s <= step}
        if "loss" in r:
            out["losses"][step] = float(r["loss"])
            if "lr" in r:
                out["lrs"][step] = float(r["lr"])
            out["tokens_per_s"] = r.get("tokens_per_s", out["tokens_per_s"])
            out["epoch"] = r.get("epoch", out["epoch"])
        if "val_loss" in r:
            out["val_losses"][step] = float(r["val_loss"])
        if "probe" in r:
            out["probes"], out["probe_step"] = r["probe"], step
    return out


def tail(path: Path, lines: int = 30, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a log; a progress bar's carriage-return redraws show only their
    newest state."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return tail_text(data, lines)


def tail_text(data: str, lines: int = 30) -> str:
    out = []
    for line in data.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        out.append(parts[-1] if parts else line)
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out[-lines:])


def last_attempt(path: Path, max_bytes: int = 256 * 1024) -> str:
    """The output of the newest attempt in a log the page writes (from its last header on)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    i = data.rfind(_RUN_HEADER)
    return data[i:] if i >= 0 else data


def error_text(output: str) -> str | None:
    """lmtune's own error message (with its hint) in a command's output, else a traceback's end."""
    i = output.rfind("lmtune: error: ")
    if i >= 0:
        return output[i + len("lmtune: error: "):].strip()
    i = output.rfind("Traceback (most recent call last)")
    if i >= 0:
        return "\n".join(output[i:].strip().splitlines()[-6:])
    return None


def read_progress(work_dir: str | Path) -> Progress:
    work = Path(work_dir)
    log = read_train_log(work / "logs" / "train_log.jsonl")
    losses = sorted(log["losses"].items())
    p = Progress(losses=losses, lrs=sorted(log["lrs"].items()), val_losses=sorted(log["val_losses"].items()),
                 total=log["total"],
                 step=losses[-1][0] if losses else 0, tokens_per_s=log["tokens_per_s"], epoch=log["epoch"],
                 probes=log["probes"], probe_step=log["probe_step"], log_tail=tail(work / OUTPUT_LOG))
    info = read_run(work)
    if info is None:
        p.state = "none" if not losses else "ended"
        return p
    p.command, p.returncode = info.shell, info.returncode
    if is_alive(info):
        p.state = "running"
        return p
    waiter = _WAITERS.get(info.pid)
    if info.returncode is None and waiter is not None:  # ours, just ended: its exit status is on its way
        waiter.join(timeout=5)
        info = read_run(work) or info
        p.returncode = info.returncode
    if info.stopped:
        p.state = "stopped"
    elif info.returncode == 0:
        p.state = "finished"
    elif info.returncode is None:  # the page restarted while it ran: judge by what it left
        done = p.total is not None and p.step >= p.total and (work / "hf").is_dir()
        p.state = "finished" if done else "ended"
    else:
        p.state = "failed"
    if p.state in ("failed", "ended"):
        p.error = error_text(last_attempt(work / OUTPUT_LOG))
    return p
