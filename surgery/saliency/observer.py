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
from torch import nn

from surgery.executor.experts import BatchRouting, ExpertListener, RoutedExperts, expert_forward

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


def expert_output(experts: nn.Module, j: int, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """E_j(x) for the fused-parameter experts of a resident transformers 5 block ([E, ...] parameters)."""
    return expert_forward(experts, {k: v[j] for k, v in experts.named_parameters()}, x, transposed)


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


class SaliencyObserver(ExpertListener):
    """Records a MoE block's saliency from the routed-expert outputs its layer computes.

    In the executor it listens to the layer's `RoutedExperts` (paged or not); given only a block (a
    whole model in memory, as the benchmarks and tests use it) it installs a one-chunk `RoutedExperts`
    over the block's own fused parameters. `valid` (bool [N]) must be set before each forward."""

    def __init__(self, block: nn.Module, num_experts: int, routing: str = "model", router_attr: str = "gate",
                 transposed: bool = False, runner: RoutedExperts | None = None) -> None:
        if routing not in ("model", "reference"):
            raise ValueError(f"unknown routing {routing!r}")
        self.block = block
        self.router = getattr(block, router_attr)
        self.num_experts = num_experts
        self.routing = routing
        self.stats = LayerStats(num_experts, int(self.router.weight.shape[-1]))
        self._router_logits: torch.Tensor | None = None
        self._orig_gate_forward = self.router.forward
        self._own_runner = runner is None
        if runner is None:
            runner = RoutedExperts(block, num_experts, transposed, layer=-1, listeners=[self])
            runner.weights = dict(block.experts.named_parameters())
        self.runner = runner
        observer = self

        def gate_forward(module, *args, **kwargs):
            out = observer._orig_gate_forward(*args, **kwargs)
            observer._router_logits = out[0]
            return out

        self.router.forward = types.MethodType(gate_forward, self.router)

    @property
    def valid(self) -> torch.Tensor | None:
        return self.runner.valid

    @valid.setter
    def valid(self, value: torch.Tensor | None) -> None:
        self.runner.valid = value

    def detach(self) -> None:
        self.router.forward = self._orig_gate_forward
        if self._own_runner:
            self.runner.detach()
        elif self in self.runner.listeners:
            self.runner.listeners.remove(self)

    def begin(self, batch: BatchRouting) -> None:
        if self.routing == "reference":
            batch.notes[self] = self._reference_routing(batch.x, batch.valid)

    @torch.no_grad()
    def expert(self, batch: BatchRouting, j: int, tokens: torch.Tensor, weights: torch.Tensor,
               y: torch.Tensor | None, run) -> None:
        if self.routing == "model":
            if y is not None:
                keep = batch.valid[tokens]
                self.stats.add(j, y[keep], weights[keep])
            return
        xv, top_i, g = batch.notes[self]
        rows, slots = torch.where(top_i == j)
        if rows.numel():
            self.stats.add(j, run(xv[rows]), g[rows, slots])

    def _reference_routing(self, x: torch.Tensor, valid: torch.Tensor):
        """CerebrasResearch/reap's rule: top-k of raw logits, softmax weights renormalised over top-k."""
        logits = self._router_logits.reshape(x.shape[0], -1).float()
        k = self.router.top_k if hasattr(self.router, "top_k") else self.block.top_k
        probs = torch.softmax(logits, dim=-1)
        _top_w, top_i = torch.topk(logits, k, dim=-1)
        g = probs.gather(1, top_i)
        g = g / g.sum(dim=-1, keepdim=True)
        return x[valid], top_i[valid], g[valid]
