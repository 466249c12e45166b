"""AutoRound's `auto_round:auto_gptq` packing of symmetric 4-bit weights (GPTQ's layout).

For a linear weight [out, in] with levels q in 0..15 and fp16 scales [out, groups]:

- `qweight` int32 [in / 8, out]: nibble j (bits 4j..4j+3) of row r holds input 8r + j;
- `qzeros`  int32 [groups, out / 8]: the zero point 8 stored as 8 - 1 = 7 in every nibble
  (0x77777777; readers add the 1 back);
- `scales`  float16 [groups, out].

The dequantised weight is scales[g(i), o] * (q[o, i] - 8) for input i in group g(i) = i // group_size.
"""

from __future__ import annotations

import torch

from surgery.quant.rtn import BITS, MAXQ

PACK = 32 // BITS  # 8 nibbles per int32
ZERO_WORD = sum((MAXQ - 1) << (BITS * j) for j in range(PACK))  # 0x77777777
SUFFIXES = ("qweight", "qzeros", "scales")  # what replaces one quantized `weight`


def packed_shapes(out_features: int, in_features: int, groups: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """The three tensors (shape, safetensors dtype) that replace a [out, in] weight."""
    return {"qweight": ((in_features // PACK, out_features), "I32"),
            "qzeros": ((groups, out_features // PACK), "I32"),
            "scales": ((groups, out_features), "F16")}


def pack_qweight(q: torch.Tensor) -> torch.Tensor:
    """Levels uint8 [out, in] -> qweight int32 [in / 8, out]."""
    out_f, in_f = q.shape
    x = q.to(torch.int64).t().reshape(in_f // PACK, PACK, out_f)
    shifts = (torch.arange(PACK, dtype=torch.int64) * BITS).view(1, PACK, 1)
    words = (x << shifts).sum(dim=1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).contiguous()


def unpack_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """qweight int32 [in / 8, out] -> levels uint8 [out, in] (on qweight's device)."""
    rows, out_f = qweight.shape
    shifts = (torch.arange(PACK, dtype=torch.int32, device=qweight.device) * BITS).view(1, PACK, 1)
    levels = (qweight.unsqueeze(1) >> shifts) & 0xF
    return levels.reshape(rows * PACK, out_f).t().to(torch.uint8)


def qzeros(groups: int, out_features: int) -> torch.Tensor:
    """Symmetric zero points: every nibble 7 (zero 8 minus one)."""
    word = ZERO_WORD - 2 ** 32 if ZERO_WORD >= 2 ** 31 else ZERO_WORD
    return torch.full((groups, out_features // PACK), word, dtype=torch.int32)


def pack(q: torch.Tensor, scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """Levels [out, in] and scales [out, groups] -> {qweight, qzeros, scales} as written to disk."""
    out_f, _ = q.shape
    return {"qweight": pack_qweight(q), "qzeros": qzeros(scales.shape[1], out_f),
            "scales": scales.t().contiguous().to(torch.float16)}


def pack_batch(levels: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels uint8 `[n, in, out]` and scales `[n, out, groups]` of a batch of weights -> (qweight int32
    `[n, in / 8, out]`, scales fp16 `[n, groups, out]`), on their device: `pack` of each weight (its
    qzeros are the constant `qzeros`)."""
    n, in_f, out_f = levels.shape
    x = levels.view(n, in_f // PACK, PACK, out_f)
    words = x[:, :, 0].to(torch.int32)
    for j in range(1, PACK):  # nibble j of row r is input 8r + j; bits 28..31 wrap into the sign as int32
        words.bitwise_or_(x[:, :, j].to(torch.int32).bitwise_left_shift_(BITS * j))
    return words, scales.transpose(1, 2).to(torch.float16).contiguous()


def decode_batch(levels: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """out `[n, out, in]` = scale[group] · (level - 8) from levels `[n, in, out]` and scales `[n, out,
    groups]`, in out's dtype: what a W4A16 reader decodes the packed weights to (the same float32
    subtract and multiply as `dequantize_w4a16`, rounded once to out's dtype), on levels' device; a
    float32 `out` is decoded in place."""
    n, in_f, out_f = levels.shape
    block = group_size if in_f > group_size else in_f
    work = out if out.dtype == torch.float32 else torch.empty(out.shape, dtype=torch.float32, device=out.device)
    work.copy_(levels.transpose(1, 2))
    work.sub_(MAXQ)
    s = scales.to(torch.float32)
    full = in_f // block
    if full:
        work[:, :, :full * block].view(n, out_f, full, block).mul_(s[:, :, :full, None])
    if full * block < in_f:
        work[:, :, full * block:].mul_(s[:, :, full:full + 1])
    if work is not out:
        out.copy_(work)
