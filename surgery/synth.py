"""Synthetic checkpoints: tiny (or benchmark-sized) models of each family, built from transformers
configs with random weights and written in the hub's on-disk layout as real multi-shard safetensors.

Used by the tests (every family against the in-memory oracle), the demo (a built-in default that
needs no network) and the benchmarks (multi-GB checkpoints). `save_pretrained` writes per-expert
keys, exactly as the hub ships them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

# Per-family config overrides for a tiny model. Shapes are small but keep every structural feature:
# dense first layers, groups, shared experts, mlp-only layers, biases.
TINY: dict[str, dict] = {
    "minimax_m2": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, rotary_dim=16, num_local_experts=8,
                       num_experts_per_tok=2),
    "mixtral": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, num_experts=8, num_experts_per_tok=2),
    "glm4_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                     num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                     topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2,
                        topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=32,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16),
}
COMMON = dict(vocab_size=256, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)

# Config keys the hub's checkpoints use where transformers 5 writes another name on save.
HUB_CONFIG_KEYS: dict[str, dict[str, str]] = {"qwen3_moe": {"num_local_experts": "num_experts"}}

FAMILIES = tuple(TINY)


def tiny_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**COMMON, **TINY[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_checkpoint(
    out: str | Path,
    family: str = "minimax_m2",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "200KB",
    **overrides,
) -> Path:
    """Write a random model of `family` to `out` in the hub's layout and return the directory.

    Router biases (e_score_correction_bias) and norms get random, uneven values so that a
    reindexing mistake changes the logits; weights are scaled so activations stay O(1).
    """
    from transformers import AutoModelForCausalLM

    out = Path(out)
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    renames = HUB_CONFIG_KEYS.get(family)
    if renames:
        cfg_path = out / "config.json"
        raw = json.loads(cfg_path.read_text())
        raw = {renames.get(k, k): v for k, v in raw.items()}
        cfg_path.write_text(json.dumps(raw, indent=2))
    return out


def quantize_fp8(src: str | Path, dst: str | Path, block: int = 128) -> Path:
    """Rewrite a bf16/fp32 checkpoint into the hub's FP8 block-scaled layout (as MiniMax-M2.1 ships):
    every 2-D linear weight of attention and experts becomes float8_e4m3fn with a float32
    `weight_scale_inv` [ceil(out/block), ceil(in/block)]; routers, norms, embeddings stay as they are."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map: dict[str, str] = {}
    total = 0
    fmax = torch.finfo(torch.float8_e4m3fn).max
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(src / shard)
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            quantize = t.ndim == 2 and name.endswith("proj.weight") or name.endswith((".w1.weight", ".w2.weight", ".w3.weight"))
            quantize = quantize and ".gate." not in name and "embed" not in name and "lm_head" not in name
            if not quantize:
                out[name] = t
                continue
            w = t.float()
            rows, cols = w.shape
            br, bc = math.ceil(rows / block), math.ceil(cols / block)
            pad = torch.zeros(br * block, bc * block)
            pad[:rows, :cols] = w
            blocks = pad.view(br, block, bc, block)
            amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
            scale = amax / fmax
            q = (blocks / scale[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
            out[name] = q.to(torch.float8_e4m3fn)
            out[name.removesuffix("weight") + "weight_scale_inv"] = scale.float().contiguous()
        for name in out:
            new_map[name] = shard
            total += out[name].numel() * out[name].element_size()
        save_file(out, dst / shard, metadata={"format": "pt"})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                                  "weight_block_size": [block, block]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in src.iterdir():
        if extra.suffix in (".json", ".jinja", ".txt") and not (dst / extra.name).exists():
            (dst / extra.name).write_bytes(extra.read_bytes())
    return dst
