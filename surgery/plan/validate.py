"""Validating a plan against a model: a plan file may be edited by hand, so everything the rewrite
relies on is re-checked here and refused in one line (`SurgeryError`) before a byte is written."""

from __future__ import annotations

import math

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.errors import SurgeryError
from surgery.humanize import layer_ranges
from surgery.plan.counts import group_imbalance, routing_problem


def _int_list(value: object, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        raise SurgeryError(f"plan: {what} must be a list of integer expert ids")
    return value


def validate_plan(plan: dict, model: MoEModel) -> None:
    """Refuse, in one line, any plan the rewrite could not apply to this model or that would write a
    checkpoint transformers cannot load. Checks, in order: structure, source fingerprint, the set of
    layers, ids (range, duplicates, keep ∪ drop = all), one count for every layer, routing limits."""
    if not isinstance(plan, dict) or not isinstance(plan.get("layers"), dict):
        raise SurgeryError("plan: not a plan (needs a \"layers\" object)")
    _check_source(plan, model)
    given = _given_layers(plan, model)
    counts: dict[int, int] = {}
    for layer in sorted(given):
        counts[layer] = _check_layer(model, layer, given[layer])
    _check_counts(model, counts)


def _check_source(plan: dict, model: MoEModel) -> None:
    """The plan names this model by the fingerprint it was made from."""
    source = plan.get("source")
    if not isinstance(source, dict) or not isinstance(source.get("sha256"), str):
        raise SurgeryError("plan: no source fingerprint (\"source\": {\"sha256\": ...})")
    mine = fingerprint(model.ckpt)
    if source["sha256"] != mine["sha256"]:
        differs = [f"{k} {source.get(k)!r} vs {mine[k]!r}" for k in ("architecture", "shards", "total_bytes")
                   if k in source and source.get(k) != mine[k]]
        what = "; ".join(differs) if differs else "config.json or shard headers differ"
        raise SurgeryError(
            f"plan was made for another model (source sha256 {source['sha256'][:12]}, this model "
            f"{mine['sha256'][:12]}: {what})", model.ckpt.directory)


def _given_layers(plan: dict, model: MoEModel) -> dict[int, dict]:
    """layer -> entry, with exactly the model's prunable MoE layers (MTP layers unless `drop_mtp`)."""
    moe = set(model.prunable_layers(bool(plan.get("drop_mtp"))))
    given: dict[int, dict] = {}
    for key, entry in plan["layers"].items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise SurgeryError(f"plan: layer key {key!r} is not a layer index") from None
        if layer not in moe:
            raise SurgeryError(f"plan: layer {layer} is not a MoE layer of this model "
                               f"(MoE layers: {layer_ranges(sorted(moe))})")
        if layer in given:
            raise SurgeryError(f"plan: layer {layer} is listed twice")
        if not isinstance(entry, dict):
            raise SurgeryError(f"plan: layer {layer} must be an object with \"keep\" and \"drop\"")
        given[layer] = entry
    missing = sorted(moe - set(given))
    mtp_missing = [layer for layer in missing if layer >= model.num_layers]
    if mtp_missing:
        raise SurgeryError(f"plan: MTP layer(s) {layer_ranges(mtp_missing)} (past num_hidden_layers) hold routed "
                           "experts but have no entry: calibrate them (saliency.json from this version has them) "
                           "or make the plan with --drop-mtp")
    if missing:
        raise SurgeryError(f"plan: MoE layer(s) {layer_ranges(missing)} missing (every MoE layer needs an entry)")
    return given


def _check_layer(model: MoEModel, layer: int, entry: dict) -> int:
    """One layer's ids (in range, no duplicates, keep and drop disjoint and complete), its routing groups,
    protection and merge groups; returns how many experts it keeps."""
    num_experts = model.num_experts
    keep = _int_list(entry.get("keep"), f"layer {layer} \"keep\"")
    drop = _int_list(entry.get("drop", []), f"layer {layer} \"drop\"")
    for e in (*keep, *drop):
        if not 0 <= e < num_experts:
            raise SurgeryError(f"plan: layer {layer} names expert {e}, outside 0..{num_experts - 1}")
    for what, ids in (("keep", keep), ("drop", drop)):
        dup = sorted({e for e in ids if ids.count(e) > 1})
        if dup:
            raise SurgeryError(f"plan: layer {layer} lists expert(s) {dup} more than once in \"{what}\"")
    both = sorted(set(keep) & set(drop))
    if both:
        raise SurgeryError(f"plan: layer {layer} both keeps and drops expert(s) {both}")
    unlisted = sorted(set(range(num_experts)) - set(keep) - set(drop))
    if unlisted:
        raise SurgeryError(f"plan: layer {layer} neither keeps nor drops expert(s) {unlisted} "
                           f"(keep and drop together must list all {num_experts})")
    uneven = group_imbalance(model, keep)
    if uneven:
        raise SurgeryError(f"plan: layer {layer} {uneven}")
    _validate_protected(layer, entry.get("protected"), keep, num_experts)
    _validate_merge(layer, entry, keep, drop, num_experts)
    return len(keep)


def _check_counts(model: MoEModel, counts: dict[int, int]) -> None:
    """One kept count for every layer (unless the family counts per layer), each valid for the routing."""
    distinct = sorted(set(counts.values()))
    if len(distinct) > 1 and not model.spec.per_layer_counts:
        first = min(counts)
        other = next(layer for layer in sorted(counts) if counts[layer] != counts[first])
        raise SurgeryError(
            f"plan: layer {other} keeps {counts[other]} experts but layer {first} keeps {counts[first]}; "
            f"transformers builds every MoE layer of {model.spec.architectures[0]} from one config count "
            f"({model.experts_key}), so every layer must keep the same number")
    for n in distinct:
        problem = routing_problem(model, n)
        if problem:
            raise SurgeryError(f"plan: {problem}")


def _id_key(key: object, layer: int, what: str, num_experts: int) -> int:
    try:
        e = int(key)  # JSON object keys are strings
    except (TypeError, ValueError):
        raise SurgeryError(f"plan: layer {layer} \"{what}\" key {key!r} is not an expert id") from None
    if str(e) != str(key) or not 0 <= e < num_experts:
        raise SurgeryError(f"plan: layer {layer} \"{what}\" key {key!r} is not an expert id in 0..{num_experts - 1}")
    return e


def _validate_protected(layer: int, protected: object, keep: list[int], num_experts: int) -> None:
    """"protected": {"<expert>": max activation}: every protected expert must be kept (a person who
    wants one dropped removes it from this list too, so the file never contradicts itself)."""
    if protected is None:
        return
    if not isinstance(protected, dict):
        raise SurgeryError(f"plan: layer {layer} \"protected\" must be an object {{expert id: max activation}}")
    for key in protected:
        e = _id_key(key, layer, "protected", num_experts)
        if e not in keep:
            raise SurgeryError(f"plan: layer {layer} drops expert {e}, which \"protected\" lists (max activation "
                               "above the super-expert threshold); keep it or remove it from \"protected\"")


def _validate_merge(layer: int, entry: dict, keep: list[int], drop: list[int], num_experts: int) -> None:
    """"merge": {"<kept expert>": [dropped experts]} and "merge_weights": [E non-negative numbers]:
    groups name a kept expert and dropped ones, each dropped expert in at most one group, and every
    group has a positive total weight (its average is defined)."""
    groups = entry.get("merge")
    if groups is None:
        if "merge_weights" in entry:
            raise SurgeryError(f"plan: layer {layer} has \"merge_weights\" but no \"merge\" groups")
        return
    if not isinstance(groups, dict):
        raise SurgeryError(f"plan: layer {layer} \"merge\" must be an object {{kept expert: [dropped experts]}}")
    weights = entry.get("merge_weights")
    if (not isinstance(weights, list) or len(weights) != num_experts
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)
            or not all(math.isfinite(w) and w >= 0 for w in weights)):
        raise SurgeryError(f"plan: layer {layer} \"merge_weights\" must list {num_experts} finite numbers >= 0 "
                           "(the routed frequency of every expert)")
    seen: dict[int, int] = {}
    for key, members in groups.items():
        c = _id_key(key, layer, "merge", num_experts)
        if c not in keep:
            raise SurgeryError(f"plan: layer {layer} merges into expert {c}, which it does not keep")
        members = _int_list(members, f"layer {layer} \"merge\" group {c}")
        for d in members:
            if d not in drop:
                raise SurgeryError(f"plan: layer {layer} merges expert {d} into {c}, but only dropped experts "
                                   "can be merged into a kept one")
            if d in seen:
                raise SurgeryError(f"plan: layer {layer} merges expert {d} into both {seen[d]} and {c}")
            seen[d] = c
        if members and weights[c] + sum(weights[d] for d in members) <= 0:
            raise SurgeryError(f"plan: layer {layer} merge group {c} has total weight 0 (no routed tokens): "
                               "its average is undefined")
