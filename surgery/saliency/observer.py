"""Per-expert saliency, recorded while the MoE block runs its own forward.

transformers 5 MoE blocks route with `gate(x) -> (router_logits, top_k_weights, top_k_index)` and then
call `experts(x, top_k_index, top_k_weights)`. We replace the experts' forward with one that
sorts the (token, slot) pairs by expert, runs each expert once on exactly its tokens (a chunk of experts
as one grouped matmul), takes ‖E_j(x)‖ from the same output the layer adds to its result, and
accumulates per expert (float64 segment sums on the compute device, real tokens only): frequency,
weighted frequency, EAN, the REAP numerator, the max activation and the output sum. The routing is
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

from surgery.executor.experts import BatchRouting, ChunkRows, ExpertListener, RoutedExperts, expert_forward
from surgery.executor.routing import SortedPairs, segment_max, segment_sum

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


def expert_output(experts: nn.Module, j: int, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """E_j(x) for the fused-parameter experts of a resident transformers 5 block ([E, ...] parameters)."""
    return expert_forward(experts, {k: v[j] for k, v in experts.named_parameters()}, x, transposed)


class LayerStats:
    """Float64 accumulators for one MoE layer, kept where the experts are computed (on the GPU they
    never travel to the host before the layer is done: `raw`)."""

    def __init__(self, num_experts: int, hidden: int = 0, device: torch.device | str = "cpu") -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.frequency = zeros(num_experts)
        self.weighted_frequency = zeros(num_experts)
        self.ean = zeros(num_experts)
        self.reap_sum = zeros(num_experts)
        self.max_activation = torch.full((num_experts,), -np.inf, dtype=torch.float64, device=device)
        # sum of E_j(x) over j's real routed tokens: its mean is what expert merging compares (cosine)
        self.output_sum = zeros(num_experts, hidden)

    def add(self, lo: int, hi: int, out: torch.Tensor, weights: torch.Tensor, lengths: torch.Tensor,
            keep: torch.Tensor | None = None) -> None:
        """Experts [lo, hi) on their pairs in expert order: `out` [P, H] = E_j(x), `weights` [P] = g_j(x),
        `lengths` the pairs of each expert (device), `keep` [P] the pairs that count (real tokens; None:
        all). Each statistic is one segment sum per expert, added to its accumulator, so an expert's
        figures do not depend on which experts share its chunk."""
        if out.shape[0] == 0:
            return
        norms = torch.linalg.vector_norm(out.float(), dim=-1).double()
        g = weights.double()
        peak = out.amax(dim=-1).double()
        if keep is not None:
            k = keep.double()
            norms, g = norms * k, g * k
            peak = peak.masked_fill(~keep, -np.inf)
            total = torch.mul(out, k[:, None])  # float64 by type promotion: one pass, no separate copy
            count = k
        else:
            total = out.double()
            count = torch.ones_like(g)
        for acc, values in ((self.frequency, count), (self.weighted_frequency, g), (self.ean, norms),
                            (self.reap_sum, g * norms)):
            acc[lo:hi] += segment_sum(values, lengths)
        self.max_activation[lo:hi] = torch.maximum(self.max_activation[lo:hi], segment_max(peak, lengths))
        if self.output_sum.shape[1] == out.shape[1]:
            self.output_sum[lo:hi] += segment_sum(total, lengths)

    RAW = ("frequency", "weighted_frequency", "ean", "reap_sum", "max_activation", "output_sum")

    def raw(self) -> dict[str, np.ndarray]:
        """The accumulators on the host (what ranks of a distributed run exchange and sum, and what is
        written): the layer's one device-to-host copy of its statistics."""
        return {k: getattr(self, k).cpu().numpy().copy() for k in self.RAW}

    @classmethod
    def from_raw(cls, raw: dict[str, np.ndarray]) -> LayerStats:
        stats = cls(len(raw["frequency"]), np.asarray(raw["output_sum"]).shape[1])
        for k in cls.RAW:
            setattr(stats, k, torch.from_numpy(np.asarray(raw[k], dtype=np.float64).copy()))
        return stats

    def result(self) -> dict[str, list[float]]:
        raw = self.raw()
        freq = raw["frequency"]
        reap = np.divide(raw["reap_sum"], freq, out=np.zeros_like(freq), where=freq > 0)
        max_act = np.where(np.isfinite(raw["max_activation"]), raw["max_activation"], 0.0)
        return {
            "frequency": freq.tolist(),
            "weighted_frequency": raw["weighted_frequency"].tolist(),
            "ean": raw["ean"].tolist(),
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
        self.stats = LayerStats(num_experts, int(self.router.weight.shape[-1]), self.router.weight.device)
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
    def chunk(self, rows: ChunkRows) -> None:
        if self.routing == "model":
            self.stats.add(rows.lo, rows.hi, rows.y, rows.weights, rows.lengths, rows.batch.valid[rows.tokens])
            return
        xv, pairs = rows.batch.notes[self]
        start, stop = pairs.rows(rows.lo, rows.hi)
        lengths = pairs.lengths[rows.lo:rows.hi]
        y = rows.run(xv, pairs.token_of[start:stop], pairs.counts(rows.lo, rows.hi), lengths)
        self.stats.add(rows.lo, rows.hi, y, pairs.weight_of[start:stop], lengths)

    def _reference_routing(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, SortedPairs]:
        """CerebrasResearch/reap's rule over the batch's real tokens: top-k of the raw logits, softmax
        weights renormalised over the top-k; the pairs sorted by expert once for every chunk."""
        logits = self._router_logits.reshape(x.shape[0], -1).float()
        k = self.router.top_k if hasattr(self.router, "top_k") else self.block.top_k
        probs = torch.softmax(logits, dim=-1)
        _top_w, top_i = torch.topk(logits, k, dim=-1)
        g = probs.gather(1, top_i)
        g = g / g.sum(dim=-1, keepdim=True)
        return x[valid], SortedPairs(top_i[valid], g[valid], self.num_experts, rounds=False)
