"""Pruning plans: which experts each MoE layer keeps, made from saliency and checked before use.

A plan is a small JSON file a person may read and edit between calibration and rewrite::

    {"method": "reap", "ratio": 0.5, "source": {<fingerprint of the model>},
     "layers": {"<layer>": {"keep": [original expert ids], "drop": [original expert ids]}}}

Kept experts keep their original relative order and are renumbered 0..n_keep-1 by the rewrite (the
new index of an expert is its position in the sorted keep list, whatever order the file lists it
in). Because the file can be edited by hand, `validate_plan` re-checks everything the rewrite relies
on and says, in one line, what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.errors import SurgeryError
from surgery.inspect import layer_ranges
from surgery.jsonio import read_json
from surgery.plan.counts import kept_count, n_keep_for  # noqa: F401 - re-exported
from surgery.plan.merge import SALIENCIES, mean_outputs, merge_groups
from surgery.plan.protect import MODES, Protection, protected_experts

METHODS = ("reap", "frequency", "ean", "weighted_frequency", "random")  # rank by a saliency and drop
PLAN_METHODS = (*METHODS, "merge")  # merge: keep what a saliency keeps, fold the dropped into the kept


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


def _ranking(scores: list[float], n_keep: int, n_group: int = 1) -> list[int]:
    """The n_keep highest scores, ties toward the lower index, returned in original order.

    With group-limited routing (n_group > 1) the router views the experts as n_group contiguous
    groups of equal size, so each group keeps its own n_keep / n_group best: kept experts stay in
    their groups, in order, and the pruned router's groups are the original groups minus the dropped
    experts (routing among kept experts is otherwise unchanged)."""
    size = len(scores) // n_group
    kept: list[int] = []
    for g in range(n_group):
        ids = range(g * size, (g + 1) * size)
        kept += sorted(ids, key=lambda e: (-scores[e], e))[:n_keep // n_group]
    return sorted(kept)


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


def _random_scores(seed: int, layer: int, num_experts: int) -> list[float]:
    """Scores from SHA-256 of (seed, layer, expert): deterministic forever, on every platform and
    library version (a numpy or `random` stream may change between releases)."""
    out = []
    for e in range(num_experts):
        digest = hashlib.sha256(f"surgery-random:{seed}:{layer}:{e}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") / 2**64)
    return out


def _scores(layers_in: dict, layer: int, stat: str, num_experts: int) -> list[float]:
    """One layer's saliency `stat` as floats, or a one-line refusal saying what is wrong with it."""
    stats = layers_in.get(str(layer))
    if not isinstance(stats, dict) or stat not in stats:
        raise SurgeryError(f"saliency has no {stat!r} statistics for MoE layer {layer} "
                           "(calibration incomplete or for another model?)")
    scores = stats[stat]
    if not isinstance(scores, list) or len(scores) != num_experts:
        raise SurgeryError(f"saliency {stat!r} of layer {layer} has "
                           f"{len(scores) if isinstance(scores, list) else 'no'} values, expected {num_experts}")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise SurgeryError(f"saliency {stat!r} of layer {layer} holds a non-number") from None
    if any(math.isnan(s) for s in scores):
        raise SurgeryError(f"saliency {stat!r} of layer {layer} holds NaN (calibration diverged?)")
    return scores


def check_request(model: MoEModel, method: str, ratio: float | None = None, *, keep: int | None = None,
                  multiple_of: int | None = None, protect: str | None = None, merge_saliency: str = "reap") -> int:
    """Everything about a plan request that needs no saliency (method, protection mode, merge saliency,
    the kept count), so `prune` refuses an impossible one before calibrating; returns the kept count."""
    if method not in PLAN_METHODS:
        raise SurgeryError(f"unknown method {method!r}; choose one of {', '.join(PLAN_METHODS)}")
    if method == "merge" and merge_saliency not in SALIENCIES:
        raise SurgeryError(f"unknown --merge-saliency {merge_saliency!r}; choose one of {', '.join(SALIENCIES)}")
    if protect is not None and protect not in MODES:
        raise SurgeryError(f"unknown --protect {protect!r}; choose one of {', '.join(MODES)}")
    return kept_count(model, ratio, keep, multiple_of)


