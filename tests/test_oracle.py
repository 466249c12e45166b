"""The oracle itself: its routing is the model's, its statistics count real tokens only, pruning in
memory slices consistently, and FP8 dequantization is right. The executor is judged against it, so
it must be judged against the model first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.synth import FAMILIES
from tests.oracle import (
    STATS,
    dequantize_checkpoint,
    load_model,
    make_batch,
    moe_blocks,
    oracle_saliency,
    prune_in_memory,
    route,
    routed_output,
    router_of,
)

LENGTHS = [13, 4, 9, 13, 1]


def vocab_of(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def arch_facts(model_dir: Path) -> MoEModel:
    return MoEModel(Checkpoint(model_dir))


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint):
    """One float32 model per family, loaded once; tests that modify a model load their own."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = load_model(tiny_checkpoint(family))
        return cache[family]

    return get


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


# ---------------------------------------------------------------------------------------------- batches
def test_make_batch_is_right_padded() -> None:
    ids, mask = make_batch(50, [3, 7, 1], seed=4)
    assert ids.shape == mask.shape == (3, 7) and ids.dtype == torch.long
    assert mask.sum(dim=1).tolist() == [3, 7, 1]
    for row, n in enumerate([3, 7, 1]):
        assert mask[row, :n].all() and not mask[row, n:].any()
        assert (ids[row, n:] == 0).all() and (ids[row, :n] >= 1).all() and (ids[row, :n] < 50).all()
    again, _ = make_batch(50, [3, 7, 1], seed=4)
    other, _ = make_batch(50, [3, 7, 1], seed=5)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_routed_output_is_the_models(family: str, tiny_checkpoint, loaded) -> None:
    """Σ_j g_j·out_j, recomputed with the block's router and the fused expert weights, equals what
    the block's experts module returns inside the model's own forward, for every MoE layer."""
    model_dir = tiny_checkpoint(family)
    model = loaded(family)
    blocks = moe_blocks(model)
    assert sorted(blocks) == arch_facts(model_dir).moe_layers
    inputs, outputs = {}, {}
    handles = []
    for i, block in blocks.items():
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])))
        handles.append(block.experts.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o)))
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
            for i, block in blocks.items():
                x = inputs[i].reshape(-1, inputs[i].shape[-1])
                mine = routed_output(block, x)
                theirs = outputs[i].reshape(mine.shape).double()
                assert theirs.abs().max() > 0.1
                torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_stats_count_every_real_token_top_k_times(family: str, tiny_checkpoint, loaded) -> None:
    model_dir = tiny_checkpoint(family)
    facts = arch_facts(model_dir)
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=1)
    n = int(mask.sum())
    for routing in ("model", "reference"):
        stats, hidden = oracle_saliency(loaded(family), ids, mask, routing=routing)
        assert sorted(stats) == facts.moe_layers
        assert len(hidden) == facts.num_layers + 1
        for layer, s in stats.items():
            assert set(s) == set(STATS)
            assert all(v.dtype == np.float64 and v.shape == (facts.num_experts,) for v in s.values())
            assert s["frequency"].sum() == facts.top_k * n, (routing, layer)
            routing_facts = facts.routing_facts()
            if routing == "reference":
                expected_weight = n  # renormalised over the chosen k
            elif routing_facts["renormalize"]:
                expected_weight = n * routing_facts["routed_scaling_factor"]
            else:
                expected_weight = None
            if expected_weight is not None:
                assert s["weighted_frequency"].sum() == pytest.approx(expected_weight, rel=1e-6)
            seen = s["frequency"] > 0
            assert (s["reap"][~seen] == 0).all() and (s["ean"][~seen] == 0).all()
            assert (s["max_activation"][~seen] == 0).all()
            assert (s["ean"][seen] > 0).all() and (s["reap"][seen] > 0).all()
            # reap is a mean of g·‖out‖ over the expert's tokens, each g at most the largest routing weight
            assert (s["reap"] * s["frequency"] <= s["ean"] * max(1.0, routing_facts["routed_scaling_factor"])
                    + 1e-9).all()


