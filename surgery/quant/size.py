"""Bytes of a checkpoint after W4A16 (and optionally after pruning first), from headers alone and
without torch, so `surgery inspect` can say what `surgery prune --quantize w4a16` will write."""

from __future__ import annotations

from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError
from surgery.plan.counts import n_keep_for
from surgery.quant.targets import find_targets

PACK = 8  # 4-bit levels per int32


def packed_bytes(out_features: int, in_features: int, group_size: int = 128) -> int:
    """qweight int32 [in/8, out] + qzeros int32 [groups, out/8] + scales fp16 [groups, out]."""
    groups = -(-in_features // group_size)
    return 4 * (in_features // PACK) * out_features + 4 * groups * (out_features // PACK) + 2 * groups * out_features


def w4a16_size(model: MoEModel, keep_fraction: float = 1.0, group_size: int = 128) -> int:
    """Output bytes of `surgery quantize` (RTN or GPTQ: the same layout) on this checkpoint, with each
    routed expert's and router's bytes scaled by `keep_fraction` (pruning first keeps that share)."""
    targets = find_targets(model, group_size=group_size)
    total = 0.0
    for name, info in model.ckpt.tensors.items():
        if name in targets.consumed:
            continue
        t = targets.targets.get(name)
        size = packed_bytes(t.out_features, t.in_features, group_size) if t else info.nbytes
        if name in targets.fp8_dequant:
            size = 2 * info.numel  # dequantised to bf16
        if model.classify(name).kind in ("expert", "router", "fused"):
            size *= keep_fraction
        total += size
    return int(total)


def w4a16_sizes(model: MoEModel, ratios: tuple[float, ...], group_size: int = 128) -> dict[str, int] | None:
    """{"0.00": bytes after W4A16, "0.25": after pruning 25% then W4A16, ...}; None when this checkpoint
    cannot be quantized (already W4A16, experts fused on disk, or refused)."""
    if any(n.endswith(".qweight") for n in model.ckpt.tensors):
        return None
    e = model.num_experts
    try:
        return {f"{r:.2f}": w4a16_size(model, (n_keep_for(e, r) if r else e) / e, group_size) for r in (0.0, *ratios)}
    except SurgeryError:
        return None
