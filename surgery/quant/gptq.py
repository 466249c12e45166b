"""GPTQ for one linear weight, as pure functions on tensors (Frantar et al., arXiv 2210.17323).

Per linear with weight W [out, in] and the inputs x it saw on the calibration tokens:

- Hessian H = 2/n Σ x xᵀ over the n tokens ([in, in], float32 sums);
- dead inputs (H_ii = 0) get H_ii = 1 and W[:, i] = 0; dampening adds `damp` × mean(diag H) to the
  diagonal (1% by default);
- U = upper Cholesky factor of H⁻¹; columns are quantized left to right in blocks of `group_size`
  (no act-order); after each column its error (w - q) / U_ii is pushed into the block's remaining
  columns (row i of U), and after each block the block's errors are pushed into every later column
  at once (the "lazy batch" update, equal in exact arithmetic to the column-by-column one);
- groups are the blocks, so each group's scale is computed, with AutoRound's symmetric rule
  (`surgery.quant.rtn.group_scales`: the larger side maps to -8, fp16, |scale| >= 1e-5), from the
  group's weights as the errors of the groups before it left them, when the group starts
  (GPTQModel/AutoGPTQ with static_groups=False).

With H = I (no correlation between inputs) this is exactly RTN of W.

This per-weight form is the specification (and runs in float64 for the tests); the quantize command runs
the same arithmetic over batches of weights on the compute device (`surgery.quant.gptq_batch`), which
tests/test_quant_gptq_batch.py holds to it bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from surgery.quant.rtn import MAXQ, group_scales

DAMP = 0.01


class Hessian:
    """Σ x xᵀ and the token count for one linear's inputs; `value()` = 2/n Σ x xᵀ."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros((n, n), dtype=torch.float32, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0]:
            x = x.to(self.sum.device, torch.float32)
            self.sum.addmm_(x.t(), x)
            self.count += x.shape[0]

    def value(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.count, 1))


def inverse_cholesky(hessian: torch.Tensor, weight: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, after zeroing dead inputs of `weight`
    in place (inputs never seen: their column cannot matter and is quantized as 0)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


@contextmanager
def _cpu_threads_for(w: torch.Tensor):
    """One CPU thread for small weights: the column loop is thousands of tiny ops, for which the
    intra-op thread pool costs more than it gives (8x slower on a busy 2-core machine)."""
    if w.device.type != "cpu" or w.shape[0] * 128 > 1 << 20:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128, damp: float = DAMP,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of one weight [out, in] given its Hessian [in, in]: (levels uint8 [out, in] in 0..15,
    scales fp16 [out, groups]), the layout `surgery.quant.pack` packs."""
    w = weight.to(dtype).clone()
    with _cpu_threads_for(w):
        return _gptq(w, hessian.to(dtype), group_size, damp, dtype)


def _gptq(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    u = inverse_cholesky(hessian, w, damp)
    block = group_size if in_f > group_size else in_f
    levels = torch.empty((out_f, in_f), dtype=torch.uint8, device=w.device)
    scales = []
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        scale = group_scales(w1)  # fp16 [out]: from the group's error-updated weights, at its start
        s = scale.to(dtype)
        for i in range(i2 - i1):
            col = w1[:, i]
            q = torch.clamp(torch.round(col / s), -MAXQ, MAXQ - 1)
            levels[:, i1 + i] = (q + MAXQ).to(torch.uint8)
            e = (col - q * s) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
        scales.append(scale)
    return levels, torch.stack(scales, dim=1)


def dequantize_levels(levels: torch.Tensor, scales: torch.Tensor, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [out, in] = scale[group] · (level - 8), from unpacked levels [out, in] and scales [out, groups]."""
    out_f, in_f = levels.shape
    block = group_size if in_f > group_size else in_f
    s = scales.to(torch.float32).repeat_interleave(block, dim=1)[:, :in_f]
    return ((levels.to(torch.float32) - MAXQ) * s).to(dtype)
