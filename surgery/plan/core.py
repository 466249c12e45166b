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
from pathlib import Path

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.errors import SurgeryError
from surgery.inspect import layer_ranges
from surgery.jsonio import read_json

METHODS = ("reap", "frequency", "ean", "weighted_frequency", "random")


def n_keep_for(num_experts: int, ratio: float) -> int:
    """E - floor(E * ratio), with a tolerance so that e.g. 0.3 * 10 drops 3, not 2 or 4."""
    return num_experts - math.floor(num_experts * ratio + 1e-9)


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


def make_plan(saliency: dict, model: MoEModel, method: str, ratio: float, seed: int = 0,
              drop_mtp: bool = False) -> dict:
    """Keep the E - floor(E * ratio) most salient experts of every MoE layer.

    `saliency` is calibration's `saliency.json` (its `model.sha256` must be this model's); for
    `random` only the model is needed (`saliency` may be empty) and `seed` picks the experts.
    """
    if method not in METHODS:
        raise SurgeryError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 <= ratio < 1:
        raise SurgeryError(f"ratio must be in [0, 1), got {ratio!r}")
    source = fingerprint(model.ckpt)
    num_experts = model.num_experts
    n_keep = n_keep_for(num_experts, ratio)
    problem = routing_problem(model, n_keep)
    if problem:
        raise SurgeryError(f"ratio {ratio} {problem}; use a smaller ratio", model.ckpt.directory)
    layers_in = {}
    if method != "random" or saliency:
        sal_model = (saliency.get("model") or {}) if isinstance(saliency, dict) else {}
        if sal_model.get("sha256") != source["sha256"]:
            raise SurgeryError(
                f"saliency was computed on model {str(sal_model.get('sha256'))[:12]} "
                f"({sal_model.get('architecture')}) but MODEL is {source['sha256'][:12]} "
                f"({source['architecture']}); calibrate this model or pass the model calibration used",
                model.ckpt.directory)
        layers_in = saliency.get("layers") or {}
    plan_layers: dict[str, dict[str, list[int]]] = {}
    for layer in model.prunable_layers(drop_mtp):
        if method == "random":
            scores = _random_scores(seed, layer, num_experts)
        else:
            stats = layers_in.get(str(layer))
            if not isinstance(stats, dict) or method not in stats:
                raise SurgeryError(f"saliency has no {method!r} statistics for MoE layer {layer} "
                                   "(calibration incomplete or for another model?)")
            scores = stats[method]
            if not isinstance(scores, list) or len(scores) != num_experts:
                raise SurgeryError(f"saliency {method!r} of layer {layer} has "
                                   f"{len(scores) if isinstance(scores, list) else 'no'} values, "
                                   f"expected {num_experts}")
            try:
                scores = [float(s) for s in scores]
            except (TypeError, ValueError):
                raise SurgeryError(f"saliency {method!r} of layer {layer} holds a non-number") from None
            if any(math.isnan(s) for s in scores):
                raise SurgeryError(f"saliency {method!r} of layer {layer} holds NaN (calibration diverged?)")
        keep = _ranking(scores, n_keep, model.routing_facts().get("n_group", 1))
        kept = set(keep)
        plan_layers[str(layer)] = {"keep": keep, "drop": [e for e in range(num_experts) if e not in kept]}
    plan: dict = {"method": method, "ratio": ratio}
    if method == "random":
        plan["seed"] = seed
    plan["source"] = source
    if drop_mtp:
        plan["drop_mtp"] = True
    if method != "random" and isinstance(saliency, dict):
        plan["calibration"] = {k: saliency.get(k) for k in ("num_tokens", "routing") if k in saliency}
    plan["layers"] = plan_layers
    return plan


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


def kept_map(plan: dict) -> dict[int, dict[int, int]]:
    """layer -> {original expert id: new id}; new ids follow the original order."""
    return {int(layer): {old: new for new, old in enumerate(sorted(entry["keep"]))}
            for layer, entry in plan["layers"].items()}


def normalized(plan: dict) -> dict:
    """The plan with keep/drop lists sorted and layers in numeric order (what the rewrite applies)."""
    out = {k: v for k, v in plan.items() if k != "layers"}
    out["layers"] = {str(int(k)): {"keep": sorted(v["keep"]), "drop": sorted(v.get("drop", []))}
                     for k, v in sorted(plan["layers"].items(), key=lambda kv: int(kv[0]))}
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