def make_plan(saliency: dict, model: MoEModel, method: str, ratio: float | None = None, seed: int = 0,
              drop_mtp: bool = False, *, keep: int | None = None, multiple_of: int | None = None,
              protect: str | None = None, merge_saliency: str = "reap",
              outputs: Callable[[int], np.ndarray] | None = None) -> dict:
    """Keep the most salient experts of every MoE layer: E - floor(E * ratio), or exactly `keep`, rounded
    down to a multiple of `multiple_of` (`surgery.plan.counts`).

    `saliency` is calibration's `saliency.json` (its `model.sha256` must be this model's); for
    `random` only the model is needed (`saliency` may be empty) and `seed` picks the experts.
    `protect` ("super" / "outliers") never drops the experts the reference's super-expert rule
    finds (`surgery.plan.protect`). `merge` keeps what `merge_saliency` keeps and records, per layer,
    which kept expert each dropped one is merged into and the routed frequencies that weight the
    average (`surgery.plan.merge`); `outputs(layer)` gives calibration's [E, H] output sums.
    """
    n_keep = check_request(model, method, ratio, keep=keep, multiple_of=multiple_of, protect=protect,
                           merge_saliency=merge_saliency)
    source = fingerprint(model.ckpt)
    num_experts = model.num_experts
    n_group = model.routing_facts().get("n_group", 1)
    layers_in = {}
    if method != "random" or saliency or protect:
        sal_model = (saliency.get("model") or {}) if isinstance(saliency, dict) else {}
        if sal_model.get("sha256") != source["sha256"]:
            raise SurgeryError(
                f"saliency was computed on model {str(sal_model.get('sha256'))[:12]} "
                f"({sal_model.get('architecture')}) but MODEL is {source['sha256'][:12]} "
                f"({source['architecture']}); calibrate this model or pass the model calibration used",
                model.ckpt.directory)
        layers_in = saliency.get("layers") or {}
    if method == "merge" and outputs is None:
        raise SurgeryError("--method merge needs calibration's expert output sums (WORK/stats/*.outputs.npy)")
    protection = protected_experts(layers_in, model.moe_layers, num_experts, protect) if protect else None
    rank_by = merge_saliency if method == "merge" else method
    plan_layers: dict[str, dict] = {}
    for layer in model.prunable_layers(drop_mtp):
        if method == "random":
            scores = _random_scores(seed, layer, num_experts)
        else:
            scores = _scores(layers_in, layer, rank_by, num_experts)
        guarded = protection.experts.get(layer, {}) if protection else {}
        if guarded:
            _check_room(model, layer, guarded, n_keep, n_group, protection)
            scores = [math.inf if e in guarded else s for e, s in enumerate(scores)]
        kept_ids = _ranking(scores, n_keep, n_group)
        kept = set(kept_ids)
        entry: dict = {"keep": kept_ids, "drop": [e for e in range(num_experts) if e not in kept]}
        if guarded:
            entry["protected"] = {str(e): v for e, v in sorted(guarded.items())}
        if method == "merge":
            freq = _scores(layers_in, layer, "frequency", num_experts)
            means = mean_outputs(outputs(layer), freq, layer)
            entry["merge"] = {str(c): ds for c, ds in merge_groups(means, freq, kept_ids, n_group).items()}
            entry["merge_weights"] = freq
        plan_layers[str(layer)] = entry
    plan: dict = {"method": method}
    if ratio is not None:
        plan["ratio"] = ratio
    if keep is not None:
        plan["requested_keep"] = keep
    if multiple_of is not None:
        plan["multiple_of"] = multiple_of
    if keep is not None or multiple_of is not None:
        plan["n_keep"] = n_keep  # what every layer keeps, after rounding
    if method == "random":
        plan["seed"] = seed
    if method == "merge":
        plan["merge"] = {"saliency": merge_saliency, "similarity": "cosine of mean expert outputs",
                         "weights": "routed frequency"}
    if protection is not None:
        plan["protect"] = protection.record()
    plan["source"] = source
    if drop_mtp:
        plan["drop_mtp"] = True
    if method != "random" and isinstance(saliency, dict):
        plan["calibration"] = {k: saliency.get(k) for k in ("num_tokens", "routing") if k in saliency}
    plan["layers"] = plan_layers
    return plan


