"""Check a (pruned) checkpoint's structure against its own config.json, from headers alone.

What a loader would otherwise discover late or silently: every tensor the index names exists in its
shard with the header's dtype and shape (the reader checks this while opening), and in every MoE
layer the experts are exactly 0..n-1 with n the config's count, each with the same tensors and
shapes, the router has n rows and each router bias n entries, and no tensor of an expert numbered n
or more remains anywhere.

A `total_size` in the index that disagrees with the tensors is reported as a warning only: published
checkpoints often carry a stale one and every loader ignores it (the rewrite writes an exact one).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.inspect import layer_ranges


def _fail(message: str, where: Path) -> None:
    raise SurgeryError(f"verify failed: {message}", where)


def verify_checkpoint(out_dir: str | Path) -> dict:
    """Raise a one-line `SurgeryError` on the first problem; otherwise return counts."""
    out_dir = Path(out_dir)
    with Checkpoint(out_dir) as ckpt:
        model = MoEModel(ckpt)
        n = model.num_experts
        where = ckpt.index_path or out_dir
        warnings: list[str] = []
        total = ckpt.index_metadata.get("total_size")
        if total is not None and str(total) != str(ckpt.total_bytes):
            # hub checkpoints are often off here and load fine (loaders ignore it): a warning, not a failure
            warnings.append(f"index metadata.total_size is {total} but the tensors hold {ckpt.total_bytes} bytes")
        moe = set(model.prunable_layers())
        experts: dict[int, dict[int, dict[str, tuple]]] = defaultdict(lambda: defaultdict(dict))
        for name, info in ckpt.tensors.items():
            role = model.classify(name)
            if role.kind == "expert":
                if role.expert >= n:
                    _fail(f"tensor {name!r} belongs to expert {role.expert} but config.json says {n} experts "
                          f"({model.experts_key}); a dropped expert remains", where)
                if role.layer not in moe and role.layer < model.num_layers:
                    _fail(f"tensor {name!r} is an expert's but layer {role.layer} is not a MoE layer", where)
                experts[role.layer][role.expert][role.rest] = (info.dtype, info.shape)
            elif role.kind in ("router", "fused") and (len(info.shape) <= role.axis or info.shape[role.axis] != n):
                _fail(f"{role.kind} tensor {name!r} has shape {list(info.shape)}; config.json says {n} experts",
                      where)
        for layer in sorted(moe):
            router = model.router_weight_name(layer)
            if router not in ckpt:
                _fail(f"MoE layer {layer} has no router weight {router!r}", where)
            axis = model.spec.router_bias_axis
            for bias in model.router_bias_names(layer):
                shape = ckpt.info(bias).shape
                if len(shape) <= axis or shape[axis] != n:
                    _fail(f"router bias {bias!r} has shape {list(shape)}; expected {n} experts on axis {axis}", where)
            if model.spec.fused_on_disk:  # experts stored as [E, ...] tensors: all present, E checked above
                for rel in model.spec.fused_on_disk:
                    if model.moe_prefix(layer) + rel not in ckpt:
                        _fail(f"MoE layer {layer} has no fused expert tensor {model.moe_prefix(layer) + rel!r}",
                              where)
                continue
            have = experts.get(layer, {})
            missing = sorted(set(range(n)) - set(have))
            if missing:
                _fail(f"MoE layer {layer} has no tensors for expert(s) {layer_ranges(missing)} of 0..{n - 1}",
                      where)
            reference = have[0]
            for e in range(1, n):
                if have[e] != reference:
                    diff = sorted(set(have[e].items()) ^ set(reference.items()))
                    _fail(f"MoE layer {layer}: expert {e}'s tensors differ from expert 0's ({diff[0][0]})", where)
        return {
            "ok": True,
            "path": str(out_dir),
            "architecture": model.spec.architectures[0],
            "num_experts": n,
            "experts_key": model.experts_key,
            "moe_layers": len(moe),
            "tensors": len(ckpt.tensors),
            "shards": len(ckpt.shards),
            "total_bytes": ckpt.total_bytes,
            "warnings": warnings,
        }
