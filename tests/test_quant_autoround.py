"""SignRound's pieces against AutoRound 0.16.1 itself and against a hand-written reference.

- untuned (v = 0, both factors 1) the levels and scales are RTN's (`rtn_quantize`, itself AutoRound's RTN
  bit for bit), for full groups, a zero-padded partial group and a row shorter than a group, one weight
  or a stack of experts;
- with arbitrary offsets and factors the fake-quantised weight and its gradients equal AutoRound's own
  `quant_tensor_sym` (the function its WrapperLinear calls);
- `sign_round` over a few steps equals AutoRound's own optimiser loop (its SignSGD, torch's LinearLR, its
  best-loss selection) written out in the test, and its row sampling is AutoRound's `IndexSampler`;
- the differentiable grouped expert forward equals the engine's per-expert `expert_forward`.
"""

from __future__ import annotations

import random

import pytest
import torch

from surgery.executor.grouped import grouped_linear
from surgery.quant.pack import pack
from surgery.quant.rtn import rtn_quantize
from surgery.quant.signround import IndexSampler, RoundedWeight, SignRoundOptions, sign_round

SHAPES = [(64, 256), (32, 192), (96, 64)]  # full groups, a partial last group, a row shorter than a group


@pytest.mark.parametrize("shape", SHAPES)
def test_untuned_is_rtn_bit_for_bit(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    w[0, :5] = 0.0
    levels, scales = RoundedWeight(w.clone(), 128).quantized()
    q, s = rtn_quantize(w, 128)
    assert torch.equal(levels, q) and torch.equal(scales, s)
    stack = torch.randn(3, *shape) * 0.02
    levels, scales = RoundedWeight(stack.clone(), 128).quantized()
    for e in range(3):
        q, s = rtn_quantize(stack[e], 128)
        rows = slice(e * shape[0], (e + 1) * shape[0])
        assert torch.equal(levels[rows], q) and torch.equal(scales[rows], s)


def test_qdq_in_float32_is_what_the_reader_decodes():
    from surgery.checkpoint.w4a16 import dequantize_w4a16

    torch.manual_seed(1)
    r = RoundedWeight(torch.randn(64, 192) * 0.05, 128)
    with torch.no_grad():
        r.v.uniform_(-0.5, 0.5)
        r.max_scale.uniform_(0.7, 1.0)
    levels, scales = r.quantized()
    packed = pack(levels, scales)
    decoded = dequantize_w4a16(packed["qweight"], packed["qzeros"], packed["scales"], 128)
    assert torch.equal(r.qdq(torch.float32).detach(), decoded)


@pytest.mark.parametrize("shape", SHAPES)
def test_qdq_and_gradients_equal_autoround(shape):
    from auto_round.data_type.int import quant_tensor_sym

    torch.manual_seed(2)
    w = torch.randn(shape) * 0.05
    ours = RoundedWeight(w.clone(), 128)
    with torch.no_grad():
        ours.v.uniform_(-0.5, 0.5)
        ours.min_scale.uniform_(0.6, 1.2)  # above 1 too: both clamp into [0, 1] first
        ours.max_scale.uniform_(0.6, 1.2)
    v = ours.v.detach().clone().requires_grad_(True)
    mins = ours.min_scale.detach().clone().clamp(0, 1).requires_grad_(True)
    maxs = ours.max_scale.detach().clone().clamp(0, 1).requires_grad_(True)
    wb = w.to(torch.bfloat16)
    wmin, wmax = ours.wmin, ours.wmax  # AutoRound's WrapperLinear: per group of the bf16 weight, through zero
    theirs, _, _ = quant_tensor_sym(wb, 4, 128, v, mins, maxs, torch.float16, wmin, wmax)
    mine = ours.qdq(torch.bfloat16)
    assert torch.equal(mine, theirs.to(torch.bfloat16))
    probe = torch.randn(shape)
    (mine.float() * probe).sum().backward()
    (theirs.float() * probe).sum().backward()
    assert torch.equal(ours.v.grad, v.grad)
    assert torch.allclose(ours.min_scale.grad, mins.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours.max_scale.grad, maxs.grad, rtol=1e-5, atol=1e-7)


def test_index_sampler_is_autorounds():
    from auto_round.compressors.utils import IndexSampler as Theirs

    random.seed(7)
    theirs = Theirs(10, 4)
    ours = IndexSampler(10, 4, 7)
    assert [ours.next_batch() for _ in range(9)] == [theirs.next_batch() for _ in range(9)]


def _problem():
    torch.manual_seed(3)
    w = torch.randn(32, 192) * 0.05
    x = torch.randn(6, 40, 192)
    return w, x, x @ w.t()


def test_sign_round_equals_autoround_optimizer_loop():
    """Our loop against AutoRound's SignSGD + LinearLR + best-MSE selection on one linear, all rows a step."""
    from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD
    from auto_round.data_type.int import quant_tensor_sym

    w, x, ref = _problem()
    iters, lr = 6, 0.05

    ours = RoundedWeight(w.clone(), 128)

    def loss_of(rows):
        rows = sorted(rows)  # all rows every step; the order would only change the float sum
        return (x[rows] @ ours.qdq(torch.bfloat16).float().t() - ref[rows]).pow(2).mean()

    result = sign_round([ours], loss_of, 6, SignRoundOptions(iters=iters, lr=lr, batch_size=6))

    theirs = RoundedWeight(w.clone(), 128)  # only for its bf16 groups, min and max
    v = torch.zeros_like(theirs.v, requires_grad=True)
    mins = torch.ones_like(theirs.min_scale, requires_grad=True)
    maxs = torch.ones_like(theirs.max_scale, requires_grad=True)
    opt = SignSGD([{"params": [v]}, {"params": [mins, maxs]}], lr=lr, weight_decay=0)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=iters)
    best, best_loss = None, float("inf")
    for _ in range(iters):
        mins.data.clamp_(0, 1)
        maxs.data.clamp_(0, 1)
        qdq, _, _ = quant_tensor_sym(w.to(torch.bfloat16), 4, 128, v, mins, maxs, torch.float16, theirs.wmin,
                                     theirs.wmax)
        loss = (x @ qdq.float().t() - ref).pow(2).mean()  # qdq is bf16: AutoRound's weight dtype
        (loss * 1000).backward()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), [t.detach().clone() for t in (v, mins, maxs)]
        opt.step()
        opt.zero_grad()
        sched.step()
    assert result.best_loss == pytest.approx(best_loss, rel=1e-6)
    assert result.best_loss < result.init_loss
    assert result.best_iter > 0
    # the kept levels and scales are those AutoRound's best parameters give
    with torch.no_grad():
        theirs.v.copy_(best[0])
        theirs.min_scale.copy_(best[1])
        theirs.max_scale.copy_(best[2])
    mine, want = ours.quantized(), theirs.quantized()
    assert torch.equal(mine[0], want[0]) and torch.equal(mine[1], want[1])
    assert not torch.equal(mine[0], rtn_quantize(w, 128)[0])


