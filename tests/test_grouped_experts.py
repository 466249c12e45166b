"""The grouped expert compute and what it rests on, checked on the CPU where the CUDA code paths can be
forced: the ordered add in rounds (CUDA's deterministic replacement for one `index_add_`) gives the same
bits as the CPU's single call; the grouped branch of `grouped_forward` (one matmul per projection over
a chunk's rows, biases repeated per row, the gate over every row at once) matches the per-expert call;
a calibration with both forced (`use_grouped_mm` and rounds, as on CUDA bf16) is bit-identical paged
and one-chunk and equals the CPU path within float32 rounding; a NaN from an expert is reported
naming it; hidden-state rows written straight to their chunk files read back through zarr as written.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from surgery.executor import experts as experts_module
from surgery.executor import routing as routing_module
from surgery.executor.experts import expert_forward, grouped_forward
from surgery.executor.routing import SortedPairs, segment_max, segment_sum
from tests.oracle import load_model, moe_blocks


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_routing(tokens: int, experts: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return index, torch.rand(tokens, k, generator=g)


@pytest.mark.parametrize("chunks", [[(0, 16)], [(0, 5), (5, 6), (6, 16)], [(j, j + 1) for j in range(16)]])
def test_rounds_add_like_one_index_add(chunks):
    """Adding chunk by chunk in rounds (a token at most once per round) = one sequential index_add_ per
    chunk, bit for bit: each token's contributions in ascending expert order either way."""
    index, weights = random_routing(300, 16, 4, seed=1)
    plain, rounds = SortedPairs(index, weights, 16, rounds=False), SortedPairs(index, weights, 16, rounds=True)
    assert plain.bounds == rounds.bounds and torch.equal(plain.token_of, rounds.token_of)
    values = torch.randn(index.numel(), 24, generator=torch.Generator().manual_seed(2)) * 100
    a, b = torch.zeros(300, 24), torch.zeros(300, 24)
    for lo, hi in chunks:
        start, stop = plain.rows(lo, hi)
        plain.add_into(a, lo, hi, values[start:stop])
        rounds.add_into(b, lo, hi, values[start:stop])
    assert torch.equal(a, b)
    ref = torch.zeros(300, 24)
    for j in range(16):  # expert by expert, as the per-expert loop did
        tok, slot = torch.where(index == j)
        rows = (index.reshape(-1) == j).nonzero().squeeze(1)
        order = torch.argsort(plain.slot_of)  # flat pair -> sorted position
        ref.index_add_(0, tok, values[order[rows]])
    assert torch.equal(a, ref)


def test_segment_reductions_are_per_segment():
    """A segment's sum and max do not depend on what else is in the call (paged = one chunk)."""
    x = torch.randn(500, 7, dtype=torch.float64)
    lengths = torch.tensor([0, 3, 200, 1, 0, 296])
    whole_sum, whole_max = segment_sum(x, lengths), segment_max(x, lengths)
    starts = [0, *torch.cumsum(lengths, 0).tolist()]
    for i in range(len(lengths)):
        part = x[starts[i]:starts[i + 1]]
        one = lengths[i:i + 1]
        assert torch.equal(segment_sum(part, one)[0], whole_sum[i])
        assert torch.equal(segment_max(part, one)[0], whole_max[i])
    assert torch.equal(whole_sum[0], torch.zeros(7)) and torch.isinf(whole_max[0]).all()


