"""Batched GPTQ (`surgery.quant.gptq_batch`, `gptq_experts`) against the per-weight form (`gptq.py`), bit
for bit on CPU float32: levels and scales identical on random weights and Hessians (many weights,
uneven token counts, dead inputs, a partial last group, rows of several linears quantized as one) and
on the trained fixture's experts with Hessians of their real routed tokens (gathered and accumulated as
the pass does, compared with the per-expert concatenation and `Hessian`); a Hessian that does not
factorise gives RTN for that weight alone; packing and decoding equal `pack` and `dequantize_w4a16`;
the writer thread re-raises a write error and leaves no file."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.checkpoint.writer import TensorEntry
from surgery.errors import SurgeryError
from surgery.executor.experts import BatchRouting
from surgery.executor.routing import SortedPairs
from surgery.quant.gptq import Hessian, gptq_quantize, inverse_cholesky
from surgery.quant.gptq_batch import inverse_cholesky_batch, quantize_batch, rtn_batch
from surgery.quant.gptq_experts import RoutedTokens, expert_hessians
from surgery.quant.gptq_writer import LayerWriter
from surgery.quant.pack import decode_batch, pack, pack_batch
from surgery.quant.rtn import rtn_quantize


def random_problem(n: int, out_f: int, in_f: int, seed: int):
    """n weights with Hessians of correlated random inputs, uneven token counts, some dead inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, out_f, in_f, generator=g) / math.sqrt(in_f)
    hs = []
    for k in range(n):
        tokens = 50 + 97 * k
        x = torch.randn(tokens, in_f, generator=g) @ (torch.eye(in_f) + 0.2 * torch.randn(in_f, in_f, generator=g))
        x[:, (3 * k) % in_f] = 0  # a dead input per weight, a different one each
        if k % 3 == 0:
            x[:, -1] = 0
        h = Hessian(in_f)
        for part in x.split(61):
            h.add(part)
        hs.append(h.value())
    return w, torch.stack(hs)


def same_as_per_weight(w: torch.Tensor, h: torch.Tensor, group: int) -> None:
    got = quantize_batch(w, h.clone(), group)
    assert not got.failed.any()
    for k in range(w.shape[0]):
        q, s = gptq_quantize(w[k], h[k], group)
        assert torch.equal(got.levels[k].t(), q), k
        assert torch.equal(got.scales[k], s), k


@pytest.mark.parametrize("n,out_f,in_f,group", [(9, 64, 320, 128), (7, 96, 192, 128), (5, 32, 96, 128),
                                                (6, 48, 256, 64)])
def test_batched_equals_per_weight_gptq(n, out_f, in_f, group):
    w, h = random_problem(n, out_f, in_f, seed=n)
    same_as_per_weight(w, h, group)
    # a sub-batch of the same weights gives the same bits (what paged == one chunk rests on)
    part = quantize_batch(w[2:4], h[2:4].clone(), group)
    whole = quantize_batch(w, h.clone(), group)
    assert torch.equal(part.levels, whole.levels[2:4]) and torch.equal(part.scales, whole.scales[2:4])


@pytest.mark.parametrize("in_f", [192, 640])
def test_batched_inverse_factors_equal_per_weight(in_f):
    """Dead inputs, dampening and the three factorisations: the same bits as `inverse_cholesky`."""
    w, h = random_problem(6, 16, in_f, seed=in_f)
    wb = w.clone()
    u, failed = inverse_cholesky_batch(h.clone(), wb)
    assert not failed.any()
    for k in range(6):
        wk = w[k].clone()
        assert torch.equal(u[k], inverse_cholesky(h[k], wk)) and torch.equal(wb[k], wk), k


def test_rows_of_linears_sharing_an_input_quantize_as_one_weight():
    """q/k/v (or a shared expert's gate/up) as the rows of one weight: each part equals its own GPTQ."""
    w, h = random_problem(3, 64, 192, seed=3)
    qkv = torch.cat([w[0], w[1, :32], w[2]])[None]
    got = quantize_batch(qkv, h[:1].clone(), 128)
    at = 0
    for part in (w[0], w[1, :32], w[2]):
        q, s = gptq_quantize(part, h[0], 128)
        rows = slice(at, at + part.shape[0])
        assert torch.equal(got.levels[0][:, rows].t(), q) and torch.equal(got.scales[0][rows], s)
        at += part.shape[0]


