"""Config schema, loading, overrides, list-cfg / copy-cfg and the CLI surface."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmtune.cli import main
from lmtune.config import list_builtin, load_config, parse_overrides
from lmtune.errors import UserError


def test_every_builtin_config_loads():
    names = list_builtin()
    assert "smollm2_135m_lora_self_cognition" in names
    for needed in ("qwen2_5_1_5b_instruct_qlora_custom", "llama3_8b_instruct_lora_alpaca",
                   "qwen2_5_7b_instruct_full_oasst1", "internlm2_5_chat_7b_qlora_custom"):
        assert needed in names
    for name in names:
        load_config(name)


def test_unknown_key_names_the_nearest_and_the_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("model = 'x'\n\nlearning_rat = 1e-4\n")
    with pytest.raises(UserError) as e:
        load_config(str(cfg))
    msg = str(e.value)
    assert f"{cfg}:3" in msg and "learning_rat" in msg and "learning_rate" in msg


def test_wrong_type_and_range_name_the_key(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("batch_size = 'eight'\n")
    with pytest.raises(UserError, match="'batch_size' must be an integer"):
        load_config(str(cfg))
    cfg.write_text("method = 'qlora2'\n")
    with pytest.raises(UserError, match="'method' must be one of 'full', 'lora'"):
        load_config(str(cfg))
    cfg.write_text("lora_dropout = 1.5\n")
    with pytest.raises(UserError, match="'lora_dropout' must be between 0.0 and 1.0"):
        load_config(str(cfg))


def test_configs_are_values_only(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import os\nmodel = 'x'\n")
    with pytest.raises(UserError, match="may not import"):
        load_config(str(cfg))
    cfg.write_text("model = open('/etc/passwd').read()\n")
    with pytest.raises(UserError, match="not a plain value"):
        load_config(str(cfg))


def test_xtuner_names_and_arithmetic_work(tmp_path):
    cfg = tmp_path / "c.py"
    # Private helper names (leading underscore) may be reused below and are not config keys.
    cfg.write_text("pretrained_model_name_or_path = '/m'\nSYSTEM = 'hi'\n_base_lr = 2e-4\nlr = _base_lr * 2\n")
    c = load_config(str(cfg))
    assert c.model == "/m" and c.system == "hi" and c.lr == pytest.approx(4e-4)


def test_yaml_config_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: smollm2-135m-instruct\nlr: 0.001\nmax_epochs: 2\n")
    c = load_config(str(cfg), parse_overrides(["lr=1e-4", "max_epochs=1", "pack_to_max_length=false"]))
    assert c.lr == 1e-4 and c.max_epochs == 1 and c.pack_to_max_length is False
    with pytest.raises(UserError, match="did you mean 'max_epochs'"):
        load_config(str(cfg), parse_overrides(["max_epoch=1"]))
    cfg.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="YAML error"):
        load_config(str(cfg))


def test_list_and_copy_cfg(tmp_path, capsys):
    assert main(["list-cfg", "-p", "smollm2"]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["smollm2_135m_full_self_cognition", "smollm2_135m_llava_shapes", "smollm2_135m_lora_dpo_concise",
                   "smollm2_135m_lora_self_cognition"]
    assert main(["copy-cfg", "smollm2_135m_lora_self_cognition", str(tmp_path / "cfgs")]) == 0
    copied = tmp_path / "cfgs/smollm2_135m_lora_self_cognition_copy.py"
    assert copied.is_file()
    assert load_config(str(copied)).method == "lora"
    assert main(["copy-cfg", "smollm2_135m_lora_self_cognitio", str(tmp_path)]) == 2
    assert "did you mean smollm2_135m_lora_self_cognition" in capsys.readouterr().err


def test_cli_help_for_every_command():
    for args in ([], ["train"], ["convert", "pth_to_hf"], ["convert", "merge"], ["chat"], ["data", "check"],
                 ["data", "self-cognition"], ["web"], ["serve"], ["export", "app"], ["quickstart"]):
        proc = subprocess.run([sys.executable, "-m", "lmtune.cli", *args, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "usage: lmtune" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lmtune.cli", "version"], capture_output=True, text=True)
    assert proc.stdout.startswith("lmtune ")
