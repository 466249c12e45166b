"""FP8 e4m3 block dequantisation of one expert weight into a buffer, in place (device or CPU).

`ExpertStore.materialize` builds each expert's fused parameters with `dequantize_into`: on any device a
broadcast multiply over a block view (no `repeat_interleave` copies); on the CPU, where torch converts
float8 element by element, an integer bit trick that is bit-identical and several times faster
(tests/test_paging.py checks every code and scale class).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def dequantize_into(dst: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int]) -> None:
    """dst = weight * scale of its block, in place in dst's dtype (the product is taken in float32,
    so float32 and bf16 results equal `fp8.dequantize`'s). Full blocks are one broadcast multiply over
    a [rows/b, b, cols/b, b] view; partial edge blocks get the same broadcast on their strips."""
    scale = scale_inv.float()
    if dst.device.type == "cpu" and _fast_e4m3(weight, scale):
        work = dst if dst.dtype == torch.float32 else _scratch("f32", weight.shape, torch.float32)
        _e4m3_bits_to(work, weight)
        _mul_blocks(work, scale * _E4M3_OFFSET, block)
        if work is not dst:
            dst.copy_(work)
        return
    dst.copy_(weight)
    _mul_blocks(dst, scale, block)


def _mul_blocks(dst: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    rows, cols = dst.shape
    br, bc = block
    fr, fc = rows - rows % br, cols - cols % bc
    nr, nc = fr // br, fc // bc
    if fr and fc:
        dst[:fr, :fc].view(nr, br, nc, bc).mul_(scale[:nr, None, :nc, None])
    if fc < cols and fr:  # right strip: one partial column block per row block
        dst[:fr, fc:].view(nr, br, cols - fc).mul_(scale[:nr, None, nc:nc + 1])
    if fr < rows:  # bottom strip: one partial row block
        bottom = dst[fr:]
        if fc:
            bottom[:, :fc].view(rows - fr, nc, bc).mul_(scale[nr, None, :nc, None])
        if fc < cols:
            bottom[:, fc:].mul_(scale[nr, nc])


# FP8 e4m3 -> float32 on the CPU. torch converts float8 element by element (~0.3 G elements/s on two
# cores, measured: slower than the disk); integer shifts and a bf16 -> float32 widening are vectorised
# (~1.7 G elements/s). The byte's sign goes to bit 15 of a 16-bit word and its 4 exponent + 3 mantissa
# bits to bits 10..4, which is the bf16 whose exponent field is the fp8 exponent: exactly
# value * 2^-120 (normals and subnormals alike, the latter as float32 denormals). Multiplying by
# scale * 2^120 gives the same real product as value * scale, hence the same float32 rounding:
# bit-identical (tests check all 256 codes). Not used where that could differ: NaN codes (0x7f/0xff,
# which must stay NaN), scales >= 2^7 (scale * 2^120 would overflow), or denormals flushed to zero.
_E4M3_OFFSET = 2.0 ** 120
_E4M3_MASK = -30736  # 0x87F0 as int16: the sign bit and bits 10..4
_scratch_bufs: dict[str, torch.Tensor] = {}
_denormals_kept: bool | None = None


def _scratch(key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A reused CPU buffer (one per purpose; the compute thread is the only caller)."""
    n = _numel(shape)
    buf = _scratch_bufs.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = _scratch_bufs[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _fast_e4m3(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    global _denormals_kept
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        return False
    if _denormals_kept is None:
        _denormals_kept = bool((torch.tensor([2.0 ** -140]) * 2.0).item() != 0.0)
    if not _denormals_kept or not bool((scale.abs() < 2.0 ** 7).all()):
        return False
    return not _has_nan_codes(weight)


_LOW7, _ONES, _HIGH = 0x7F7F7F7F7F7F7F7F, 0x0101010101010101, -0x7F7F7F7F7F7F7F80  # per-byte masks


def _has_nan_codes(weight: torch.Tensor) -> bool:
    """Whether any byte is a NaN code (low 7 bits all set), eight bytes per int64 word: a byte's
    (b & 0x7f) + 1 carries into its bit 7 only when b & 0x7f == 0x7f, and never into the next byte.
    ~14 G bytes/s against ~2.5 for a byte-wise compare (torch's uint8 kernels are not vectorised)."""
    flat = weight.view(torch.uint8).reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return bool((flat & 0x7F).eq(0x7F).any())
    words = _scratch("nan", torch.Size([flat.numel() // 8]), torch.int64)
    torch.bitwise_and(flat.view(torch.int64), _LOW7, out=words)
    return bool(words.add_(_ONES).bitwise_and_(_HIGH).any())


def _e4m3_bits_to(dst: torch.Tensor, weight: torch.Tensor) -> None:
    """dst (float32) = weight (float8_e4m3fn, no NaN codes) * 2^-120, exactly."""
    bits = _scratch("i16", weight.shape, torch.int16)
    bits.copy_(weight.view(torch.int8))  # sign-extended: a negative byte sets bits 15..8
    bits.bitwise_left_shift_(4).bitwise_and_(_E4M3_MASK)
    dst.copy_(bits.view(torch.bfloat16))