def test_a_hessian_that_does_not_factorise_takes_rtn_alone():
    w, h = random_problem(4, 64, 192, seed=11)
    h[2] = -torch.eye(192)  # no dead input, dampening cannot make it positive definite
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_quantize(w[2], h[2], 128)  # the per-weight form stops
    got = quantize_batch(w, h.clone(), 128)
    assert got.failed.tolist() == [False, False, True, False]
    q, s = rtn_quantize(w[2], 128)
    assert torch.equal(got.levels[2].t(), q) and torch.equal(got.scales[2], s)
    for k in (0, 1, 3):
        q, s = gptq_quantize(w[k], h[k], 128)
        assert torch.equal(got.levels[k].t(), q) and torch.equal(got.scales[k], s)


@pytest.mark.parametrize("fail", [False, True])
def test_accelerator_branches_give_the_same_bits(fail, monkeypatch):
    """The branches a GPU takes (no host read-back: dead inputs masked and RTN computed for every weight,
    then selected on the device; the batch whole, not in threaded parts), taken on the CPU: the same
    levels, scales and failures as the host's branches."""
    import surgery.quant.gptq_batch as gptq_batch

    w, h = random_problem(5, 64, 192, seed=13)
    if fail:
        h[3] = -torch.eye(192)
    host = quantize_batch(w, h.clone(), 128)
    u_host, f_host = inverse_cholesky_batch(h.clone(), w.clone())
    monkeypatch.setattr(gptq_batch, "host_side", lambda device: False)
    device = quantize_batch(w, h.clone(), 128)
    u_dev, f_dev = inverse_cholesky_batch(h.clone(), w.clone())
    assert torch.equal(device.levels, host.levels) and torch.equal(device.scales, host.scales)
    assert device.failed.tolist() == host.failed.tolist() == [False, False, False, fail, False]
    assert torch.equal(u_dev, u_host) and torch.equal(f_dev, f_host)


def test_pack_and_decode_batch_equal_the_per_weight_format():
    w, h = random_problem(3, 64, 192, seed=5)
    got = quantize_batch(w, h.clone(), 128)
    qweight, scales = pack_batch(got.levels, got.scales)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(3, 64, 192, dtype=dtype)
        decode_batch(got.levels, got.scales, 128, out)
        for k in range(3):
            ref = pack(got.levels[k].t().contiguous(), got.scales[k])
            assert torch.equal(qweight[k], ref["qweight"]) and torch.equal(scales[k], ref["scales"])
            assert torch.equal(out[k], dequantize_w4a16(ref["qweight"], ref["qzeros"], ref["scales"], 128, dtype))
    rq, rs = rtn_batch(w, 128)
    for k in range(3):
        q, s = rtn_quantize(w[k], 128)
        assert torch.equal(rq[k].t(), q) and torch.equal(rs[k], s)


# ------------------------------------------------------------------------------------- real experts
def routing(x: torch.Tensor, top_k_index: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor,
            experts: int) -> BatchRouting:
    """A BatchRouting as the engine's `RoutedExperts` builds it (pairs sorted by expert)."""
    return BatchRouting(x, valid, SortedPairs(top_k_index, weights, experts), torch.zeros_like(x))


