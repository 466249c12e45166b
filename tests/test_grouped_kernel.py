"""torch's grouped GEMM itself (`torch._grouped_mm`, what CUDA bf16 runs) forced on the CPU, where torch
has a kernel for it, through every caller of `surgery.executor.grouped`.

The other tests that force the grouped branch (tests/test_grouped_experts.py) still reach the CPU's
per-expert loop inside `grouped_linear`; no GPU is lent to CI. Here the real kernel gets what CUDA
gives it: int32 offsets, column-major views of `[n, out, in]` weights and gpt-oss's `[n, in, out]`,
experts with no rows (first, inner, last), autograd through it, and the summed-dimension form of the
weight gradient that the tuned quantizer's backward uses. Each result is compared with the per-expert
loop (float32: the kernel's own tiling may differ in the last bits, so within 1e-5 relative), and each
test counts the kernel's calls, so it cannot pass on the loop alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from surgery.executor import experts as experts_module
from surgery.executor import grouped as grouped_module
from surgery.executor.grouped import grouped_linear, grouped_weight_grad

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM")

COUNTS = [0, 5, 0, 9, 3, 1, 0]  # experts without rows first, inside and last


@pytest.fixture
def kernel(monkeypatch) -> list[tuple[int, ...]]:
    """Force the grouped kernel on every device and dtype; the shapes of its calls, to count them."""
    calls: list[tuple[int, ...]] = []
    real = torch._grouped_mm

    def counted(a, b, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counted)
    monkeypatch.setattr(grouped_module, "use_grouped_mm", lambda device, dtype: True)
    monkeypatch.setattr(experts_module, "use_grouped_mm", lambda device, dtype: True)
    return calls


def per_expert(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool) -> torch.Tensor:
    parts, start = [], 0
    for j, c in enumerate(counts):
        rows = x[start:start + c]
        parts.append(rows @ weight[j] if transposed else F.linear(rows, weight[j]))
        start += c
    return torch.cat(parts)


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_and_its_gradients_equal_the_loop(transposed, kernel):
    g = torch.Generator().manual_seed(0)
    n, in_f, out_f = len(COUNTS), 40, 24
    shape = (n, in_f, out_f) if transposed else (n, out_f, in_f)
    w = torch.randn(*shape, generator=g).requires_grad_(True)
    x = torch.randn(sum(COUNTS), in_f, generator=g).requires_grad_(True)
    probe = torch.randn(sum(COUNTS), out_f, generator=g)
    y = grouped_linear(x, w, COUNTS, transposed=transposed)
    assert kernel, "the grouped kernel was not called"
    (y * probe).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad, w.grad = None, None
    ref = per_expert(x, w, COUNTS, transposed)
    (ref * probe).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=1e-5, atol=1e-5)
    assert not gw[[0, 2, 6]].any() and gw[1].abs().sum() > 0


def test_offsets_on_the_device_without_counts(kernel):
    """Given offsets only (as the engine passes them on CUDA, no host synchronisation), the same rows."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(len(COUNTS), 16, 32, generator=g)
    x = torch.randn(sum(COUNTS), 32, generator=g)
    offsets = grouped_module.offsets_of(torch.tensor(COUNTS))
    torch.testing.assert_close(grouped_linear(x, w, offsets=offsets), per_expert(x, w, COUNTS, False),
                               rtol=1e-5, atol=1e-5)
    assert kernel


def test_weight_gradients_of_all_experts_in_one_call(kernel):
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(sum(COUNTS), 24, generator=g)
    x = torch.randn(sum(COUNTS), 40, generator=g)
    got = grouped_weight_grad(gy, x, COUNTS)
    assert len(kernel) == 1 and got.shape == (len(COUNTS), 24, 40)
    start = 0
    for j, c in enumerate(COUNTS):
        torch.testing.assert_close(got[j], gy[start:start + c].t() @ x[start:start + c], rtol=1e-5, atol=1e-5)
        start += c
    assert not got[[0, 2, 6]].any()


def test_unaligned_shapes_fall_back_to_the_loop(kernel):
    """The kernel wants 16-byte aligned rows (bf16: multiples of 8 elements); other shapes take the loop."""
    w, x = torch.randn(len(COUNTS), 12, 30), torch.randn(sum(COUNTS), 30)
    assert torch.equal(grouped_linear(x, w, COUNTS), per_expert(x, w, COUNTS, False)) and not kernel


