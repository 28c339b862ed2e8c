"""QLoRA (NF4) and 8-bit LoRA on CPU with bitsandbytes: loading, training, and in-training chat
probes that must leave gradients untouched (bitsandbytes' CPU inference-layout trap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl

bnb = pytest.importorskip("bitsandbytes")

from lmtune.config import load_config  # noqa: E402
from lmtune.models import quant  # noqa: E402
from lmtune.train.loop import Trainer, run_training  # noqa: E402
from lmtune.train.objectives import flat_batch, loss_sum  # noqa: E402


def _records(n=16):
    return [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"The answer is {2 * i}."}]} for i in range(n)]


def _cfg(tmp_path, model, **kw):
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    base = dict(model=model, datasets=[str(data)], max_length=128, method="lora", quantization="nf4", lora_r=4,
                lora_alpha=8, lora_dropout=0.0, lr=1e-2, batch_size=4, accumulative_counts=1, max_steps=4,
                save_steps=100, warmup_ratio=0.0, seed=0, pack_to_max_length=False, mixed_precision="no",
                evaluation_inputs=["What is 3 plus 3?"], eval_max_new_tokens=6)
    base.update(kw)
    path = tmp_path / "cfg.py"
    path.write_text("\n".join(f"{k} = {v!r}" for k, v in base.items()) + "\n")
    return load_config(str(path))


def _lora_grads(trainer) -> dict[str, torch.Tensor]:
    model = trainer.train_model
    model.train()
    model.zero_grad(set_to_none=True)
    s, _ = loss_sum(model, flat_batch(trainer.rows[:4]))
    s.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.fixture
def qlora_trainer(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir)
    t = Trainer(cfg, tmp_path / "w")
    t.setup()
    # Non-zero LoRA B so every LoRA weight gets a gradient (B starts at zero in real training).
    with torch.no_grad():
        for n, p in t.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return t


def test_model_is_quantized_and_adapter_trainable(qlora_trainer):
    layers = quant.quantized_linears(qlora_trainer.model)
    assert layers and all(type(m.weight).__name__ == "Params4bit" for m in layers)
    trainable = [n for n, p in qlora_trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_probe_does_not_break_lora_gradients(qlora_trainer):
    """Gradients after an in-training probe are non-zero and equal those without the probe."""
    before = _lora_grads(qlora_trainer)
    qlora_trainer._probe()
    layers = quant.quantized_linears(qlora_trainer.model)
    assert not any(quant.is_inference_packed(m) for m in layers)
    after = _lora_grads(qlora_trainer)
    assert before.keys() == after.keys()
    for n in before:
        assert after[n].abs().sum() > 0, n
        torch.testing.assert_close(after[n], before[n], rtol=1e-5, atol=1e-7, msg=n)


def test_the_trap_exists_and_restore_undoes_it(qlora_trainer):
    """Without the guard, generate() repacks the 4-bit weights (on CPUs with AVX512-BF16) and the
    gradients change; restore_trainable_layout brings back the exact ones."""

    layers = quant.quantized_linears(qlora_trainer.model)
    if not getattr(layers[0], "support_avx512bf16_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks here")
    before = _lora_grads(qlora_trainer)
    model = qlora_trainer.model
    model.eval()
    ids = torch.tensor([qlora_trainer.rows[0]["input_ids"][:8]])
    with torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)
    assert all(quant.is_inference_packed(m) for m in layers)
    broken = _lora_grads(qlora_trainer)
    worst = max(float((broken[n] - before[n]).abs().max()) for n in before)
    assert worst > 1e-4  # the silent damage the probe guard prevents
    # The fallback: unpacking makes gradients flow through the base layers again. It is not exact
    # (bitsandbytes re-quantizes the double-quantized scales), which is why the probe prevents the
    # repacking rather than undoing it.
    assert quant.restore_trainable_layout(model) == len(layers)
    assert not any(quant.is_inference_packed(m) for m in layers)
    fixed = _lora_grads(qlora_trainer)
    err = max(float((fixed[n] - before[n]).norm() / before[n].norm()) for n in before)
    bad = max(float((broken[n] - before[n]).norm() / before[n].norm()) for n in before)
    print(f"relative gradient error: repacked {bad:.3g}, unpacked again {err:.3g}")
    assert err < 0.05 and err < bad / 5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantized_lora_trains_to_lower_loss(tmp_path, tiny_model_dir, kind):
    cfg = _cfg(tmp_path, tiny_model_dir, quantization=kind, max_steps=10, lr=2e-2, evaluation_freq=5)
    out = run_training(cfg, tmp_path / "w")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "w/logs/train_log.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert len(losses) == 10
    assert losses[-1] < losses[0] - 0.5, losses
    assert (out / "adapter_model.safetensors").is_file()


def test_load_model_quantized_on_cpu(tiny_model_dir):
    from lmtune.models.loader import load_model

    m4 = load_model(tiny_model_dir, dtype="float32", quantization="nf4", device="cpu")
    assert quant.quantized_linears(m4)
    m8 = load_model(tiny_model_dir, dtype="float32", quantization="int8", device="cpu")
    assert any(type(p).__name__ == "Int8Params" for p in m8.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(m4(input_ids=ids).logits).all() and torch.isfinite(m8(input_ids=ids).logits).all()


@pytest.mark.slow
def test_qlora_train_command_prints_no_bitsandbytes_kernel_notice(tmp_path, tiny_model_dir):
    """bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community..." when it is
    imported on an AVX512-BF16 CPU without the optional `kernels` package; lmtune hides exactly that
    line. A real QLoRA `lmtune train` (NF4 load, one step, save) in a fresh process: not on stderr."""
    import lmtune

    notice = quant._CPU_KERNEL_NOTICE
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(lmtune.__file__).parents[1])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # Without lmtune in front, bitsandbytes prints it on this kind of CPU: the message is still the one
    # hidden (if a bitsandbytes release rewords it, this fails and the filter needs the new words).
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True,
                          env=env, timeout=300)
    if "gemm_4bit_forward" in bare.stderr:
        assert notice in bare.stderr

    cfg = _cfg(tmp_path, tiny_model_dir, max_steps=1, evaluation_inputs=[])
    p = subprocess.run([sys.executable, "-m", "lmtune.cli", "train", cfg._source, "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "w").is_dir()
    assert "gemm_4bit_forward" not in p.stderr and "kernels-community" not in p.stderr, p.stderr[-3000:]
