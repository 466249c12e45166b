"""Config rules: `family` (architectures and model_type name one family of the table) and `routing`
(top-k within the expert count, group-limited routing fields consistent)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.arch.rules.problem import Problem
from surgery.arch.table import BY_ARCHITECTURE, TABLE

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel

BY_MODEL_TYPE = {spec.model_type: spec for spec in TABLE}


def family_problems(model: MoEModel, where: str) -> list[Problem]:
    """`architectures` and `model_type` name one family of the table."""
    cfg, spec = model.ckpt.config, model.spec
    out = []
    archs = cfg.get("architectures") or []
    others = sorted({BY_ARCHITECTURE[a].family for a in archs if a in BY_ARCHITECTURE} - {spec.family})
    if others:
        out.append(Problem("family", "architectures", f"config.json architectures {archs} name several families "
                           f"({', '.join([spec.family, *others])}); expected one", where))
    mt = cfg.get("model_type")
    if mt is not None and mt != spec.model_type:
        known = BY_MODEL_TYPE.get(mt)
        its = f" (family {known.family})" if known else ""
        out.append(Problem("family", "model_type", f"config.json model_type {mt!r}{its} disagrees with architectures "
                           f"{archs} (family {spec.family}); expected model_type {spec.model_type!r}", where))
    return out


def routing_problems(model: MoEModel, where: str) -> list[Problem]:
    """top-k within the expert count; group-limited routing fields that divide the experts into groups
    able to supply top-k (groups are scored by their top 2)."""
    spec, e, k = model.spec, model.num_experts, model.top_k
    key = model.experts_key
    if e < 1:
        return [Problem("routing", key, f"config.json {key} is {e}; expected at least 1 expert", where)]
    out = []
    if not 1 <= k <= e:
        out.append(Problem("routing", spec.top_k_key, f"config.json {spec.top_k_key} is {k} but {key} is {e}; "
                           f"expected top-k between 1 and {e}", where))
    if spec.routing.group_keys:
        facts = model.routing_facts()
        g, tg = facts.get("n_group", 1), facts.get("topk_group", 1)
        gk, tk = spec.routing.group_keys
        if g < 1 or e % g:
            out.append(Problem("routing", gk, f"config.json {gk} is {g}, which does not divide {key} {e} into equal "
                               "routing groups", where))
        elif not 1 <= tg <= g:
            out.append(Problem("routing", tk, f"config.json {tk} is {tg}; expected 1..{gk} ({g})", where))
        elif g > 1 and (e // g < 2 or tg * (e // g) < k):
            out.append(Problem("routing", tk, f"config.json {tk} {tg} of {g} groups of {e // g} experts cannot "
                               f"supply {spec.top_k_key} {k} (groups are scored by their top 2)", where))
    return out
