"""Images in data: the three formats, image_folder, clear errors with file:line, `data check`,
the cache keeping image references."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest

from conftest import make_tiny_llama, make_tiny_tower, shape_image, write_jsonl, data_cache

from lmtune.config import load_config
from lmtune.data.formats import read_conversations
from lmtune.errors import UserError


@pytest.fixture(scope="module")
def vparts(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("vdata")
    (root / "imgs").mkdir()
    return {"root": root, "llm": str(make_tiny_llama(root / "llm", smol_tokenizer)),
            "clip": str(make_tiny_tower(root / "clip")),
            "red": shape_image(root / "imgs" / "red.png", "red"), "blue": shape_image(root / "imgs" / "blue.png", "blue")}


def test_llava_json_with_paths_relative_to_image_folder(tmp_path, vparts):
    data = tmp_path / "llava.json"
    data.write_text(json.dumps([
        {"id": "1", "image": "red.png",
         "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ], indent=1))
    convs = read_conversations(data, image_folder=str(vparts["root"] / "imgs"))
    assert convs[0].images == [vparts["red"]]
    assert convs[0].messages[0].content == "<image>\nWhat colour?"
    assert convs[1].images == []


def test_openai_image_parts_and_sharegpt_images_list(tmp_path, vparts):
    png = base64.b64encode(Path(vparts["blue"]).read_bytes()).decode()
    openai_file = write_jsonl(tmp_path / "openai.jsonl", [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "imgs/red.png"}},
            {"type": "text", "text": "And this one?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
            {"role": "assistant", "content": "Red, then blue."}]}])
    sharegpt_file = write_jsonl(tmp_path / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "<image><image>Same?"}, {"from": "gpt", "value": "No."}],
         "images": ["imgs/red.png", "imgs/blue.png"]}])
    shutil.copytree(vparts["root"] / "imgs", tmp_path / "imgs")  # relative to each data file's folder
    (openai,) = read_conversations(openai_file)
    (sharegpt,) = read_conversations(sharegpt_file)
    assert openai.messages[0].content == "<image>\nAnd this one?<image>\n"
    assert openai.images[0] == str(tmp_path / "imgs" / "red.png")
    assert openai.images[1].startswith("data:image/png;base64,")
    assert sharegpt.images == [str(tmp_path / "imgs" / "red.png"), str(tmp_path / "imgs" / "blue.png")]


def test_placeholder_count_mismatch_and_missing_image_name_the_line(tmp_path, vparts):
    data = write_jsonl(tmp_path / "bad.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>Hi"}, {"from": "gpt", "value": "Yo"}],
         "images": [vparts["red"]]},
        {"conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A dot"}],
         "images": [vparts["red"]]},
    ])
    with pytest.raises(UserError) as e:
        read_conversations(data)
    assert f"{data}:2" in str(e.value) and "1 image(s) but 0 <image> placeholder(s)" in str(e.value)
    data.write_text(json.dumps({"image": "nowhere.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]}) + "\n")
    with pytest.raises(UserError) as e:
        read_conversations(data)
    assert f"{data}:1" in str(e.value) and "nowhere.png' does not exist" in str(e.value)


def _vision_config(tmp_path, vparts, data, **kw) -> Path:
    cfg = tmp_path / "cfg.py"
    lines = {"model": vparts["llm"], "vision_tower": vparts["clip"], "prompt_template": "chatml",
             "datasets": [str(data)], "max_length": 256, **kw}
    cfg.write_text("".join(f"{k} = {v!r}\n" for k, v in lines.items()))
    return cfg


def test_data_check_reports_bad_images_and_counts_image_tokens(tmp_path, vparts, capsys):
    from lmtune.cli import main

    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(Path(vparts["red"]).read_bytes()[:60])  # a truncated PNG: the header reads, pixels don't
    good = {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}],
            "image": vparts["red"]}
    data = write_jsonl(tmp_path / "d.jsonl", [
        good,
        {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "?"}],
         "image": str(corrupt)},
        {"conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "?"}],
         "image": str(tmp_path / "gone.png")},
        {"conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "?"}],
         "image": vparts["blue"]},
        {"conversations": [{"from": "human", "value": "Text only, <image> by mistake"}, {"from": "gpt", "value": "?"}]},
        good,
    ])
    before = data.read_bytes()
    assert main(["data", "check", str(_vision_config(tmp_path, vparts, data))]) == 2
    out = capsys.readouterr().out
    assert f"{data}:2: image '{corrupt}' cannot be read" in out
    assert f"{data}:3: image '{tmp_path / 'gone.png'}' does not exist" in out
    assert f"{data}:4: the record has 1 image(s) but 0 <image> placeholder(s)" in out
    assert f"skipped {data}:5: bad_image" in out  # an <image> without an image: not tokenizable
    # the corrupt image's header reads, so its sample is built (and its record reported above)
    assert "images: 2 distinct, 3 in samples; 75 image tokens" in out  # 25 per image (5x5 patches)
    assert data.read_bytes() == before  # a check never writes


def test_dataset_rows_keep_image_references_through_the_cache(tmp_path, vparts, monkeypatch):
    from lmtune.data.dataset import build_dataset
    from lmtune.data.templates import get_template
    from lmtune.models.kinds import model_kind

    monkeypatch.setenv("LMTUNE_CACHE_DIR", data_cache(tmp_path / "cache"))
    records = [{"conversations": [{"from": "human", "value": f"<image>\nColour {i}?"},
                                  {"from": "gpt", "value": "Red." if i % 2 else "Blue."}],
                "image": vparts["red"] if i % 2 else vparts["blue"]} for i in range(6)]
    cfg = load_config(str(_vision_config(tmp_path, vparts, write_jsonl(tmp_path / "d.jsonl", records))))
    tok = model_kind(cfg).load_tokenizer(cfg)
    template = get_template("chatml", tok)
    first = build_dataset(cfg, tok, template)
    again = build_dataset(cfg, tok, template)
    assert first.stats["cache"] == "miss" and again.stats["cache"] == "hit"
    assert [r["images"] for r in again.rows] == [r["images"] for r in first.rows]
    assert sorted(ref for r in first.rows for ref in r["images"]) == sorted([vparts["red"]] * 3 + [vparts["blue"]] * 3)
    image_id = tok.convert_tokens_to_ids("<image>")
    for row in first.rows:  # every row holds 25 image tokens per image it names
        assert sum(t == image_id for t in row["input_ids"]) == 25 * len(row["images"])
