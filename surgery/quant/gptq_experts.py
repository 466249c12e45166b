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

from dataclasses import dataclass, field

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.executor.grouped import grouped_linear
from surgery.quant.gptq_batch import for_parts, quantize_batch, rtn_batch
from surgery.quant.pack import decode_batch, pack_batch

TOKEN_PART_BYTES = 64 << 20  # float32 bytes of routed rows per CPU part of the Hessian products


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


def routed_tokens(captured: list, ids: list[int], minimum: int) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """(x, counts, chosen): the valid routed tokens of the chosen experts (positions k in `ids` of those with
    at least `minimum`), `[sum of their counts, H]` sorted by expert, rows of one expert in batch order;
    `counts` for every expert of `ids`. One host read: the chunk's validity mask."""
    first, stop = ids[0], ids[-1] + 1
    if ids != list(range(first, stop)):
        raise SurgeryError(f"internal error: GPTQ chunk {ids[:3]}... is not a run of consecutive experts")
    n = len(ids)
    segs = [b.token_of[b.bounds[first]:b.bounds[stop]] for b in captured]
    if not segs or not sum(s.numel() for s in segs):
        return None, [0] * n, []
    keep = torch.cat([b.valid[s] for b, s in zip(captured, segs, strict=True)]).cpu().numpy()
    expert = np.concatenate([np.repeat(np.arange(n), np.diff(np.asarray(b.bounds[first:stop + 1])))
                             for b in captured])
    counts = np.bincount(expert[keep], minlength=n)
    chosen = [k for k in range(n) if counts[k] >= minimum and counts[k] > 0]
    if not chosen:
        return None, counts.tolist(), []
    order = np.argsort(expert, kind="stable")  # expert-major; batch order, then routing order, kept
    take = keep[order] & np.isin(expert[order], chosen)
    rows = torch.cat([b.x[s] for b, s in zip(captured, segs, strict=True)])
    x = rows[torch.from_numpy(order[take]).to(rows.device)]
    return x, counts.tolist(), chosen


def expert_hessians(x: torch.Tensor, counts: list[int], gate_up: torch.Tensor | None, act,
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H_in `[g, H, H]`, H_mid `[g, I, I]` or None): 2/n Σ x xᵀ of each expert's rows of `x` (float32
    sums, as `gptq.Hessian`) and of act(gate)·up under `gate_up` `[g, 2I, H]`."""
    g, d = len(counts), x.shape[-1]
    h_in = torch.zeros((g, d, d), dtype=torch.float32, device=x.device)
    h_mid = None
    if gate_up is not None:
        inter = gate_up.shape[1] // 2
        h_mid = torch.zeros((g, inter, inter), dtype=torch.float32, device=x.device)
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()

    def part(a: int, b: int) -> None:
        rows = x[starts[a]:starts[b]]
        _accumulate(h_in[a:b], rows.to(torch.float32), counts[a:b])
        if h_mid is not None:
            gate, up = grouped_linear(rows, gate_up[a:b], counts[a:b]).chunk(2, dim=-1)
            _accumulate(h_mid[a:b], (act(gate) * up).to(torch.float32), counts[a:b])

    per = max(1, TOKEN_PART_BYTES // max(1, 4 * d * max(1, starts[-1] // g)))
    for_parts(g, per, part, x.device)
    scale = torch.tensor([2.0 / max(c, 1) for c in counts], dtype=torch.float32).to(x.device)
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


def quantize_chunk(weights: dict[str, torch.Tensor], slots: list[Slot], captured: list, ids: list[int],
                   act, *, group_size: int, damp: float, minimum: int) -> ChunkResult:
    """Quantize the chunk's slots in place in `weights` (decoded) and return the packed tensors."""
    n = len(ids)
    x, counts, chosen = routed_tokens(captured, ids, minimum)
    rtn = [k for k in range(n) if k not in set(chosen)]
    result = ChunkResult(few_tokens=len(rtn) * len(slots))
    h_in = h_mid = None
    if chosen:
        gate_up = weights.get("gate_up_proj")
        sel = torch.tensor(chosen, device=x.device)
        h_in, h_mid = expert_hessians(x, [counts[k] for k in chosen],
                                      None if gate_up is None else gate_up[sel], act)
        del x
    for param in dict.fromkeys(s.param for s in slots):
        mine = [s for s in slots if s.param == param]
        rows = torch.cat([weights[param][:, s.row:s.row + s.out] for s in mine], dim=1) if len(mine) > 1 \
            else weights[param][:, mine[0].row:mine[0].row + mine[0].out]
        n_, out_f, in_f = rows.shape
        levels = torch.empty((n_, in_f, out_f), dtype=torch.uint8, device=rows.device)
        scales = torch.empty((n_, out_f, -(-in_f // group_size)), dtype=torch.float16, device=rows.device)
        if chosen:
            down = {s.role == "down" for s in mine}
            if len(down) > 1:
                raise SurgeryError(f"internal error: {param} mixes down with gate/up rows")
            h = h_mid if down.pop() else h_in
            if h is None:
                raise SurgeryError(f"internal error: no Hessian for the routed experts' {param}")
            q = quantize_batch(rows[sel], h, group_size, damp)
            levels[sel], scales[sel] = q.levels, q.scales
            result.failed = result.failed + q.failed.sum() * len(mine)
        if rtn:
            idx = torch.tensor(rtn, device=rows.device)
            levels[idx], scales[idx] = rtn_batch(rows[idx], group_size)
        at = 0
        for s in mine:
            lv, sc = levels[:, :, at:at + s.out], scales[:, at:at + s.out]
            decode_batch(lv, sc, group_size, weights[param][:, s.row:s.row + s.out])
            result.packed[s] = pack_batch(lv, sc)
            at += s.out
    return result
