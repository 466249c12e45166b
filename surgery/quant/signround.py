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

from surgery.quant.rtn import MAXQ, SCALE_FLOOR, grouped_rows, num_groups

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


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward (AutoRound's `round_ste`)."""
    return (x.round() - x).detach() + x


class RoundedWeight:
    """One weight `[out, in]`, or a stack of them `[n, out, in]` whose rows are quantized independently
    (a layer's fused experts), with its SignRound parameters."""

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        self.shape = tuple(weight.shape)
        self.in_features = self.shape[-1]
        self.group_size = group_size
        self.groups = num_groups(self.in_features, group_size)
        rows = weight.detach().reshape(-1, self.in_features).to(torch.bfloat16)
        self.rows = rows.shape[0]
        self.grouped = grouped_rows(rows, group_size)  # [rows * groups, G] bf16 (AutoRound's amp cast)
        self.wmin = torch.clamp(self.grouped.min(-1)[0], max=0)
        self.wmax = torch.clamp(self.grouped.max(-1)[0], min=0)
        dev = weight.device
        self.v = torch.zeros(self.grouped.shape, dtype=torch.float32, device=dev, requires_grad=True)
        self.min_scale = torch.ones(self.grouped.shape[0], dtype=torch.float32, device=dev, requires_grad=True)
        self.max_scale = torch.ones(self.grouped.shape[0], dtype=torch.float32, device=dev, requires_grad=True)

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

    def _levels(self, scale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(_round_ste(self.grouped / scale + self.v), -MAXQ, MAXQ - 1)

    def _ungroup(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.rows, -1)[:, :self.in_features].reshape(self.shape)

    def qdq(self, dtype: torch.dtype) -> torch.Tensor:
        """The fake-quantised weight in `dtype` (differentiable in v and the factors). The product
        scale x level is taken in float32, so in float32 it is exactly what the W4A16 reader decodes;
        in bf16 it is AutoRound's own bf16 qdq weight."""
        scale = self.scale()
        return self._ungroup(scale.float() * self._levels(scale)).to(dtype)

    @torch.no_grad()
    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels uint8 `[rows, in]` in 0..15, scales fp16 `[rows, groups]`) of the current parameters,
        rows in the order of the weight's leading dims (expert, then output)."""
        scale = self.scale()
        q = (self._levels(scale) + MAXQ).to(torch.uint8)
        levels = q.reshape(self.rows, -1)[:, :self.in_features]
        return levels.contiguous(), scale.reshape(self.rows, self.groups)

    def nbytes(self) -> int:
        """What tuning holds for this weight besides the weight itself: the bf16 groups, v, its gradient
        and best copy, the fake-quantised weight and its gradient (float32)."""
        n = self.grouped.numel()
        return n * (2 + 4 * 3) + 2 * 4 * math.prod(self.shape)


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
    through the current fake-quantised weights (differentiable in their parameters). Leaves the
    parameters of the lowest-loss step in the weights."""
    rounding = [w.v for w in weights]
    factors = [p for w in weights for p in (w.min_scale, w.max_scale)]
    sampler = IndexSampler(nsamples, opts.batch_size, opts.seed if seed is None else seed)
    best_loss, best_iter, init_loss = math.inf, 0, math.nan
    best: list[torch.Tensor] | None = None
    for i in range(opts.iters):
        loss = loss_of(sampler.next_batch())
        (loss * LOSS_SCALE).backward()
        value = float(loss.item())
        if i == 0:
            init_loss = value
        if value < best_loss:
            best_loss, best_iter = value, i
            best = [p.detach().clone() for p in rounding + factors]
        decay = 1.0 - i / opts.iters  # LinearLR(start_factor=1, end_factor=0, total_iters=iters)
        with torch.no_grad():
            for params, rate in ((rounding, opts.rate), (factors, opts.minmax_rate)):
                for p in params:
                    if p.grad is not None:
                        p.add_(torch.sign(p.grad), alpha=-rate * decay)
                        p.grad = None
    if best is not None:
        with torch.no_grad():
            for p, b in zip(rounding + factors, best, strict=True):
                p.copy_(b)
    return TuneResult(init_loss, best_loss if best is not None else math.nan, best_iter, opts.iters)
