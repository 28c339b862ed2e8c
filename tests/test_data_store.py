"""The on-disk token store: rows from the store equal the in-memory definition for every format,
pretraining documents split (not dropped), mixing without copies, validation split, `datasets`
sources, resumable preparation, and corrupt or foreign stores rebuilt."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import data_cache

from lmtune.config import validate
from lmtune.data import store as st
from lmtune.data.dataset import build_dataset, load_conversations
from lmtune.data.templates import get_template
from lmtune.data.tokenize import IGNORE_INDEX, _token_ids, encode_many, pack
from lmtune.errors import UserError


@pytest.fixture(autouse=True)
def cache_home(smol_tokenizer, tmp_path, monkeypatch):
    # smol_tokenizer first: the model cache must resolve under the real root, not this temporary one.
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    return tmp_path / "cache"


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def words(i: int, n: int) -> str:
    return " ".join(f"w{(i * 7 + k) % 53}" for k in range(n))


def openai_records():
    out = []
    for i in range(30):
        msgs = [{"role": "user", "content": f"question {i}: {words(i, i % 7 + 1)}"},
                {"role": "assistant", "content": f"answer {i}: {words(i, (i * 3) % 40 + 1)}"}]
        if i % 4 == 0:  # multi-turn: long ones lose trailing turns
            msgs += [{"role": "user", "content": f"more {i}"}, {"role": "assistant", "content": words(i + 1, 25)}]
        if i == 5:  # a prompt that alone fills max_length
            msgs[0]["content"] = words(5, 200)
        out.append({"messages": msgs})
    return out


@pytest.fixture
def files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = {"openai": write_jsonl(tmp_path / "openai.jsonl", openai_records())}
    alpaca = [{"instruction": f"do {i}", "input": words(i, i % 3), "output": f"done {words(i, i % 9 + 1)}"}
              for i in range(12)]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca, indent=1), encoding="utf-8")
    f["alpaca"] = str(tmp_path / "alpaca.json")
    sharegpt = [{"conversations": [{"from": "human", "value": f"hi {i}"}, {"from": "gpt", "value": words(i, i + 2)}]}
                for i in range(10)]
    pq.write_table(pa.Table.from_pylist(sharegpt), tmp_path / "sharegpt.parquet")
    f["sharegpt"] = str(tmp_path / "sharegpt.parquet")
    with open(tmp_path / "oasst1.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["text"])
        w.writeheader()
        for i in range(6):
            w.writerow({"text": f"### Human: q{i} ### Assistant: {words(i, 6)} ### Human: again ### Assistant: ok {i}"})
    f["oasst1"] = str(tmp_path / "oasst1.csv")
    docs = [{"text": words(i, [5, 30, 90, 160, 11, 240, 1, 64][i])} for i in range(8)]
    f["pretrain"] = write_jsonl(tmp_path / "pretrain.jsonl", docs)
    return f


def in_memory(cfg, tok, tpl):
    """Today's definition, all in Python lists: read, mix, encode, pack."""
    convs, _ = load_conversations(cfg, tpl)
    encoded = encode_many(convs, tok, tpl, cfg.max_length, add_eos=cfg.pretrain_add_eos)
    samples = [s for e in encoded for s in e.samples]
    rows = pack(samples, cfg.max_length, cfg.shuffle_before_pack, cfg.seed) if cfg.pack_to_max_length else samples
    skipped: dict = {}
    for e in encoded:
        if e.skipped:
            skipped[e.skipped] = skipped.get(e.skipped, 0) + 1
    stats = {"samples": len(samples), "skipped": skipped, "truncated": sum(e.truncated for e in encoded),
             "tokens": sum(len(s["input_ids"]) for s in samples),
             "loss_tokens": sum(sum(x != IGNORE_INDEX for x in s["labels"]) for s in samples)}
    return rows, stats


