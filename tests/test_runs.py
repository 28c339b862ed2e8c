"""Runs that cannot mix, resumes that fit, checkpoints that load without pickle, fp16 loss scaling."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from conftest import write_jsonl
from lmtune.cli import main
from lmtune.errors import UserError
from lmtune.train import checkpoint as ckpt
from lmtune.train.loop import Trainer, run_training
from test_train import _records, make_cfg


@pytest.fixture
def data_file(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", _records())


def _cfg_file(tmp_path, model, data, **kw):
    base = dict(model=model, datasets=[str(data)], max_length=128, method="lora", lora_r=4, lora_alpha=8, lr=1e-3,
                batch_size=2, accumulative_counts=1, max_steps=2, save_steps=1, warmup_ratio=0.0, seed=0)
    base.update(kw)
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.py')))}.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return str(path)


def test_new_run_into_a_finished_run_is_refused_and_overwrite_starts_afresh(tmp_path, tiny_model_dir, data_file,
                                                                            capsys):
    work = tmp_path / "w"
    cfg = _cfg_file(tmp_path, tiny_model_dir, data_file)
    assert main(["train", cfg, "--work-dir", str(work)]) == 0
    (work / "notes.txt").write_text("mine")  # the user's own file in the work dir
    before = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    capsys.readouterr()
    assert main(["train", cfg, "--work-dir", str(work)]) == 2
    err = capsys.readouterr().err
    assert "already holds another run" in err and "iter_2" in err and "--resume auto" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == before  # nothing touched
    assert main(["train", cfg, "--work-dir", str(work), "--overwrite", "--cfg-options", "max_steps=1"]) == 0
    assert (work / "notes.txt").read_text() == "mine"  # only lmtune's own files were removed
    assert not (work / "iter_2").exists() and (work / "iter_1").is_dir()
    log = [json.loads(line) for line in (work / "logs/train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1]  # no lines of the old run


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, tiny_model_dir, data_file, capsys):
    work = tmp_path / "w"
    cfg = _cfg_file(tmp_path, tiny_model_dir, data_file)
    assert main(["train", cfg, "--work-dir", str(work)]) == 0
    other = write_jsonl(tmp_path / "other.jsonl", _records(30)[6:])
    for overrides, key in ((["lora_r=8"], "lora"), (["lora_layers='1:'"], "lora"),
                           ([f"datasets=['{other}']"], "data_fingerprint"),
                           (["batch_size=1"], "rows_per_step"), (["method=full"], "method")):
        capsys.readouterr()
        assert main(["train", cfg, "--work-dir", str(work), "--resume", "--cfg-options", *overrides]) == 2
        err = capsys.readouterr().err
        assert f"does not fit this run: {key}" in err, (key, err)


def test_resume_with_more_steps_explains_the_schedule(tmp_path, tiny_model_dir, data_file, capsys):
    work = tmp_path / "w"
    cfg = _cfg_file(tmp_path, tiny_model_dir, data_file, lr_scheduler="linear")
    assert main(["train", cfg, "--work-dir", str(work)]) == 0
    capsys.readouterr()
    assert main(["train", cfg, "--work-dir", str(work), "--resume", "--overwrite", "--cfg-options", "max_steps=4"]) == 0
    err = capsys.readouterr().err
    assert "4 steps instead of 2" in err and "continues from step 2" in err
    assert ckpt.latest_checkpoint(work).name == "iter_4"


class _Boom:
    def __reduce__(self):
        return (exec, ("open(__import__('os').environ['BOOM_FILE'], 'w').write('ran')",))


def test_a_checkpoint_with_pickled_code_is_refused(tmp_path, tiny_model_dir, data_file, monkeypatch):
    work = tmp_path / "w"
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=2, save_steps=2)
    run_training(cfg, work)
    marker = tmp_path / "ran.txt"
    monkeypatch.setenv("BOOM_FILE", str(marker))
    it = work / "iter_2"
    with open(it / "rng.pt", "wb") as f:
        pickle.dump({"torch": _Boom()}, f)
    manifest = json.loads((it / "manifest.json").read_text())
    manifest["files"]["rng.pt"] = (it / "rng.pt").stat().st_size
    (it / "manifest.json").write_text(json.dumps(manifest))
    t = Trainer(make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=4, save_steps=2), work)
    with pytest.raises(UserError, match="more than plain tensors"):
        t.setup(it)
    assert not marker.exists()


def test_fp16_uses_loss_scaling_and_resumes_it(tmp_path, tiny_model_dir, data_file):
    cfg = make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=3, save_steps=3, mixed_precision="fp16", lr=3e-3)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    assert isinstance(t.dist.scaler, torch.amp.GradScaler)
    t.train()
    state = json.loads((tmp_path / "w/iter_3/trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] > 0
    losses = [loss for _, loss in t.state.history]
    assert all(map(lambda x: x == x, losses))
    t2 = Trainer(make_cfg(tmp_path, tiny_model_dir, data_file, max_steps=4, save_steps=4, mixed_precision="fp16"),
                 tmp_path / "w")
    t2.setup(tmp_path / "w/iter_3")
    assert t2.dist.scaler.get_scale() == state["grad_scaler"]["scale"]


def test_fp16_with_fsdp2_is_refused_clearly(tmp_path, tiny_model_dir, data_file):
    from lmtune.train.strategies.fsdp2 import FSDP2Strategy

    s = FSDP2Strategy.__new__(FSDP2Strategy)  # the check needs no process group
    s.cfg = make_cfg(tmp_path, tiny_model_dir, data_file)
    with pytest.raises(UserError, match="loss scaling"):
        s.setup_precision(torch.float16, torch.device("cpu"))
