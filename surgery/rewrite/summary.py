"""What a plan does, before anything is written: kept counts, protected and merged experts, and the
output size. The sizes are the ones the rewrite will produce: they come from the rewrite's own layout
(`surgery.rewrite.layout.plan_layout`), which is why this summary lives with the rewrite, not the plan."""

from __future__ import annotations

from surgery.arch.model import MoEModel
from surgery.rewrite.layout import plan_layout


def plan_summary(model: MoEModel, plan: dict) -> dict:
    """Kept counts per layer, tensor bytes before/after and the exact output size (shard files); the
    protected experts (layer -> {expert: max activation}) and the rule's numbers when the plan protects;
    the merge groups (layer -> {kept: [dropped]}) and the dropped experts merged nowhere when it merges."""
    shards = plan_layout(model, plan)
    layers = {int(k): v for k, v in plan["layers"].items()}
    kept = {layer: len(v["keep"]) for layer, v in layers.items()}
    info = {
        "method": plan.get("method"),
        "ratio": plan.get("ratio"),
        "n_keep": plan.get("n_keep"),
        "multiple_of": plan.get("multiple_of"),
        "num_experts": model.num_experts,
        "kept": dict(sorted(kept.items())),
        "moe_layers": len(kept),
        "bytes_before": model.ckpt.total_bytes,
        "bytes_after": sum(s.data_bytes for s in shards),
        "files_before": sum(s.file_size for s in model.ckpt.shards.values()),
        "files_after": sum(s.file_size for s in shards if s.tensors),
        "shards_after": sum(1 for s in shards if s.tensors),
    }
    if "protect" in plan:
        info["protect"] = plan["protect"]
        info["protected"] = {layer: {int(e): float(v) for e, v in entry["protected"].items()}
                             for layer, entry in sorted(layers.items()) if entry.get("protected")}
    if any("merge" in entry for entry in layers.values()):
        info["merge"] = {layer: {int(c): list(ds) for c, ds in entry.get("merge", {}).items()}
                         for layer, entry in sorted(layers.items())}
        info["unmerged"] = {layer: sorted(set(entry.get("drop", []))
                                          - {d for ds in entry.get("merge", {}).values() for d in ds})
                            for layer, entry in sorted(layers.items())}
    return info
