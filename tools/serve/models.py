"""Small checkpoints vLLM's CPU backend can run, built with surgery's own tools (`surgery.synth`), whose
greedy decoding is decisive enough that two correct implementations agree token for token.

Why not plain random weights: their next-token distributions are nearly flat (top-1 log-probability
about -4 over 1024 tokens, top-1/top-2 gaps down to 0.004 nats), so bf16 rounding differences flip
near-ties and a divergence says nothing about the loader. Here the head gets a successor rule on top of
its random rows, lm_head[succ(t)] += BOOST * embed[t] / |embed[t]|, so the residual stream's copy of the
input token votes for one successor; attention and the routed experts still move every logit (the
check reports how many greedy steps they decide against the rule, and how far pruning alone moves the
log-probabilities, i.e. what a loader mistake would look like).

Shapes are what vLLM's CPU backend takes: head_dim 64 (it refuses 16), hidden and intermediate sizes
multiples of 128, softmax routers (its router asserts on sigmoid + bias).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

FAMILIES = {
    "qwen3_moe": dict(moe_intermediate_size=128, intermediate_size=256, num_experts=16, num_experts_per_tok=2,
                      mlp_only_layers=[], norm_topk_prob=True),
    "mixtral": dict(intermediate_size=128, num_local_experts=16, num_experts_per_tok=2),
    "olmoe": dict(intermediate_size=128, num_experts=16, num_experts_per_tok=2),
}
COMMON = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              max_position_embeddings=512)
VOCAB = 1024
EMBED_SCALE = 16.0  # sqrt(hidden): token embeddings as large as a sublayer's output
BOOST = 8.0  # logit units the successor rule adds (at full alignment of the residual with the input token)
SEED = 0


def successor(vocab: int) -> list[int]:
    """A fixed permutation of the vocabulary: token t's preferred next token."""
    return [(7 * t + 3) % vocab for t in range(vocab)]  # 7 is coprime with 1024


def tokenizer(directory: Path) -> Path:
    """A byte-level BPE trained on the standard library (`surgery.synth.make_tokenizer`), built once."""
    from surgery.synth import make_tokenizer

    if not (directory / "tokenizer.json").is_file():
        make_tokenizer(directory, vocab_size=VOCAB)
    return directory


def _rewrite(model_dir: Path, name: str, change) -> None:
    """Replace tensor `name` in its shard by `change(tensor as float32)` (cast back to its dtype)."""
    from safetensors.torch import load_file, save_file

    shard = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(model_dir / shard)
    tensors[name] = change(tensors[name].float()).to(tensors[name].dtype).contiguous()
    save_file(tensors, model_dir / shard, metadata={"format": "pt"})


def _add_successor_rule(model_dir: Path, boost: float, embed_scale: float) -> None:
    """embed *= embed_scale (so the residual stream keeps the input token against the sublayers' outputs,
    which the pre-norms make |x| ~ sqrt(H) large); lm_head[succ(t)] += boost * embed[t] / |embed[t]| /
    sqrt(H) (the final RMSNorm makes |h| ~ sqrt(H), so full alignment adds `boost` logits)."""
    import torch
    from safetensors.torch import load_file

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    embed_name = "model.embed_tokens.weight"
    embed = load_file(model_dir / index[embed_name])[embed_name].float()
    _rewrite(model_dir, embed_name, lambda e: e * embed_scale)
    hidden = embed.shape[1]
    unit = embed / embed.norm(dim=1, keepdim=True)
    rows = torch.tensor(successor(embed.shape[0]))

    def boosted(head):
        head[rows] += boost * unit / math.sqrt(hidden)
        return head

    _rewrite(model_dir, "lm_head.weight", boosted)


def build(root: Path, family: str, boost: float = BOOST, embed_scale: float = EMBED_SCALE) -> Path:
    """`root/family`: a bf16 checkpoint of `family` in the hub's layout, with a tokenizer."""
    import torch

    from surgery.synth import make_checkpoint

    out = root / family
    if (out / "config.json").is_file():
        return out
    tok = tokenizer(root / "tokenizer")
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tok)
    make_checkpoint(out, family, seed=SEED, dtype=torch.bfloat16, max_shard_size="2MB", vocab_size=VOCAB,
                    pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_id, bos_token_id=t.bos_token_id,
                    **COMMON, **FAMILIES[family])
    _add_successor_rule(out, boost, embed_scale)
    for f in tok.iterdir():
        if f.is_file():
            shutil.copyfile(f, out / f.name)
    return out