def brute_force_stats(block: torch.nn.Module, x: torch.Tensor, routing: str) -> dict[str, np.ndarray]:
    """The statistics' definitions, token by token, with each expert's output from the model's own
    experts module (one-hot routing, weight 1) rather than the oracle's recomputation."""
    e = block.experts.num_experts
    freq, wf, ean, rs = (np.zeros(e) for _ in range(4))
    peak = np.full(e, -np.inf)
    with torch.no_grad():
        # MiniMax-M2 keeps its correction bias on the block and hands it to the router
        bias = (block.e_score_correction_bias,) if hasattr(block, "e_score_correction_bias") else ()
        logits, weights, index = router_of(block)(x, *bias)
        if routing == "reference":
            k = router_of(block).top_k
            index = logits.argsort(dim=-1, descending=True)[:, :k]
            probs = torch.softmax(logits.double(), dim=-1).gather(1, index)
            weights = probs / probs.sum(dim=-1, keepdim=True)
        for t in range(x.shape[0]):
            for p in range(index.shape[1]):
                j, g = int(index[t, p]), float(weights[t, p])
                out = block.experts(x[t:t + 1], torch.tensor([[j]]), torch.ones(1, 1, dtype=x.dtype))[0].double()
                norm = float(out.norm())
                freq[j] += 1
                wf[j] += g
                ean[j] += norm
                rs[j] += g * norm
                peak[j] = max(peak[j], float(out.max()))
    reap = np.divide(rs, freq, out=np.zeros(e), where=freq > 0)
    return {"frequency": freq, "weighted_frequency": wf, "ean": ean, "reap": reap,
            "max_activation": np.where(freq > 0, peak, 0.0)}


