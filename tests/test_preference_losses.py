"""Each preference loss against a direct transcription of its paper's formula on random
log-probabilities, forward and backward, in float64; the per-token log-probability kernel against
full logits. The transcriptions below are written from the papers' equations with plain
exp / log / division, not from the implementation's (log-sigmoid, log1p) forms."""

from __future__ import annotations

import math

import pytest
import torch

from lmtune.train.losses import linear_token_logprobs, plain_token_logprobs
from lmtune.train.objectives.dpo import dpo_loss
from lmtune.train.objectives.kto import kto_loss
from lmtune.train.objectives.orpo import orpo_loss
from lmtune.train.objectives.reward import reward_loss
from lmtune.train.objectives.simpo import simpo_loss

F64 = dict(dtype=torch.float64)


def sigma(x):
    return 1 / (1 + torch.exp(-x))


def _logps(n=16, seed=0, low=-40.0, high=-0.5):
    g = torch.Generator().manual_seed(seed)
    return [(low + (high - low) * torch.rand(n, generator=g, **F64)).requires_grad_(True) for _ in range(4)]


def _close(a, b, grads_a, grads_b):
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), (a, b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.allclose(ga, gb, rtol=1e-10, atol=1e-12), (ga, gb)


def _check(ours, paper, inputs):
    """Same values, and the same gradients of a random weighting of them."""
    w = torch.rand(ours.shape, generator=torch.Generator().manual_seed(9), **F64)
    ga = torch.autograd.grad((ours * w).sum(), inputs, allow_unused=True)
    gb = torch.autograd.grad((paper * w).sum(), inputs, allow_unused=True)
    ga = [torch.zeros_like(x) if g is None else g for g, x in zip(ga, inputs)]
    gb = [torch.zeros_like(x) if g is None else g for g, x in zip(gb, inputs)]
    _close(ours, paper, ga, gb)


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_sigmoid_is_the_papers_loss(beta, eps):
    """DPO eq. 7: −log σ(β log πθ(y_w|x)/πref(y_w|x) − β log πθ(y_l|x)/πref(y_l|x)); with label
    smoothing ε (conservative DPO) the ε-weighted loss of the flipped pair is added."""
    pw, pl, rw, rl = _logps(seed=1, low=-8, high=-0.5)
    ours, cr, rr = dpo_loss(pw, pl, rw, rl, beta, "sigmoid", eps)
    u = beta * torch.log(torch.exp(pw) / torch.exp(rw)) - beta * torch.log(torch.exp(pl) / torch.exp(rl))
    paper = -(1 - eps) * torch.log(sigma(u)) - eps * torch.log(sigma(-u))
    _check(ours, paper, [pw, pl, rw, rl])
    assert torch.allclose(cr, beta * (pw - rw).detach()) and torch.allclose(rr, beta * (pl - rl).detach())


def test_ipo_is_the_papers_loss():
    """IPO (Azar et al., eq. 17): (h_π(y_w, y_l, x) − τ⁻¹/2)², h_π = log[πθ(y_w)πref(y_l) / (πθ(y_l)πref(y_w))]."""
    pw, pl, rw, rl = _logps(seed=2, low=-8, high=-0.5)
    tau = 0.3
    ours, _, _ = dpo_loss(pw, pl, rw, rl, tau, "ipo")
    h = torch.log(torch.exp(pw) * torch.exp(rl) / (torch.exp(pl) * torch.exp(rw)))
    _check(ours, (h - 1 / (2 * tau)) ** 2, [pw, pl, rw, rl])


def test_hinge_is_slic_on_the_margin():
    """SLiC-HF's calibration loss max(0, δ − log πθ(y_w)/πθ(y_l)) with δ = 1 on β-scaled log-ratios."""
    pw, pl, rw, rl = _logps(seed=3, low=-12, high=-0.5)
    beta = 0.5
    ours, _, _ = dpo_loss(pw, pl, rw, rl, beta, "hinge")
    m = beta * (torch.log(torch.exp(pw) / torch.exp(rw)) - torch.log(torch.exp(pl) / torch.exp(rl)))
    paper = torch.maximum(torch.zeros_like(m), 1 - m)
    assert (paper > 0).any() and (paper == 0).any()  # both sides of the hinge are exercised
    _check(ours, paper, [pw, pl, rw, rl])


def test_orpo_is_the_papers_loss():
    """ORPO eqs. 2–7: L_SFT + λ·L_OR, L_OR = −log σ(log odds(y_w|x)/odds(y_l|x)), odds = P/(1−P),
    P(y|x) = exp(mean token log-prob), L_SFT = mean NLL of y_w."""
    g = torch.Generator().manual_seed(4)
    nw, nl = 7, 11
    tw = (-3 * torch.rand(16, nw, generator=g, **F64)).requires_grad_(True)  # token log-probs
    tl = (-3 * torch.rand(16, nl, generator=g, **F64)).requires_grad_(True)
    lam = 0.1
    ours, nll, ratio = orpo_loss(tw.sum(1) / nw, tl.sum(1) / nl, lam)
    pw, pl = torch.exp(tw.sum(1) / nw), torch.exp(tl.sum(1) / nl)
    odds_w, odds_l = pw / (1 - pw), pl / (1 - pl)
    l_sft = -tw.sum(1) / nw
    paper = l_sft + lam * -torch.log(sigma(torch.log(odds_w / odds_l)))
    _check(ours, paper, [tw, tl])
    assert torch.allclose(ratio, torch.log(odds_w / odds_l).detach())


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_is_the_papers_loss(eps):
    """SimPO eq. 6: −log σ(β/|y_w| log πθ(y_w|x) − β/|y_l| log πθ(y_l|x) − γ) (+ label smoothing)."""
    g = torch.Generator().manual_seed(5)
    tw = (-3 * torch.rand(16, 9, generator=g, **F64)).requires_grad_(True)
    tl = (-3 * torch.rand(16, 4, generator=g, **F64)).requires_grad_(True)
    beta, gamma = 2.0, 0.5
    ours, _, _ = simpo_loss(tw.sum(1) / 9, tl.sum(1) / 4, beta, gamma, eps)
    z = beta / 9 * tw.sum(1) - beta / 4 * tl.sum(1) - gamma
    paper = -(1 - eps) * torch.log(sigma(z)) - eps * torch.log(sigma(-z))
    _check(ours, paper, [tw, tl])


def test_kto_is_the_papers_loss():
    """KTO eq. 8: L = E[λ_y − v(x, y)], r = log πθ/πref, z0 = max(0, KL estimate from mismatched
    pairs) without gradient, v = λ_D σ(β(r − z0)) if desirable, λ_U σ(β(z0 − r)) if not."""
    p, r, kp, kr = _logps(n=12, seed=6, low=-6, high=-0.5)
    with torch.no_grad():
        kp += 0.5  # make the KL estimate positive so the clamp is not trivially 0
    desirable = torch.tensor([True, False] * 6)
    beta, lam_d, lam_u = 0.1, 1.0, 1.5
    ours, rewards, z0 = kto_loss(p, r, desirable, kp, kr, beta, lam_d, lam_u)
    z0_paper = max(0.0, float(torch.mean(torch.log(torch.exp(kp) / torch.exp(kr))).detach()))
    assert z0_paper > 0 and float(z0) == pytest.approx(z0_paper, rel=1e-12)
    rr = torch.log(torch.exp(p) / torch.exp(r))
    v = torch.stack([lam_d * sigma(beta * (rr[i] - z0_paper)) if desirable[i] else
                     lam_u * sigma(beta * (z0_paper - rr[i])) for i in range(12)])
    lam_y = torch.tensor([lam_d if d else lam_u for d in desirable.tolist()], **F64)
    _check(ours, lam_y - v, [p, r])
    # No gradient through z0: the KL sequences' log-probs do not get any.
    g = torch.autograd.grad(ours.sum(), [kp], allow_unused=True)[0]
    assert g is None or float(g.abs().max()) == 0.0
    assert torch.allclose(rewards, beta * (p - r).detach())


def test_kto_kl_clamped_at_zero():
    p, r, kp, kr = _logps(n=6, seed=7, low=-6, high=-0.5)
    with torch.no_grad():
        kp -= 5.0
    _, _, z0 = kto_loss(p, r, torch.ones(6, dtype=torch.bool), kp, kr, 0.1)
    assert float(z0) == 0.0


def test_reward_is_bradley_terry():
    """−log P(y_w ≻ y_l), P = exp(s_w) / (exp(s_w) + exp(s_l))."""
    g = torch.Generator().manual_seed(8)
    sw = torch.randn(16, generator=g, **F64).requires_grad_(True)
    sl = torch.randn(16, generator=g, **F64).requires_grad_(True)
    paper = -torch.log(torch.exp(sw) / (torch.exp(sw) + torch.exp(sl)))
    _check(reward_loss(sw, sl), paper, [sw, sl])


# --------------------------------------------------------------------------- per-token log-probs


@pytest.mark.parametrize("trainable_weight", [False, True])
@pytest.mark.parametrize("chunk", [5, None])
def test_linear_token_logprobs_matches_full_logits(trainable_weight, chunk):
    """Forward and backward (a random upstream gradient per token) equal log_softmax of the full
    logits, with the output layer frozen (LoRA: gradient finished in the forward pass) or trained
    (recomputed chunk by chunk in the backward pass)."""
    g = torch.Generator().manual_seed(10 + int(trainable_weight) + int(chunk or 0))
    n, h, v = 37, 16, 211
    x = torch.randn(n, h, generator=g, **F64, requires_grad=True)
    w = torch.randn(v, h, generator=g, **F64, requires_grad=trainable_weight)
    b = torch.randn(v, generator=g, **F64, requires_grad=trainable_weight)
    t = torch.randint(0, v, (n,), generator=g)
    t[::6] = -100
    up = torch.randn(n, generator=g, **F64)
    inputs = [x] + ([w, b] if trainable_weight else [])
    out = linear_token_logprobs(x, w, t, bias=b, chunk=chunk)
    ga = torch.autograd.grad((out * up).sum(), inputs)
    logits = torch.nn.functional.linear(x, w, b)
    ref = torch.log_softmax(logits, -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1) * (t != -100)
    gb = torch.autograd.grad((ref * up).sum(), inputs)
    assert out.dtype == torch.float64
    _close(out, ref, ga, gb)
    assert torch.allclose(plain_token_logprobs(logits.detach(), t, chunk=7), ref.detach(), rtol=1e-12, atol=1e-12)


def test_linear_token_logprobs_bf16_autocast():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(300, 32, generator=g)
    t = torch.randint(0, 300, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_token_logprobs(x, w, t, chunk=16)
    (gx,) = torch.autograd.grad(out.sum(), [x])
    xd = x.detach().double().requires_grad_(True)
    ref = torch.log_softmax(xd @ w.double().t(), -1).gather(1, t[:, None]).squeeze(1)
    (rx,) = torch.autograd.grad(ref.sum(), [xd])
    assert out.dtype == torch.float32
    # bf16 matmul inputs (8 bits of mantissa) over 32-term dot products: logits off by ~1e-2.
    assert float((out.double() - ref).abs().max()) < 0.1 * math.sqrt(32)
    assert float((gx.double() - rx).norm() / rx.norm()) < 3e-2
