"""GPTQ of a batch of weights at once: `[n, out, in]` weights and their `[n, in, in]` Hessians.

The same algorithm as `surgery.quant.gptq` (the per-weight form and its description), run over a batch
dimension so that a chunk of routed experts, or the attention linears of a layer, costs one pass of
the column loop instead of one per weight:

- one batched dead-input / dampening step and one batched Cholesky / inverse / Cholesky
  (`torch.linalg.cholesky_ex`, so a weight whose Hessian does not factorise does not stop the batch:
  it is counted and takes RTN, as QMoE does);
- the column loop over the batch, `group_size` columns per block, each column's error pushed into the
  rest of its block at once for every weight of the batch, and each block's errors into the later
  columns by one batched product;
- AutoRound's symmetric scale rule per group (`surgery.quant.rtn.group_scales`) from the group's
  error-updated weights at its start.

Bit for bit the per-weight `gptq_quantize` on CPU float32: every elementwise step is the same operation
on the same values (only laid out across a batch), the batched reductions and LAPACK calls equal the
single ones (tests/test_quant_gptq_batch.py checks levels and scales identical on random and real
Hessians, many weights, dead inputs, a partial last group and a forced Cholesky failure). The block
being quantized is held transposed (`[n, block, out]`) so that a column is a contiguous row: the
same arithmetic, but the column steps stream memory instead of striding through it (2-3x faster on a
CPU). Levels come out as `[n, in, out]`, the layout `qweight` packs.

Device: everything stays on the weights' device; the loop has a fixed number of kernels per column
whatever n is, and nothing in it reads a value back to the host. On a CPU the batch is cut into
sub-batches whose block fits the cache, quantized on as many threads as torch may use, one
intra-op thread each (a few hundred small elementwise operations per column block are faster on
separate threads than split across a pool, and do not stall when the machine is busy).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from surgery.quant.gptq import DAMP
from surgery.quant.rtn import MAXQ, group_scales, num_groups, rtn_quantize

CPU_BLOCK_BYTES = 8 << 20  # float32 bytes of one CPU sub-batch's column block ([n_sub, block, out])


def host_side(device: torch.device) -> bool:
    """Whether `device` is the host: there a check that reads a value back is free, and a batch is cut
    into cache-sized parts on threads. Elsewhere (an accelerator) nothing reads back and a batch runs
    whole; the one switch, so a test can take the accelerator's branches on the CPU (same results)."""
    return device.type == "cpu"


@dataclass
class Quantized:
    """Levels uint8 `[n, in, out]` (0..15, zero point 8) and fp16 scales `[n, out, groups]` of a batch;
    `failed` (bool `[n]`, on the device): weights whose Hessian did not factorise (they hold RTN)."""

    levels: torch.Tensor
    scales: torch.Tensor
    failed: torch.Tensor


