"""Talking to a model that sees: the exported LLaVA folder with plain transformers + AutoProcessor
generates exactly the tokens `lmtune chat --image` does; the tutorial's `--visual-encoder --llava`
form; image_url parts in the API (data: URLs, local paths; remote URLs only when allowed)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import make_tiny_llama, make_tiny_tower, shape_image, write_jsonl

from lmtune.config import validate
from lmtune.train.loop import run_training

QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smol_tokenizer):
    root = tmp_path_factory.mktemp("vserve")
    image = shape_image(root / "red.png", "red")
    data = write_jsonl(root / "d.jsonl", [{"image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "red"}]}] * 4)
    llm, tower = make_tiny_llama(root / "llm", smol_tokenizer), make_tiny_tower(root / "clip")
    cfg = validate({"model": str(llm), "vision_tower": str(tower), "prompt_template": "chatml", "device": "cpu",
                    "datasets": [str(data)], "max_length": 256, "batch_size": 1, "accumulative_counts": 1,
                    "max_steps": 1, "lr": 1e-2, "mixed_precision": "no", "lora_r": 4, "lora_alpha": 8,
                    "train_vision_tower": "lora"})
    hf = run_training(cfg, root / "work")
    return {"hf": str(hf), "work": root / "work", "image": image, "llm": str(llm), "tower": str(tower)}


def _transformers_tokens(folder: str, image: str, n: int = 8) -> list[int]:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(folder)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=prompt, images=Image.open(image).convert("RGB"), add_special_tokens=False,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_exported_folder_and_lmtune_chat_generate_the_same_tokens(trained, capsys):
    from lmtune.cli import main
    from lmtune.serve.chat import user_turn
    from lmtune.serve.vision import VisionEngine

    expected = _transformers_tokens(trained["hf"], trained["image"])
    engine = VisionEngine.load(trained["hf"], device="cpu")
    gen = engine.stream([user_turn(QUESTION, [trained["image"]])], images=[trained["image"]], max_new_tokens=8)
    text = "".join(gen)
    assert gen.token_ids == expected
    # The CLI prints the same answer.
    assert main(["chat", trained["hf"], "--image", trained["image"], "--prompt", QUESTION, "--max-new-tokens",
                 "8"]) == 0
    assert capsys.readouterr().out.strip() == text.strip()


def test_tutorial_form_llm_visual_encoder_llava(trained, capsys):
    """`lmtune chat LLM --visual-encoder VIT --llava DIR --prompt-template chatml --image IMG`: DIR is the
    trained folder (its work dir) or a checkpoint put onto LLM + VIT; all answer alike."""
    from lmtune.cli import main

    answers = []
    for llava in (str(trained["work"]), str(trained["work"] / "iter_1")):
        assert main(["chat", trained["llm"], "--visual-encoder", trained["tower"], "--llava", llava,
                     "--prompt-template", "chatml", "--image", trained["image"], "--prompt", QUESTION,
                     "--max-new-tokens", "8"]) == 0
        answers.append(capsys.readouterr().out.strip())
    assert answers[0] == answers[1]


def test_api_takes_image_url_parts(trained, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lmtune.serve.api import create_app
    from lmtune.serve.vision import VisionEngine

    engine = VisionEngine.load(trained["hf"], device="cpu", model_name="llava")
    client = TestClient(create_app(engine))
    data_url = "data:image/png;base64," + base64.b64encode(Path(trained["image"]).read_bytes()).decode()

    def ask(url):
        return client.post("/v1/chat/completions", json={"model": "llava", "max_tokens": 8, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}]})

    by_data, by_path = ask(data_url), ask(trained["image"])
    assert by_data.status_code == 200 and by_path.status_code == 200
    assert by_data.json()["choices"][0]["message"] == by_path.json()["choices"][0]["message"]
    expected = engine.generate([{"role": "user", "content": f"<image>\n{QUESTION}"}], images=[trained["image"]],
                               max_new_tokens=8)
    assert by_data.json()["choices"][0]["message"]["content"] == expected.text
    remote = ask("https://example.com/cat.png")
    assert remote.status_code == 400 and "--allow-remote-images" in remote.json()["error"]["message"]
    missing = ask(str(tmp_path / "nope.png"))
    assert missing.status_code == 400 and "is not a file on the server" in missing.json()["error"]["message"]


def test_web_page_offers_an_image_box_for_a_model_that_sees(trained):
    pytest.importorskip("gradio")
    from lmtune.serve.vision import VisionEngine
    from lmtune.serve.web import build_demo

    demo = build_demo(VisionEngine.load(trained["hf"], device="cpu"))
    boxes = [c for c in demo.get_config_file()["components"] if c.get("props", {}).get("elem_id") == "lmtune-image"]
    assert boxes and boxes[0]["props"]["visible"] is True