@pytest.mark.parametrize("family", ["minimax_m2", "gpt_oss"])
def test_grouped_branch_matches_per_expert(family, tiny_checkpoint, monkeypatch):
    """The grouped branch (what CUDA bf16 runs) on a chunk's rows equals each expert on its own rows,
    within float32 rounding (gpt-oss: transposed weights, biases, its own clamped gate)."""
    from surgery.eval.fidelity import router_of

    block = next(iter(moe_blocks(load_model(tiny_checkpoint(family))).values()))
    experts = block.experts
    params = dict(experts.named_parameters())
    num, hidden = router_of(block).weight.shape
    index, weights = random_routing(40, num, 2, seed=3)
    x = torch.randn(40, hidden)
    pairs = SortedPairs(index, weights, num)
    lo, hi = 1, num - 1
    start, stop = pairs.rows(lo, hi)
    chunk = {k: v[lo:hi].detach() for k, v in params.items()}
    args = (x, pairs.token_of[start:stop], pairs.counts(lo, hi), pairs.lengths[lo:hi])
    with torch.no_grad():
        ref = grouped_forward(experts, chunk, *args)
        monkeypatch.setattr(experts_module, "use_grouped_mm", lambda device, dtype: True)
        got = grouped_forward(experts, chunk, *args)
        for j in range(lo, hi):  # the CPU branch is exactly the per-expert call
            a, b = pairs.rows(j, j + 1)
            one = expert_forward(experts, {k: v[j - lo] for k, v in chunk.items()}, x[pairs.token_of[a:b]])
            assert torch.equal(ref[a - start:b - start], one), j
    assert got.shape == ref.shape == (stop - start, hidden) and ref.abs().max() > 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_nan_from_an_expert_is_named(tiny_checkpoint):
    from surgery.saliency.observer import SaliencyObserver

    model = load_model(tiny_checkpoint("minimax_m2"))
    layer, block = next(iter(moe_blocks(model).items()))
    with torch.no_grad():
        block.experts.down_proj[3].fill_(float("nan"))
    observer = SaliencyObserver(block, block.experts.gate_up_proj.shape[0])
    observer.runner.layer = layer
    x = torch.randn(1, 64, block.gate.weight.shape[1])
    try:
        with pytest.raises(SurgeryError, match=rf"layer {layer}: produced by expert 3"), torch.no_grad():
            block(x)
    finally:
        observer.detach()


def test_cuda_code_paths_forced_on_the_cpu(tiny_checkpoint, monkeypatch, tmp_path):
    """Calibration with the grouped branch and the ordered rounds forced (as CUDA bf16 runs them): paged
    results equal one-chunk results bit for bit (one thread), and the CPU path's within float32 rounding."""
    from tests.test_paging import calibrate, set_paging

    model_dir = tiny_checkpoint("minimax_m2")
    set_paging(monkeypatch, None, None)
    cpu, _ = calibrate(model_dir, tmp_path / "cpu", keep_hidden=False)
    monkeypatch.setattr(experts_module, "use_grouped_mm", lambda device, dtype: True)
    real = routing_module.SortedPairs.__init__
    monkeypatch.setattr(routing_module.SortedPairs, "__init__",
                        lambda self, index, weights, num, rounds=None: real(self, index, weights, num, True))
    one, _ = calibrate(model_dir, tmp_path / "one", keep_hidden=False)
    set_paging(monkeypatch, 3, 40)
    paged, _ = calibrate(model_dir, tmp_path / "paged", keep_hidden=False)
    assert paged["layers"] == one["layers"]
    for layer, stats in cpu["layers"].items():
        assert stats["frequency"] == one["layers"][layer]["frequency"]
        for key in ("weighted_frequency", "ean", "reap", "max_activation"):
            np.testing.assert_allclose(one["layers"][layer][key], stats[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_direct_chunk_writes_read_back(dtype, tmp_path):
    """Rows written to their chunk files (padded to the full length) read back through zarr exactly, and
    the files hold the bytes zarr itself writes."""
    from surgery.executor import cache as cache_module
    from surgery.executor.cache import HiddenCache

    cache = HiddenCache(tmp_path / "c.zarr")
    z = cache.create_hidden(1, 5, 9, 16, dtype, 1)
    assert cache_module._chunk_path(z, 3) is not None
    rows = torch.randn(2, 6, 16).to(dtype)
    HiddenCache.write_rows(z, 2, rows)
    back = HiddenCache.read_rows(cache.hidden(1), 0, 5)
    assert torch.equal(back[2:4, :6], rows) and not back[2:4, 6:].any() and not back[[0, 1, 4]].any()
    other = HiddenCache(tmp_path / "z.zarr")
    zz = other.create_hidden(1, 5, 9, 16, dtype, 1)
    data = torch.nn.functional.pad(rows, (0, 0, 0, 3))
    data = (data.view(torch.int16).numpy().view(np.uint16) if dtype == torch.bfloat16 else data.numpy())
    zz[2:4] = data  # zarr's own write
    for row in (2, 3):
        assert cache_module._chunk_path(z, row).read_bytes() == cache_module._chunk_path(zz, row).read_bytes()