@pytest.mark.parametrize("in_features", [256, 192])
def test_tuned_quantizer_with_the_kernel(in_features, kernel):
    """SignRound's expert linear (forward through the kernel, weight gradients in one grouped call per few
    experts) against autograd through `qdq` and the kernel: the same output and gradients."""
    from tests.test_quant_autoround import tuned_experts_problem

    ours, ref, x, counts, probe = tuned_experts_problem(in_features)
    (ours.linear(x, counts, torch.float32) * probe).sum().backward()
    before = len(kernel)
    assert before >= 2  # the forward, and the weight gradients in the backward
    (grouped_linear(x, ref.qdq(torch.float32), counts) * probe).sum().backward()
    assert len(kernel) > before
    torch.testing.assert_close(ours.v.grad, ref.v.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(ours.max_scale.grad, ref.max_scale.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(ours.min_scale.grad, ref.min_scale.grad, rtol=1e-3, atol=1e-6)
    assert not ours.v.grad[32 * ours.groups:64 * ours.groups].any()  # expert 1 saw no token


def test_gptq_hessians_with_the_kernel(kernel):
    """Down's Hessians (act(gate)·up of each expert's routed tokens, through the kernel) equal the loop's
    within float32 rounding; gate/up's are the gathered rows themselves, bit for bit."""
    from surgery.quant.gptq_experts import RoutedTokens, expert_hessians
    from tests.test_quant_gptq_batch import routing

    g = torch.Generator().manual_seed(3)
    e, hidden, inter, tokens = 6, 32, 16, 60
    gate_up = torch.randn(e, 2 * inter, hidden, generator=g) / 4
    x = torch.randn(1, tokens, hidden, generator=g)
    idx = torch.stack([torch.randperm(e - 1, generator=g)[:2] for _ in range(tokens)])  # expert 5: no tokens
    batch = routing(x.reshape(tokens, hidden), idx, torch.rand(tokens, 2, generator=g),
                    torch.ones(tokens, dtype=torch.bool), e)
    act = torch.nn.SiLU()
    routed = RoutedTokens([batch], list(range(e)), 1)
    h_in, h_mid = expert_hessians(routed, gate_up, act)
    assert kernel
    kernel_free = grouped_module.use_grouped_mm
    try:
        grouped_module.use_grouped_mm = lambda device, dtype: False
        r_in, r_mid = expert_hessians(RoutedTokens([batch], list(range(e)), 1), gate_up, act)
    finally:
        grouped_module.use_grouped_mm = kernel_free
    assert torch.equal(h_in, r_in)
    np.testing.assert_allclose(h_mid.numpy(), r_mid.numpy(), rtol=1e-5, atol=1e-6)
    assert h_mid.abs().sum() > 0


def test_calibration_with_the_kernel(tiny_checkpoint, monkeypatch, tmp_path, kernel):
    """A calibration whose experts all run through the real kernel: frequencies equal the CPU path's and
    every other statistic within float32 rounding; paged (3 experts a chunk) equals one chunk."""
    from tests.test_paging import calibrate, set_paging

    model_dir = tiny_checkpoint("minimax_m2")
    set_paging(monkeypatch, None, None)
    one, _ = calibrate(model_dir, tmp_path / "one", keep_hidden=False)
    assert kernel
    set_paging(monkeypatch, 3, 40)
    paged, _ = calibrate(model_dir, tmp_path / "paged", keep_hidden=False)
    monkeypatch.setattr(grouped_module, "use_grouped_mm", lambda device, dtype: False)
    monkeypatch.setattr(experts_module, "use_grouped_mm", lambda device, dtype: False)
    set_paging(monkeypatch, None, None)
    cpu, _ = calibrate(model_dir, tmp_path / "cpu", keep_hidden=False)
    for layer, stats in cpu["layers"].items():
        for run in (one, paged):
            assert stats["frequency"] == run["layers"][layer]["frequency"]
            for key in ("weighted_frequency", "ean", "reap", "max_activation"):
                np.testing.assert_allclose(run["layers"][layer][key], stats[key], rtol=1e-5, atol=1e-7, err_msg=key)
