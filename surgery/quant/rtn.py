"""Symmetric group-wise 4-bit round-to-nearest, exactly as AutoRound 0.16.1 computes it.

AutoRound (`auto_round/data_type/int.py: quant_tensor_rtn_sym`, reached with iters=0 and the
optimised RTN disabled) works per row and group of `group_size` inputs on the weight in the model's
compute dtype, which on every device it supports is bfloat16 for bf16 and fp32 checkpoints (its amp
cast), so the weight is rounded to bf16 first. Then, per (row, group):

    wmin = min(min(w), 0), wmax = max(max(w), 0)                     (bf16, exact)
    max_v = -wmax if wmax >= -wmin else -wmin                         (the larger side, sign flipped
                                                                       so that it maps to -8)
    scale = fp16(bf16(max_v / 8)), then |scale| >= 1e-5 keeping its sign
    q = clamp(round_half_even(float32(w) / float32(scale)), -8, 7) + 8

`max_v / 8` is exact in bf16 (a power of two), so the only rounding of the scale is bf16 -> fp16.
A row shorter than one group is one group (AutoRound does not pad it); a partial last group is
padded with zeros, which cannot change its min/max (both are clamped through zero).

The packer (`auto_round_extension/torch/qlinear_torch_zp.py`) recomputes the integers from the
bf16 fake-quantised weight as round(bf16(q * scale) / scale + 8); that round trip always returns q + 8
(|q| <= 8 and bf16's relative error 2^-9 keep it within 1/64), which the tests check against
AutoRound itself rather than trusting the argument.
"""

from __future__ import annotations

import torch

BITS = 4
MAXQ = 2 ** (BITS - 1)  # 8: symmetric 4-bit levels are -8..7, stored as 0..15 around the zero point 8
SCALE_FLOOR = 1e-5  # AutoRound's q_scale_thresh for fp16 scales


def num_groups(in_features: int, group_size: int) -> int:
    """Groups along the input dimension (the last one partial); a row shorter than a group is one."""
    return -(-in_features // group_size)


def grouped_rows(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out * groups, group] (zero-padded), or [out, in] when in <= group_size."""
    out_f, in_f = w.shape
    if in_f <= group_size:
        return w
    pad = num_groups(in_f, group_size) * group_size - in_f
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(-1, group_size)


def group_scales(w: torch.Tensor) -> torch.Tensor:
    """fp16 signed scales [rows] of rows of bf16 values [rows, n]: AutoRound's symmetric rule."""
    wmin = torch.clamp(w.min(-1)[0], max=0)
    wmax = torch.clamp(w.max(-1)[0], min=0)
    wmin_abs = -wmin
    max_v = (2 * (wmax < wmin_abs).int() - 1) * torch.max(wmax, wmin_abs)
    scale = (max_v / MAXQ).to(torch.float16)
    return torch.where(scale < 0, torch.clamp(scale, max=-SCALE_FLOOR), torch.clamp(scale, min=SCALE_FLOOR))


def quantize_with_scales(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Levels 0..15 (uint8) of bf16 values `w` [rows, n] on fp16 scales [rows] (symmetric, zero 8)."""
    q = w.div(scale.unsqueeze(-1)).round_().clamp_(-MAXQ, MAXQ - 1)
    return (q + MAXQ).to(torch.uint8)


def rtn_quantize(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoRound's RTN of one linear weight [out, in]: (levels uint8 [out, in] in 0..15,
    scales fp16 [out, groups])."""
    out_f, in_f = weight.shape
    w = weight.to(torch.bfloat16)
    g = grouped_rows(w, group_size)
    scale = group_scales(g)
    q = quantize_with_scales(g, scale)
    groups = num_groups(in_f, group_size)
    q = q.reshape(out_f, -1)[:, :in_f]
    return q.contiguous(), scale.reshape(out_f, groups)
