"""Making a pruning plan: which experts each MoE layer keeps, ranked by a saliency (or at random).

A plan is a small JSON file a person may read and edit between calibration and rewrite::

    {"method": "reap", "ratio": 0.5, "source": {<fingerprint of the model>},
     "layers": {"<layer>": {"keep": [original expert ids], "drop": [original expert ids]}}}

Kept experts keep their original relative order and are renumbered 0..n_keep-1 by the rewrite (the
new index of an expert is its position in the sorted keep list, whatever order the file lists it
in). Because the file can be edited by hand, `surgery.plan.validate.validate_plan` re-checks
everything the rewrite relies on; `surgery.plan.files` writes, reads and hashes plans.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import numpy as np

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.errors import SurgeryError
from surgery.plan.counts import kept_count
from surgery.plan.merge import SALIENCIES, mean_outputs, merge_groups
from surgery.plan.protect import MODES, Protection, protected_experts
from surgery.plan.scores import layer_scores

METHODS = ("reap", "frequency", "ean", "weighted_frequency", "random")  # rank by a saliency and drop
PLAN_METHODS = (*METHODS, "merge")  # merge: keep what a saliency keeps, fold the dropped into the kept


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


def _random_scores(seed: int, layer: int, num_experts: int) -> list[float]:
    """Scores from SHA-256 of (seed, layer, expert): deterministic forever, on every platform and
    library version (a numpy or `random` stream may change between releases)."""
    out = []
    for e in range(num_experts):
        digest = hashlib.sha256(f"surgery-random:{seed}:{layer}:{e}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "little") / 2**64)
    return out


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
    layers_in = _saliency_layers(saliency, model, source) if method != "random" or saliency or protect else {}
    if method == "merge" and outputs is None:
        raise SurgeryError("--method merge needs calibration's expert output sums (WORK/stats/*.outputs.npy)")
    protection = protected_experts(layers_in, model.moe_layers, num_experts, protect) if protect else None
    rank_by = merge_saliency if method == "merge" else method
    plan_layers: dict[str, dict] = {}
    for layer in model.prunable_layers(drop_mtp):
        if method == "random":
            scores = _random_scores(seed, layer, num_experts)
        else:
            scores = layer_scores(layers_in, layer, rank_by, num_experts)
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
            freq = layer_scores(layers_in, layer, "frequency", num_experts)
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


def _saliency_layers(saliency: dict, model: MoEModel, source: dict) -> dict:
    """saliency.json's per-layer statistics, refused unless calibration ran on this very model."""
    sal_model = (saliency.get("model") or {}) if isinstance(saliency, dict) else {}
    if sal_model.get("sha256") != source["sha256"]:
        raise SurgeryError(
            f"saliency was computed on model {str(sal_model.get('sha256'))[:12]} "
            f"({sal_model.get('architecture')}) but MODEL is {source['sha256'][:12]} "
            f"({source['architecture']}); calibrate this model or pass the model calibration used",
            model.ckpt.directory)
    return saliency.get("layers") or {}


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
