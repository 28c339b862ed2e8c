"""convert pth_to_hf and convert merge on a tiny model trained for a few steps."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_tiny_llama, write_jsonl
from lmtune.cli import main
from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.models.loader import load_model, load_tokenizer
from lmtune.train.loop import run_training


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("export")
    data = write_jsonl(tmp / "d.jsonl", [
        {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i} {i} {i}"}]}
        for i in range(16)])
    cfg_path = tmp / "cfg.py"
    cfg_path.write_text(
        f"model = {tiny_model_dir!r}\ndatasets = [{str(data)!r}]\nmax_length = 64\nmethod = 'lora'\n"
        "lora_r = 4\nlora_alpha = 16\nlora_dropout = 0.0\nlr = 5e-2\nbatch_size = 2\naccumulative_counts = 1\n"
        "max_steps = 3\nsave_steps = 3\n")
    run_training(load_config(str(cfg_path)), tmp / "work")
    return tmp


def _generate(model, tok, prompt="say 3"):
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        return model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)[0].tolist()


def test_pth_to_hf_without_config_gives_the_trained_adapter(trained):
    out = trained / "converted"
    assert main(["convert", "pth_to_hf", str(trained / "work/iter_3"), str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "lmtune.json").is_file()
    tok = load_tokenizer(str(out))
    a = load_model(str(out))
    b = load_model(str(trained / "work/hf"))
    with torch.no_grad():
        ids = tok("say 5", return_tensors="pt")["input_ids"]
        assert torch.allclose(a(input_ids=ids).logits, b(input_ids=ids).logits, atol=1e-6)


def test_merge_generates_like_base_plus_adapter(trained, tiny_model_dir):
    out = trained / "merged"
    assert main(["convert", "merge", tiny_model_dir, str(trained / "work/hf"), str(out),
                 "--max-shard-size", "1MB"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded as asked
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"  # the base's own dtype, not forced fp16
    tok = load_tokenizer(str(out))
    merged = load_model(str(out))
    with_adapter = load_model(tiny_model_dir, adapter=str(trained / "work/hf"))
    base = load_model(tiny_model_dir)
    assert _generate(merged, tok) == _generate(with_adapter, tok)
    ids = tok("say 7", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        lm, la, lb = (m(input_ids=ids).logits for m in (merged, with_adapter, base))
    assert torch.allclose(lm, la, atol=1e-5)
    assert not torch.allclose(lm, lb, atol=1e-3)  # the adapter really changed something


def test_merge_with_adapter_of_another_base_is_refused(trained, tmp_path, smol_tokenizer, capsys):
    other = make_tiny_llama(tmp_path / "wider", smol_tokenizer, hidden=96)
    out = tmp_path / "merged"
    assert main(["convert", "merge", str(other), str(trained / "work/hf"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "mismatch" in err and "different base model" in err
    assert not out.exists()


def test_pth_to_hf_rejects_incomplete_checkpoint(trained, tmp_path):
    broken = tmp_path / "iter_9"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="incomplete"):
        from lmtune.export import pth_to_hf

        pth_to_hf(None, str(broken), str(tmp_path / "out"))


def test_exported_tokenizer_config_is_readable_by_transformers_4(trained):
    for folder in (trained / "work/hf", trained / "merged"):
        if not folder.exists():
            continue
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        assert cfg.get("tokenizer_class") in (None, "PreTrainedTokenizerFast")
        assert not isinstance(cfg.get("extra_special_tokens"), list)
        tok = load_tokenizer(str(folder))
        assert tok.eos_token == "<|im_end|>" and tok.chat_template