def test_sign_round_keeps_the_best_step():
    """The parameters left are those of the lowest-loss step, not the last."""
    w, x, ref = _problem()
    ours = RoundedWeight(w.clone(), 128)
    seen: list[tuple[float, torch.Tensor]] = []

    def loss_of(rows):
        qdq = ours.qdq(torch.float32)
        loss = (x[rows] @ qdq.t() - ref[rows]).pow(2).mean()
        seen.append((loss.item(), qdq.detach().clone()))
        return loss

    result = sign_round([ours], loss_of, 6, SignRoundOptions(iters=12, lr=0.05, batch_size=2))
    loss, qdq = min(seen, key=lambda s: s[0])
    assert result.best_loss == loss and result.best_iter not in (0, 11)
    levels, scales = ours.quantized()
    decoded = scales.float().repeat_interleave(128, 1)[:, :192] * (levels.float() - 8)
    assert torch.equal(decoded, qdq)


def test_grouped_expert_forward_equals_per_expert_loop():
    from torch import nn

    from surgery.executor.experts import expert_forward
    from surgery.quant.autoround_pass import _experts_forward

    torch.manual_seed(4)
    experts = nn.Module()
    experts.act_fn = nn.SiLU()
    e, h, i, tokens, k = 5, 32, 16, 40, 2
    weights = {"gate_up_proj": torch.randn(e, 2 * i, h), "down_proj": torch.randn(e, h, i)}
    x = torch.randn(tokens, h)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(tokens)])
    idx[:, 0] = torch.where(idx[:, 0] == 4, 0, idx[:, 0])  # expert 4 gets fewer tokens
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % (e - 1), idx[:, 1])
    wts = torch.rand(tokens, k)
    def project(name, rows, counts, weights=weights):
        return grouped_linear(rows, weights[name], counts)

    ours = _experts_forward(experts, project, e, x, idx, wts)
    ref = torch.zeros_like(x)
    for t in range(tokens):
        for s in range(k):
            j = int(idx[t, s])
            params = {n: p[j] for n, p in weights.items()}
            ref[t] += wts[t, s] * expert_forward(experts, params, x[t:t + 1])[0]
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
    gate_up = weights["gate_up_proj"].clone().requires_grad_(True)
    with_grad = {**weights, "gate_up_proj": gate_up}
    _experts_forward(experts, lambda n, r, c: grouped_linear(r, with_grad[n], c), e, x, idx, wts).sum().backward()
    assert gate_up.grad is not None and bool(gate_up.grad.abs().sum() > 0)