@pytest.mark.parametrize("routing", ["model", "reference"])
@pytest.mark.parametrize("family", FAMILIES)
def test_stats_match_their_definitions(family: str, routing: str, tiny_checkpoint, loaded) -> None:
    model_dir = tiny_checkpoint(family)
    model = loaded(family)
    ids, mask = make_batch(vocab_of(model_dir), [9, 4, 6], seed=8)
    inputs = {}
    blocks = moe_blocks(model)
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in blocks.items()]
    try:
        stats, _ = oracle_saliency(model, ids, mask, routing=routing)
    finally:
        for h in handles:
            h.remove()
    for i, block in blocks.items():
        x = inputs[i].reshape(-1, inputs[i].shape[-1])[mask.reshape(-1).bool()]
        want = brute_force_stats(block, x, routing)
        np.testing.assert_array_equal(stats[i]["frequency"], want["frequency"])
        for key in STATS:
            np.testing.assert_allclose(stats[i][key], want[key], rtol=1e-5, atol=1e-7, err_msg=f"{i} {key}")


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_excluded(family: str, tiny_checkpoint, loaded) -> None:
    model_dir = tiny_checkpoint(family)
    model = loaded(family)
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=2)
    other = ids.clone()
    pads = mask == 0
    other[pads] = torch.randint(1, vocab_of(model_dir), (int(pads.sum()),), generator=torch.Generator().manual_seed(9))
    a, _ = oracle_saliency(model, ids, mask)
    b, _ = oracle_saliency(model, other, mask)
    for layer in a:
        for key in STATS:
            np.testing.assert_allclose(a[layer][key], b[layer][key], rtol=1e-6, atol=1e-9, err_msg=f"{layer} {key}")
    # the same change does show when the pad positions are counted as real
    full = torch.ones_like(mask)
    a_all, _ = oracle_saliency(model, ids, full)
    b_all, _ = oracle_saliency(model, other, full)
    assert any(not np.allclose(a_all[layer]["ean"], b_all[layer]["ean"]) for layer in a_all)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_adds_up_its_sequences(family: str, tiny_checkpoint, loaded) -> None:
    """Stats of a padded batch of unequal lengths = the sums of each sequence's stats run alone."""
    model_dir = tiny_checkpoint(family)
    model = loaded(family)
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=3)
    batch, hidden = oracle_saliency(model, ids, mask)
    parts = []
    for row, n in enumerate(LENGTHS):
        one, one_hidden = oracle_saliency(model, ids[row:row + 1, :n], mask[row:row + 1, :n])
        parts.append(one)
        torch.testing.assert_close(one_hidden[-1][0], hidden[-1][row, :n], rtol=1e-4, atol=1e-4)
    for layer in batch:
        freq = sum(p[layer]["frequency"] for p in parts)
        np.testing.assert_array_equal(batch[layer]["frequency"], freq)
        for key in ("weighted_frequency", "ean"):
            np.testing.assert_allclose(batch[layer][key], sum(p[layer][key] for p in parts), rtol=1e-5)
        reap_sum = sum(p[layer]["reap"] * p[layer]["frequency"] for p in parts)
        np.testing.assert_allclose(batch[layer]["reap"] * freq, reap_sum, rtol=1e-5)
        peaks = np.max([np.where(p[layer]["frequency"] > 0, p[layer]["max_activation"], -np.inf)
                        for p in parts], axis=0)
        np.testing.assert_allclose(batch[layer]["max_activation"], np.where(freq > 0, peaks, 0.0), rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_reference_equals_model_for_renormalised_softmax(family: str, tiny_checkpoint, loaded) -> None:
    """Softmax then top-k then renormalise is the reference rule exactly, so the stats agree."""
    ids, mask = make_batch(256, LENGTHS, seed=4)
    ref, _ = oracle_saliency(loaded(family), ids, mask, routing="reference")
    mod, _ = oracle_saliency(loaded(family), ids, mask, routing="model")
    for layer in ref:
        np.testing.assert_array_equal(ref[layer]["frequency"], mod[layer]["frequency"])
        for key in STATS:
            np.testing.assert_allclose(ref[layer][key], mod[layer][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["minimax_m2", "deepseek_v3"])
def test_reference_ignores_bias_and_groups(family: str, tiny_checkpoint) -> None:
    """A huge correction bias on expert 5 makes the model pick it for every token; the reference
    rule (raw logits, no bias, no groups) does not, and its choices cross groups."""
    model = load_model(tiny_checkpoint(family))
    blocks = moe_blocks(model)
    ids, mask = make_batch(256, LENGTHS, seed=5)
    n = int(mask.sum())
    for block in blocks.values():
        owner = block.gate if hasattr(block.gate, "e_score_correction_bias") else block
        owner.e_score_correction_bias[5] = 100.0
    mod, _ = oracle_saliency(model, ids, mask, routing="model")
    ref, _ = oracle_saliency(model, ids, mask, routing="reference")
    for layer in blocks:
        assert mod[layer]["frequency"][5] == n
        assert ref[layer]["frequency"][5] < n
    groups = getattr(model.config, "n_group", 1) or 1
    if groups > 1:
        block = next(iter(blocks.values()))
        x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        size = block.experts.num_experts // groups
        with torch.no_grad():
            model_choice, _ = route(block, x, "model")
            ref_choice, _ = route(block, x, "reference")
        assert (model_choice // size == (model_choice // size)[:, :1]).all()  # topk_group=1: one group
        assert (ref_choice // size != (ref_choice // size)[:, :1]).any()
        with torch.no_grad():
            logits = router_of(block)(x)[0]
        assert torch.equal(ref_choice.sort(dim=1).values, logits.topk(ref_choice.shape[1]).indices.sort(dim=1).values)


def test_unknown_routing_is_refused(tiny_checkpoint, loaded) -> None:
    ids, mask = make_batch(256, [3], seed=0)
    with pytest.raises(ValueError, match="routing"):
        oracle_saliency(loaded("mixtral"), ids, mask, routing="sigmoid")


# ---------------------------------------------------------------------------------------------- pruning
def keep_lists(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """(a permutation of all experts within each group, a subset keeping equal counts per group)."""
    e = next(iter(moe_blocks(model).values())).experts.num_experts
    groups = getattr(model.config, "n_group", 1) or 1
    size = e // groups
    perm, subset = [], []
    for g in range(groups):
        members = list(range(g * size, (g + 1) * size))
        perm += members[1:] + members[:1]  # rotated within the group: no expert stays in place
        subset += members[:1] + members[2:]
    return perm, subset


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_in_memory(family: str, tiny_checkpoint) -> None:
    model_dir = tiny_checkpoint(family)
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=6)
    model = load_model(model_dir)
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).logits
    perm, subset = keep_lists(model)
    layers = sorted(moe_blocks(model))
    before = {i: {n: t.clone() for n, t in b.state_dict().items()} for i, b in moe_blocks(model).items()}

    prune_in_memory(model, dict.fromkeys(layers, list(range(len(perm)))))
    with torch.no_grad():
        same = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(same, base)

    prune_in_memory(model, dict.fromkeys(layers, perm))
    for i, block in moe_blocks(model).items():
        for name, t in block.state_dict().items():
            if "shared" in name:
                assert torch.equal(t, before[i][name])
            elif t.ndim == 2 and t.shape[0] == 1:  # ERNIE's [1, E] correction bias
                assert torch.equal(t, before[i][name][:, perm]), name
            else:  # every routed-expert tensor (weights, router rows, biases) follows the permutation
                assert torch.equal(t, before[i][name][perm]), name
    with torch.no_grad():
        permuted = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-5)

    pruned = prune_in_memory(load_model(model_dir), dict.fromkeys(layers, subset))
    with torch.no_grad():
        changed = pruned(input_ids=ids, attention_mask=mask).logits
    assert (changed - base).abs().max() > 1e-2
    for block in moe_blocks(pruned).values():
        assert block.experts.num_experts == router_of(block).num_experts == len(subset)
        assert router_of(block).weight.shape[0] == block.experts.gate_up_proj.shape[0] == len(subset)
    assert getattr(pruned.config, arch_facts(model_dir).experts_key) == len(subset)
    stats, _ = oracle_saliency(pruned, ids, mask)
    assert all(s["frequency"].shape == (len(subset),) for s in stats.values())
    assert all(s["frequency"].sum() == arch_facts(model_dir).top_k * int(mask.sum()) for s in stats.values())


def test_prune_refuses_bad_keep(loaded) -> None:
    model = loaded("mixtral")
    with pytest.raises(ValueError):
        prune_in_memory(model, {0: [0, 0, 1]})
    with pytest.raises(ValueError):
        prune_in_memory(model, {0: [0, 8]})


# ---------------------------------------------------------------------------------------------- FP8
def test_dequantize_exact_blocks(tmp_path: Path) -> None:
    """A 5 x 7 fp8 weight with 2 x 3 blocks (partial at both edges) and power-of-two scales: exact."""
    src = tmp_path / "src"
    src.mkdir()
    w = torch.arange(35, dtype=torch.float32).reshape(5, 7) % 9 - 4  # small integers: exact in e4m3
    scale = torch.tensor([[1.0, 2.0, 4.0], [0.5, 8.0, 0.25], [16.0, 0.125, 32.0]])
    save_file({"a.weight": w.to(torch.float8_e4m3fn), "a.weight_scale_inv": scale,
               "norm.weight": torch.ones(7, dtype=torch.bfloat16)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8",
                                                                         "weight_block_size": [2, 3]}}))
    dst = dequantize_checkpoint(src, tmp_path / "dst")
    got = tensors_of(dst)
    assert set(got) == {"a.weight", "norm.weight"}
    assert got["a.weight"].dtype == torch.float32  # exact products, no second rounding
    want = torch.empty(5, 7)
    for r in range(5):
        for c in range(7):
            want[r, c] = w[r, c] * scale[r // 2, c // 3]
    assert torch.equal(got["a.weight"].float(), want)
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())


