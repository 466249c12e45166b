"""The in-memory oracle: REAP saliency computed with the whole (tiny) model loaded by transformers.

The streaming executor computes per-expert statistics one layer at a time from tensors it reads off
disk; this module does the same math the obvious way, so tests can hold the executor to it. Nothing
here is clever on purpose: routing is recomputed with each MoE block's own router module, every
expert's output is recomputed from the fused parameters, and statistics are accumulated in float64
over real (attention_mask == 1) tokens only.

Families are handled without naming them: a MoE block is any `decoder_layer.mlp` with `.gate` and
`.experts`; a router that wants the block's `e_score_correction_bias` (MiniMax-M2) says so in its
`forward` signature.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


# ---------------------------------------------------------------------------------------------- loading
def _is_fp8_config(config: dict) -> bool:
    qcfg = config.get("quantization_config") or {}
    return qcfg.get("quant_method") == "fp8"


def dequantize_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write an FP8 block-scaled checkpoint as plain float32 (exact products) so transformers loads it on CPU.

    Every float8_e4m3fn tensor `W` with a sibling `<name minus 'weight'>weight_scale_inv` `S`
    ([ceil(out/b0), ceil(in/b1)]) becomes `W.float() * S` expanded over its b0 x b1 blocks (edge
    blocks partial), stored as float32; scale tensors and `quantization_config` are dropped. This is
    independent of the executor's own dequantization, which is what makes it a reference.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    qcfg = config.pop("quantization_config", None) or {}
    b0, b1 = qcfg.get("weight_block_size") or (128, 128)
    index_path = src / "model.safetensors.index.json"
    if index_path.is_file():
        shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(src / shard, framework="pt") as f:
            names = list(f.keys())
            tensors = {n: f.get_tensor(n) for n in names}
        out: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if name.endswith("weight_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                scale_name = name.removesuffix("weight") + "weight_scale_inv"
                if scale_name not in tensors:
                    raise ValueError(f"{src / shard}: fp8 tensor {name!r} has no {scale_name!r} in the same shard")
                scale = tensors[scale_name].float()
                rows, cols = t.shape
                if scale.shape != (math.ceil(rows / b0), math.ceil(cols / b1)):
                    raise ValueError(f"{name}: scale shape {tuple(scale.shape)} does not match {tuple(t.shape)}")
                full = scale.repeat_interleave(b0, dim=0).repeat_interleave(b1, dim=1)[:rows, :cols]
                t = (t.float() * full).to(torch.float32)
            out[name] = t.contiguous()
            weight_map[name] = shard
            total += t.numel() * t.element_size()
        save_file(out, dst / shard, metadata={"format": "pt"})
    if index_path.is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / index_path.name).write_text(json.dumps(index, indent=2))
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in src.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and not (dst / extra.name).exists():
            shutil.copyfile(extra, dst / extra.name)
    return dst


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole model in memory, in eval mode; FP8 block-scaled checkpoints are dequantized first
    (transformers' own FP8 path needs a GPU)."""
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if _is_fp8_config(config):
        with tempfile.TemporaryDirectory(prefix="oracle-dequant-") as tmp:
            plain = dequantize_checkpoint(model_dir, tmp)
            model = AutoModelForCausalLM.from_pretrained(plain, dtype=dtype)
            # materialise every tensor before the files go away (they may be memory-mapped)
            for t in (*model.parameters(), *model.buffers()):
                t.data = t.data.clone()
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


# ---------------------------------------------------------------------------------------------- structure
def moe_blocks(model: nn.Module) -> dict[int, nn.Module]:
    """{decoder layer index: MoE block} for every layer whose `mlp` has a router and routed experts."""
    return {
        i: layer.mlp
        for i, layer in enumerate(model.model.layers)
        if (hasattr(layer.mlp, "gate") or hasattr(layer.mlp, "router")) and hasattr(layer.mlp, "experts")
    }


def router_of(block: nn.Module) -> nn.Module:
    """The block's router: `gate` in most families, `router` in gpt-oss."""
    return block.gate if hasattr(block, "gate") else block.router


