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
    "ernie4_5_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8, moe_k=2,
                         moe_num_shared_experts=1, moe_layer_start_index=1),
    "gpt_oss": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                    sliding_window=6, layer_types=["sliding_attention", "full_attention"]),
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
            quantize = t.ndim == 2 and name.endswith(("proj.weight", ".w1.weight", ".w2.weight", ".w3.weight"))
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


DEMO_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def stdlib_text(max_bytes: int = 2_000_000) -> list[str]:
    """Deterministic sample of the Python standard library's source: text every machine has."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def make_tokenizer(out: str | Path, vocab_size: int = 2048) -> Path:
    """Train a byte-level BPE tokenizer on stdlib text and save it with a chat template (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|bos|>", "<|eos|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_text(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|bos|>",
                                   pad_token="<|pad|>")
    fast.chat_template = DEMO_CHAT_TEMPLATE
    fast.save_pretrained(out)
    return Path(out)


def make_demo_model(out: str | Path, seed: int = 0) -> Path:
    """The demo's built-in default: a small MiniMax-M2-layout checkpoint (random weights, bf16, hub
    shard layout) with a tokenizer trained on the standard library. About 40 MB."""
    out = Path(out)
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    make_tokenizer(out, vocab_size=2048)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    make_checkpoint(out, "minimax_m2", seed=seed, dtype=torch.bfloat16, max_shard_size="8MB",
                    hidden_size=256, intermediate_size=128, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32, rotary_dim=32, num_local_experts=32,
                    num_experts_per_tok=4, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return out
