"""GPTQ of a chunk of routed experts at once, from the tokens the engine captured for the layer.

For the experts `ids` the engine has built (`weights[param]` `[n, ...]` on the compute device):

1. their valid routed tokens, gathered once for the chunk into one matrix sorted by expert (each
   expert's rows in batch order: the rows, and the order, the per-expert form concatenated), with
   one host read of the chunk's validity mask (the counts decide GPTQ or RTN);
2. per expert with at least `minimum` tokens: the Hessian of its tokens (gate and up share it) and,
   from the gate/up projection under the ORIGINAL weights (`grouped_linear`, the one place that
   computes many experts' projections), the Hessian of act(gate)·up (down's inputs) — accumulated
   into `[g, d, d]` tensors on the device by one product per expert over its rows of the sorted matrix
   (no padding: routed counts are skewed, and padding to the chunk's largest count would multiply
   memory by max/mean; each product has at least `minimum` rows, so there is nothing to gain from one
   launch instead of g, and nothing waits for the host);
3. `quantize_batch` for each fused parameter's quantized rows (gate and up rows together), RTN
   (`rtn_batch`) for the experts with too few tokens;
4. the decoded quantized weights written over the built ones (the layer's outputs, the next layer's
   inputs, come from them) and the packed tensors (`qweight`, `scales`) handed back for the host.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.executor.grouped import grouped_linear
from surgery.quant.gptq_batch import for_parts, quantize_batch, rtn_batch
from surgery.quant.pack import decode_batch, pack_batch
from surgery.quant.rtn import num_groups

# float32 bytes of routed rows and their products per part of the Hessians: on a CPU, small enough that the
# parts' transients are reused from the heap (larger ones are mapped and faulted in anew every time); on an
# accelerator, a bound on the transient memory (parts run one after the other; an expert is never split)
TOKEN_PART_BYTES = 24 << 20
DEVICE_PART_BYTES = 1 << 30


@dataclass(frozen=True)
class Slot:
    """A quantized piece of a fused expert parameter: rows [row, row + out) of `param`; `names[k]` is the
    on-disk weight name of the piece for the chunk's k-th expert; `role` gate, up or down."""

    param: str
    row: int
    out: int
    names: tuple[str, ...]
    role: str | None = None


