"""A MoE layer's routed experts computed chunk by chunk, as grouped matmuls over tokens sorted by expert.

`RoutedExperts` replaces the block's `experts.forward`. Each batch's routing is sorted by expert once
(`surgery.executor.routing.SortedPairs`); a chunk of consecutive experts [lo, hi) then owns one range of
pairs, and its forward is one gather of their inputs, one grouped matmul per projection (gate/up, the
family's activation, down: `grouped_forward`), the routing weights, and one ordered add of the
weighted outputs back into the batch's output (`SortedPairs.add_into`). Listeners (saliency, fidelity,
the reference rule) see each chunk's outputs on its routed pairs as a `ChunkRows`, and compute what
they record batched over the chunk's experts (segment sums on the device), so nothing waits for the
host per expert: the host learns a batch's per-expert counts once, and whether a chunk's outputs are
finite once per chunk.

With every expert in one chunk the layer is computed in one pass; otherwise the executor runs the
layer's batches once to *capture* each batch's MoE input and routing (the experts' contribution
returned as zeros), streams the chunks over the captured tokens, and runs the batches again to
*replay* the finished expert outputs into the layer. Per expert and batch the computation is the same
in both modes, each statistic is a per-expert segment sum added to its accumulator batch by batch, and
each token's output is accumulated in ascending expert order, so paged results are bit-identical to
the one-chunk path.

Where the grouped kernel runs (CUDA, bf16: `surgery.executor.grouped.use_grouped_mm`) a chunk's rows go
through `grouped_linear`. Elsewhere each expert runs on its own rows, as the in-memory model does: on
the CPU an elementwise activation over many experts' rows at once is split across threads at positions
that depend on the chunk, and torch's vectorised and scalar paths differ in the last bit, so only the
per-expert call keeps paged and one-chunk results identical.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.executor.grouped import grouped_linear, use_grouped_mm
from surgery.executor.routing import SortedPairs, segment_max
from surgery.executor.timing import DeviceClock

Params = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- forward
def expert_forward(experts: nn.Module, params: Params, x: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """E(x) for one expert given its parameters (`gate_up_proj` [2I, H], `down_proj` [H, I], or
    transposed [in, out] for gpt-oss, optional `*_bias`), with the experts module's own gating."""
    transposed = transposed or getattr(experts, "is_transposed", False)
    w = params["gate_up_proj"]
    h = x @ w if transposed else F.linear(x, w)
    if "gate_up_proj_bias" in params:
        h = h + params["gate_up_proj_bias"]
    h = _gate(experts, h)
    w2 = params["down_proj"]
    y = h @ w2 if transposed else F.linear(h, w2)
    if "down_proj_bias" in params:
        y = y + params["down_proj_bias"]
    return y