def tuned_experts_problem(in_features: int):
    """Two equal stacks of 4 experts' SignRound parameters (moved off their initial values), routed rows
    (expert 1 gets none) and a probe of the output: (ours, ref, x, counts, probe)."""
    torch.manual_seed(5)
    w = torch.randn(4, 32, in_features) * 0.05
    counts = [7, 0, 12, 5]
    x = torch.randn(sum(counts), in_features)
    probe = torch.randn(sum(counts), 32)
    ours, ref = RoundedWeight(w.clone(), 128), RoundedWeight(w.clone(), 128)
    with torch.no_grad():
        for r in (ours, ref):
            torch.manual_seed(6)
            r.v.uniform_(-0.5, 0.5)
            r.max_scale.uniform_(0.7, 1.0)
    return ours, ref, x, counts, probe


@pytest.mark.parametrize("in_features,chunk", [(256, 1 << 24), (192, 1 << 24), (192, 1)])
def test_tuned_expert_linear_equals_autograd_through_qdq(in_features, chunk, monkeypatch):
    """`RoundedWeight.linear` (weights rebuilt in the backward) against autograd through `qdq` and
    `grouped_linear`: the same output and the same gradients of v and the factors."""
    import surgery.quant.signround as signround

    monkeypatch.setitem(signround.EXPERT_CHUNK, "cpu", chunk)  # 1: one expert at a time
    out_f = 32
    ours, ref, x, counts, probe = tuned_experts_problem(in_features)
    y = ours.linear(x, counts, torch.float32)
    (y * probe).sum().backward()
    y_ref = grouped_linear(x, ref.qdq(torch.float32), counts)
    (y_ref * probe).sum().backward()
    assert torch.equal(y, y_ref)
    assert torch.allclose(ours.v.grad, ref.v.grad, rtol=1e-6, atol=1e-9)
    assert torch.allclose(ours.max_scale.grad, ref.max_scale.grad, rtol=1e-3, atol=1e-6)
    assert torch.allclose(ours.min_scale.grad, ref.min_scale.grad, rtol=1e-3, atol=1e-6)
    assert bool(ours.v.grad[:out_f * ours.groups].abs().sum() > 0) and not bool(
        ours.v.grad[out_f * ours.groups:2 * out_f * ours.groups].any())  # expert 1 saw no token