def _router_call(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`block.gate(x)` -> (router_logits, top_k_weights, top_k_index), passing the block's
    `e_score_correction_bias` where the router's signature asks for it (MiniMax-M2)."""
    router = router_of(block)
    params = inspect.signature(router.forward).parameters
    if "e_score_correction_bias" in params:
        return router(x, block.e_score_correction_bias)
    return router(x)


def route(block: nn.Module, x: torch.Tensor, routing: str = "model") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k choice [N, k] and routing weights [N, k] (float64) for tokens x [N, H].

    `model`: exactly what the block's router gives the experts (after renormalisation and routed
    scaling). `reference`: the CerebrasResearch/reap rule: top-k of the raw logits, weights the
    softmax over all logits renormalised over the chosen k (no sigmoid, bias or groups).
    """
    logits, weights, index = _router_call(block, x)
    if routing == "model":
        return index, weights.double()
    if routing == "reference":
        k = index.shape[-1]
        logits = logits.double()
        index = torch.topk(logits, k, dim=-1).indices
        probs = torch.softmax(logits, dim=-1).gather(1, index)
        return index, probs / probs.sum(dim=-1, keepdim=True)
    raise ValueError(f"routing must be 'model' or 'reference', not {routing!r}")


def expert_output(experts: nn.Module, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert j on tokens x [N, H], from the fused parameters, in the parameters' dtype.

    gpt-oss keeps [E, in, out] weights, per-expert biases and its own clamped, interleaved gating
    (`_apply_gate`, as its experts forward uses it); the others [E, out, in] and SwiGLU."""
    if "GptOss" in type(experts).__name__:
        h = x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j]
        return experts._apply_gate(h) @ experts.down_proj[j] + experts.down_proj_bias[j]
    gate, up = (x @ experts.gate_up_proj[j].T).chunk(2, dim=-1)
    return (experts.act_fn(gate) * up) @ experts.down_proj[j].T


def routed_output(block: nn.Module, x: torch.Tensor, routing: str = "model") -> torch.Tensor:
    """Σ_j g_j(x)·out_j(x) over each token's chosen experts, recomputed expert by expert; equals the
    block's `experts(...)` output when the oracle's routing is the model's."""
    index, weights = route(block, x, routing)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for j in range(block.experts.gate_up_proj.shape[0]):
        tok, pos = torch.where(index == j)
        if tok.numel():
            out.index_add_(0, tok, expert_output(block.experts, j, x[tok]).double() * weights[tok, pos, None])
    return out


class _LayerStats:
    """Float64 per-expert accumulators of one MoE layer."""

    def __init__(self, num_experts: int) -> None:
        self.frequency = np.zeros(num_experts, dtype=np.float64)
        self.weighted_frequency = np.zeros(num_experts, dtype=np.float64)
        self.ean = np.zeros(num_experts, dtype=np.float64)
        self.reap_sum = np.zeros(num_experts, dtype=np.float64)
        self.max_activation = np.full(num_experts, -np.inf, dtype=np.float64)

    def add(self, block: nn.Module, x: torch.Tensor, routing: str) -> None:
        index, weights = route(block, x, routing)
        for j in range(len(self.frequency)):
            tok, pos = torch.where(index == j)
            if not tok.numel():
                continue
            out = expert_output(block.experts, j, x[tok]).double()
            g = weights[tok, pos]
            norms = out.norm(dim=-1)
            self.frequency[j] += tok.numel()
            self.weighted_frequency[j] += float(g.sum())
            self.ean[j] += float(norms.sum())
            self.reap_sum[j] += float((g * norms).sum())
            self.max_activation[j] = max(self.max_activation[j], float(out.max()))

    def result(self) -> dict[str, np.ndarray]:
        seen = self.frequency > 0
        reap = np.divide(self.reap_sum, self.frequency, out=np.zeros_like(self.reap_sum), where=seen)
        return {
            "frequency": self.frequency.copy(),
            "weighted_frequency": self.weighted_frequency.copy(),
            "ean": self.ean.copy(),
            "reap": reap,
            "max_activation": np.where(seen, self.max_activation, 0.0),
        }


