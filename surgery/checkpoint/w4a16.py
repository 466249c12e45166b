"""W4A16 weights in AutoRound's `auto_round:auto_gptq` packing (GPTQ's layout): dequantise on the fly.

A linear `X` is stored as `X.qweight` int32 [in / 8, out] (nibble j of row r = input 8r + j),
`X.qzeros` int32 [groups, out / 8] (zero point minus one, per nibble) and `X.scales` fp16 [groups,
out]; the weight is W[o, i] = scales[g, o] · (q[i, o] - (z[g, o] + 1)) with g = i // group_size (a
row shorter than one group is one group). Torch ops only, so it runs on whatever device the packed
tensors are on, like the FP8 path (`surgery.checkpoint.fp8`).
"""

from __future__ import annotations

import torch

QWEIGHT, QZEROS, SCALES = "qweight", "qzeros", "scales"
BITS = 4
PACK = 32 // BITS


def _nibbles(words: torch.Tensor, dim: int) -> torch.Tensor:
    """Split int32 words into their 8 nibbles (low first) along `dim` (0: rows, 1: columns)."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=words.device)
    if dim == 0:
        x = (words.unsqueeze(1) >> shifts.view(1, PACK, 1)) & 0xF
        return x.reshape(words.shape[0] * PACK, words.shape[1])
    x = (words.unsqueeze(2) >> shifts.view(1, 1, PACK)) & 0xF
    return x.reshape(words.shape[0], words.shape[1] * PACK)


def dequantize_w4a16(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight [out, in] of one packed linear, computed in float32 and returned in `dtype`."""
    q = _nibbles(qweight, 0).to(torch.float32)  # [in, out]
    zeros = _nibbles(qzeros, 1).to(torch.float32) + 1  # [groups, out]
    in_f = q.shape[0]
    block = group_size if in_f > group_size else in_f
    s = scales.to(torch.float32)
    w = (q - zeros.repeat_interleave(block, dim=0)[:in_f]) * s.repeat_interleave(block, dim=0)[:in_f]
    return w.t().contiguous().to(dtype)


def is_packed(name: str) -> bool:
    """True for the `qweight` of a packed linear (its qzeros/scales are read with it)."""
    return name.endswith("." + QWEIGHT)


def group_size_of(config: dict) -> int:
    qcfg = config.get("quantization_config") or {}
    return int(qcfg.get("group_size") or 128)


def packed_weight_names(names) -> dict[str, str]:
    """{`X.weight`: `X.qweight`} for every packed linear among tensor names: what a reader that wants
    plain weights reads instead (its `X.qzeros` and `X.scales` are consumed with it)."""
    return {n.removesuffix(QWEIGHT) + "weight": n for n in names if is_packed(n)}


def is_packed_part(name: str, names) -> bool:
    """True for `X.qweight`, `X.qzeros` and `X.scales` of a packed linear (`X.qweight` in `names`)."""
    stem, _, part = name.rpartition(".")
    return part in (QWEIGHT, QZEROS, SCALES) and f"{stem}.{QWEIGHT}" in names


def read_packed_weight(ckpt, weight_name: str, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The dequantised weight [out, in] of packed linear `X` given `X.weight`; the packed tensors are
    moved to `device` (the compute device) before dequantising, like FP8 blocks."""
    stem = weight_name.removesuffix("weight")
    parts = [ckpt.read(stem + p) for p in (QWEIGHT, QZEROS, SCALES)]
    if device is not None:
        parts = [p.to(device) for p in parts]
    return dequantize_w4a16(*parts, group_size_of(ckpt.config), dtype)