def _gate(experts: nn.Module, h: torch.Tensor) -> torch.Tensor:
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def grouped_forward(experts: nn.Module, params: Params, x: torch.Tensor, tokens: torch.Tensor,
                    counts: list[int], lengths: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """E_j(x[t]) for every pair of a range sorted by expert: experts `params` (`[n, ...]`, in order)
    with `counts` pairs each (host ints; `lengths` the same on the device), the pairs' tokens `tokens`.
    Returns `[P, out]` in pair order. One grouped matmul per projection where the device has the
    kernel, else each expert on its own rows (see the module docstring)."""
    transposed = transposed or getattr(experts, "is_transposed", False)
    w1, w2 = params["gate_up_proj"], params["down_proj"]
    rows = sum(counts)
    if not use_grouped_mm(x.device, w1.dtype):
        parts, start = [], 0
        for j, c in enumerate(counts):
            if c:
                one = {k: v[j] for k, v in params.items()}
                parts.append(expert_forward(experts, one, x[tokens[start:start + c]], transposed))
            start += c
        if len(parts) == 1:  # one expert (the CPU's usual chunk part): its output as it is, no copy
            return parts[0]
        if parts:
            return torch.cat(parts)
        out_f = w2.shape[2] if transposed else w2.shape[1]
        return x.new_empty((0, out_f), dtype=w2.dtype)
    xs = x[tokens]
    offsets = torch.cumsum(lengths, 0, dtype=torch.int32)
    h = grouped_linear(xs, w1, counts, offsets, transposed)
    if "gate_up_proj_bias" in params:
        h = h + params["gate_up_proj_bias"].repeat_interleave(lengths, dim=0, output_size=rows)
    y = grouped_linear(_gate(experts, h), w2, counts, offsets, transposed)
    if "down_proj_bias" in params:
        y = y + params["down_proj_bias"].repeat_interleave(lengths, dim=0, output_size=rows)
    return y


def flops_per_row(params: Params) -> int:
    """Multiply-adds x 2 of one expert on one token (its weight matrices' sizes)."""
    return 2 * sum(v[0].numel() for k, v in params.items() if not k.endswith("_bias"))


# ---------------------------------------------------------------------------------------------- routing
@dataclass
class BatchRouting:
    """One batch's MoE input and routing, sorted by expert; `out` accumulates Σ w·E_j(x)."""

    x: torch.Tensor  # [N, H]
    valid: torch.Tensor  # bool [N]: tokens the statistics count
    pairs: SortedPairs  # the model's routing, sorted by expert
    out: torch.Tensor
    notes: dict = field(default_factory=dict)  # listener -> its per-batch state

    @property
    def token_of(self) -> torch.Tensor:  # token of each (token, slot) pair, sorted by expert
        return self.pairs.token_of

    @property
    def weight_of(self) -> torch.Tensor:
        return self.pairs.weight_of

    @property
    def bounds(self) -> list[int]:  # pairs of expert j are [bounds[j], bounds[j + 1]) (host ints)
        return self.pairs.bounds

    def routed(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.bounds[j], self.bounds[j + 1]
        return self.token_of[a:b], self.weight_of[a:b]


@dataclass
class ChunkRows:
    """Experts [lo, hi) of a chunk on one batch: their routed pairs [start, stop) of `batch.pairs`
    (`tokens`, `weights`, per-expert `counts` on the host and `lengths` on the device) and their
    outputs `y` [P, H] on them, in pair order; `run(x, tokens, counts, lengths)` evaluates the same
    experts on other rows (pairs sorted by expert, as `grouped_forward` takes them)."""

    batch: BatchRouting
    lo: int
    hi: int
    start: int
    stop: int
    counts: list[int]
    lengths: torch.Tensor
    y: torch.Tensor
    run: Callable[[torch.Tensor, torch.Tensor, list[int], torch.Tensor], torch.Tensor]

    @property
    def tokens(self) -> torch.Tensor:
        return self.batch.token_of[self.start:self.stop]

    @property
    def weights(self) -> torch.Tensor:
        return self.batch.weight_of[self.start:self.stop]


class ExpertListener:
    """What a pass sees of the routed experts: `begin` once per batch (at the forward, where the router
    ran), then `chunk` for every group of consecutive experts in ascending order, with their outputs
    on their routed pairs (and a way to run them on other rows)."""

    def begin(self, batch: BatchRouting) -> None:  # pragma: no cover - interface
        pass

    def chunk(self, rows: ChunkRows) -> None:  # pragma: no cover - interface
        pass


# ---------------------------------------------------------------------------------------------- executor
class RoutedExperts:
    """Replaces `block.experts.forward` for one layer; see the module docstring for the modes."""

    def __init__(self, block: nn.Module, num_experts: int, transposed: bool, layer: int,
                 listeners: Sequence[ExpertListener] = (), where: object = None,
                 clock: DeviceClock | None = None) -> None:
        self.block = block
        self.experts = block.experts
        self.num_experts = num_experts
        self.transposed = transposed
        self.layer = layer
        self.listeners = list(listeners)
        self.where = where
        self.clock = clock
        self.valid: torch.Tensor | None = None  # set by the executor before each forward
        self.mode = "resident"
        self.weights: Params | None = None  # resident: [E, ...] parameters
        self.captured: list[BatchRouting] = []
        # pairs computed at once at most (a chunk's experts are split at expert boundaries beyond it); None:
        # the batch's token count, which bounds the working set as one expert at a time over every token did
        self.rows_max: int | None = None
        self.flops = 0  # FLOPs of the expert evaluations so far (routed outputs and listeners' runs)
        self._replay = 0
        self._orig = block.experts.forward
        runner = self

        def forward(module, hidden_states, top_k_index=None, top_k_weights=None):
            return runner._forward(hidden_states, top_k_index, top_k_weights)

        block.experts.forward = types.MethodType(forward, block.experts)

    def detach(self) -> None:
        self.block.experts.forward = self._orig
        self.captured.clear()
        self.weights = None

    # ---------------------------------------------------------------- modes
    def capture(self) -> None:
        self.mode, self.captured = "capture", []

    def replay(self) -> None:
        self.mode, self._replay = "replay", 0

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.mode == "replay":
            batch = self.captured[self._replay]
            self._replay += 1
            return batch.out
        if self.mode == "skip":  # a run that observes the rest of the layer only
            return torch.zeros_like(x)
        valid = self.valid if self.valid is not None else torch.ones(x.shape[0], dtype=torch.bool)
        if not torch.isfinite(x).all():
            raise SurgeryError(f"NaN/Inf in the hidden states after layer {self.layer} (before its MoE block: "
                               "attention or a norm produced it)", self.where)
        batch = BatchRouting(x, valid.to(x.device), SortedPairs(top_k_index, top_k_weights, self.num_experts),
                             torch.zeros_like(x))
        for listener in self.listeners:
            listener.begin(batch)
        if self.mode == "resident":
            self.compute(range(self.num_experts), self.weights, [batch], 0)
            return batch.out
        self.captured.append(batch)
        return torch.zeros_like(x)

    def compute(self, ids: Sequence[int], weights: Params, batches: Sequence[BatchRouting], first: int) -> None:
        """Experts `ids` (consecutive, ascending; `weights[k][j - first]` are expert j's) over `batches`,
        batch by batch as the one-chunk path does, so per-expert statistics accumulate in the same
        order. Whether the outputs are finite is asked once, after every batch."""
        if not len(ids):
            return
        lo, hi = ids[0], ids[-1] + 1
        checks: list[tuple[BatchRouting, int, torch.Tensor]] = []
        with self.clock.span("compute") if self.clock is not None else nullcontext():
            for batch in batches:
                for a, b in self._parts(batch, lo, hi):
                    checks.append((batch, a, self._compute_part(batch, weights, first, a, b)))
        self._check_finite(checks)

    def _parts(self, batch: BatchRouting, lo: int, hi: int) -> list[tuple[int, int]]:
        """[lo, hi) split at expert boundaries into ranges of at most `rows_max` pairs (a single expert
        with more pairs is a range of its own)."""
        limit = self.rows_max or max(batch.x.shape[0], 1)
        bounds, parts, a = batch.bounds, [], lo
        for j in range(lo + 1, hi + 1):
            if j == hi or bounds[j + 1] - bounds[a] > limit:
                parts.append((a, j))
                a = j
        return parts

    def _compute_part(self, batch: BatchRouting, weights: Params, first: int, lo: int, hi: int) -> torch.Tensor:
        """Experts [lo, hi) on their pairs of `batch`: outputs, listeners, the weighted add into
        `batch.out`; returns per expert 1.0 where an output was not finite (on the device: asked later)."""
        params = {k: v[lo - first:hi - first] for k, v in weights.items()}
        pairs = batch.pairs
        start, stop = pairs.rows(lo, hi)
        counts, lengths = pairs.counts(lo, hi), pairs.lengths[lo:hi]

        def run(x: torch.Tensor, tokens: torch.Tensor, counts: list[int], lengths: torch.Tensor) -> torch.Tensor:
            self.flops += sum(counts) * flops_per_row(params)
            return grouped_forward(self.experts, params, x, tokens, counts, lengths, self.transposed)

        y = run(batch.x, pairs.token_of[start:stop], counts, lengths)
        # a row with a NaN/Inf has a non-finite sum (one reduction, not an elementwise test of every value;
        # a finite row whose sum overflows float counts as non-finite too)
        bad = segment_max((~torch.isfinite(y.sum(dim=-1))).float(), lengths) if y.numel() else \
            torch.zeros(hi - lo, device=y.device)
        if self.listeners:
            rows = ChunkRows(batch, lo, hi, start, stop, counts, lengths, y, run)
            for listener in self.listeners:
                listener.chunk(rows)
        if stop > start:
            pairs.add_into(batch.out, lo, hi, (y * pairs.weight_of[start:stop, None]).to(batch.out.dtype))
        return bad

    def _check_finite(self, checks: list[tuple[BatchRouting, int, torch.Tensor]]) -> None:
        if not checks:
            return
        if not bool(torch.cat([c for _, _, c in checks]).gt(0).any()):  # the chunk's one host synchronisation
            return
        for _batch, lo, flags in checks:
            hit = flags.gt(0).nonzero()
            if hit.numel():
                raise SurgeryError(f"NaN/Inf in the hidden states after layer {self.layer}: produced by expert "
                                   f"{lo + int(hit[0])}", self.where)
