"""One linear per expert over tokens sorted by expert: the grouped GEMM, chosen in one place.

A MoE layer's routed experts each see a different number of tokens. Sorted by expert, the tokens of a
chunk of n experts form one `[P, in]` matrix whose rows [offs[j-1], offs[j]) belong to expert j, and a
projection of all of them is one grouped matmul against the experts' stacked weights `[n, out, in]`:
torch's `_grouped_mm` where the device and dtype have a fast kernel (CUDA, bfloat16: CUTLASS on SM90),
else the plain loop of one `F.linear` per expert. Calibration, evaluation, fidelity, GPTQ and the
tuned quantizer all compute experts through `grouped_linear`, so the choice is made here once.

The loop is kept on the CPU because there it is the same arithmetic as the grouped kernel and its
per-expert call is exactly the one the rest of the project (and the in-memory oracle) makes, which
keeps paged and one-chunk results bit-identical. On CUDA the grouped kernel's rows may differ from a
per-expert GEMM's in the last bits (a different tiling); tests that compare CUDA with the CPU state
their tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def use_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether experts on `device` in `dtype` run as one grouped matmul (else one GEMM per expert)."""
    return device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def offsets_of(counts: torch.Tensor) -> torch.Tensor:
    """Cumulative int32 row offsets (the end of each expert's rows) from per-expert token counts."""
    return torch.cumsum(counts, 0, dtype=torch.int32)


def _aligned(*sizes: int) -> bool:
    # the grouped kernel wants 16-byte aligned strides: bf16 rows of a multiple of 8 elements
    return all(s % 8 == 0 for s in sizes)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: Sequence[int] | None = None,
                   offsets: torch.Tensor | None = None, transposed: bool = False) -> torch.Tensor:
    """y[rows of expert j] = x[rows of expert j] @ W_j^T for every expert j of `weight` `[n, out, in]`
    (`transposed`: `[n, in, out]`, y = x @ W_j), with `x` `[P, in]` sorted by expert. `counts` (host
    ints) are the rows of each expert; `offsets` (their cumulative sum, int32 on x's device) may be
    given instead where the grouped kernel runs, so no host synchronisation is needed. Differentiable
    in `x` and `weight` on every path."""
    n = weight.shape[0]
    out_f = weight.shape[2] if transposed else weight.shape[1]
    in_f = weight.shape[1] if transposed else weight.shape[2]
    if (use_grouped_mm(x.device, x.dtype) and weight.dtype == x.dtype and _aligned(in_f, out_f)
            and x.shape[0] > 0):
        if offsets is None:
            offsets = offsets_of(torch.as_tensor(list(counts), device=x.device))
        w = weight if transposed else weight.transpose(-2, -1)
        return torch._grouped_mm(x, w, offs=offsets)
    if counts is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    if len(counts) != n:
        raise ValueError(f"{len(counts)} expert row counts for {n} experts")
    # unbind, not weight[j]: under autograd each index would give back a zero-filled gradient of the whole
    # [n, ...] weight (n full-size buffers filled and summed per backward); unbind's backward stacks once
    weights = weight.unbind(0)
    parts, start = [], 0
    for j, c in enumerate(counts):
        if c:
            rows = x[start:start + c]
            parts.append(rows @ weights[j] if transposed else F.linear(rows, weights[j]))
        start += c
    if not parts:
        return x.new_zeros((0, out_f))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def grouped_weight_grad(grad: torch.Tensor, x: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Every expert's weight gradient of `grouped_linear` (not transposed) at once: `[n, out, in]` with
    G_j = grad[rows of j]^T x[rows of j] (zeros for an expert without rows), in the inputs' dtype. Where
    the grouped kernel runs this is one call (its form that groups the summed dimension), not one small
    GEMM per expert: the tuned quantizer's backward takes it for every expert weight at every step."""
    n, out_f, in_f = len(counts), grad.shape[1], x.shape[1]
    if use_grouped_mm(x.device, x.dtype) and grad.dtype == x.dtype and _aligned(in_f, out_f) and x.shape[0] > 0:
        offsets = offsets_of(torch.as_tensor(list(counts), device=x.device))
        return torch._grouped_mm(grad.t(), x, offs=offsets)
    out = x.new_zeros((n, out_f, in_f))
    start = 0
    for j, c in enumerate(counts):
        if c:
            out[j] = grad[start:start + c].t() @ x[start:start + c]
        start += c
    return out
