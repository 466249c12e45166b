"""GPTQ through the layer engine (one layer resident, routed experts streamed, hidden states in a tier)
against an in-memory sequential GPTQ written here: the whole tiny model loaded by transformers; per
layer, the attention linears' inputs captured from the model's own forward (earlier layers already
replaced by their quantized weights) and quantized, then each expert's routed tokens captured from a
second forward with that attention quantized, with plain loops; Hessians in float64 and the plain
column-by-column GPTQ of tests/test_quant_gptq.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.quant.driver import calibrate_gptq, layer_file
from surgery.quant.targets import find_targets
from tests.oracle import make_batch
from tests.test_quant_gptq import reference_gptq

GROUP = 128


def in_memory_gptq(src, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    valid = mask.reshape(-1).bool()
    cfg = model.config
    results = {}
    for li, layer in enumerate(model.model.layers):
        attn = {n: getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        seen: dict[str, list] = {n: [] for n in attn}

        def grab(mod, a, n, seen=seen):
            seen[n].append(a[0].reshape(-1, a[0].shape[-1]))

        experts = layer.mlp.experts
        routed = {j: [] for j in range(cfg.num_local_experts)}
        record = {"on": False}

        def plain(hidden, top_k_index, top_k_weights, experts=experts, routed=routed, record=record):
            out = torch.zeros_like(hidden)
            for tok in range(hidden.shape[0]):
                for slot in range(top_k_index.shape[1]):
                    j = int(top_k_index[tok, slot])
                    x = hidden[tok]
                    g, u = (experts.gate_up_proj[j] @ x).chunk(2)
                    mid = experts.act_fn(g) * u
                    out[tok] += top_k_weights[tok, slot] * (experts.down_proj[j] @ mid)
                    if valid[tok] and record["on"]:
                        routed[j].append((x, mid))
            return out

        experts.forward = plain
        # 1. attention inputs under this layer's original weights (earlier layers already quantized)
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: grab(mod, a, n)) for n, m in attn.items()]
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for h in hooks:
            h.remove()

        def hess(rows: list[torch.Tensor]) -> torch.Tensor:
            x = torch.stack(rows).double() if rows[0].ndim == 1 else torch.cat(rows).double()
            return 2 / x.shape[0] * x.t() @ x

        prefix = f"model.layers.{li}."
        for n, lin in attn.items():
            x = torch.cat(seen[n])[valid]
            q, s = reference_gptq(lin.weight.data, hess([x]), GROUP)
            results[f"{prefix}self_attn.{n}.weight"] = (q, s)
            lin.weight.data = dequant(q, s)
        # 2. each expert's routed tokens once this layer's attention is quantized
        record["on"] = True
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        del experts.forward
        inter = experts.down_proj.shape[-1]
        for j, pairs in routed.items():
            h_in, h_mid = hess([x for x, _ in pairs]), hess([m for _, m in pairs])
            base = f"{prefix}block_sparse_moe.experts.{j}."
            parts = (("w1", experts.gate_up_proj[j, :inter], h_in), ("w3", experts.gate_up_proj[j, inter:], h_in),
                     ("w2", experts.down_proj[j], h_mid))
            for role, w, h in parts:
                q, s = reference_gptq(w.data, h, GROUP)
                results[base + role + ".weight"] = (q, s)
                w.data.copy_(dequant(q, s))
    return results


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    block = GROUP if q.shape[1] > GROUP else q.shape[1]
    return ((q.double() - 8) * s.double().repeat_interleave(block, dim=1)[:, :q.shape[1]]).float()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from surgery.synth import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("gptq") / "m", "minimax_m2", hidden_size=160, intermediate_size=64,
                           num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, head_dim=32, rotary_dim=32)


def test_streaming_gptq_equals_in_memory_sequential_gptq(tiny, tmp_path):
    ids, mask = make_batch(256, [40, 33, 40, 21, 38], seed=5)
    ref = in_memory_gptq(tiny, ids, mask)
    work = tmp_path / "work"
    with Checkpoint(tiny) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, partial_groups="pad")  # hidden 160: the in-memory GPTQ pads, as AutoRound
        fallback = calibrate_gptq(model, targets, work, {"t": 1}, ids.numpy(), mask.numpy().astype(np.uint8),
                                  group_size=GROUP, batch_size=2, device=torch.device("cpu"), dtype=torch.float32,
                                  progress=False, min_tokens=1)
        assert fallback == 0
        from safetensors.torch import load_file

        assert set(ref) == set(targets.targets)
        worst = 0.0
        for layer in (0, 1):
            got = load_file(layer_file(work, layer))
            for name, t in targets.targets.items():
                if t.layer != layer:
                    continue
                base = name.removesuffix(".weight")
                w = dequantize_w4a16(got[base + ".qweight"], got[base + ".qzeros"], got[base + ".scales"], GROUP)
                rq, rs = ref[name]
                assert torch.equal(got[base + ".scales"].t().float(), rs.float()) or \
                    (got[base + ".scales"].t().float() - rs.float()).abs().max() < 1e-3, name
                mismatch = (w != dequant(rq, rs)).float().mean()
                assert mismatch < 0.01, f"{name}: {mismatch:.4f} of weights differ"
                worst = max(worst, float(mismatch))
        print(f"largest fraction of differing weights: {worst:.5f}")
