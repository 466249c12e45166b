"""SignRound (Cheng et al., arXiv 2309.05516) with AutoRound 0.16.1's defaults: the tuned rounding of
W4A16 weights, on the tensors of one decoder layer.

Per quantized weight, grouped along its input as RTN groups it (`surgery.quant.rtn`: bf16 first, rows
of `group_size`, a partial last group zero-padded), SignRound learns

- a rounding offset `v` per weight element (initial 0): level = clamp(round(w / scale + v), -8, 7);
- a factor on each group's min and on its max (initial 1, clamped into [0, 1] before every use): the
  scale is AutoRound's symmetric rule (`auto_round/data_type/int.py: quant_tensor_sym`) on
  `min(w) * min_scale` and `max(w) * max_scale`, so tuning can only narrow the range;

by signed gradient descent (`sign_sgd.py`: p -= lr * sign(grad), no momentum) on the mean squared error
between the layer's output through the fake-quantised weights and its float reference, times 1000
(`_scale_loss_and_backward`), round() passing gradients straight through (`round_ste`). The learning
rate decays linearly from `lr` (default 1 / iters, for the factors too) to 0 over `iters` (default 200)
steps (torch's `LinearLR`); each step draws `batch_size` (8) calibration rows by AutoRound's
`IndexSampler` (a shuffled cycle, reshuffled when fewer than a batch remain), seeded per layer here so a
resumed run draws the same rows. The parameters kept are those of the step with the lowest loss (its
loss measured before that step's update), as AutoRound's best-MSE selection does. `v` is not clamped:
the linear decay bounds its total movement to lr * (iters + 1) / 2, about 0.5, as in AutoRound.

With v = 0 and both factors 1 the levels and scales are exactly RTN's (`rtn_quantize`); the tests check
that bit for bit, and one step against a hand-written reference.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from surgery.executor.grouped import grouped_linear, grouped_weight_grad
from surgery.quant.rtn import MAXQ, SCALE_FLOOR, grouped_rows, num_groups

EXPERT_CHUNK = {"cpu": 1 << 24, "cuda": 1 << 30}  # fake-quantised expert weight elements built at once
GRAD_CHUNK = 1 << 24  # weight-gradient elements (float32) of the experts taken at once in the backward
LOSS_SCALE = 1000.0  # AutoRound scales the loss before backward (it changes no sign, only underflow)


@dataclass(frozen=True)
class SignRoundOptions:
    """AutoRound's tuning knobs (its defaults)."""

    iters: int = 200
    lr: float | None = None  # None: 1 / iters
    minmax_lr: float | None = None  # None: lr
    batch_size: int = 8  # calibration rows per step
    seed: int = 42

    @property
    def rate(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def minmax_rate(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.rate


def _qdq_values(grouped: torch.Tensor, v: torch.Tensor, sf: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale x clamp(round(w / scale + v), -8, 7) in `dtype`, the rounded values in int8), by row chunks
    (rows are independent: chunks bound the float32 temporaries and change no arithmetic)."""
    out = torch.empty(grouped.shape, dtype=dtype, device=grouped.device)
    r8 = torch.empty(grouped.shape, dtype=torch.int8, device=grouped.device)
    for a, b in _chunks(grouped):
        r = (grouped[a:b] / sf[a:b]).add_(v[a:b]).round_()  # bf16 / fp16 promotes to float32, as AutoRound's
        r8[a:b] = r.clamp_(-128, 127)
        out[a:b] = r.clamp_(-MAXQ, MAXQ - 1).mul_(sf[a:b])  # the product in float32, then `dtype`
    return out, r8


def _values_of(r8: torch.Tensor, sf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`_qdq_values`' first result again, from its saved rounding."""
    out = torch.empty(r8.shape, dtype=dtype, device=r8.device)
    for a, b in _chunks(r8):
        out[a:b] = r8[a:b].clamp(-MAXQ, MAXQ - 1).float().mul_(sf[a:b])
    return out


def _grad_rows(g: torch.Tensor, grouped: torch.Tensor, r: torch.Tensor, sf: torch.Tensor, dv: torch.Tensor,
               d_mul: torch.Tensor, d_div: torch.Tensor) -> None:
    """AutoRound's gradients for rows of groups, from the float32 gradient `g` of their qdq values:
    into v (round passes it straight through, clamp stops it outside the levels) and into the fp16
    scale along autograd's two paths, each reduced in float32 and cast to fp16 (then added): the
    product scale * q, and the division w / scale inside the rounding."""
    dvc = torch.mul(g, sf, out=dv).mul_((r >= -MAXQ) & (r <= MAXQ - 1))
    d_mul.copy_((g * r.clamp(-MAXQ, MAXQ - 1)).sum(-1, keepdim=True))
    d_div.copy_((-dvc * (grouped.float() / sf / sf)).sum(-1, keepdim=True))


class _QDQ(torch.autograd.Function):
    """The fake-quantised weight with AutoRound's gradients, written out so the backward keeps one int8
    per weight (the rounded value) instead of autograd's float32 intermediates."""

    @staticmethod
    def forward(ctx, grouped: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out, r8 = _qdq_values(grouped, v, scale.float(), dtype)
        ctx.save_for_backward(grouped, r8, scale)
        ctx.rounded = r8
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grouped, r8, scale = ctx.saved_tensors
        sf = scale.float()
        dv = torch.empty(grouped.shape, dtype=torch.float32, device=grouped.device)
        d_mul, d_div = torch.empty_like(scale), torch.empty_like(scale)
        for a, b in _chunks(grouped):
            _grad_rows(grad[a:b].float(), grouped[a:b], r8[a:b], sf[a:b], dv[a:b], d_mul[a:b], d_div[a:b])
        return None, dv, d_mul + d_div, None


class _QGroupedLinear(torch.autograd.Function):
    """y = x_j qdq(W_j)^T for every expert j over rows `x` sorted by expert (`grouped_linear`), with the
    gradients `_QDQ` + `grouped_linear` would give, but the fake-quantised weights are never kept: the
    forward builds them and drops them, the backward rebuilds them from the int8 rounding for x's gradient
    and turns each expert's weight gradient into its v and scale gradients at once. A layer's experts
    are most of its weights, so this holds one int8 per weight across the step where autograd would hold
    the float weights and their gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, weight: RoundedWeight,
                counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        sf = scale.float()
        r8 = torch.empty(weight.grouped.shape, dtype=torch.int8, device=v.device)
        y = x.new_empty((x.shape[0], weight.shape[1]))
        for e0, e1, a, b, r0, r1 in _expert_chunks(weight, counts):
            out, r8[a:b] = _qdq_values(weight.grouped[a:b], v[a:b], sf[a:b], dtype)
            if r1 > r0:
                y[r0:r1] = grouped_linear(x[r0:r1], weight.ungroup_experts(out, e1 - e0), counts[e0:e1])
        ctx.save_for_backward(x, r8, scale)
        ctx.weight, ctx.counts, ctx.dtype, ctx.rounded = weight, counts, dtype, r8
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x, r8, scale = ctx.saved_tensors
        rw, counts = ctx.weight, ctx.counts
        sf = scale.float()
        gx = torch.zeros_like(x)
        dv = torch.zeros(r8.shape, dtype=torch.float32, device=r8.device)
        ds = torch.zeros(2, *scale.shape, dtype=scale.dtype, device=scale.device)
        per = rw.shape[1] * rw.groups  # group rows of one expert
        pad = rw.groups * rw.group_size - rw.in_features if rw.in_features > rw.group_size else 0
        for e0, e1, a, b, r0, r1 in _expert_chunks(rw, counts):
            if r1 == r0:
                continue
            w = rw.ungroup_experts(_values_of(r8[a:b], sf[a:b], ctx.dtype), e1 - e0)
            gx[r0:r1] = grouped_linear(gy[r0:r1], w, counts[e0:e1], transposed=True)
            # F.linear's weight gradient, into v's and the factors' gradients, a few experts at a time
            # (one grouped call each where the kernel runs; float32 temporaries bounded by GRAD_CHUNK)
            step = max(1, GRAD_CHUNK // (rw.shape[1] * rw.groups * rw.grouped.shape[-1]))
            for f0 in range(e0, e1, step):
                f1 = min(f0 + step, e1)
                s0 = r0 + sum(counts[e0:f0])
                s1 = s0 + sum(counts[f0:f1])
                if s1 == s0:
                    continue
                gw = grouped_weight_grad(gy[s0:s1], x[s0:s1], counts[f0:f1]).float()
                gw = torch.nn.functional.pad(gw, (0, pad)).reshape((f1 - f0) * per, -1)
                ja, jb = f0 * per, f1 * per
                _grad_rows(gw, rw.grouped[ja:jb], r8[ja:jb], sf[ja:jb], dv[ja:jb], ds[0, ja:jb], ds[1, ja:jb])
        return gx, dv, ds[0] + ds[1], None, None, None


def _expert_chunks(rw: RoundedWeight, counts: list[int]) -> list[tuple[int, int, int, int, int, int]]:
    """Experts [e0, e1) at a time, with their group rows [a, b) and token rows [r0, r1): a chunk's
    fake-quantised weights are all that is built at once (~64 MB of float32 on a CPU; on CUDA, where memory
    is larger and one grouped GEMM per projection is faster, ~4 GB)."""
    per_expert = rw.shape[1] * rw.groups * rw.grouped.shape[-1]
    budget = EXPERT_CHUNK.get(rw.grouped.device.type, EXPERT_CHUNK["cpu"])
    n = max(1, budget // per_expert)
    per = rw.shape[1] * rw.groups
    out, r0 = [], 0
    for e0 in range(0, len(counts), n):
        e1 = min(e0 + n, len(counts))
        r1 = r0 + sum(counts[e0:e1])
        out.append((e0, e1, e0 * per, e1 * per, r0, r1))
        r0 = r1
    return out


def _chunks(grouped: torch.Tensor, elements: int = 1 << 22) -> list[tuple[int, int]]:
    rows = max(1, elements // max(grouped.shape[-1], 1))
    return [(a, min(a + rows, grouped.shape[0])) for a in range(0, grouped.shape[0], rows)]


class RoundedWeight:
    """One weight `[out, in]`, or a stack of them `[n, out, in]` whose rows are quantized independently
    (a layer's fused experts), with its SignRound parameters. The weight is rounded to bf16 in place
    (AutoRound's amp cast; the caller's tensor then holds the values quantization sees) and, when its
    groups are whole, read from there without a copy."""

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        self.shape = tuple(weight.shape)
        self.in_features = self.shape[-1]
        self.group_size = group_size
        self.groups = num_groups(self.in_features, group_size)
        rows = weight.detach().reshape(-1, self.in_features)
        self.rows = rows.shape[0]
        if self.in_features % group_size and self.in_features > group_size:
            self.grouped = grouped_rows(rows.to(torch.bfloat16), group_size)  # a zero-padded copy
        else:
            if rows.dtype != torch.bfloat16:
                for i in range(0, self.rows, 4096):
                    rows[i:i + 4096].copy_(rows[i:i + 4096].to(torch.bfloat16))
            self.grouped = grouped_rows(rows, group_size)  # [rows * groups, G], a view
        self.wmin = torch.clamp(self.grouped.min(-1)[0], max=0).to(torch.bfloat16)
        self.wmax = torch.clamp(self.grouped.max(-1)[0], min=0).to(torch.bfloat16)
        dev = weight.device
        self.v = torch.zeros(self.grouped.shape, dtype=torch.float32, device=dev, requires_grad=True)
        self.min_scale = torch.ones(self.grouped.shape[0], dtype=torch.float32, device=dev, requires_grad=True)
        self.max_scale = torch.ones(self.grouped.shape[0], dtype=torch.float32, device=dev, requires_grad=True)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (levels int8, scale) of the last qdq
        self.best: tuple[torch.Tensor, torch.Tensor] | None = None

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.min_scale, self.max_scale]

    def scale(self) -> torch.Tensor:
        """fp16 signed scale per group `[rows * groups, 1]` (differentiable in the factors)."""
        with torch.no_grad():
            self.min_scale.clamp_(0.0, 1.0)
            self.max_scale.clamp_(0.0, 1.0)
        wmin_abs = -(self.wmin * self.min_scale)
        wmax_abs = self.wmax * self.max_scale
        max_v = (2 * (wmax_abs < wmin_abs).int() - 1) * torch.max(wmax_abs, wmin_abs)
        scale = (max_v / MAXQ).to(torch.float16)
        scale = torch.where(scale < 0, torch.clamp(scale, max=-SCALE_FLOOR), torch.clamp(scale, min=SCALE_FLOOR))
        return scale.unsqueeze(-1)

    def _ungroup(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.rows, -1)[:, :self.in_features].reshape(self.shape)

    def ungroup_experts(self, g: torch.Tensor, n: int) -> torch.Tensor:
        """Group rows of `n` consecutive experts -> their weights `[n, out, in]`."""
        return g.reshape(n * self.shape[1], -1)[:, :self.in_features].reshape(n, *self.shape[1:])

    def qdq(self, dtype: torch.dtype) -> torch.Tensor:
        """The fake-quantised weight in `dtype` (differentiable in v and the factors). The product
        scale x level is taken in float32, so in float32 it is exactly what the W4A16 reader decodes;
        in bf16 it is AutoRound's own bf16 qdq weight."""
        scale = self.scale()
        out = _QDQ.apply(self.grouped, self.v, scale, dtype)
        self._last = (scale.detach(), out.grad_fn)
        return self._ungroup(out)

    def linear(self, x: torch.Tensor, counts: list[int], dtype: torch.dtype) -> torch.Tensor:
        """`grouped_linear(x, qdq(dtype), counts)` for a stack of experts, differentiable in v and the
        factors, without keeping the fake-quantised weights (`_QGroupedLinear`)."""
        scale = self.scale()
        y = _QGroupedLinear.apply(x, self.v, scale, self, counts, dtype)
        self._last = (scale.detach(), y.grad_fn)
        return y

    def keep(self) -> None:
        """Remember the levels and scales of the last `qdq` (the step with the lowest loss so far)."""
        scale, node = self._last
        with torch.no_grad():
            levels = node.rounded.clamp(-MAXQ, MAXQ - 1)  # the levels of that step, int8
        self.best = (levels, scale.clone())

    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels uint8 `[rows, in]` in 0..15, scales fp16 `[rows, groups]`) of the kept step (else of
        the current parameters), rows in the order of the weight's leading dims (expert, then output)."""
        if self.best is not None:
            levels, scale = self.best
        else:
            scale = self.scale()
            levels = torch.round(self.grouped.float() / scale.float() + self.v).clamp_(-MAXQ, MAXQ - 1)
        q = (levels.to(torch.int8) + MAXQ).to(torch.uint8)
        return q.reshape(self.rows, -1)[:, :self.in_features].contiguous(), scale.reshape(self.rows, self.groups)


class IndexSampler:
    """AutoRound's `IndexSampler` (compressors/utils.py) on a private, seeded generator."""

    def __init__(self, nsamples: int, batch_size: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.nsamples, self.batch_size = nsamples, min(batch_size, nsamples)
        self.indices = list(range(nsamples))
        self.rng.shuffle(self.indices)
        self.index = 0

    def next_batch(self) -> list[int]:
        if self.index + self.batch_size > self.nsamples:
            self.rng.shuffle(self.indices)
            self.index = 0
        batch = self.indices[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return batch


@dataclass
class TuneResult:
    init_loss: float
    best_loss: float
    best_iter: int
    iters: int


def sign_round(weights: Sequence[RoundedWeight], loss_of: Callable[[list[int]], torch.Tensor], nsamples: int,
               opts: SignRoundOptions, seed: int | None = None) -> TuneResult:
    """Tune `weights` in place: `loss_of(rows)` is the MSE of the layer's output on calibration rows `rows`
    through the current fake-quantised weights (each weight's `qdq` called once, differentiable in their
    parameters). Each weight keeps the levels and scales of the lowest-loss step (`quantized`)."""
    rounding = [w.v for w in weights]
    factors = [p for w in weights for p in (w.min_scale, w.max_scale)]
    sampler = IndexSampler(nsamples, opts.batch_size, opts.seed if seed is None else seed)
    best_loss, best_iter, init_loss = math.inf, 0, math.nan
    for i in range(opts.iters):
        loss = loss_of(sampler.next_batch())
        (loss * LOSS_SCALE).backward()
        value = float(loss.item())
        if i == 0:
            init_loss = value
        if value < best_loss:
            best_loss, best_iter = value, i
            for w in weights:
                w.keep()
        decay = 1.0 - i / opts.iters  # LinearLR(start_factor=1, end_factor=0, total_iters=iters)
        with torch.no_grad():
            for params, rate in ((rounding, opts.rate), (factors, opts.minmax_rate)):
                for p in params:
                    if p.grad is not None:
                        p.add_(torch.sign(p.grad), alpha=-rate * decay)
                        p.grad = None
    for w in weights:
        w._last = None
    return TuneResult(init_loss, best_loss, best_iter, opts.iters)
