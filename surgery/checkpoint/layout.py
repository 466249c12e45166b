"""An output checkpoint's shards, decided from the input headers before a byte is written.

Every command that writes a checkpoint (rewrite, merge, quantize) keeps the input's sharding: one
output shard per input shard, under the same file name, its tensors in the input's file order. What
an input tensor becomes is the command's to say (`place`: nothing for a dropped expert, a renamed
tensor, a router's kept rows, a quantized weight's packed triple, a byte copy); the walk and a shard's
sizes are shared here. Names, dtypes and shapes, and therefore every offset, are known before writing,
which is what lets the writer put each header first and stream the data after it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from surgery.checkpoint.reader import Checkpoint, TensorInfo
from surgery.checkpoint.writer import TensorEntry, file_size_for

# An output tensor of some command's layout: it has `entry` (the TensorEntry written) and `source`
# (the input TensorInfo it comes from), plus whatever says how its bytes are produced.
T = TypeVar("T")


@dataclass
class OutShard(Generic[T]):
    """One output file: same name as its input shard, tensors in the input's file order (possibly none:
    such a shard is not written)."""

    name: str
    metadata: dict[str, str]
    tensors: list[T] = field(default_factory=list)

    @property
    def entries(self) -> list[TensorEntry]:
        return [t.entry for t in self.tensors]  # type: ignore[attr-defined]

    @property
    def data_bytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)  # type: ignore[attr-defined]

    @property
    def file_size(self) -> int:
        return file_size_for(self.entries, self.metadata)


def plan_shards(ckpt: Checkpoint, place: Callable[[TensorInfo], Iterable[T]]) -> list[OutShard[T]]:
    """One output shard per input shard (sorted by name), each input tensor of the model replaced by
    what `place` makes of it, in file order."""
    out: list[OutShard[T]] = []
    for shard_name in sorted(ckpt.shards):
        shard: OutShard[T] = OutShard(shard_name, dict(ckpt.shards[shard_name].metadata))
        for info in ckpt.shard_tensors(shard_name):
            if ckpt.tensors.get(info.name) is info:  # else in the shard's header but not the index: not the model's
                shard.tensors.extend(place(info))
        out.append(shard)
    return out
