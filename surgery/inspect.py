"""`surgery inspect`: what is in a checkpoint and what pruning would do to it, from headers alone.

Only reports: the facts come from where they live (the architecture's `MoEModel`, the plan's kept
counts and pruned size in `surgery.plan.counts`, the W4A16 size in `surgery.quant.size`, the
consistency rules in `surgery.arch.consistency`)."""

from __future__ import annotations

from collections import Counter, defaultdict

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.plan.counts import n_keep_for, pruned_size
from surgery.quant.size import w4a16_sizes

RATIOS = (0.25, 0.40, 0.50)


def summarize(model: MoEModel) -> dict:
    ckpt = model.ckpt
    expert_bytes: dict[int, int] = defaultdict(int)
    router_bytes: dict[int, int] = defaultdict(int)
    dtype_bytes: Counter[str] = Counter()
    scales = 0
    for name, info in ckpt.tensors.items():
        dtype_bytes[info.dtype] += info.nbytes
        if name.endswith("weight_scale_inv"):
            scales += 1
        role = model.classify(name)
        if role.kind in ("expert", "fused"):
            expert_bytes[role.layer] += info.nbytes
        elif role.kind == "router":
            router_bytes[role.layer] += info.nbytes
    qcfg = ckpt.config.get("quantization_config")
    quant = None
    if qcfg:
        quant = {k: qcfg.get(k) for k in ("quant_method", "fmt", "weight_block_size", "bits", "group_size")
                 if qcfg.get(k) is not None}
        quant["scale_tensors"] = scales
    total = ckpt.total_bytes
    return {
        "path": str(ckpt.directory),
        "architecture": model.spec.architectures[0],
        "family": model.spec.family,
        "fingerprint": fingerprint(ckpt)["sha256"],
        "num_layers": model.num_layers,
        "moe_layers": model.moe_layers,
        "extra_layers": model.beyond_layers(),
        "num_experts": model.num_experts,
        "num_experts_key": model.experts_key,
        "experts_per_token": model.top_k,
        "routing": model.routing_facts(),
        "dtypes": dict(sorted(dtype_bytes.items(), key=lambda kv: -kv[1])),
        "quantization": quant,
        "shards": len(ckpt.shards),
        "tensors": len(ckpt.tensors),
        "total_bytes": total,
        "expert_bytes": sum(expert_bytes.values()),
        "router_bytes": sum(router_bytes.values()),
        "pruned_bytes": {f"{r:.2f}": pruned_size(model, r, expert_bytes, router_bytes) for r in RATIOS},
        "experts_kept": {f"{r:.2f}": n_keep_for(model.num_experts, r) for r in RATIOS},
        "w4a16_bytes": w4a16_sizes(model, RATIOS),  # after `surgery quantize` (W4A16), unpruned and after each ratio
        # what every other command would refuse (surgery.arch.consistency): inspect reports, never refuses
        "problems": [{"rule": p.rule, "subject": p.subject, "message": p.message} for p in model.problems()],
    }