CASES = {
    "sft_unpacked": lambda f: dict(datasets=[f["openai"], {"path": f["alpaca"], "repeat": 1.5}], system="SYS",
                                   max_length=64, pack_to_max_length=False, max_dataset_samples=35),
    "sft_packed": lambda f: dict(datasets=[f["openai"], {"path": f["sharegpt"], "repeat": 2},
                                           {"path": f["oasst1"], "weight": 0.5}], max_length=96, seed=5),
    "pretrain_packed": lambda f: dict(datasets=[f["pretrain"], f["openai"]], objective="pretrain", max_length=48),
    "pretrain_no_eos": lambda f: dict(datasets=[f["pretrain"]], objective="pretrain", max_length=40,
                                      pretrain_add_eos=False, pack_to_max_length=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_store_rows_equal_in_memory_rows(case, files, smol_tokenizer, monkeypatch):
    import lmtune.data.prepare as prep

    monkeypatch.setattr(prep, "CHUNK_MAX", 4)  # many chunks, shared by two processes
    cfg = validate({**CASES[case](files), "num_proc": 2})
    tpl = get_template("chatml", smol_tokenizer)
    expected, stats = in_memory(cfg, smol_tokenizer, tpl)
    data = build_dataset(cfg, smol_tokenizer, tpl)
    assert len(data.rows) == len(expected)
    assert list(data.rows) == expected  # ids, labels (the loss masks), position ids, seq_lens
    for key, value in stats.items():
        assert data.stats[key] == value, key
    assert data.stats["rows"] == len(expected)
    if case.startswith("sft"):  # the data exercises truncation and skipping
        assert stats["truncated"] > 0
    if case == "sft_packed":
        assert stats["skipped"] == {"prompt_too_long": 1}
    if case.startswith("pretrain"):
        assert max(len(r["input_ids"]) for r in expected) == cfg.max_length
    # Reopened from the cache: the same rows, no re-encoding.
    again = build_dataset(cfg, smol_tokenizer, tpl)
    assert again.stats["cache"] == "hit" and list(again.rows) == expected
    assert again.rows.fingerprint == data.rows.fingerprint


def test_fast_token_ids_equal_the_tokenizer_call(smol_tokenizer):
    texts = ["plain text", "", "多语言 text ✓", "with <|im_end|> a special token", "  spaces\n\nnewlines\t"]
    assert _token_ids(smol_tokenizer, texts) == smol_tokenizer(texts, add_special_tokens=True)["input_ids"]


def test_long_documents_are_split_not_dropped(files, smol_tokenizer):
    cfg = validate({"datasets": [files["pretrain"]], "objective": "pretrain", "max_length": 32})
    data = build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))
    docs = [json.loads(line)["text"] for line in Path(files["pretrain"]).read_text().splitlines()]
    eos = smol_tokenizer.eos_token_id
    # Each document + EOS, in pieces of at most max_length; only a lone last token (nothing to
    # predict it from) is left out.
    pieces = []
    for d in smol_tokenizer(docs, add_special_tokens=True)["input_ids"]:
        d = d + [eos]
        pieces += [tuple(d[i:i + 32]) for i in range(0, len(d), 32) if len(d[i:i + 32]) >= 2]
    got = []
    for r in data.rows:
        bounds = np.cumsum([0] + r["seq_lens"])
        got += [tuple(r["input_ids"][a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert sorted(got) == sorted(pieces) and len(pieces) > len(docs)
    # Positions restart at 0 with every sample: a packed row never attends across documents.
    for r in data.rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert starts == list(np.cumsum([0] + r["seq_lens"][:-1]))
        assert all(r["labels"][s] == IGNORE_INDEX for s in starts)


def test_mixing_repeats_index_the_store_without_copies(files, smol_tokenizer, cache_home):
    cfg = validate({"datasets": [{"path": files["alpaca"], "repeat": 2.5}], "max_length": 64,
                    "pack_to_max_length": False})
    data = build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))
    assert len(data.rows) == 30  # 12 × 2.5
    (tok,) = [p for p in (cache_home / "data").iterdir() if p.name.startswith("tok-")]
    meta = json.loads((tok / "meta.json").read_text())
    assert meta["n_convs"] == 12  # each record encoded and stored once
    assert meta["files"]["input_ids.bin"]["count"] * 2.5 == pytest.approx(data.stats["tokens"], rel=0.2)
    assert meta["files"]["input_ids.bin"]["dtype"] == np.dtype(np.uint16).str  # SmolLM2: 49,152 ids


def test_wide_vocabularies_use_uint32(tmp_path):
    samples = [{"input_ids": [1, 70000, 3], "labels": [-100, 70000, 3]}, {"input_ids": [65536], "labels": [-100]}]
    piece = st.encode_samples(samples, {"input_ids": "tokens", "labels": "mask:input_ids"}, st.token_dtype(100_000))
    assert piece["input_ids"].dtype == np.uint32
    piece.update(conv_nsamples=np.array([2]), conv_skip=np.zeros(1, np.uint8), conv_trunc=np.zeros(1, np.uint8),
                 conv_where=np.frombuffer(b"f:1", np.uint8), sample_loss=np.array([2, 0]))
    piece["conv_where.len"] = np.array([3])
    st.write_store(tmp_path / "s", "k", {"input_ids": "tokens", "labels": "mask:input_ids"}, 100_000, [piece])
    store = st.open_store(tmp_path / "s", "k")
    assert store.sample(0)["input_ids"].tolist() == [1, 70000, 3]
    assert store.sample(0)["labels"].tolist() == [-100, 70000, 3] and store.where(0) == "f:1"
    with pytest.raises(ValueError, match="not a mask"):
        st.encode_samples([{"input_ids": [1, 2], "labels": [-100, 5]}], {"input_ids": "tokens", "labels": "mask:input_ids"},
                          np.uint16)


def test_validation_split_and_val_datasets(files, smol_tokenizer):
    tpl = get_template("chatml", smol_tokenizer)
    base = {"datasets": [files["sharegpt"]], "max_length": 64, "pack_to_max_length": False}
    full = build_dataset(validate(base), smol_tokenizer, tpl)
    held = build_dataset(validate({**base, "val_set_size": 0.3}), smol_tokenizer, tpl)
    train = {tuple(r["input_ids"]) for r in held.rows}
    val = {tuple(r["input_ids"]) for r in held.val_rows}
    assert len(val) == 3 and len(train) == 7 and not train & val
    assert train | val == {tuple(r["input_ids"]) for r in full.rows}
    assert held.rows.fingerprint != full.rows.fingerprint
    both = build_dataset(validate({**base, "val_set_size": 2, "val_datasets": [files["alpaca"]]}), smol_tokenizer, tpl)
    assert len(both.val_rows) == 2 + 12 and both.stats["val"]["conversations"] == 14


# --------------------------------------------------------------------------- `datasets` sources


def test_datasets_sources_give_the_rows_of_the_same_records(tmp_path, smol_tokenizer, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    records = [{"instruction": f"do {i}", "input": "", "output": f"done {words(i, i % 5 + 1)}"} for i in range(9)]
    ref_path = write_jsonl(tmp_path / "ref.jsonl", records[:6])
    # A dataset repo's layout (no loading script): splits from the file names.
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "repo" / "data" / "train.jsonl", records[:6])
    write_jsonl(tmp_path / "repo" / "data" / "test.jsonl", records[6:])
    repo = datasets.load_dataset(str(tmp_path / "repo"), split="train")
    repo.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": repo, "test": repo.select([0])}).save_to_disk(str(tmp_path / "saved_dict"))
    repo.to_parquet(str(tmp_path / "local.parquet"))
    tpl = get_template("chatml", smol_tokenizer)

    def rows(entry):
        cfg = validate({"datasets": [entry], "max_length": 64, "pack_to_max_length": True})
        return list(build_dataset(cfg, smol_tokenizer, tpl).rows)

    expected = rows(ref_path)
    assert rows(str(tmp_path / "saved")) == expected
    assert rows({"path": str(tmp_path / "saved_dict"), "split": "train"}) == expected
    assert rows({"path": str(tmp_path / "repo"), "split": "train"}) == expected
    assert rows({"path": str(tmp_path / "repo"), "split": "train", "streaming": True}) == expected
    assert rows(str(tmp_path / "local.parquet")) == expected
    with pytest.raises(UserError, match="no split 'validation'"):
        rows({"path": str(tmp_path / "saved_dict"), "split": "validation"})


def test_hub_ids_pass_the_path_check_and_fail_clearly_offline(tmp_path, smol_tokenizer, monkeypatch):
    from lmtune.config import check_paths
    from lmtune.data.hub import is_datasets_source

    import datasets
    import huggingface_hub.constants

    assert is_datasets_source({"path": "tatsu-lab/alpaca"}) and not is_datasets_source({"path": "data/x.jsonl"})
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set the modules' own flags
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = validate({"datasets": [{"path": "nobody-here/no-such-set", "split": "train"}], "model": "smollm2-135m-instruct"})
    check_paths(cfg)  # a hub id is not a missing local path
    with pytest.raises(UserError, match="cannot load dataset 'nobody-here/no-such-set'"):
        build_dataset(cfg, smol_tokenizer, get_template("chatml", smol_tokenizer))


# --------------------------------------------------------------------------- trust and resumption


def _tok_store(cache_home: Path) -> Path:
    (tok,) = [p for p in (cache_home / "data").iterdir() if p.name.startswith("tok-") and "." not in p.name]
    return tok


def _damage_flip(tok: Path, other: Path):
    with open(tok / "input_ids.bin", "r+b") as f:
        f.seek(5)
        b = f.read(1)
        f.seek(5)
        f.write(bytes([b[0] ^ 0x55]))


def _damage_truncate(tok: Path, other: Path):
    os.truncate(tok / "labels.bin", (tok / "labels.bin").stat().st_size - 1)


def _damage_meta(tok: Path, other: Path):
    (tok / "meta.json").write_text("{not json")


def _damage_counts(tok: Path, other: Path):
    meta = json.loads((tok / "meta.json").read_text())
    meta["n_samples"] -= 1
    (tok / "meta.json").write_text(json.dumps(meta))


def _foreign(tok: Path, other: Path):
    """Another data set's (valid) store under this one's name."""
    import shutil

    shutil.rmtree(tok)
    shutil.copytree(other, tok)


@pytest.mark.parametrize("damage", [_damage_flip, _damage_truncate, _damage_meta, _damage_counts, _foreign])
def test_corrupt_or_foreign_store_is_rebuilt(damage, files, smol_tokenizer, cache_home, tmp_path, capsys):
    tpl = get_template("chatml", smol_tokenizer)
    other_cfg = validate({"datasets": [files["alpaca"]], "max_length": 64})
    build_dataset(other_cfg, smol_tokenizer, tpl)
    other = _tok_store(cache_home)
    other = other.rename(tmp_path / "other_store")
    cfg = validate({"datasets": [files["sharegpt"]], "max_length": 64})
    good = list(build_dataset(cfg, smol_tokenizer, tpl).rows)
    tok = _tok_store(cache_home)
    damage(tok, other)
    capsys.readouterr()
    again = build_dataset(cfg, smol_tokenizer, tpl)
    assert "damaged or not this data's; rebuilding it" in capsys.readouterr().err
    assert list(again.rows) == good
    assert st.open_store(tok, tok.name[4:]) is not None


def test_damaged_rows_index_is_rebuilt(files, smol_tokenizer, cache_home, capsys):
    tpl = get_template("chatml", smol_tokenizer)
    cfg = validate({"datasets": [files["sharegpt"]], "max_length": 64})
    good = list(build_dataset(cfg, smol_tokenizer, tpl).rows)
    (rows,) = [p for p in (cache_home / "data").iterdir() if p.name.startswith("rows-")]
    idx = np.fromfile(rows / "train.idx", dtype=np.int64)
    idx[0] = 10**9  # out of range of the stores
    idx.tofile(rows / "train.idx")
    meta = json.loads((rows / "meta.json").read_text())  # even with a matching seal
    meta["files"]["train.idx"].update(mtime_ns=(rows / "train.idx").stat().st_mtime_ns)
    (rows / "meta.json").write_text(json.dumps(meta))
    again = build_dataset(cfg, smol_tokenizer, tpl)
    assert "rows index" in capsys.readouterr().err and again.stats["cache"] == "miss"
    assert list(again.rows) == good


def test_copied_store_is_checked_in_full_then_trusted(files, smol_tokenizer, cache_home):
    import shutil

    tpl = get_template("chatml", smol_tokenizer)
    cfg = validate({"datasets": [files["sharegpt"]], "max_length": 64})
    good = list(build_dataset(cfg, smol_tokenizer, tpl).rows)
    tok = _tok_store(cache_home)
    shutil.copytree(tok, tok.with_name("copy"))  # new mtimes, same content
    shutil.rmtree(tok)
    tok.with_name("copy").rename(tok)
    store = st.open_store(tok, tok.name[4:])
    assert store is not None  # hashed, matched, resealed
    assert json.loads((tok / "meta.json").read_text())["files"]["input_ids.bin"]["mtime_ns"] == \
        (tok / "input_ids.bin").stat().st_mtime_ns
    assert list(build_dataset(cfg, smol_tokenizer, tpl).rows) == good


def test_interrupted_prepare_resumes_to_the_same_store(tmp_path, tiny_model_dir, smol_tokenizer, monkeypatch):
    docs = [{"text": words(i, 20 + i % 50)} for i in range(1200)]
    data = write_jsonl(tmp_path / "corpus.jsonl", docs)
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(f"model = {tiny_model_dir!r}\ndatasets = [{data!r}]\nobjective = 'pretrain'\n"
                        "max_length = 64\nnum_proc = 2\n")
    env = dict(os.environ, LMTUNE_CACHE_DIR=data_cache(tmp_path / "cut"), PYTHONUNBUFFERED="1")
    # Small chunks, each encoded slowly, so the kill lands while shards are being written.
    slow = ("import sys, time, lmtune.data.prepare as p; p.CHUNK_MAX = 8; enc = p._encode_shard\n"
            "def slow(task):\n    time.sleep(0.05)\n    return enc(task)\n"
            "p._encode_shard = slow\nfrom lmtune.cli import main\nsys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", slow, "data", "prepare", str(cfg_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while len(list((tmp_path / "cut" / "data").glob("tok-*.partial/shard-*.npz"))) < 6:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not [p for p in (tmp_path / "cut" / "data").iterdir() if p.name.startswith("tok-") and "." not in p.name]
    code = ("import sys, lmtune.data.prepare as p; p.CHUNK_MAX = 8\n"
            "from lmtune.cli import main\nsys.exit(main(sys.argv[1:]))")
    out = subprocess.run([sys.executable, "-c", code, "data", "prepare", str(cfg_path)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming the preparation" in out.stderr and "prepared now" in out.stdout
    assert not list((tmp_path / "cut" / "data").glob("*.partial"))
    # The same store as one uninterrupted preparation with default chunks and one process.
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "whole"))
    from lmtune.config import load_config

    cfg = load_config(str(cfg_path), {"num_proc": 1})
    whole = build_dataset(cfg, smol_tokenizer, get_template("auto", smol_tokenizer))
    cut_store = _tok_store(tmp_path / "cut")
    whole_store = _tok_store(tmp_path / "whole")
    a, b = (json.loads((s / "meta.json").read_text()) for s in (cut_store, whole_store))
    assert a["fingerprint"] == b["fingerprint"]
    assert {k: v["sha256"] for k, v in a["files"].items()} == {k: v["sha256"] for k, v in b["files"].items()}
    assert a["chunk"] == 8 and b["chunk"] != 8  # the store does not depend on how it was chunked
    assert len(whole.rows) > 0


def test_prepare_hashes_the_store_in_full(files, smol_tokenizer, cache_home, capsys):
    """A change that keeps a file's size and mtime passes the quick seal check of a training start;
    `lmtune data prepare` (verify=True) hashes every file and rebuilds."""
    tpl = get_template("chatml", smol_tokenizer)
    cfg = validate({"datasets": [files["sharegpt"]], "max_length": 64})
    good = list(build_dataset(cfg, smol_tokenizer, tpl).rows)
    tok = _tok_store(cache_home)
    stat = (tok / "input_ids.bin").stat()
    _damage_flip(tok, None)
    os.utime(tok / "input_ids.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    again = build_dataset(cfg, smol_tokenizer, tpl, verify=True)
    assert "damaged or not this data's; rebuilding it" in capsys.readouterr().err
    assert list(again.rows) == good


def test_a_check_run_leaves_the_cache_alone(files, smol_tokenizer, cache_home):
    tpl = get_template("chatml", smol_tokenizer)
    cfg = validate({"datasets": [files["sharegpt"]], "max_length": 64})
    build_dataset(cfg, smol_tokenizer, tpl)
    before = {p.name: p.stat().st_mtime_ns for p in (cache_home / "data").iterdir()}
    errors: list = []
    checked = build_dataset(cfg, smol_tokenizer, tpl, errors=errors)
    assert not errors and checked.stats["samples"] == 10
    assert {p.name: p.stat().st_mtime_ns for p in (cache_home / "data").iterdir()} == before
    assert build_dataset(cfg, smol_tokenizer, tpl).stats["cache"] == "hit"
