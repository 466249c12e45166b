"""GPTQ math against an independent, plain in-memory GPTQ written here with straightforward loops
(column by column, no lazy block updates, float64), plus the format's round trip."""

from __future__ import annotations

import math

import torch

from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.quant.gptq import Hessian, dequantize_levels, gptq_quantize
from surgery.quant.pack import pack
from surgery.quant.rtn import rtn_quantize


def reference_gptq(w: torch.Tensor, h: torch.Tensor, group: int, damp: float = 0.01):
    """Textbook GPTQ: Cholesky of H⁻¹, one column at a time, each column's error spread immediately
    over all later columns; a group's scale from its (updated) weights when its first column comes."""
    w = w.double().clone()
    h = h.double().clone()
    rows, cols = w.shape
    for i in range(cols):
        if h[i, i] == 0:
            h[i, i] = 1
            w[:, i] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    u = torch.linalg.cholesky(hinv).t()  # upper: hinv = uᵀ u
    size = group if cols > group else cols
    levels = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = []
    scale = None
    for i in range(cols):
        if i % size == 0:
            g = w[:, i:i + size]
            lo = torch.clamp(g.min(dim=1).values, max=0)
            hi = torch.clamp(g.max(dim=1).values, min=0)
            # the larger side maps to -8 (ties: the positive side); fp16 scale, magnitude at least 1e-5
            s = torch.where(hi >= -lo, -hi, -lo) / 8
            s = s.to(torch.float16)
            s = torch.where(s < 0, torch.clamp(s, max=-1e-5), torch.clamp(s, min=1e-5))
            scales.append(s)
            scale = s.double()
        q = torch.clamp(torch.round(w[:, i] / scale), -8, 7)
        levels[:, i] = (q + 8).to(torch.uint8)
        err = (w[:, i] - q * scale) / u[i, i]
        for j in range(i + 1, cols):
            w[:, j] -= err * u[i, j]
    return levels, torch.stack(scales, dim=1)


def test_gptq_equals_plain_reference():
    g = torch.Generator().manual_seed(0)
    for rows, cols, group in ((64, 320, 128), (32, 96, 128), (48, 256, 64)):
        w = torch.randn(rows, cols, generator=g) / math.sqrt(cols)
        x = torch.randn(600, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
        x[:, 5] = 0  # a dead input
        hess = Hessian(cols)
        for part in x.split(97):
            hess.add(part)
        h = hess.value()
        assert torch.allclose(h.double(), 2 / 600 * x.double().t() @ x.double(), rtol=1e-4, atol=1e-4)
        q, s = gptq_quantize(w, h, group, dtype=torch.float64)
        rq, rs = reference_gptq(w, h, group)
        assert torch.equal(s, rs)
        assert (q != rq).float().mean() < 1e-3
        # GPTQ lowers the output error on the calibration inputs compared with RTN
        deq = dequantize_levels(q, s, group)
        rtn = dequantize_levels(*rtn_quantize(w, group), group)
        assert ((x @ (deq - w).t()) ** 2).sum() < ((x @ (rtn - w).float().t()) ** 2).sum()


def test_identity_hessian_is_rtn():
    w = (torch.randn(64, 256) / 16).to(torch.bfloat16)
    q, s = gptq_quantize(w, torch.eye(256))
    rq, rs = rtn_quantize(w, 128)
    assert torch.equal(q, rq) and torch.equal(s, rs)


def test_pack_round_trip_and_dequantize():
    w = torch.randn(96, 320) / 18
    q, s = rtn_quantize(w, 128)
    p = pack(q, s)
    assert p["qweight"].shape == (40, 96) and p["qzeros"].shape == (3, 12) and p["scales"].shape == (3, 96)
    assert (p["qzeros"] == 0x77777777).all()
    deq = dequantize_w4a16(p["qweight"], p["qzeros"], p["scales"], 128)
    assert torch.equal(deq, dequantize_levels(q, s, 128))
    # plain loops: nibble j of row r is input 8r + j
    qw = p["qweight"]
    for r, o in ((0, 0), (7, 50), (39, 95)):
        word = int(qw[r, o]) & 0xFFFFFFFF
        for j in range(8):
            assert (word >> (4 * j)) & 0xF == int(q[o, 8 * r + j])
    # within one step of its group's scale (half a step, or one where the +7 side is clipped)
    step = s.float().abs().repeat_interleave(128, dim=1)[:, :320]
    assert ((deq - w.bfloat16().float()).abs() <= step + 1e-6).all()  # RTN works on the bf16 weight