@pytest.fixture(scope="module")
def captured_layer(shared_fixtures):
    """Layer 1 of the trained MiniMax-M2 fixture: its experts and the MoE inputs and routing of real code
    (three batches, right-padded, one input forced dead)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = shared_fixtures / "tinymoe-m2"
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    docs = [json.loads(line)["text"] for line in (shared_fixtures / "text" / "code.calib.jsonl").open()][:12]
    experts = model.model.layers[1].mlp.experts
    seen = []

    def capture(hidden, top_k_index, top_k_weights):
        seen.append((hidden.clone(), top_k_index.clone(), top_k_weights.clone()))
        raise StopIteration

    experts.forward = capture
    batches = []
    for part in (docs[:4], docs[4:8], docs[8:]):
        enc = tok(part, return_tensors="pt", padding=True, truncation=True, max_length=96)
        with torch.no_grad(), pytest.raises(StopIteration):
            model(**enc)
        hidden, idx, wts = seen.pop()
        hidden[:, 7] = 0  # a dead input for every expert's gate/up Hessian
        batches.append(routing(hidden, idx, wts, enc["attention_mask"].reshape(-1).bool(), experts.num_experts))
    del experts.forward
    return experts, batches


def per_expert_hessians(experts, batches, j: int):
    """The per-expert form: the expert's valid routed tokens concatenated over batches, `Hessian`."""
    x = torch.cat([b.x[b.routed(j)[0]][b.valid[b.routed(j)[0]]] for b in batches])
    h_in, h_mid = Hessian(x.shape[-1]), None
    if x.shape[0]:
        h_in.add(x)
        gate, up = F.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
        mid = experts.act_fn(gate) * up
        h_mid = Hessian(mid.shape[-1])
        h_mid.add(mid)
    return h_in, h_mid


def test_real_experts_batched_equal_per_expert(captured_layer):
    experts, batches = captured_layer
    ids = list(range(experts.num_experts))
    counts = [sum(int(b.valid[b.routed(j)[0]].sum()) for b in batches) for j in ids]
    minimum = sorted(counts)[4] + 1  # a few experts take RTN
    tokens = RoutedTokens(batches, ids, minimum)
    assert tokens.counts == counts and len(set(counts)) > 5  # uneven
    assert tokens.chosen == [j for j in ids if counts[j] >= minimum] and 0 < len(tokens.chosen) < len(ids)
    sel = torch.tensor(tokens.chosen)
    h_in, h_mid = expert_hessians(tokens, experts.gate_up_proj.data, experts.act_fn)
    inter = experts.down_proj.shape[-1]
    gate_up = quantize_batch(experts.gate_up_proj.data, h_in.clone(), 128, index=sel)
    down = quantize_batch(experts.down_proj.data[sel], h_mid.clone(), 128)
    for k, j in enumerate(tokens.chosen):
        ref_in, ref_mid = per_expert_hessians(experts, batches, j)
        assert torch.equal(h_in[k], ref_in.value()) and torch.equal(h_mid[k], ref_mid.value()), j
        for rows, w in ((slice(0, inter), experts.gate_up_proj[j, :inter]),
                        (slice(inter, 2 * inter), experts.gate_up_proj[j, inter:])):
            q, s = gptq_quantize(w.data, ref_in.value(), 128)  # gate and up, each on its own
            assert torch.equal(gate_up.levels[k][:, rows].t(), q) and torch.equal(gate_up.scales[k][rows], s)
        q, s = gptq_quantize(experts.down_proj[j].data, ref_mid.value(), 128)
        assert torch.equal(down.levels[k].t(), q) and torch.equal(down.scales[k], s)
    # a chunk of the same experts gathers the same tokens and Hessians (paged == one chunk)
    part = RoutedTokens(batches, ids[8:20], minimum)
    assert part.counts == counts[8:20]
    p_in, p_mid = expert_hessians(part, experts.gate_up_proj.data[8:20], experts.act_fn)
    at = [tokens.chosen.index(8 + k) for k in part.chosen]
    assert torch.equal(p_in, h_in[at]) and torch.equal(p_mid, h_mid[at])


# ------------------------------------------------------------------------------------- writer thread
def test_layer_writer_reraises_and_leaves_no_file(tmp_path):
    t = torch.arange(4, dtype=torch.int32)
    path = tmp_path / "layer.safetensors"
    ok = LayerWriter(path, [TensorEntry("a", "I32", (4,)), TensorEntry("b", "I32", (4,))])
    ok.put([("a", t)])
    ok.put([("b", t)])
    ok.close()
    assert path.is_file()
    bad = LayerWriter(tmp_path / "bad.safetensors", [TensorEntry("a", "I32", (4,))])
    bad.put([("zz", t)])  # out of order: the thread's error comes back to the producer
    with pytest.raises(SurgeryError, match="zz"):
        bad.close()
    assert not list(tmp_path.glob("bad*"))
