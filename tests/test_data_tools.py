"""lmtune data self-cognition / replace / check / show."""

from __future__ import annotations

import json

import pytest
from conftest import data_cache

from lmtune.cli import main
from lmtune.config import validate
from lmtune.data import self_cognition_train_phrases as P
from lmtune.data.formats import read_conversations
from lmtune.data.tools import replace_in_file, write_self_cognition
from lmtune.errors import UserError


@pytest.fixture(autouse=True)
def cache_home(smol_tokenizer, tmp_path, monkeypatch):
    # check / show build token stores in the cache: keep them out of the user's.
    # smol_tokenizer first: the model cache must resolve under the real root, not this temporary one.
    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    return tmp_path / "cache"


def test_phrase_counts():
    assert len(set(P.QUESTIONS_EN)) >= 40 and len(set(P.QUESTIONS_ZH)) >= 30
    assert len(P.ANSWERS_EN) >= 3 and len(P.ANSWERS_ZH) >= 3
    for a in P.ANSWERS_EN + P.ANSWERS_ZH:
        assert "{name}" in a


def test_self_cognition_is_diverse(tmp_path):
    out = tmp_path / "sc.jsonl"
    assert write_self_cognition(out, name="小明", author="ACME", n=300, seed=1) == 300
    convs = read_conversations(out, "openai")
    assert len(convs) == 300
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(set(lines)) == 300  # no repeated sample
    questions = {c.messages[0].content for c in convs}
    assert len(questions) > 50
    assert any(len(c.messages) == 4 for c in convs) and any(len(c.messages) == 2 for c in convs)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in c.messages[0].content) for c in convs)
    assert all(any("小明" in m.content for m in c.messages if m.role == "assistant") for c in convs)
    assert out.read_text(encoding="utf-8") == (write_self_cognition(tmp_path / "b.jsonl", "小明", "ACME", 300, 1)
                                               and (tmp_path / "b.jsonl").read_text(encoding="utf-8"))


@pytest.mark.parametrize("chinese", [0.0, 0.4, 1.0])
def test_self_cognition_language_share(tmp_path, chinese):
    out = tmp_path / "sc.jsonl"
    write_self_cognition(out, name="Ada", author="ACME", n=400, seed=2, chinese=chinese)
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in c.messages[-1].content) for c in read_conversations(out, "openai"))
    assert abs(zh / 400 - chinese) <= 0.08  # a binomial draw of 400: 4 standard deviations at most


def test_self_cognition_cli(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(["data", "self-cognition", "--name", "Ada", "--n", "20", "-o", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 20
    assert main(["data", "self-cognition", "--name", " ", "-o", str(out)]) == 2
    assert "--name must not be empty" in capsys.readouterr().err


def test_replace_jsonl_and_json(tmp_path):
    src = tmp_path / "a.jsonl"
    write_self_cognition(src, name="OLD", author="X", n=10, seed=0)
    n = replace_in_file(src, tmp_path / "b.jsonl", old="OLD", new="新名字")
    text = (tmp_path / "b.jsonl").read_text(encoding="utf-8")
    assert n >= 10 and "OLD" not in text and text.count("新名字") == n
    j = tmp_path / "c.json"
    j.write_text(json.dumps([{"instruction": "who?", "output": "I am OLD, OLD!"}]), encoding="utf-8")
    assert replace_in_file(j, j, "OLD", "NEW", overwrite=True) == 2  # in place
    assert json.loads(j.read_text())[0]["output"] == "I am NEW, NEW!"


def test_replace_bad_input_leaves_output_untouched(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "OLD"}\n{"text": broken\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    with pytest.raises(UserError) as info:
        replace_in_file(src, out, "OLD", "NEW", overwrite=True)
    assert f"{src}:2" in str(info.value) and "malformed JSON" in str(info.value)
    assert out.read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["a.jsonl", "out.jsonl"]  # no temp file
    bad = tmp_path / "gbk.jsonl"
    bad.write_bytes('{"text": "你好"}\n'.encode("gbk"))
    with pytest.raises(UserError, match="not valid UTF-8"):
        replace_in_file(bad, out, "a", "b", overwrite=True)
    assert out.read_text() == "precious\n"


def data_cfg(tmp_path, records, **kw):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return validate({"datasets": [str(p)], "max_length": 64, **kw}), p


GOOD = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am Ada."}]}


def test_check_reports_and_exit_codes(tmp_path, capsys):
    from lmtune.data.tools import check_command

    long = {"messages": [{"role": "user", "content": "long " * 100}, {"role": "assistant", "content": "ok"}]}
    cfg, p = data_cfg(tmp_path, [GOOD, GOOD, long], prompt_template="chatml")
    assert check_command(cfg) == 0
    out = capsys.readouterr().out
    assert "3 conversations read" in out and "prompt_too_long: 1" in out and f"{p}:3" in out
    assert "carrying loss" in out and "histogram" in out and "data check: OK" in out

    bad = {"messages": [{"role": "robot", "content": "x"}]}
    cfg, p = data_cfg(tmp_path, [GOOD, bad, GOOD])
    assert check_command(cfg) == 2
    out = capsys.readouterr().out
    assert f"{p}:2" in out and "unknown role 'robot'" in out and "PROBLEMS FOUND" in out


def test_show_masked_text(tmp_path, capsys):
    from lmtune.data.tools import show_command

    cfg, _ = data_cfg(tmp_path, [GOOD], prompt_template="chatml")
    assert show_command(cfg, "masked_text", 1) == 0
    out = capsys.readouterr().out
    assert "[[<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n]]I am Ada.<|im_end|>[[\n]]" in out
    assert show_command(cfg, "labels", 1) == 0
    assert "-100" in capsys.readouterr().out


def test_cli_unknown_template_no_traceback(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n")
    cfgfile = tmp_path / "c.py"
    cfgfile.write_text(f"datasets = [{str(p)!r}]\nprompt_template = 'chatmk'\n")
    assert main(["data", "check", str(cfgfile)]) == 2
    err = capsys.readouterr().err
    assert "unknown prompt template 'chatmk'" in err and "internlm2_chat" in err and "Traceback" not in err
