"""The training page without a browser: the config it writes, the `lmtune train` subprocess it
starts, stops and resumes, and the progress it reads back from the work dir."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_jsonl
from lmtune.config import load_config
from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt
from lmtune.webui import form as F
from lmtune.webui import runs
from test_serve_common import tiny_model  # noqa: F401
from test_train import _records

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    # the subprocess must import this checkout's lmtune, as the page's own process does
    src = str(Path(__file__).resolve().parents[1] / "src")
    monkeypatch.setenv("PYTHONPATH", src + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _form(model, data, **kw) -> dict:
    return {**F.defaults(), "model": model, "datasets": str(data), "max_length": 128, "lora_r": 4, "lora_alpha": 8,
            "lr": 1e-3, "batch_size": 2, "accumulative_counts": 1, "max_steps": 3, "save_steps": 1,
            "evaluation_inputs": "What is 2 plus 2?", **kw}


def _wait(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_the_page_writes_a_config_lmtune_train_loads(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records(4))
    path = tmp_path / "w" / runs.CONFIG_NAME
    values = F.config_values(_form(tiny_model_dir, data, method="qlora", system="Be brief.",
                                   evaluation_inputs="Q1\n\nQ2\n"))
    runs.write_config(path, values)
    text = path.read_text()
    assert text.startswith("# Written by `lmtune webui`")
    cfg = load_config(str(path))  # what `lmtune train` reads
    assert (cfg.method, cfg.quantization, cfg.lora_r, cfg.max_steps, cfg.system) == ("lora", "nf4", 4, 3, "Be brief.")
    assert cfg.evaluation_inputs == ["Q1", "Q2"] and [d["path"] for d in cfg.datasets] == [str(data)]
    assert F.form_from_config(cfg)["method"] == "qlora"  # and back into the form

    runs.write_config(path, {**values, "lr": 5e-4})  # the page's own, unedited file: replaced
    assert load_config(str(path)).lr == 5e-4
    path.write_text(path.read_text().replace("lr = 0.0005", "lr = 0.0001"))  # the user edits it
    edited = path.read_text()
    with pytest.raises(UserError, match="not written by this page \\(or was edited since\\)"):
        runs.write_config(path, values)
    assert path.read_text() == edited


def test_a_config_started_from_a_built_in_keeps_the_keys_the_form_does_not_set(tmp_path, tiny_model_dir):
    base = "qwen2_5_1_5b_instruct_qlora_custom"
    form = F.form_from_config(load_config(base))
    assert (form["model"], form["method"]) == ("Qwen/Qwen2.5-1.5B-Instruct", "qlora")
    data = write_jsonl(tmp_path / "data.jsonl", _records(4))
    form.update(model=tiny_model_dir, datasets=str(data), lr=1e-4)
    path = runs.write_config(tmp_path / "w" / runs.CONFIG_NAME, F.config_values(form, gpus=0), base)
    cfg, builtin = load_config(str(path)), load_config(base)
    assert (cfg.model, cfg.lr, cfg.quantization) == (tiny_model_dir, 1e-4, "nf4")
    for key in ("lora_dropout", "warmup_ratio", "num_proc", "logging_steps", "gradient_checkpointing", "lora_r"):
        assert getattr(cfg, key) == getattr(builtin, key), key
    assert f"starting from '{base}'" in path.read_text()


def test_full_fine_tuning_from_a_base_config_that_picks_lora_layers_loads(tmp_path, tiny_model_dir):
    base = "smollm2_135m_lora_self_cognition"
    assert load_config(base).lora_layers is not None
    form = F.form_from_config(load_config(base))
    data = write_jsonl(tmp_path / "data.jsonl", _records(4))
    form.update(model=tiny_model_dir, datasets=str(data), method="full")
    path = runs.write_config(tmp_path / "w" / runs.CONFIG_NAME, F.config_values(form, gpus=0), base)
    cfg = load_config(str(path))
    assert (cfg.method, cfg.lora_layers) == ("full", None)
    form["method"] = "lora"  # with LoRA the base's choice stays
    path = runs.write_config(tmp_path / "w2" / runs.CONFIG_NAME, F.config_values(form, gpus=0), base)
    assert load_config(str(path)).lora_layers == load_config(base).lora_layers


def test_a_bad_value_gets_the_cli_message_for_its_field_and_nothing_is_written(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records(4))
    (tmp_path / "mine").mkdir()  # the user's own empty folder stays
    work = tmp_path / "mine" / "new" / "w"
    cases = [({"lr": 5}, "lr", "config key 'lr' must be between 0.0 and 1.0, got 5.0"),
             ({"batch_size": None}, "batch_size", "config key 'batch_size' must be an integer, got None"),
             ({"datasets": str(tmp_path / "nope.jsonl")}, "datasets", "does not exist"),
             ({"datasets": ""}, "datasets", "no training data"),
             ({"model": str(tmp_path / "no_model")}, "model", "model path"),
             ({"objective": "nonsense"}, "objective", "config key 'objective' must be one of 'sft'")]
    for change, field, message in cases:
        with pytest.raises(UserError) as info:
            runs.write_config(work / runs.CONFIG_NAME, F.config_values({**_form(tiny_model_dir, data), **change}))
        assert message in str(info.value), (change, str(info.value))
        assert runs.error_field(info.value) == field, (change, str(info.value))
        assert ".check-" not in str(info.value)  # names the config file, not the page's scratch copy
        assert not (tmp_path / "mine" / "new").exists()  # nothing written, no folder left behind
        assert (tmp_path / "mine").is_dir()


@pytest.mark.slow  # three `lmtune train` processes: ~40 s on 2 idle cores, minutes on busy ones
def test_stop_ends_the_run_and_its_last_checkpoint_loads_and_resumes(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    work = tmp_path / "w"
    config = runs.write_config(work / runs.CONFIG_NAME,
                               F.config_values(_form(tiny_model_dir, data, max_steps=100_000)))
    info = runs.start_train(config, work)
    assert runs.read_progress(work).state == "running"
    _wait(lambda: ckpt.latest_checkpoint(work, quiet=True), 180, "a first checkpoint")
    with pytest.raises(UserError, match="still running in"):  # never two trainings into one work dir
        runs.start_train(config, work, overwrite=True)

    message = runs.stop_train(work)
    assert "stopped. The last complete checkpoint is iter_" in message
    assert not runs.is_alive(info)
    with pytest.raises(ProcessLookupError):
        os.killpg(info.pid, 0)  # the whole process group is gone
    p = runs.read_progress(work)
    assert p.state == "stopped" and p.total == 100_000 and 0 < p.step < 100_000
    last = ckpt.latest_checkpoint(work)
    assert ckpt.verify_checkpoint(last) is None
    weights = load_file(str(last / "model.safetensors"))
    assert weights and all("lora_" in k for k in weights)

    # Resume from it (the schedule is shortened so the run ends soon)
    step = int(last.name.split("_")[1])
    runs.write_config(config, F.config_values(_form(tiny_model_dir, data, max_steps=step + 2)))
    runs.start_train(config, work, resume=True)
    p = _wait(lambda: (q := runs.read_progress(work)).state != "running" and q, 240, "the resumed run to end")
    assert p.state == "finished", p.log_tail
    assert (p.step, p.total, p.percent) == (step + 2, step + 2, 100.0)
    assert [s for s, _ in p.losses] == list(range(1, step + 3))  # redone steps are not doubled
    assert p.lrs and p.tokens_per_s > 0
    assert p.probes and p.probes[0]["question"] == "What is 2 plus 2?" and p.probe_step == step + 2
    output = (work / runs.OUTPUT_LOG).read_text()
    assert f"resumed from {last}" in output and "final model written" in output
    assert (work / "hf" / "adapter_model.safetensors").is_file()

    # A new run into the finished one: `lmtune train` refuses, and the page shows its message
    runs.start_train(config, work)
    p = _wait(lambda: (q := runs.read_progress(work)).state != "running" and q, 120, "the refusal")
    assert p.state == "failed" and p.returncode == 2
    assert p.error.startswith(f"{work} already holds another run") and "--resume auto" in p.error
    assert (work / "hf" / "adapter_model.safetensors").is_file()  # nothing of the finished run lost


def test_progress_reads_a_log_with_a_resume_and_a_partial_last_line(tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "train_log.jsonl").write_text(
        '{"step": 0, "total_steps": 4}\n{"step": 1, "loss": 3.0, "lr": 0.1}\n{"step": 2, "loss": 2.5, "lr": 0.1}\n'
        '{"step": 3, "loss": 2.4, "lr": 0.1}\n{"step": 1, "total_steps": 5}\n{"step": 2, "loss": 2.6, "lr": 0.2}\n'
        '{"step": 2, "probe": [{"question": "q", "answer": "a"}]}\n{"step": 2, "val_loss": 2.7, "val_ppl": 14.9}\n'
        '{"step": 3, "lo')
    (tmp_path / runs.OUTPUT_LOG).write_text("=== webui: x\nline 1\ntrain: 10%\rtrain: 20%\rtrain: 40%\n")
    p = runs.read_progress(tmp_path)
    assert p.losses == [(1, 3.0), (2, 2.6)] and p.total == 5 and p.step == 2 and p.percent == 40.0
    assert p.probes == [{"question": "q", "answer": "a"}] and p.val_losses == [(2, 2.7)]
    assert p.log_tail.splitlines()[-1] == "train: 40%"  # a progress bar shows its newest state
    assert p.state == "ended"  # a run not started from this page


def test_export_commands_are_the_cli_commands():
    assert runs.export_args("pth_to_hf", source="w/iter_3", out="w/out") == ["convert", "pth_to_hf", "w/iter_3",
                                                                              "w/out"]
    assert runs.export_args("merge", source="w/hf", out="m", base="b", overwrite=True) == \
        ["convert", "merge", "b", "w/hf", "m", "--overwrite"]
    assert runs.export_args("app", source="w/hf", out="a") == ["export", "app", "w/hf", "a"]
    with pytest.raises(UserError, match="base model"):
        runs.export_args("merge", source="w/hf", out="m")
    assert {"pth_to_hf", "merge", "app"} <= set(runs.export_kinds())
    assert runs.shell_command(runs.train_args("my config.py", "w", resume=True)) == \
        "lmtune train 'my config.py' --work-dir w --resume auto"


def test_an_export_runs_the_cli_in_its_own_process_group(tmp_path, tiny_model):  # noqa: F811
    pytest.importorskip("gguf")  # an optional extra of `lmtune export gguf`, not lmtune's own code
    out = tmp_path / "tiny.gguf"
    args = runs.export_args("gguf", source=str(tiny_model), out=str(out))
    proc = runs.spawn(args, tmp_path / "export.log")
    assert os.getpgid(proc.pid) == proc.pid != os.getpgid(0)
    assert proc.wait(timeout=300) == 0, (tmp_path / "export.log").read_text()
    assert out.stat().st_size > 0 and out.read_bytes()[:4] == b"GGUF"
    output = runs.last_attempt(tmp_path / "export.log")
    assert output.startswith("=== webui: ") and f"lmtune export gguf {tiny_model} {out}" in output
    assert runs.error_text(output) is None
