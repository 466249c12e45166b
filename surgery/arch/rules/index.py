"""The `index` rule: the index and the shard headers agree (the reader checks index -> shard when it
opens a checkpoint; this checks shard -> index, so a tensor no index lists cannot hide in a shard)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.arch.rules.problem import Problem

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel


def index_problems(model: MoEModel) -> list[Problem]:
    """Shard -> index: every tensor a shard's header holds is the one the index lists for that name."""
    ckpt = model.ckpt
    if ckpt.index_path is None:
        return []
    out = []
    for rel, shard in ckpt.shards.items():
        for name in shard.tensors:
            listed = ckpt.tensors.get(name)
            if listed is None:
                out.append(Problem("index", name, f"shard {rel} holds tensor {name!r}, which "
                                   f"{ckpt.index_path.name} does not list (expected every shard tensor in the "
                                   "index: an index from another revision or a partial merge?)", str(shard.path)))
            elif listed.shard != rel:
                out.append(Problem("index", name, f"tensor {name!r} is stored in shard {rel} and in {listed.shard}; "
                                   f"the index lists {listed.shard} (expected each tensor once)", str(shard.path)))
    return out