@dataclass
class ChunkResult:
    """What a chunk leaves for the writer and the counters: packed tensors per slot (`qweight` `[n, in/8,
    out]` int32, `scales` `[n, groups, out]` fp16, on the compute device), how many weights took RTN
    for lack of tokens, and the device count of weights whose Hessian did not factorise."""

    packed: dict[Slot, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    few_tokens: int = 0
    failed: torch.Tensor | int = 0


class RoutedTokens:
    """The valid routed tokens of a chunk's experts across the captured batches, sorted by expert (one
    expert's rows in batch order, as the per-expert form concatenates them). Reading the chunk's validity
    mask is its one host synchronisation; the rows themselves are gathered part by part (`rows`), so no
    copy of every routed token of the chunk is ever held at once."""

    def __init__(self, captured: list, ids: list[int], minimum: int) -> None:
        first, stop = ids[0], ids[-1] + 1
        if ids != list(range(first, stop)):
            raise SurgeryError(f"internal error: GPTQ chunk {ids[:3]}... is not a run of consecutive experts")
        n = len(ids)
        self._x = [b.x for b in captured]
        self._segs = [b.token_of[b.bounds[first]:b.bounds[stop]] for b in captured]
        sizes = [s.numel() for s in self._segs]
        self.counts, self.chosen = [0] * n, []
        self.width = captured[0].x.shape[-1] if captured else 0
        self.device = captured[0].x.device if captured else torch.device("cpu")
        if not sum(sizes):
            return
        keep = torch.cat([b.valid[s] for b, s in zip(captured, self._segs, strict=True)]).cpu().numpy()
        expert = np.concatenate([np.repeat(np.arange(n), np.diff(np.asarray(b.bounds[first:stop + 1])))
                                 for b in captured])
        counts = np.bincount(expert[keep], minlength=n)
        self.counts = counts.tolist()
        self.chosen = [k for k in range(n) if counts[k] >= max(minimum, 1)]
        order = np.argsort(expert, kind="stable")  # expert-major; batch, then routing order, kept
        order = order[keep[order] & np.isin(expert[order], self.chosen)]
        batch = np.repeat(np.arange(len(sizes)), sizes)
        self._batch = batch[order]
        self._local = order - np.concatenate([[0], np.cumsum(sizes)[:-1]])[self._batch]
        self._start = np.concatenate([[0], np.cumsum(counts[self.chosen])]).tolist()

    def rows(self, a: int, b: int) -> torch.Tensor:
        """`[rows, H]`: the tokens of chosen experts a..b-1 (positions in `chosen`), in order: one host ->
        device index copy, then a gather per captured batch."""
        lo, hi = self._start[a], self._start[b]
        x0 = self._x[0]
        out = torch.empty((hi - lo, self.width), dtype=x0.dtype, device=x0.device)
        batch = self._batch[lo:hi]
        by_batch = np.argsort(batch, kind="stable")  # destinations, grouped by source batch
        ends = np.searchsorted(batch[by_batch], np.arange(len(self._x) + 1)).tolist()
        index = to_device(np.stack([by_batch, self._local[lo:hi][by_batch]]), out.device)
        for i, (x, seg) in enumerate(zip(self._x, self._segs, strict=True)):
            if ends[i] < ends[i + 1]:
                dest, local = index[:, ends[i]:ends[i + 1]]
                out.index_copy_(0, dest, x.index_select(0, seg.index_select(0, local)))
        return out


def to_device(a, device: torch.device) -> torch.Tensor:
    """A host array (numpy or list) on `device`; from pinned memory, asynchronously, to a CUDA device (a copy
    from pageable memory would wait for the device's queue)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def expert_hessians(tokens: RoutedTokens, gate_up: torch.Tensor | None, act,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H_in `[g, H, H]`, H_mid `[g, I, I]` or None) of the chosen experts: 2/n Σ x xᵀ of each one's
    tokens (float32 sums, as `gptq.Hessian`) and of act(gate)·up under `gate_up` `[n, 2I, H]` (the
    chunk's, indexed by `tokens.chosen` part by part)."""
    counts = [tokens.counts[k] for k in tokens.chosen]
    index = to_device(np.array(tokens.chosen), tokens.device)
    g, d, device = len(counts), tokens.width, tokens.device
    h_in = torch.zeros((g, d, d), dtype=torch.float32, device=device)
    h_mid = None
    if gate_up is not None:
        inter = gate_up.shape[1] // 2
        h_mid = torch.zeros((g, inter, inter), dtype=torch.float32, device=device)

    def part(a: int, b: int) -> None:
        rows = tokens.rows(a, b)
        _accumulate(h_in[a:b], rows.to(torch.float32), counts[a:b])
        if h_mid is not None:
            gate, up = grouped_linear(rows, gate_up[index[a:b]], counts[a:b]).chunk(2, dim=-1)
            _accumulate(h_mid[a:b], (act(gate) * up).to(torch.float32), counts[a:b])

    width = 4 * (d + 3 * (0 if gate_up is None else gate_up.shape[1] // 2))  # float32 bytes per row
    limit = TOKEN_PART_BYTES if device.type == "cpu" else DEVICE_PART_BYTES
    for_parts(g, max(1, limit // max(1, width * sum(counts) // g)), part, device)
    scale = to_device(np.array([2.0 / max(c, 1) for c in counts], dtype=np.float32), device)
    h_in.mul_(scale[:, None, None])
    if h_mid is not None:
        h_mid.mul_(scale[:, None, None])
    return h_in, h_mid


def _accumulate(h: torch.Tensor, rows: torch.Tensor, counts: list[int]) -> None:
    start = 0
    for k, c in enumerate(counts):
        part = rows[start:start + c]
        h[k].addmm_(part.t(), part)
        start += c


@contextmanager
def timed(timings: dict[str, float] | None, key: str):
    """Add the host-side seconds of the block to `timings[key]` (on an accelerator: the time to queue it)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def quantize_chunk(weights: dict[str, torch.Tensor], slots: list[Slot], captured: list, ids: list[int],
                   act, *, group_size: int, damp: float, minimum: int,
                   timings: dict[str, float] | None = None) -> ChunkResult:
    """Quantize the chunk's slots in place in `weights` (decoded) and return the packed tensors."""
    with timed(timings, "experts: tokens and Hessians"):
        tokens = RoutedTokens(captured, ids, minimum)
        chosen = tokens.chosen
        few = [k for k in range(len(ids)) if k not in set(chosen)]
        hessians = {}
        if chosen:
            hessians["in"], hessians["down"] = expert_hessians(tokens, weights.get("gate_up_proj"), act)
        del tokens
    result = ChunkResult(few_tokens=len(few) * len(slots))
    for param in dict.fromkeys(s.param for s in slots):
        mine = [s for s in slots if s.param == param]
        roles = {"down" if s.role == "down" else "in" for s in mine}
        hessian = hessians.pop(roles.pop(), None) if len(roles) == 1 else None  # each is used once: overwritten
        if chosen and hessian is None:
            raise SurgeryError(f"internal error: no one Hessian for the routed experts' {param}")
        with timed(timings, "experts: GPTQ and RTN"):
            levels, scales, failed = _quantize_rows(weights[param], mine, chosen, few, hessian, group_size, damp)
        del hessian
        result.failed = result.failed + failed * len(mine)
        with timed(timings, "experts: decode and pack"):
            at = 0
            for s in mine:
                lv, sc = levels[:, :, at:at + s.out], scales[:, at:at + s.out]
                decode_batch(lv, sc, group_size, weights[param][:, s.row:s.row + s.out])
                result.packed[s] = pack_batch(lv, sc)
                at += s.out
    return result


def _quantize_rows(param: torch.Tensor, mine: list[Slot], chosen: list[int], few: list[int],
                   hessian: torch.Tensor | None, group_size: int, damp: float):
    """(levels `[n, in, rows]`, scales `[n, rows, groups]`, failed count) of the slots' rows of a fused
    parameter `[n, out, in]`: GPTQ for the chosen experts, RTN for the few-token ones."""
    adjacent = all(a.row + a.out == b.row for a, b in zip(mine, mine[1:], strict=False))  # gate, up: one view
    rows = param[:, mine[0].row:mine[-1].row + mine[-1].out] if adjacent else \
        torch.cat([param[:, s.row:s.row + s.out] for s in mine], dim=1)
    n, out_f, in_f = rows.shape
    levels = torch.empty((n, in_f, out_f), dtype=torch.uint8, device=rows.device)
    scales = torch.empty((n, out_f, num_groups(in_f, group_size)), dtype=torch.float16, device=rows.device)
    failed = 0
    if chosen:
        sel = to_device(np.array(chosen), rows.device)
        q = quantize_batch(rows, hessian, group_size, damp, index=sel)
        levels[sel], scales[sel] = q.levels, q.scales
        failed = q.failed.sum()
    if few:
        idx = to_device(np.array(few), rows.device)
        levels[idx], scales[idx] = rtn_batch(rows[idx], group_size)
    return levels, scales, failed
