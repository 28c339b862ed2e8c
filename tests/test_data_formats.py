"""Every data format and file type → Conversation, auto-detection, and every bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from lmtune.data.formats import detect_format, read_conversations
from lmtune.errors import UserError


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def roles(conv):
    return [(m.role, m.content) for m in conv.messages]


OPENAI = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!", "loss": False},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Bob."},
]}
ALPACA = {"instruction": "Translate", "input": "chat", "output": "猫", "system": "You translate."}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                              {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Bye!"}]}
OASST = {"text": "### Human: Hi there ### Assistant: Hello! ### Human: How are you? ### Assistant: Fine."}
PRETRAIN = {"text": "Once upon a time there was a cat."}


def test_openai(tmp_path):
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [OPENAI]), "openai")
    assert roles(conv)[0] == ("system", "Be brief.")
    assert [m.trains() for m in conv.messages] == [False, False, False, False, True]
    assert conv.source == f"{tmp_path / 'a.jsonl'}:1"


def test_alpaca(tmp_path):
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [ALPACA]), "alpaca")
    assert roles(conv) == [("system", "You translate."), ("user", "Translate\nchat"), ("assistant", "猫")]
    rec = {"instruction": "Q2", "output": "A2", "history": [["Q1", "A1"]]}
    (conv,) = read_conversations(jsonl(tmp_path / "b.jsonl", [rec]), "alpaca")
    assert roles(conv) == [("user", "Q1"), ("assistant", "A1"), ("user", "Q2"), ("assistant", "A2")]


def test_sharegpt(tmp_path):
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [SHAREGPT]), "sharegpt")
    assert roles(conv) == [("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"), ("assistant", "Bye!")]


def test_oasst1_multi_turn(tmp_path):
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [OASST]), "oasst1")
    assert roles(conv) == [("user", "Hi there"), ("assistant", "Hello!"), ("user", "How are you?"),
                           ("assistant", "Fine.")]


def test_pretrain(tmp_path):
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [PRETRAIN]), "pretrain")
    assert conv.is_pretrain and conv.text == PRETRAIN["text"]


@pytest.mark.parametrize("rec,fmt", [(OPENAI, "openai"), (ALPACA, "alpaca"), (SHAREGPT, "sharegpt"),
                                     (OASST, "oasst1"), (PRETRAIN, "pretrain")])
def test_auto_detection(tmp_path, rec, fmt):
    assert detect_format(rec, "x") == fmt
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [rec]))
    assert conv.is_pretrain == (fmt == "pretrain")


def test_json_list_parquet_csv_and_folder(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps([ALPACA, ALPACA], ensure_ascii=False, indent=2), encoding="utf-8")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([PRETRAIN, PRETRAIN, PRETRAIN]), folder / "b.parquet")
    with open(folder / "sub" / "c.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerow({"instruction": "Say hi", "input": "", "output": "hi, 你好"})
    (folder / "notes.txt").write_text("ignored")
    assert len(read_conversations(folder / "a.json")) == 2
    assert len(read_conversations(folder / "b.parquet")) == 3
    (conv,) = read_conversations(folder / "sub" / "c.csv")
    assert roles(conv) == [("user", "Say hi"), ("assistant", "hi, 你好")]
    assert conv.source.endswith("c.csv:2")
    assert len(read_conversations(folder)) == 6  # the folder, recursively; .txt ignored


def test_openai_content_parts(tmp_path):
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                        {"role": "assistant", "content": "Yo"}]}
    (conv,) = read_conversations(jsonl(tmp_path / "a.jsonl", [rec]))
    assert conv.messages[0].content == "Hi"


# --------------------------------------------------------------------------- bad input


def expect_error(path, fmt="auto") -> str:
    with pytest.raises(UserError) as info:
        read_conversations(path, fmt)
    return str(info.value)


def test_malformed_json_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(OPENAI) + "\n" + '{"messages": [ {"role": "user"\n', encoding="utf-8")
    msg = expect_error(p)
    assert f"{p}:2" in msg and "malformed JSON" in msg and "delimiter" in msg


def test_malformed_json_list(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]', encoding="utf-8")
    msg = expect_error(p)
    assert f"{p}:3" in msg and "malformed JSON" in msg


def test_missing_field(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "no output here", "input": ""}])
    msg = expect_error(p, "alpaca")
    assert f"{p}:2" in msg and "'output'" in msg


def test_missing_field_auto_names_it(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [OPENAI, {"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant"}]}])
    msg = expect_error(p)
    assert f"{p}:2" in msg and "'content'" in msg and "messages[1]" in msg


def test_unknown_role(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "human", "content": "hi"},
                                                   {"role": "assistant", "content": "yo"}]}])
    msg = expect_error(p)
    assert f"{p}:1" in msg and "unknown role 'human'" in msg and "messages[0].role" in msg
    p = jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    msg = expect_error(p)
    assert f"{p}:1" in msg and "unknown role 'bot'" in msg


def test_empty_assistant_reply(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "assistant", "content": "  "}]}])
    msg = expect_error(p)
    assert f"{p}:1" in msg and "empty assistant reply" in msg
    p = jsonl(tmp_path / "b.jsonl", [{"text": "### Human: hi ### Assistant: "}])
    assert "empty assistant reply" in expect_error(p)


def test_non_utf8(tmp_path):
    p = tmp_path / "gbk.jsonl"
    p.write_bytes((json.dumps(PRETRAIN) + "\n").encode() + '{"text": "你好"}\n'.encode("gbk"))
    msg = expect_error(p)
    assert f"{p}:2" in msg and "not valid UTF-8" in msg and "byte offset" in msg and "iconv" in msg


def test_empty_dataset(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n", encoding="utf-8")
    msg = expect_error(p)
    assert str(p) in msg and "no records" in msg
    folder = tmp_path / "nothing"
    folder.mkdir()
    assert "no data files" in expect_error(folder)


def test_unknown_format_and_undetectable(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    msg = expect_error(p)
    assert f"{p}:1" in msg and "cannot tell the data format" in msg and "question" in msg
    assert "unknown data format 'gpt4'" in expect_error(p, "gpt4")


def test_errors_collected_instead_of_raised(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join([json.dumps(OPENAI), json.dumps({"messages": "x"}), json.dumps(OPENAI)]) + "\n")
    errors: list = []
    convs = read_conversations(p, errors=errors)
    assert len(convs) == 2 and len(errors) == 1 and f"{p}:2" in str(errors[0])
