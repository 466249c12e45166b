"""Per-expert saliency, recorded while the MoE block runs its own forward.

transformers 5 MoE blocks route with `gate(x) -> (router_logits, top_k_weights, top_k_index)` and then
call `experts(x, top_k_index, top_k_weights)`. We replace the experts' forward with one that
gathers the tokens routed to each expert, runs that expert once on exactly those tokens, takes
‖E_j(x)‖ from the same output the layer adds to its result, and accumulates (float64, real tokens
only): frequency, weighted frequency, EAN, the REAP numerator and the max activation. The routing is
therefore the model's own rule (sigmoid/softmax, correction bias, groups, renormalisation, scaling)
with no re-implementation. `routing="reference"` additionally reproduces CerebrasResearch/reap's
rule for the statistics: top-k of the raw router logits, g = softmax over all experts renormalised
by the top-k sum; the layer output still follows the model's routing.
"""

from __future__ import annotations

import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


def expert_output(experts: nn.Module, j: int, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """E_j(x) for the fused-parameter experts of transformers 5: [E, out, in] weights (F.linear), or
    [E, in, out] (`transposed`, gpt-oss), optional per-expert biases, the module's own gating."""
    transposed = transposed or getattr(experts, "is_transposed", False)
    has_bias = getattr(experts, "gate_up_proj_bias", None) is not None
    w = experts.gate_up_proj[j]
    h = x @ w if transposed else F.linear(x, w)
    if has_bias:
        h = h + experts.gate_up_proj_bias[j]
    h = experts._apply_gate(h) if hasattr(experts, "_apply_gate") else _swiglu(experts, h)
    w2 = experts.down_proj[j]
    y = h @ w2 if transposed else F.linear(h, w2)
    if has_bias:
        y = y + experts.down_proj_bias[j]
    return y


def _swiglu(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


class LayerStats:
    """Float64 accumulators for one MoE layer."""

    def __init__(self, num_experts: int, hidden: int = 0) -> None:
        self.frequency = np.zeros(num_experts, dtype=np.float64)
        self.weighted_frequency = np.zeros(num_experts, dtype=np.float64)
        self.ean = np.zeros(num_experts, dtype=np.float64)
        self.reap_sum = np.zeros(num_experts, dtype=np.float64)
        self.max_activation = np.full(num_experts, -np.inf, dtype=np.float64)
        # sum of E_j(x) over j's real routed tokens: its mean is what expert merging compares (cosine)
        self.output_sum = np.zeros((num_experts, hidden), dtype=np.float64)

    def add(self, j: int, out: torch.Tensor, weights: torch.Tensor) -> None:
        """`out` [n, H] = E_j(x) on real tokens routed to j, `weights` [n] = their g_j(x)."""
        if out.shape[0] == 0:
            return
        norms = torch.linalg.vector_norm(out.float(), dim=-1).double().cpu()
        g = weights.double().cpu()
        self.frequency[j] += out.shape[0]
        self.weighted_frequency[j] += float(g.sum())
        self.ean[j] += float(norms.sum())
        self.reap_sum[j] += float((g * norms).sum())
        self.max_activation[j] = max(self.max_activation[j], float(out.max()))
        if self.output_sum.shape[1] == out.shape[1]:
            self.output_sum[j] += out.double().sum(0).cpu().numpy()

    RAW = ("frequency", "weighted_frequency", "ean", "reap_sum", "max_activation", "output_sum")

    def raw(self) -> dict[str, np.ndarray]:
        """The accumulators themselves (what ranks of a distributed run exchange and sum)."""
        return {k: getattr(self, k).copy() for k in self.RAW}

    @classmethod
    def from_raw(cls, raw: dict[str, np.ndarray]) -> LayerStats:
        stats = cls(len(raw["frequency"]), np.asarray(raw["output_sum"]).shape[1])
        for k in cls.RAW:
            setattr(stats, k, np.asarray(raw[k], dtype=np.float64).copy())
        return stats

    def result(self) -> dict[str, list[float]]:
        freq = self.frequency
        reap = np.divide(self.reap_sum, freq, out=np.zeros_like(freq), where=freq > 0)
        max_act = np.where(np.isfinite(self.max_activation), self.max_activation, 0.0)
        return {
            "frequency": freq.tolist(),
            "weighted_frequency": self.weighted_frequency.tolist(),
            "ean": self.ean.tolist(),
            "reap": reap.tolist(),
            "max_activation": max_act.tolist(),
        }


class SaliencyObserver:
    """Instruments one MoE block; `valid` (bool [N]) must be set before each forward."""

    def __init__(self, block: nn.Module, num_experts: int, routing: str = "model", router_attr: str = "gate",
                 transposed: bool = False) -> None:
        if routing not in ("model", "reference"):
            raise ValueError(f"unknown routing {routing!r}")
        self.block = block
        self.router = getattr(block, router_attr)
        self.transposed = transposed
        self.experts = block.experts
        self.num_experts = num_experts
        self.routing = routing
        self.stats = LayerStats(num_experts, int(self.router.weight.shape[-1]))
        self.valid: torch.Tensor | None = None
        self._router_logits: torch.Tensor | None = None
        self._orig_gate_forward = self.router.forward
        self._orig_experts_forward = block.experts.forward
        observer = self

        def gate_forward(module, *args, **kwargs):
            out = observer._orig_gate_forward(*args, **kwargs)
            observer._router_logits = out[0]
            return out

        def experts_forward(module, hidden_states, top_k_index=None, top_k_weights=None):
            return observer._forward(hidden_states, top_k_index, top_k_weights)

        self.router.forward = types.MethodType(gate_forward, self.router)
        block.experts.forward = types.MethodType(experts_forward, block.experts)

    def detach(self) -> None:
        self.router.forward = self._orig_gate_forward
        self.block.experts.forward = self._orig_experts_forward

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        valid = self.valid if self.valid is not None else torch.ones(x.shape[0], dtype=torch.bool)
        valid = valid.to(x.device)
        out = torch.zeros_like(x)
        record = self.routing == "model"
        # sort (token, slot) pairs by expert: one gather and one call per expert that has tokens
        flat_expert = top_k_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        token_of = torch.div(order, top_k_index.shape[1], rounding_mode="floor")
        weight_of = top_k_weights.reshape(-1)[order]
        start = 0
        for j, n in enumerate(counts):
            if n == 0:
                continue
            tokens = token_of[start:start + n]
            w = weight_of[start:start + n]
            start += n
            y = expert_output(self.experts, j, x[tokens], self.transposed)
            if record:
                keep = valid[tokens]
                self.stats.add(j, y[keep], w[keep])
            out.index_add_(0, tokens, (y * w[:, None]).to(out.dtype))
        if not record:
            self._record_reference(x, valid)
        return out

    def _record_reference(self, x: torch.Tensor, valid: torch.Tensor) -> None:
        """CerebrasResearch/reap's rule: top-k of raw logits, softmax weights renormalised over top-k."""
        logits = self._router_logits.reshape(x.shape[0], -1).float()
        k = self.router.top_k if hasattr(self.router, "top_k") else self.block.top_k
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = torch.topk(logits, k, dim=-1)
        g = probs.gather(1, top_i)
        g = g / g.sum(dim=-1, keepdim=True)
        xv, top_i, g = x[valid], top_i[valid], g[valid]
        for j in range(self.num_experts):
            rows, slots = torch.where(top_i == j)
            if rows.numel():
                self.stats.add(j, expert_output(self.experts, j, xv[rows], self.transposed), g[rows, slots])
