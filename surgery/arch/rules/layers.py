"""What each layer holds: `layers` (indices within num_hidden_layers plus the family's MTP layers),
`experts` (every MoE layer has its router and experts exactly 0..E-1 with identical tensor sets) and
`missing` (the embedding, final norm, lm_head unless tied, and each decoder layer's norms)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.arch.rules.problem import Problem
from surgery.humanize import layer_ranges

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel


def layer_problems(model: MoEModel, beyond: dict[int, str], mtp: int, where: str) -> list[Problem]:
    """`beyond`: layer -> a tensor of it, for the layers past num_hidden_layers + the MTP layers."""
    if not beyond:
        return []
    spec, n = model.spec, model.num_layers
    layers = sorted(beyond)
    example = beyond[layers[0]]
    found = f"tensors of layer(s) {layer_ranges(layers)} (e.g. {example!r})"
    if spec.mtp_key:
        msg = (f"{found} are stored, but num_hidden_layers {n} + {spec.mtp_key} {mtp} allow layers 0..{n + mtp - 1}; "
               f"expected {spec.mtp_key} to count the stored MTP layers")
    else:
        declared = {k: model.ckpt.config[k] for k in spec.declared_mtp_keys if k in model.ckpt.config}
        said = (f"; config.json declares {', '.join(f'{k}={v}' for k, v in declared.items())}, but"
                if declared else ";")
        msg = (f"{found} are stored past num_hidden_layers ({n}) (MTP modules?){said} the {spec.family} table entry "
               "knows no layout for them: expected no tensors past the last decoder layer")
    return [Problem("layers", example, msg, where)]


def expert_problems(model: MoEModel, experts: dict[int, dict[int, dict[str, tuple]]], where: str) -> list[Problem]:
    """Each MoE layer: its router, and experts exactly 0..E-1 with the same tensors (or its fused tensors)."""
    ckpt, spec, n = model.ckpt, model.spec, model.num_experts
    key = model.experts_key
    stem = spec.expert_key.split("{expert}")[0]

    def expert_name(layer: int, e: int) -> str:
        return f"{model.moe_prefix(layer)}{stem}{e}.{next(iter(experts[layer][e]))}"

    # the MTP layers past the decoder layers that hold routed experts (families with an MTP layout)
    mtp = [layer for layer in sorted(experts) if layer >= model.num_layers] if spec.mtp_key else []
    moe = model.moe_layers + mtp
    moe_set = set(moe)
    out = []
    for layer in sorted(experts):
        if layer not in moe_set:
            name = expert_name(layer, min(experts[layer]))
            out.append(Problem("experts", name, f"tensor {name!r} is an expert's but layer {layer} is not a MoE "
                               f"layer by config.json (MoE layers: {layer_ranges(model.moe_layers)})", where))
    for layer in moe:
        router = model.router_weight_name(layer)
        if router not in ckpt:
            out.append(Problem("experts", router, f"MoE layer {layer} has no router weight {router!r}; expected "
                               f"[{n}, hidden_size]", where))
        if spec.fused_on_disk:
            for rel in spec.fused_on_disk:
                if model.moe_prefix(layer) + rel not in ckpt:
                    out.append(Problem("experts", model.moe_prefix(layer) + rel, f"MoE layer {layer} has no fused "
                                       f"expert tensor {model.moe_prefix(layer) + rel!r}", where))
            continue
        have = experts.get(layer, {})
        extra = sorted(e for e in have if e >= n)
        if extra:
            name = expert_name(layer, extra[0])
            out.append(Problem("experts", name, f"tensor {name!r} belongs to expert {extra[0]} but config.json says "
                               f"{n} experts ({key}); a dropped expert remains (layer {layer} stores experts "
                               f"{layer_ranges(sorted(have))}, expected 0..{n - 1})", where))
        missing = sorted(set(range(n)) - set(have))
        if missing:
            out.append(Problem("experts", f"layer {layer}", f"MoE layer {layer} has no tensors for expert(s) "
                               f"{layer_ranges(missing)} of 0..{n - 1} ({key} {n})", where))
            continue
        reference = have[0]
        for e in range(1, n):
            if have[e] != reference:
                diff = sorted(set(have[e].items()) ^ set(reference.items()))
                out.append(Problem("experts", f"layer {layer} expert {e}", f"MoE layer {layer}: expert {e}'s tensors "
                                   f"differ from expert 0's ({diff[0][0]}: {have[e].get(diff[0][0])} vs "
                                   f"{reference.get(diff[0][0])})", where))
                break
    return out


def missing_problems(model: MoEModel, seen_layers: dict[int, set[str]], where: str) -> list[Problem]:
    """Tensors every checkpoint of the family has: embedding, final norm, lm_head unless tied, and each
    decoder layer's norms (a layer missing them is a partial download)."""
    ckpt, spec = model.ckpt, model.spec
    out = []
    for name, what in ((spec.embed, "the embedding"), (spec.final_norm, "the final norm")):
        if name not in ckpt:
            out.append(Problem("missing", name, f"tensor {name!r} ({what}) is missing", where))
    if spec.lm_head not in ckpt and not model.cfg_value("tie_word_embeddings", False):
        out.append(Problem("missing", spec.lm_head, f"tensor {spec.lm_head!r} is missing and config.json "
                           "tie_word_embeddings is false; expected lm_head [vocab_size, hidden_size]", where))
    for layer in range(model.num_layers):
        have = seen_layers.get(layer, set())
        lost = [r for r in spec.required_layer_tensors if r not in have]
        if lost:
            name = model.layer_prefix(layer) + lost[0]
            detail = "holds no tensors at all" if not have else f"has no {name!r}"
            out.append(Problem("missing", name, f"decoder layer {layer} {detail}; expected num_hidden_layers "
                               f"{model.num_layers} complete layers", where))
    return out