def oracle_saliency(
    model_dir: str | Path | nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor,
    routing: str = "model",
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[int, dict[str, np.ndarray]], list[torch.Tensor]]:
    """Per-expert REAP statistics of every MoE layer, and the model's hidden states.

    Returns `({layer: {"frequency", "weighted_frequency", "ean", "reap", "max_activation": float64
    [E]}}, hidden_states)` where hidden_states is `model(..., output_hidden_states=True)
    .hidden_states` (embeddings, then each layer's output). `model_dir` may also be an already loaded
    model (e.g. one pruned with `prune_in_memory`); `dtype` applies only when loading.
    """
    if routing not in ("model", "reference"):
        raise ValueError(f"routing must be 'model' or 'reference', not {routing!r}")
    model = model_dir if isinstance(model_dir, nn.Module) else load_model(model_dir, dtype)
    blocks = moe_blocks(model)
    real = attention_mask.reshape(-1).bool()
    stats = {i: _LayerStats(b.experts.gate_up_proj.shape[0]) for i, b in blocks.items()}

    def hook_for(i: int):
        def pre_hook(block: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1])[real]
            stats[i].add(block, x, routing)

        return pre_hook

    handles = [b.register_forward_pre_hook(hook_for(i), with_kwargs=True) for i, b in blocks.items()]
    try:
        with torch.no_grad():
            out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return {i: s.result() for i, s in stats.items()}, list(out.hidden_states)


# ---------------------------------------------------------------------------------------------- pruning
def prune_in_memory(model: nn.Module, keep: dict[int, Sequence[int]]) -> nn.Module:
    """Keep only experts `keep[layer]` (in that order) of each listed MoE layer, in place.

    Every per-expert tensor is sliced: any parameter or buffer held directly by the router, the
    experts module or the block whose first dimension is the old expert count (gate.weight,
    gate_up_proj, down_proj, e_score_correction_bias wherever it lives). The expert-count attributes
    the modules read (`num_experts` on router and experts) follow; the config's expert count is
    updated when every MoE layer keeps the same number. Groups (n_group) stay as configured.
    """
    blocks = moe_blocks(model)
    counts = set()
    for i, kept in keep.items():
        block = blocks[i]
        old = block.experts.gate_up_proj.shape[0]
        idx = torch.as_tensor(list(kept), dtype=torch.long)
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= old or len(set(idx.tolist())) != len(idx):
            raise ValueError(f"layer {i}: keep must be distinct expert indices in [0, {old})")
        routed = [m for name, m in block.named_modules() if "shared" not in name]
        for module in routed:
            for name, p in list(module.named_parameters(recurse=False)):
                if p.ndim and p.shape[0] == old:
                    setattr(module, name, nn.Parameter(p.data[idx].clone(), requires_grad=p.requires_grad))
                elif p.ndim == 2 and p.shape == (1, old):  # ERNIE's [1, E] correction bias
                    setattr(module, name, nn.Parameter(p.data[:, idx].clone(), requires_grad=p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None and b.ndim and b.shape[0] == old:
                    setattr(module, name, b[idx].clone())
            if hasattr(module, "num_experts"):
                module.num_experts = len(idx)
        counts.add(len(idx))
    if len(counts) == 1 and set(keep) == set(blocks):
        (n,) = counts
        for key in EXPERT_COUNT_KEYS:
            if hasattr(model.config, key):
                setattr(model.config, key, n)
        if hasattr(model, "num_experts"):
            model.num_experts = n
    return model


# ---------------------------------------------------------------------------------------------- batches
def make_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[torch.LongTensor, torch.Tensor]:
    """Random token ids [S, max(lengths)], right-padded with pad id 0, and the attention mask.

    Real tokens are drawn from [1, vocab_size) so a pad position is recognisable by its id.
    """
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        input_ids[row, :n] = torch.randint(1, vocab_size, (n,), generator=g)
        attention_mask[row, :n] = 1
    return input_ids, attention_mask