def inverse_cholesky_batch(hessian: torch.Tensor, weight: torch.Tensor,
                           damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, failed): U `[n, in, in]` upper Cholesky factors of (H + damp·mean(diag H)·I)⁻¹ after zeroing
    dead inputs of `weight` `[n, out, in]` in place, as `gptq.inverse_cholesky` per weight; `hessian` is
    overwritten. A batch element whose factorisation fails gets U = I and failed = True (no host sync)."""
    diag = hessian.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    cpu = host_side(hessian.device)  # where a host check is free, skip the passes it shows are no-ops
    if not cpu or bool(dead.any()):
        diag.masked_fill_(dead, 1)
        weight.masked_fill_(dead.unsqueeze(1), 0)
    # the mean of a contiguous copy of the diagonal: the same reduction `torch.mean(torch.diag(h))` runs
    diag.add_(damp * diag.contiguous().mean(-1, keepdim=True))
    lower, info = torch.linalg.cholesky_ex(hessian)
    upper, info2 = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    failed = (info != 0) | (info2 != 0)
    eye = torch.eye(hessian.shape[-1], dtype=upper.dtype, device=upper.device)
    if not cpu:
        return torch.where(failed[:, None, None], eye, upper), failed
    if bool(failed.any()):
        upper[failed] = eye
    return upper, failed


def rtn_batch(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """AutoRound's RTN of `[n, out, in]` weights: (levels `[n, in, out]`, scales `[n, out, groups]`), the
    layout `quantize_batch` returns (rows are independent, so one call over all rows is per-weight RTN)."""
    n, out_f, in_f = weight.shape
    q, s = rtn_quantize(weight.reshape(n * out_f, in_f), group_size)
    return q.view(n, out_f, in_f).transpose(1, 2), s.view(n, out_f, -1)


def quantize_batch(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128,
                   damp: float = DAMP, index: torch.Tensor | None = None) -> Quantized:
    """GPTQ of weights `[n, out, in]` (or of `weight[index]`; any float dtype, quantized from float32 copies
    made part by part, never of the whole batch at once) given their Hessians `[n, in, in]` (float32,
    overwritten). Weights whose Hessian fails to factorise take RTN."""
    n = weight.shape[0] if index is None else index.shape[0]
    _, out_f, in_f = weight.shape
    device = weight.device
    levels = torch.empty((n, in_f, out_f), dtype=torch.uint8, device=device)
    scales = torch.empty((n, out_f, num_groups(in_f, group_size)), dtype=torch.float16, device=device)
    failed = torch.empty(n, dtype=torch.bool, device=device)

    def part(a: int, b: int) -> None:
        # advanced indexing copies already; a slice is a view of the caller's weights, copied here
        w = weight[a:b].to(torch.float32, copy=True) if index is None else weight[index[a:b]].to(torch.float32)
        u, failed[a:b] = inverse_cholesky_batch(hessian[a:b], w, damp)
        _columns(w, u, group_size, levels[a:b], scales[a:b])

    cpu = host_side(device)  # on a CPU, sub-batches whose column block fits the cache; else all at once
    for_parts(n, max(1, CPU_BLOCK_BYTES // (4 * min(group_size, in_f) * out_f)) if cpu else n, part, device)
    # on a CPU a host check is free and saves the RTN pass; elsewhere RTN is always computed and selected
    # on the device, so nothing waits for the factorisation's result
    if not cpu or bool(failed.any()):
        rq, rs = rtn_batch(weight if index is None else weight[index], group_size)
        levels = torch.where(failed[:, None, None], rq, levels)
        scales = torch.where(failed[:, None, None], rs, scales)
    return Quantized(levels, scales, failed)


def for_parts(n: int, per: int, run: Callable[[int, int], None], device: torch.device) -> None:
    """`run(a, b)` over [0, n) in parts of at most `per`: one after the other on an accelerator; on a CPU
    in parts of about equal size on as many threads as torch may use, one intra-op thread each."""
    if n == 0:
        return
    if not host_side(device):
        for a in range(0, n, max(per, 1)):
            run(a, min(a + per, n))
        return
    with _one_intra_op_thread() as threads:
        # at most `per` a part, and a multiple of the threads' count of parts of about equal size
        count = -(-max(1, -(-n // max(per, 1))) // threads) * threads
        size = -(-n // count)
        parts = [(a, min(a + size, n)) for a in range(0, n, size)]
        if threads == 1 or len(parts) == 1:
            for a, b in parts:
                run(a, b)
            return
        with ThreadPoolExecutor(min(threads, len(parts)), thread_name_prefix="surgery-gptq") as pool:
            for f in [pool.submit(run, a, b) for a, b in parts]:
                f.result()


@contextmanager
def _one_intra_op_thread():
    """Run with one intra-op thread; yields how many threads torch had (the parallelism to use)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _columns(w: torch.Tensor, u: torch.Tensor, group_size: int, levels: torch.Tensor,
             scales: torch.Tensor) -> None:
    """Quantize `w` `[n, out, in]` (float32, updated in place) with inverse factors `u`, into `levels`
    `[n, in, out]` and `scales` `[n, out, groups]`: `gptq._gptq`'s arithmetic, batched and transposed."""
    n, out_f, in_f = w.shape
    block = group_size if in_f > group_size else in_f
    q = torch.empty((n, block, out_f), dtype=torch.float32, device=w.device)  # levels - 8, as floats
    t = torch.empty((n, out_f), dtype=torch.float32, device=w.device)
    tmp = torch.empty((n, block, out_f), dtype=torch.float32, device=w.device)
    for g, i1 in enumerate(range(0, in_f, block)):
        i2 = min(i1 + block, in_f)
        k = i2 - i1
        w1 = w[:, :, i1:i2].transpose(1, 2).contiguous()  # [n, k, out]: column i is row i
        u1 = u[:, i1:i2, i1:i2]
        err = torch.empty_like(w1)
        scale = group_scales(w1.transpose(1, 2))  # fp16 [n, out]: from the group's updated weights
        s = scale.to(torch.float32)
        for i in range(k):
            col, qi, e = w1[:, i], q[:, i], err[:, i]
            torch.div(col, s, out=qi)
            qi.round_().clamp_(-MAXQ, MAXQ - 1)
            torch.mul(qi, s, out=t)
            torch.sub(col, t, out=t)
            torch.div(t, u1[:, i, i, None], out=e)
            if i + 1 < k:  # the column's error into the rest of its block (column i itself is done)
                upd = tmp[:, :k - i - 1]
                torch.mul(u1[:, i, i + 1:k, None], e[:, None, :], out=upd)
                w1[:, i + 1:k].sub_(upd)
        torch.add(q[:, :k], MAXQ, out=tmp[:, :k])
        levels[:, i1:i2].copy_(tmp[:, :k])
        scales[:, :, g] = scale
        if i2 < in_f:  # the block's errors into every later column at once
            w[:, :, i2:].sub_(torch.bmm(err.transpose(1, 2).contiguous(), u[:, i1:i2, i2:]))
