"""W4A16 weights in AutoRound's `auto_round:auto_gptq` packing (GPTQ's layout): dequantise on the fly.

A linear `X` is stored as `X.qweight` int32 [in / 8, out] (nibble j of row r = input 8r + j),
`X.qzeros` int32 [groups, out / 8] (zero point minus one, per nibble) and `X.scales` fp16 [groups,
out]; the weight is W[o, i] = scales[g, o] · (q[i, o] - (z[g, o] + 1)) with g = i // group_size (a
row shorter than one group is one group). Torch ops only, so it runs on whatever device the packed
tensors are on, like the FP8 path (`surgery.checkpoint.fp8`).
"""

from __future__ import annotations

import torch

from surgery.errors import SurgeryError

QWEIGHT, QZEROS, SCALES, G_IDX = "qweight", "qzeros", "scales", "g_idx"
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
    block = group_block(group_size, in_f)
    s = scales.to(torch.float32)
    w = (q - zeros.repeat_interleave(block, dim=0)[:in_f]) * s.repeat_interleave(block, dim=0)[:in_f]
    return w.t().contiguous().to(dtype)


def dequantize_w4a16_into(dst: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                          group_size: int) -> None:
    """dst [out, in] = scales[g, o] * (level - (zero[g, o] + 1)) for input i in group g = i // group_size,
    in place in dst's dtype: what the expert pager decodes into its reused fused buffers. Bit for bit
    `dequantize_w4a16` (the same float32 subtract and multiply, rounded once to dst's dtype), but the
    nibbles are unpacked straight into dst's [out, in/8, 8] view and the groups are one broadcast over
    an [out, groups, group_size] view (a partial last group gets the same broadcast on its strip): no
    `repeat_interleave` copies of zeros and scales, no loop over groups, no transposed copy, and a
    float32 dst (CPU evaluation) needs no temporary beyond the unpacked levels."""
    out_f, in_f = dst.shape
    if tuple(qweight.shape) != (in_f // PACK, out_f) or in_f % PACK:
        raise SurgeryError(f"W4A16 qweight {list(qweight.shape)} does not pack a weight {[out_f, in_f]}")
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=qweight.device)
    work = dst if dst.dtype == torch.float32 else torch.empty(dst.shape, dtype=torch.float32, device=dst.device)
    levels = (qweight.t().unsqueeze(2) >> shifts).bitwise_and_(0xF)  # [out, in/8, 8]: input 8r + j
    work.view(out_f, in_f // PACK, PACK).copy_(levels)
    del levels
    zeros = _nibbles(qzeros, 1)[:, :out_f].to(torch.float32).add_(1).t()  # [out, groups]
    scale = scales.to(torch.float32).t()
    block = group_block(group_size, in_f)
    full = in_f // block
    if full:
        work[:, :full * block].view(out_f, full, block).sub_(zeros[:, :full, None]).mul_(scale[:, :full, None])
    if full * block < in_f:
        work[:, full * block:].sub_(zeros[:, full:full + 1]).mul_(scale[:, full:full + 1])
    if work is not dst:
        dst.copy_(work)


def group_block(group_size: int, in_features: int) -> int:
    """Inputs per group: `group_size`, or the whole row when it is shorter than one group or the
    config says -1 (AutoRound's and GPTQ's "one group per column")."""
    return group_size if 0 < group_size < in_features else in_features


def logical_shape(qweight_shape) -> tuple[int, int]:
    """The [out, in] of the weight a qweight [in / 8, out] packs: what memory budgets and fused
    buffers are sized by (the compute dtype holds the dequantised weight, not the nibbles)."""
    return int(qweight_shape[1]), int(qweight_shape[0]) * PACK


def weight_shape(ckpt, name: str) -> tuple[int, ...]:
    """The shape tensor `name` holds once read: a packed qweight's [out, in] weight, else its own."""
    shape = ckpt.info(name).shape
    return logical_shape(shape) if is_packed(name) else tuple(shape)


def is_packed(name: str) -> bool:
    """True for the `qweight` of a packed linear (its qzeros/scales are read with it)."""
    return name.endswith("." + QWEIGHT)


def group_size_of(config: dict) -> int:
    qcfg = config.get("quantization_config") or {}
    return int(qcfg.get("group_size") or 128)


def check_readable(config: dict, where: object = None) -> None:
    """Refuse, in one line, packed weights whose groups are not contiguous runs of inputs: with act
    order (`desc_act`) the `g_idx` permutation decides each input's group, and these readers (which
    take group i // group_size, as surgery's writer and AutoRound's RTN/AutoRound flows store it)
    would silently compute wrong weights."""
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("desc_act"):
        raise SurgeryError("W4A16 checkpoint quantized with act order (quantization_config desc_act true): its "
                           "g_idx permutes inputs across groups, which surgery does not read; re-export it "
                           "with desc_act false", where)


def packed_weight_names(names) -> dict[str, str]:
    """{`X.weight`: `X.qweight`} for every packed linear among tensor names: what a reader that wants
    plain weights reads instead (its `X.qzeros` and `X.scales` are consumed with it)."""
    return {n.removesuffix(QWEIGHT) + "weight": n for n in names if is_packed(n)}


def is_packed_part(name: str, names) -> bool:
    """True for `X.qweight`, `X.qzeros`, `X.scales` and `X.g_idx` of a packed linear (`X.qweight` in
    `names`); a reader consumes them all with the qweight (g_idx is the trivial i // group_size
    unless act order is on, which `check_readable` refuses)."""
    stem, _, part = name.rpartition(".")
    return part in (QWEIGHT, QZEROS, SCALES, G_IDX) and f"{stem}.{QWEIGHT}" in names


def read_packed_weight(ckpt, weight_name: str, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """The dequantised weight [out, in] of packed linear `X` given `X.weight`; the packed tensors are
    moved to `device` (the compute device) before dequantising, like FP8 blocks."""
    stem = weight_name.removesuffix("weight")
    parts = [ckpt.read(stem + p) for p in (QWEIGHT, QZEROS, SCALES)]
    if device is not None:
        parts = [p.to(device) for p in parts]
    return dequantize_w4a16(*parts, group_size_of(ckpt.config), dtype)
