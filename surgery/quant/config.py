"""The quantization_config a W4A16 checkpoint declares, in AutoRound's `auto_round:auto_gptq` form.

vLLM's AutoRound loader (`quant_method: auto-round`) quantizes a module when its name starts with
`block_name_to_quantize` unless `extra_config` names it with `bits: 16`; fused modules (qkv, gate_up)
look up each part. Names are vLLM's module names, which are the checkpoint's for most families but not
all (MiniMax-M2 stores `block_sparse_moe.*`, vLLM builds `mlp.*`: `surgery.arch.serving_rules`). So
every linear inside the decoder layers that stays 16-bit is listed under its on-disk name (what
transformers, AutoRound's readers and `surgery verify` look up) and, where it differs, under vLLM's;
a layer whose routed experts stay 16-bit also lists vLLM's fused MoE module (`<moe>.experts`), which
is what vLLM 0.32 matches (0.13 matches the keys that start with it); lm_head is listed too, as
AutoRound's own export does.
`quantize_config.json` carries the GPTQ-style summary the seed checkpoint ships beside it.
"""

from __future__ import annotations

import surgery
from surgery.arch.model import MoEModel
from surgery.arch.serving import vllm_name
from surgery.quant.targets import QuantTargets

PACKING = "auto_round:auto_gptq"
DAMP = 0.01


def block_name(model: MoEModel) -> str:
    """`model.layers`: the decoder-layer prefix without its index."""
    return model.spec.layer_prefix.split("{layer}")[0].rstrip(".")


def unquantized_modules(model: MoEModel, targets: QuantTargets) -> list[str]:
    """extra_config's 16-bit module names: on-disk, vLLM's where it differs, fused expert modules."""
    family = model.spec.family
    names = set(targets.kept_linears) | {vllm_name(family, n) for n in targets.kept_linears}
    experts = model.spec.expert_key.split(".{expert}")[0]
    names |= {vllm_name(family, model.moe_prefix(layer) + experts) for layer in targets.kept_expert_layers}
    return sorted(names)


def quantization_config(model: MoEModel, targets: QuantTargets, group_size: int, method: str,
                        gptq: dict | None = None) -> dict:
    unquantized = {name: {"bits": 16, "data_type": "float"} for name in unquantized_modules(model, targets)}
    head = model.spec.lm_head.removesuffix(".weight")
    if model.spec.lm_head in model.ckpt:
        unquantized[head] = {"bits": 16, "data_type": "float"}
    cfg = {
        "quant_method": "auto-round",
        "packing_format": PACKING,
        "bits": 4,
        "group_size": group_size,
        "sym": True,
        "data_type": "int",
        "desc_act": False,
        "iters": 0,
        "lm_head": False,
        "block_name_to_quantize": block_name(model),
        "extra_config": dict(sorted(unquantized.items())),
        "provider": "surgery",
        "quantizer": f"surgery {surgery.__version__} ({method})",
    }
    if method == "gptq":
        cfg.update({"damp_percent": DAMP, "true_sequential": False, "static_groups": False, **(gptq or {})})
    elif method == "autoround":  # tuned (SignRound): iters, nsamples, seqlen, lr... as AutoRound records them
        cfg.update(gptq or {})
    return cfg


def quantize_config(qcfg: dict) -> dict:
    """quantize_config.json: the GPTQ-style summary (as the published W4A16 REAP checkpoints ship it)."""
    keys = ("bits", "group_size", "sym", "data_type", "iters", "nsamples", "lm_head", "desc_act",
            "true_sequential", "damp_percent", "provider")
    out = {k: qcfg[k] for k in keys if k in qcfg}
    out["quant_method"] = "gptq"
    out["checkpoint_format"] = "gptq"
    return out