def fp8_error_bound(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Largest |dequantized - original| FP8 e4m3 block quantization allows: half an e4m3 ulp (2^-4
    relative) for normals, 2^-10 of the block scale below them; slack for the source's own bf16."""
    rows, cols = w.shape
    s = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return w.abs() * (2.0**-4 + 2.0**-7) + s * 2.0**-9


def test_dequantized_tiny_fp8_is_within_fp8_error(tiny_checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("minimax_m2")
    fp8 = tiny_checkpoint("minimax_m2", fp8=True)
    block = tuple(json.loads((fp8 / "config.json").read_text())["quantization_config"]["weight_block_size"])
    original, quantized = tensors_of(src), tensors_of(fp8)
    dense = tensors_of(dequantize_checkpoint(fp8, tmp_path / "dq"))
    assert set(dense) == set(original)
    n_quantized = 0
    for name, t in dense.items():
        if name + "_scale_inv" in quantized:
            n_quantized += 1
            assert t.dtype == torch.float32
            err = (t.float() - original[name].float()).abs()
            bound = fp8_error_bound(original[name].float(), quantized[name + "_scale_inv"], block)
            assert (err <= bound).all(), name
            assert err.max() > 0  # it really went through fp8
        else:
            assert torch.equal(t, original[name]), name
    assert n_quantized > 0 and any(
        t.shape[0] % block[0] or t.shape[1] % block[1] for n, t in original.items() if n + "_scale_inv" in quantized)
    # load_model dequantizes the same way: its fused expert weights are these tensors
    experts = moe_blocks(load_model(fp8))[1].experts
    prefix = "model.layers.1.block_sparse_moe.experts.6."
    fused = torch.cat([dense[prefix + "w1.weight"], dense[prefix + "w3.weight"]])
    assert torch.equal(experts.gate_up_proj[6], fused)
    assert torch.equal(experts.down_proj[6], dense[prefix + "w2.weight"])


def test_shared_fp8_fixture_dequantizes_to_the_bf16_model(shared_fixtures, tmp_path: Path) -> None:
    bf16 = tensors_of(shared_fixtures / "tinymoe-m2")
    fp8_dir = shared_fixtures / "tinymoe-m2-fp8"
    quantized = tensors_of(fp8_dir)
    dense = tensors_of(dq := dequantize_checkpoint(fp8_dir, tmp_path / "dq"))
    assert set(dense) == set(bf16)
    checked = 0
    for name, t in dense.items():
        if name + "_scale_inv" in quantized:
            err = (t.float() - bf16[name].float()).abs()
            assert (err <= fp8_error_bound(bf16[name].float(), quantized[name + "_scale_inv"], (128, 128))).all()
            checked += 1
    assert checked > 6 * 32 * 3
    # and the dequantized model is the trained one: next-token loss on held-out code matches the bf16 model's
    # (load_model's own FP8 path is the tiny test's; here the checkpoint dequantized above is loaded)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shared_fixtures / "tinymoe-m2")
    lines = (shared_fixtures / "text" / "code.eval.jsonl").read_text().splitlines()[:8]
    text = "".join(json.loads(line)["text"] for line in lines)
    ids = torch.tensor([tok(text)["input_ids"][:512]]).reshape(2, 256)
    losses = []
    for directory in (shared_fixtures / "tinymoe-m2", dq):
        with torch.no_grad():
            losses.append(float(load_model(directory)(input_ids=ids, labels=ids).loss))
    assert losses[0] < 5.0  # trained, not random (ln 8192 = 9.0)
    assert math.isclose(losses[0], losses[1], abs_tol=0.03), losses