def _check_room(model: MoEModel, layer: int, guarded: dict[int, float], n_keep: int, n_group: int,
                protection: Protection) -> None:
    """Refuse when a layer (or one of its routing groups) has more protected experts than it keeps:
    the reference would then prune protected experts after all, which is not what was asked."""
    size = model.num_experts // n_group
    per_group = n_keep // n_group
    for g in range(n_group):
        inside = sorted(e for e in guarded if e // size == g)
        if len(inside) > per_group:
            where = f"routing group {g} of layer {layer}" if n_group > 1 else f"layer {layer}"
            raise SurgeryError(
                f"--protect {protection.mode}: {where} has {len(inside)} protected experts {inside} (max activation "
                f"> {protection.threshold:.6g}) but keeps only {per_group}; keep more experts or drop --protect")


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
    num_experts = model.num_experts
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
    counts: dict[int, int] = {}
    for layer in sorted(given):
        keep = _int_list(given[layer].get("keep"), f"layer {layer} \"keep\"")
        drop = _int_list(given[layer].get("drop", []), f"layer {layer} \"drop\"")
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
        counts[layer] = len(keep)
        uneven = group_imbalance(model, keep)
        if uneven:
            raise SurgeryError(f"plan: layer {layer} {uneven}")
        _validate_protected(layer, given[layer].get("protected"), keep, num_experts)
        _validate_merge(layer, given[layer], keep, drop, num_experts)
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


def kept_map(plan: dict) -> dict[int, dict[int, int]]:
    """layer -> {original expert id: new id}; new ids follow the original order."""
    return {int(layer): {old: new for new, old in enumerate(sorted(entry["keep"]))}
            for layer, entry in plan["layers"].items()}


def normalized(plan: dict) -> dict:
    """The plan with keep/drop lists sorted and layers in numeric order (what the rewrite applies)."""
    out = {k: v for k, v in plan.items() if k != "layers"}
    out["layers"] = {str(int(k)): _normalized_entry(v)
                     for k, v in sorted(plan["layers"].items(), key=lambda kv: int(kv[0]))}
    return out


def _normalized_entry(entry: dict) -> dict:
    """keep/drop sorted; merge groups (which change the written bytes) and protection kept, sorted, and
    only when present, so plans without them hash as they always did."""
    out: dict = {"keep": sorted(entry["keep"]), "drop": sorted(entry.get("drop", []))}
    if entry.get("protected"):
        out["protected"] = {str(k): entry["protected"][k] for k in sorted(entry["protected"], key=int)}
    if entry.get("merge") is not None:
        out["merge"] = {str(k): sorted(entry["merge"][k]) for k in sorted(entry["merge"], key=int)}
        out["merge_weights"] = entry.get("merge_weights")
    return out


def plan_hash(plan: dict) -> str:
    """SHA-256 of the normalized plan as canonical JSON: identifies a rewrite for resuming."""
    canon = json.dumps(normalized(plan), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def plan_json(plan: dict) -> str:
    """The plan as JSON for people: indented objects, but each keep/drop list on one line."""
    text = json.dumps(plan, indent=2)
    return re.sub(r"\[\s*((?:-?\d+,\s*)*-?\d+)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def save_plan(plan: dict, path: str | Path) -> Path:
    """Write atomically (temporary name, fsync, rename): a plan file is either old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(plan_json(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_plan(path: str | Path) -> dict:
    plan = read_json(path, "plan")
    if not isinstance(plan, dict):
        raise SurgeryError("plan: not a JSON object", path)
    return plan


def plan_file_name(method: str, ratio: float | None, drop_mtp: bool = False, *, keep: int | None = None,
                   multiple_of: int | None = None, protect: str | None = None,
                   merge_saliency: str = "reap") -> str:
    """`prune`'s plan file in WORK, named by everything that chooses the experts, so a rerun with other
    choices makes a new plan instead of reusing one (names of plain ratio plans are what they were)."""
    parts = [f"plan-{method}", f"{ratio:g}" if keep is None else f"keep{keep}"]
    if multiple_of is not None:
        parts.append(f"m{multiple_of}")
    if protect:
        parts.append(f"protect-{protect}")
    if method == "merge" and merge_saliency != "reap":
        parts.append(merge_saliency)
    if drop_mtp:
        parts.append("drop-mtp")
    return "-".join(parts) + ".json"
