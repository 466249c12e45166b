"""The W4A16 output checkpoint, decided from the input headers before a byte is written.

One output shard per input shard, same file name, tensors in the input's file order; a quantized
`X.weight` becomes `X.qweight`, `X.qzeros`, `X.scales` in its place (shapes from the weight's shape
and the group size), an FP8 weight that stays unquantized becomes its dequantised weight in the
compute dtype, the FP8 scales are dropped, and every other tensor is a byte copy. Every offset is
therefore known up front, which lets the writer put each header first and stream the data after it.
The walk over shards and tensors is the one every writing command shares
(`surgery.checkpoint.layout.plan_shards`); this module says what each input tensor becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.arch.model import MoEModel
from surgery.checkpoint.layout import OutShard, plan_shards
from surgery.checkpoint.reader import TensorInfo
from surgery.checkpoint.writer import TensorEntry
from surgery.quant.pack import SUFFIXES, packed_shapes
from surgery.quant.rtn import num_groups
from surgery.quant.targets import QuantTargets, Target

DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class QTensor:
    """One output tensor: a byte copy of `source` (`how` "copy"), one of the three packed tensors of
    `target` (`how` "quant", `part` qweight/qzeros/scales), or an FP8 weight dequantised ("dequant")."""

    entry: TensorEntry
    source: TensorInfo
    how: str = "copy"
    target: Target | None = None
    part: str | None = None


def compute_dtype_code(model: MoEModel) -> str:
    """Dtype of dequantised FP8 weights: the checkpoint's declared dtype (bf16 when it says none)."""
    declared = str(model.ckpt.config.get("dtype") or model.ckpt.config.get("torch_dtype") or "bfloat16")
    return DTYPE_CODES.get(declared, "BF16")


def plan_quant_layout(model: MoEModel, targets: QuantTargets, group_size: int) -> list[OutShard[QTensor]]:
    dq_code = compute_dtype_code(model)

    def place(info: TensorInfo) -> list[QTensor]:
        if info.name in targets.consumed:
            return []  # an FP8 scale, consumed by its weight's quantization or dequantisation
        target = targets.targets.get(info.name)
        if target is not None:
            shapes = packed_shapes(target.out_features, target.in_features, num_groups(target.in_features, group_size))
            return [QTensor(TensorEntry(f"{target.module}.{part}", shapes[part][1], shapes[part][0]), info, "quant",
                            target, part) for part in SUFFIXES]
        if info.name in targets.fp8_dequant:
            return [QTensor(TensorEntry(info.name, dq_code, info.shape), info, "dequant")]
        return [QTensor(TensorEntry(info.name, info.dtype, info.shape), info)]

    return plan_shards(model.ckpt, place)
