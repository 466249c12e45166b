"""How many experts every MoE layer keeps: from `--ratio` or `--keep`, rounded by `--multiple-of`.

One count for every layer (transformers builds every MoE layer from one config count). The count is
decided here once, before any ranking, so an impossible request is refused before a file is written:
below top-k, above the model's expert count, a ratio and an exact count together, or a rounding that
leaves fewer than top-k. Group-limited routing (DeepSeek-V3, GLM-4.5: `n_group`) needs a count that
splits into equal groups, so `--multiple-of M` rounds down to a multiple of lcm(M, n_group): the
result is a multiple of both, and expert parallelism and the router's groups both stay whole.

The routing rules a kept count (and a kept set) must satisfy live here too, so making a plan,
validating one, and `surgery inspect`'s "what pruning would keep" all ask one module.
"""

from __future__ import annotations

import math

from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError


def n_keep_for(num_experts: int, ratio: float) -> int:
    """E - floor(E * ratio), with a tolerance so that e.g. 0.3 * 10 drops 3, not 2 or 4."""
    return num_experts - math.floor(num_experts * ratio + 1e-9)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kept_count(model: MoEModel, ratio: float | None = None, keep: int | None = None,
               multiple_of: int | None = None) -> int:
    """The number of experts each MoE layer keeps, or a one-line SurgeryError saying why not.

    `ratio` drops floor(E * ratio) experts; `keep` is the exact count (the reference's
    `n_experts_to_prune`, counted the other way); exactly one of the two. `multiple_of` then rounds
    the count down to a multiple of lcm(M, n_group), never below what the routing needs."""
    num_experts, where = model.num_experts, model.ckpt.directory
    if ratio is not None and keep is not None:
        raise SurgeryError("give --ratio or --keep, not both (--keep is the exact number of experts kept)")
    if keep is None:
        if ratio is None:
            raise SurgeryError("give --ratio R (fraction of experts dropped) or --keep N (experts kept per layer)")
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
            raise SurgeryError(f"ratio must be in [0, 1), got {ratio!r}")
        n_keep, asked = n_keep_for(num_experts, ratio), f"ratio {ratio}"
    else:
        if not _is_int(keep):
            raise SurgeryError(f"--keep must be a whole number of experts, got {keep!r}")
        if keep > num_experts:
            raise SurgeryError(f"--keep {keep} is more than the model's {num_experts} experts per layer", where)
        n_keep, asked = keep, f"--keep {keep}"
    if multiple_of is not None:
        if not _is_int(multiple_of) or multiple_of < 1:
            raise SurgeryError(f"--multiple-of must be a whole number >= 1, got {multiple_of!r}")
        n_group = model.routing_facts().get("n_group", 1)
        step = math.lcm(multiple_of, n_group)
        rounded = n_keep // step * step
        via = f"a multiple of {multiple_of}" + (f" and of n_group={n_group} (lcm {step})" if step != multiple_of
                                                else "")
        if rounded < model.min_experts_to_keep():
            raise SurgeryError(f"{asked} keeps {n_keep} experts per layer; rounding down to {via} leaves "
                               f"{rounded}, fewer than top-k {model.top_k}", where)
        n_keep, asked = rounded, f"{asked} rounded down to {via}"
    problem = routing_problem(model, n_keep)
    if problem:
        hint = "use a smaller ratio" if keep is None and multiple_of is None else "keep more experts"
        raise SurgeryError(f"{asked} {problem}; {hint}", where)
    return n_keep


def routing_problem(model: MoEModel, n_keep: int) -> str | None:
    """Why keeping `n_keep` experts per layer would leave the model's routing invalid, or None.

    Beyond `min_experts_to_keep` (top-k), group-limited routing (DeepSeek-V3, GLM-4.5) reshapes the
    scores into `n_group` equal groups and sums the top-2 of each group, so the count must divide
    into groups of at least 2, and the chosen groups must hold top-k experts.
    """
    need = model.min_experts_to_keep()
    if n_keep < need:
        return f"keeps {n_keep} experts per layer but this model needs at least {need} (top-k {model.top_k})"
    facts = model.routing_facts()
    n_group = facts.get("n_group", 1)
    if n_group > 1:
        if n_keep % n_group:
            return (f"keeps {n_keep} experts per layer, which does not divide into the model's "
                    f"n_group={n_group} equal routing groups")
        per_group = n_keep // n_group
        if per_group < 2:
            return (f"keeps {n_keep} experts per layer: {per_group} per routing group, but group-limited "
                    "routing scores each group by its top 2 experts")
        if per_group * facts.get("topk_group", 1) < model.top_k:
            return (f"keeps {n_keep} experts per layer: the {facts.get('topk_group', 1)} selected group(s) of "
                    f"{per_group} cannot supply top-k {model.top_k}")
    return None


def group_imbalance(model: MoEModel, keep: list[int]) -> str | None:
    """Why a kept set breaks group-limited routing (unequal counts per group), or None."""
    n_group = model.routing_facts().get("n_group", 1)
    if n_group <= 1:
        return None
    size = model.num_experts // n_group
    per = [sum(1 for e in keep if e // size == g) for g in range(n_group)]
    if len(set(per)) > 1:
        return (f"keeps {per} experts in its {n_group} routing groups; group-limited routing needs the same "
                "count in every group")
    return None


def pruned_size(model: MoEModel, ratio: float, expert_bytes: dict[int, int], router_bytes: dict[int, int]) -> int:
    """Checkpoint bytes after keeping E - floor(E * ratio) experts in every MoE layer (headers only; the
    exact output size of a plan is `surgery.rewrite.summary.plan_summary`'s)."""
    e = model.num_experts
    keep = n_keep_for(e, ratio)
    moe_bytes = sum(expert_bytes.values()) + sum(router_bytes.values())
    return model.ckpt.total_bytes - moe_bytes + (moe_bytes * keep) // e
