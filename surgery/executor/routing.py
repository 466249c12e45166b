"""A routing's (token, slot) pairs sorted by expert once, and what is computed over them per chunk.

Every expert computation (the layer's own routed output, the saliency statistics, fidelity's pruned
routings, the reference rule's re-routing) starts from the same thing: the pairs of a top-k routing
sorted by expert, so that the pairs of a chunk of consecutive experts [lo, hi) are one contiguous
range [bounds[lo], bounds[hi]) and each projection over them is one grouped matmul. The per-expert
counts come to the host once per batch (`bounds`: the one host synchronisation a batch costs); every
chunk after that slices device tensors at host-known offsets and never waits for the device.

Adding a chunk's weighted outputs back into each token's row must follow one order, so that paged
(several chunks) and one-chunk results are the same bits: ascending expert per token. On the CPU one
`index_add_` over the pairs in expert order does that (it adds index by index). On CUDA `index_add_`
adds with atomics, in no fixed order when a token occurs twice in one call, so the pairs are added in
*rounds*: round r holds each token's r-th expert (by expert id), a token occurs at most once per round,
and the rounds run in order.
"""

from __future__ import annotations

import torch


def bounds_of(counts: list[int]) -> list[int]:
    out = [0]
    for n in counts:
        out.append(out[-1] + n)
    return out


class SortedPairs:
    """The pairs of one routing (`index` [N, k] expert ids, `weights` [N, k]) sorted by expert (stable:
    ascending token within an expert): `token_of`, `weight_of`, `slot_of` (the flat pair index) and
    host `bounds`, the pairs of expert j being [bounds[j], bounds[j + 1])."""

    def __init__(self, index: torch.Tensor, weights: torch.Tensor | None, num_experts: int,
                 rounds: bool | None = None) -> None:
        flat = index.reshape(-1)
        self.k = index.shape[1] if index.dim() > 1 else 1
        self.num_experts = num_experts
        self.slot_of = torch.argsort(flat, stable=True)
        self.token_of = torch.div(self.slot_of, self.k, rounding_mode="floor")
        self.weight_of = weights.reshape(-1)[self.slot_of] if weights is not None else None
        counts = torch.bincount(flat, minlength=num_experts)
        self.rounds = index.is_cuda if rounds is None else rounds
        if self.rounds:
            # rank of each pair among its token's experts; pairs ordered by (rank, expert, token)
            rank = torch.argsort(torch.argsort(index, dim=1), dim=1).reshape(-1)
            key = rank * num_experts + flat
            by_round = torch.argsort(key, stable=True)
            position = torch.empty_like(self.slot_of)
            position[self.slot_of] = torch.arange(flat.numel(), device=flat.device)
            self._round_rows = position[by_round]  # where each (rank, expert)-ordered pair sits in expert order
            self._round_tokens = torch.div(by_round, self.k, rounding_mode="floor")
            host = torch.cat([counts, torch.bincount(key, minlength=self.k * num_experts)]).tolist()
            self.bounds = bounds_of(host[:num_experts])
            self._round_bounds = bounds_of(host[num_experts:])
        else:
            self.bounds = bounds_of(counts.tolist())
        self.lengths = counts  # on the device: segment lengths for per-expert reductions

    def rows(self, lo: int, hi: int) -> tuple[int, int]:
        """The pair range of experts [lo, hi)."""
        return self.bounds[lo], self.bounds[hi]

    def counts(self, lo: int, hi: int) -> list[int]:
        return [self.bounds[j + 1] - self.bounds[j] for j in range(lo, hi)]

    def add_into(self, out: torch.Tensor, lo: int, hi: int, values: torch.Tensor) -> None:
        """out[token] += values[row] for the pairs of experts [lo, hi) (`values` holds their rows, in
        pair order), each token's contributions in ascending expert order."""
        start, stop = self.rows(lo, hi)
        if stop == start:
            return
        if not self.rounds:
            out.index_add_(0, self.token_of[start:stop], values)
            return
        n = self.num_experts
        for r in range(self.k):
            a, b = self._round_bounds[r * n + lo], self._round_bounds[r * n + hi]
            if b > a:
                out.index_add_(0, self._round_tokens[a:b], values[self._round_rows[a:b] - start])


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-segment sums along dim 0 (segments of `lengths` rows, in order; empty ones are 0), each
    segment summed on its own, in row order, deterministically on every device: a segment's sum does
    not depend on what else is in the call, which keeps paged and one-chunk statistics equal."""
    if values.shape[0] == 0:
        return values.new_zeros((lengths.shape[0], *values.shape[1:]))
    return torch.segment_reduce(values, "sum", lengths=lengths, axis=0)


def segment_max(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-segment maxima along dim 0 (-inf for an empty segment)."""
    if values.shape[0] == 0:
        return values.new_full((lengths.shape[0], *values.shape[1:]), float("-inf"))
    return torch.segment_reduce(values, "max", lengths=lengths, axis=0)
