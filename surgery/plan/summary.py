"""What a plan does to a checkpoint, in numbers: experts kept, tensor bytes and file bytes before and
after. Computed from the rewrite's own layout, so the figures are the ones the rewrite will produce."""

from __future__ import annotations

from surgery.arch.model import MoEModel


def plan_summary(model: MoEModel, plan: dict) -> dict:
    """Kept counts per layer, tensor bytes before/after and the exact output size (shard files)."""
    from surgery.rewrite.layout import plan_layout

    shards = plan_layout(model, plan)
    kept = {int(k): len(v["keep"]) for k, v in plan["layers"].items()}
    return {
        "method": plan.get("method"),
        "ratio": plan.get("ratio"),
        "num_experts": model.num_experts,
        "kept": dict(sorted(kept.items())),
        "moe_layers": len(kept),
        "bytes_before": model.ckpt.total_bytes,
        "bytes_after": sum(s.data_bytes for s in shards),
        "files_before": sum(s.file_size for s in model.ckpt.shards.values()),
        "files_after": sum(s.file_size for s in shards if s.tensors),
        "shards_after": sum(1 for s in shards if s.tensors),
    }
