"""Nothing the user owns is destroyed: every command that writes a folder or a file refuses to
replace one it did not write unless --overwrite is given, and a crash mid-write leaves the previous
output as it was, with no temporary leftovers. (`export app` is covered in test_app_bundle.py.)"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from conftest import write_jsonl
from lmtune.atomic import (APP_MARKER, CACHE_MARKER, FILES_KEY, HF_MARKER, atomic_dir, atomic_file,
                           check_out_dir)
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.train.loop import run_training


def user_folder(path: Path) -> dict:
    """A folder of the user's own: a file and a subfolder."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_text("do not lose me", encoding="utf-8")
    (path / "notes" / "a.md").write_text("mine too", encoding="utf-8")
    return snapshot(path)


def snapshot(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Temporary names beside an output (they all start with '.')."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def refused(capsys, out) -> str:
    err = capsys.readouterr().err
    assert str(Path(out).resolve()) in err and "--overwrite" in err and "Traceback" not in err, err
    return err


def disk_full(monkeypatch, target, name):
    """Make `target.name` write a part of its output and then fail as a full disk would."""
    real = getattr(target, name)

    def broken(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")

    monkeypatch.setattr(target, name, broken)


# --------------------------------------------------------------------------- the rule (atomic.py)


def test_atomic_dir_rule(tmp_path, capsys):
    out = tmp_path / "out"
    with atomic_dir(out, marker=HF_MARKER) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
        (tmp / HF_MARKER).write_text(json.dumps({"system": "kept"}))
    meta = json.loads((out / HF_MARKER).read_text())
    assert meta["system"] == "kept"  # the writer's content, plus the list of files with size and mtime
    assert meta[FILES_KEY] == {f: [(out / f).stat().st_size, (out / f).stat().st_mtime_ns] for f in ("sub/x", "w.bin")}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())  # a normal folder, not mkdtemp's 0700
    # lmtune's own output of the same kind is replaced whole (no stale files), and says so
    with atomic_dir(out, marker=HF_MARKER) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert sorted(snapshot(out)) == [HF_MARKER, "v.bin"]
    assert "replacing the previous Hugging Face folder" in capsys.readouterr().err
    # ... but not one of another kind
    with pytest.raises(UserError, match="is a Hugging Face folder written by lmtune, not an app bundle"):
        check_out_dir(out, marker=APP_MARKER)
    # ... nor one the user added a file to
    (out / "mine.txt").write_text("mine")
    with pytest.raises(UserError, match=r"1 file\(s\) in it were not written by lmtune \(mine.txt\)"):
        check_out_dir(out, marker=HF_MARKER)
    assert check_out_dir(out, marker=HF_MARKER, overwrite=True) == "overwrite"
    # an empty folder is fine; a file where a folder is expected is not, even with overwrite
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty", marker=HF_MARKER) == "empty"
    (tmp_path / "f").write_text("f")
    for path in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(UserError, match="is a file"):
            check_out_dir(path, marker=HF_MARKER, overwrite=True)
    assert leftovers(tmp_path) == []


def test_atomic_dir_lists_what_is_there(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(8):
        (out / f"f{i}.txt").write_text("x")
    with pytest.raises(UserError) as info:
        check_out_dir(out, marker=HF_MARKER)
    msg = str(info.value)
    assert f"'{out}' is not empty (8 entries: f0.txt, f1.txt, f2.txt, f3.txt, f4.txt, … (3 more))" in msg
    assert "--overwrite" in msg and "another (new or empty) folder" in msg


def test_atomic_dir_crash_keeps_the_previous_folder(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with atomic_dir(out, marker=HF_MARKER) as tmp:
        (tmp / "w.bin").write_bytes(b"old")
    before = snapshot(out)
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(out, marker=HF_MARKER) as tmp:
            (tmp / "w.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert snapshot(out) == before and leftovers(tmp_path) == []
    # the rename into place fails: the previous folder is put back
    real = os.replace
    calls = []

    def failing_second_rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated")
        return real(a, b)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError, match="simulated"):
        with atomic_dir(out, marker=HF_MARKER) as tmp:
            (tmp / "w.bin").write_bytes(b"new")
    monkeypatch.undo()
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_atomic_dir_rechecks_before_the_swap(tmp_path):
    """A file the user puts into the output folder while lmtune writes is not lost."""
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"not empty \(1 entries: late.txt\)"):
        with atomic_dir(out, marker=HF_MARKER) as tmp:
            (tmp / "w.bin").write_bytes(b"1")
            out.mkdir()
            (out / "late.txt").write_text("mine")
    assert snapshot(out) == {"late.txt": b"mine"} and leftovers(tmp_path) == []


def test_atomic_file_rule(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        with atomic_file(f) as tmp:
            tmp.write_text("new")
    assert f.read_text() == "mine"
    with pytest.raises(OSError):
        with atomic_file(f, overwrite=True) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "full")
    assert f.read_text() == "mine" and leftovers(tmp_path) == []
    with atomic_file(f, overwrite=True) as tmp:
        tmp.write_text("new")
    assert f.read_text() == "new"
    assert oct(f.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    (tmp_path / "empty.txt").touch()
    with atomic_file(tmp_path / "empty.txt") as tmp:  # an empty file holds nothing to lose
        tmp.write_text("x")
    with pytest.raises(UserError, match="is a folder"):
        with atomic_file(tmp_path, overwrite=True):
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- convert pth_to_hf / merge


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A LoRA run of 2 steps on the tiny model: work/iter_2 and work/hf."""
    tmp = tmp_path_factory.mktemp("guards")
    data = write_jsonl(tmp / "d.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i}"}]}
        for i in range(8)])
    cfg = tmp / "cfg.py"
    cfg.write_text(f"model = {tiny_model_dir!r}\ndatasets = [{str(data)!r}]\nmax_length = 64\nmethod = 'lora'\n"
                   "lora_r = 2\nlora_alpha = 4\nbatch_size = 2\nmax_steps = 2\nsave_steps = 2\n")
    run_training(load_config(str(cfg)), tmp / "work")
    return tmp


def _pth_to_hf(trained, out, *extra):
    return main(["convert", "pth_to_hf", str(trained / "work/iter_2"), str(out), *extra])


def _merge(trained, out, *extra):
    base = json.loads((trained / "work/hf/adapter_config.json").read_text())["base_model_name_or_path"]
    return main(["convert", "merge", base, str(trained / "work/hf"), str(out), *extra])


CONVERTS = {"pth_to_hf": (_pth_to_hf, "adapter_model.safetensors"), "merge": (_merge, "model.safetensors")}


@pytest.mark.parametrize("command", sorted(CONVERTS))
def test_convert_keeps_the_users_folder(command, trained, tmp_path, capsys):
    run, weights = CONVERTS[command]
    out = tmp_path / "out"
    before = user_folder(out)
    assert run(trained, out) == 2
    assert "not a previous Hugging Face folder" in refused(capsys, out)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert run(trained, out, "--overwrite") == 0
    assert "(--overwrite)" in capsys.readouterr().err
    assert (out / weights).is_file() and not (out / "thesis.tex").exists() and not (out / "notes").exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("command", sorted(CONVERTS))
def test_convert_replaces_its_own_output(command, trained, tmp_path, capsys):
    run, weights = CONVERTS[command]
    out = tmp_path / "out"
    assert run(trained, out) == 0
    first = snapshot(out)
    assert sorted(json.loads(first[HF_MARKER])[FILES_KEY]) == sorted(set(first) - {HF_MARKER})
    assert run(trained, out) == 0  # a re-export over lmtune's own output proceeds, and says so
    assert "replacing the previous Hugging Face folder written by lmtune" in capsys.readouterr().err
    assert snapshot(out).keys() == first.keys()
    (out / "notes.md").write_text("my notes on this model")  # the user adds a file: no longer all lmtune's
    assert run(trained, out) == 2
    assert "1 file(s) in it were not written by lmtune (notes.md)" in refused(capsys, out)
    assert (out / "notes.md").read_text() == "my notes on this model"
    (out / "notes.md").unlink()
    with open(out / "tokenizer_config.json", "a") as f:  # ... or edits one lmtune wrote
        f.write("\n")
    edited = (out / "tokenizer_config.json").read_bytes()
    assert run(trained, out) == 2
    assert "1 file(s) changed since lmtune wrote them (tokenizer_config.json)" in refused(capsys, out)
    assert (out / "tokenizer_config.json").read_bytes() == edited


@pytest.mark.parametrize("command", sorted(CONVERTS))
def test_convert_crash_keeps_the_previous_output(command, trained, tmp_path, monkeypatch):
    import lmtune.export.hf as hf

    run, _ = CONVERTS[command]
    out = tmp_path / "out"
    assert run(trained, out) == 0
    before = snapshot(out)
    disk_full(monkeypatch, hf, "save_tokenizer")  # the weights are written, then the disk is full
    with pytest.raises(OSError, match="No space left"):
        run(trained, out)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_convert_empty_folder_and_file_path(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _pth_to_hf(trained, tmp_path / "empty") == 0
    assert (tmp_path / "empty" / "adapter_model.safetensors").is_file()
    f = tmp_path / "a_file"
    f.write_text("mine")
    assert _merge(trained, f, "--overwrite") == 2
    assert "is a file, but a folder is expected" in capsys.readouterr().err and f.read_text() == "mine"


def test_merge_into_its_own_adapter_is_refused(trained, capsys):
    before = snapshot(trained / "work/hf")
    assert _merge(trained, trained / "work/hf", "--overwrite") == 2
    assert "which this command reads" in capsys.readouterr().err
    assert _pth_to_hf(trained, trained / "work") == 2  # the work dir holds the checkpoint read
    assert "which this command reads" in capsys.readouterr().err
    assert snapshot(trained / "work/hf") == before


def test_internlm2_layout_save_keeps_the_users_folder(tmp_path):
    """`--save-format internlm2` writes through save_internlm2, under the same rule."""
    import torch

    from lmtune.models import internlm2 as il
    from test_internlm2 import make_checkpoint, tiny_config

    cfg = tiny_config()
    make_checkpoint(tmp_path / "ckpt", cfg)
    model = il.load_internlm2(str(tmp_path / "ckpt"), dtype=torch.float32)
    out = tmp_path / "out"
    before = user_folder(out)
    with pytest.raises(UserError, match="--overwrite"):
        il.save_internlm2(model, out, cfg)
    assert snapshot(out) == before and leftovers(tmp_path) == []
    il.save_internlm2(model, out, cfg, overwrite=True)
    assert (out / "config.json").is_file() and (out / HF_MARKER).is_file() and not (out / "thesis.tex").exists()
    il.save_internlm2(model, out, cfg)  # its own previous output: replaced


# --------------------------------------------------------------------------- train's hf/ (the API train uses)


def test_save_trained_model_keeps_the_users_folder(tiny_model_dir, smol_tokenizer, tmp_path, capsys):
    from lmtune.export import check_hf_out, save_trained_model
    from lmtune.models.loader import load_model

    model = load_model(tiny_model_dir)
    out = tmp_path / "work" / "hf"
    before = user_folder(out)
    with pytest.raises(UserError, match="--overwrite"):
        check_hf_out(out)  # what train calls before training
    with pytest.raises(UserError, match="not a previous Hugging Face folder"):
        save_trained_model(model, smol_tokenizer, None, None, out)
    assert snapshot(out) == before and leftovers(out.parent) == []
    save_trained_model(model, smol_tokenizer, None, None, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "thesis.tex").exists()
    assert check_hf_out(out) == "previous"
    save_trained_model(model, smol_tokenizer, None, None, out)  # the next run's hf/ replaces it
    assert "replacing the previous" in capsys.readouterr().err


# --------------------------------------------------------------------------- the model cache


def test_model_cache_keeps_a_foreign_folder(tmp_path, monkeypatch):
    from lmtune.models import loader

    monkeypatch.setenv("LMTUNE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")  # never read: the folder is checked before the slow conversion
    target = loader.cache_root() / "models" / "m-0123"
    before = user_folder(target)
    with pytest.raises(UserError, match="LMTUNE_CACHE_DIR") as info:
        loader._convert_gguf(gguf, target)
    assert f"'{target}' is not empty" in str(info.value)
    assert snapshot(target) == before and leftovers(target.parent) == []


def test_model_cache_is_written_atomically_with_its_marker(tmp_path, tiny_model_dir, monkeypatch):
    """The GGUF -> safetensors cache writer, with transformers' GGUF reading replaced by the tiny model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtune.models import loader

    tiny = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = loader.load_tokenizer(tiny_model_dir)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "m-0123"
    loader._convert_gguf(gguf, target)
    assert (target / "config.json").is_file() and check_out_dir(target, marker=CACHE_MARKER) == "previous"
    assert json.loads((target / CACHE_MARKER).read_text())["source"] == str(gguf)
    before = snapshot(target)
    disk_full(monkeypatch, type(tiny), "save_pretrained")
    with pytest.raises(OSError, match="No space left"):
        loader._convert_gguf(gguf, target)
    assert snapshot(target) == before and leftovers(target.parent) == []


# --------------------------------------------------------------------------- single files


def test_self_cognition_keeps_the_users_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "data.jsonl"
    out.write_text("my own data\n")
    assert main(["data", "self-cognition", "--name", "Ada", "--n", "5", "-o", str(out)]) == 2
    refused(capsys, out)
    assert out.read_text() == "my own data\n"
    assert main(["data", "self-cognition", "--name", "Ada", "--n", "5", "-o", str(out), "--overwrite"]) == 0
    assert len(out.read_text(encoding="utf-8").splitlines()) == 5
    before = out.read_bytes()
    disk_full(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        main(["data", "self-cognition", "--name", "Bob", "--n", "5", "-o", str(out), "--overwrite"])
    monkeypatch.undo()
    assert out.read_bytes() == before and leftovers(tmp_path) == []
    assert main(["data", "self-cognition", "--name", "Ada", "-o", str(tmp_path)]) == 2
    assert "is a folder, but a file is expected" in capsys.readouterr().err


def test_replace_keeps_the_users_file(tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "I am OLD"}])
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    args = ["data", "replace", str(src), str(out), "--old", "OLD", "--new", "NEW"]
    assert main(args) == 2
    refused(capsys, out)
    assert out.read_text() == "precious\n"
    disk_full(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        main(args + ["--overwrite"])
    monkeypatch.undo()
    assert out.read_text() == "precious\n" and leftovers(tmp_path) == []
    assert main(args + ["--overwrite"]) == 0
    assert json.loads(out.read_text())["text"] == "I am NEW"
    in_place = ["data", "replace", str(src), str(src), "--old", "OLD", "--new", "NEW"]
    assert main(in_place) == 2 and src.read_text() == '{"text": "I am OLD"}\n'
    assert main(in_place + ["--overwrite"]) == 0 and json.loads(src.read_text())["text"] == "I am NEW"


def test_copy_cfg_keeps_the_users_edits(tmp_path, capsys, monkeypatch):
    name = "smollm2_135m_lora_self_cognition"
    assert main(["copy-cfg", name, str(tmp_path)]) == 0
    copied = tmp_path / f"{name}_copy.py"
    copied.write_text(copied.read_text() + "lr = 1e-5  # my edit\n")
    edited = copied.read_text()
    assert main(["copy-cfg", name, str(tmp_path)]) == 2
    refused(capsys, copied)
    assert copied.read_text() == edited
    disk_full(monkeypatch, Path, "write_text")
    with pytest.raises(OSError, match="No space left"):
        main(["copy-cfg", name, str(tmp_path), "--overwrite"])
    monkeypatch.undo()
    assert copied.read_text() == edited and leftovers(tmp_path) == []
    assert main(["copy-cfg", name, str(tmp_path), "--overwrite"]) == 0
    assert "my edit" not in copied.read_text()
    f = tmp_path / "not_a_dir"
    f.write_text("x")
    assert main(["copy-cfg", name, str(f)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and f.read_text() == "x"
