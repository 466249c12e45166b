"""The W4A16 output checkpoint, decided from the input headers before a byte is written.

One output shard per input shard, same file name, tensors in the input's file order; a quantized
`X.weight` becomes `X.qweight`, `X.qzeros`, `X.scales` in its place (shapes from the weight's shape
and the group size), an FP8 weight that stays unquantized becomes its dequantised weight in the
compute dtype, the FP8 scales are dropped, and every other tensor is a byte copy. Every offset is
therefore known up front, which lets the writer put each header first and stream the data after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import TensorInfo
from surgery.checkpoint.writer import TensorEntry, file_size_for
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


@dataclass
class QShard:
    name: str
    metadata: dict[str, str]
    tensors: list[QTensor] = field(default_factory=list)

    @property
    def entries(self) -> list[TensorEntry]:
        return [t.entry for t in self.tensors]

    @property
    def data_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return file_size_for(self.entries, self.metadata)


def compute_dtype_code(model: MoEModel) -> str:
    """Dtype of dequantised FP8 weights: the checkpoint's declared dtype (bf16 when it says none)."""
    declared = str(model.ckpt.config.get("dtype") or model.ckpt.config.get("torch_dtype") or "bfloat16")
    return DTYPE_CODES.get(declared, "BF16")


def plan_quant_layout(model: MoEModel, targets: QuantTargets, group_size: int) -> list[QShard]:
    ckpt = model.ckpt
    dq_code = compute_dtype_code(model)
    out: list[QShard] = []
    for shard_name in sorted(ckpt.shards):
        shard = QShard(shard_name, dict(ckpt.shards[shard_name].metadata))
        for info in ckpt.shard_tensors(shard_name):
            if ckpt.tensors.get(info.name) is not info or info.name in targets.consumed:
                continue  # not part of the model (absent from the index), or an FP8 scale consumed
            target = targets.targets.get(info.name)
            if target is not None:
                base = target.module
                shapes = packed_shapes(target.out_features, target.in_features,
                                       num_groups(target.in_features, group_size))
                for part in SUFFIXES:
                    shape, dtype = shapes[part]
                    shard.tensors.append(QTensor(TensorEntry(f"{base}.{part}", dtype, shape), info, "quant",
                                                 target, part))
            elif info.name in targets.fp8_dequant:
                shard.tensors.append(QTensor(TensorEntry(info.name, dq_code, info.shape), info, "dequant"))
            else:
                shard.tensors.append(QTensor(TensorEntry(info.name, info.dtype, info.shape), info))
        out.append(shard)
    return out
