"""The layer engine's W4A16 reader, piece by piece: the in-place group decoder the expert pager uses is
bit for bit `dequantize_w4a16` (every dtype, full/partial/short/-1 groups, into a slice of a fused
buffer), the `ExpertStore` of a packed layer plans with packed bytes and builds exactly the decoded
experts, and the resident part is budgeted as the plain weights it becomes."""

from __future__ import annotations

import pytest
import torch

from surgery.arch.layer import LayerFactory
from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.w4a16 import dequantize_w4a16, dequantize_w4a16_into, read_packed_weight
from surgery.errors import SurgeryError
from surgery.executor.expert_store import Buffers, ExpertStore, Staging
from surgery.quant.dequant import write_dequantized
from surgery.quant.pipeline import quantize


def packed(out_f: int, in_f: int, group: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random qweight (every bit pattern), zero points (every nibble, not only surgery's 7) and signed
    fp16 scales, as AutoRound's auto_gptq packing lays them out."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group == -1 else -(-in_f // group)
    qweight = torch.randint(-2**31, 2**31 - 1, (in_f // 8, out_f), dtype=torch.int64, generator=g).to(torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (groups, out_f // 8), dtype=torch.int64, generator=g).to(torch.int32)
    scales = (torch.randn(groups, out_f, generator=g) * 0.03).to(torch.float16)
    return qweight, qzeros, scales


@pytest.mark.parametrize("out_f,in_f,group", [(24, 160, 128), (16, 32, 128), (16, 256, 64), (8, 96, -1),
                                              (32, 128, 128), (8, 200, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_into_is_dequantize_w4a16_bit_for_bit(out_f, in_f, group, dtype):
    qweight, qzeros, scales = packed(out_f, in_f, group, seed=out_f + in_f)
    ref = dequantize_w4a16(qweight, qzeros, scales, group, dtype)
    assert ref.shape == (out_f, in_f)
    fused = torch.full((3, out_f + 8, in_f), 7.0, dtype=dtype)  # a [n, 2I, H] buffer; this piece at rows 8..
    dequantize_w4a16_into(fused[1, 8:], qweight, qzeros, scales, group)
    assert torch.equal(fused[1, 8:].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if dtype != torch.float32 else torch.int32))
    assert bool((fused[1, :8] == 7).all()) and bool((fused[0] == 7).all()) and bool((fused[2] == 7).all())
    assert ref.abs().max() > 0  # the decoded values are not trivially zero


def test_decode_into_refuses_a_mismatched_piece():
    qweight, qzeros, scales = packed(16, 64, 32, seed=1)
    with pytest.raises(SurgeryError, match="does not pack"):
        dequantize_w4a16_into(torch.empty(16, 72), qweight, qzeros, scales, 32)


@pytest.fixture(scope="module")
def qwen_w4(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("w4-reader")
    out = root / "w4a16"
    quantize(tiny_checkpoint("qwen3_moe", hidden_size=160), out, method="rtn", quantize_dense=True, progress=False,
             partial_groups="pad")  # a partial group, as AutoRound writes it: the reader decodes those too
    return out, write_dequantized(out, root / "plain")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_store_reads_packed_experts(qwen_w4, dtype):
    out, plain = qwen_w4
    with Checkpoint(out) as ckpt, Checkpoint(plain) as pckpt:
        model, pmodel = MoEModel(ckpt), MoEModel(pckpt)
        factory = LayerFactory(model, dtype, torch.device("cpu"))
        pfactory = LayerFactory(pmodel, dtype, torch.device("cpu"))
        for layer in model.moe_layers:
            store, pstore = ExpertStore(factory, layer), ExpertStore(pfactory, layer)
            assert [(p.name, p.shape) for p in store.params] == [(p.name, p.shape) for p in pstore.params]
            assert store.compute_bytes() == pstore.compute_bytes()
            stored = sum(ckpt.info(model.expert_tensor_name(layer, 0, r, "qweight").removesuffix("qweight") + part
                                   ).nbytes for r in ("gate", "up", "down") for part in ("qweight", "qzeros", "scales"))
            assert store.raw_bytes() == stored < pstore.raw_bytes() / 4  # the packed bytes are what staging holds
            got = store.load_all(Staging(False), Buffers(), prefetch=False)
            for e in range(store.num_experts):
                parts = [read_packed_weight(ckpt, model.expert_tensor_name(layer, e, r), dtype) for r in ("gate", "up")]
                assert torch.equal(got["gate_up_proj"][e], torch.cat(parts))
                down = read_packed_weight(ckpt, model.expert_tensor_name(layer, e, "down"), dtype)
                assert torch.equal(got["down_proj"][e], down)
            for ids, chunk in store.chunks(list(range(store.num_experts)), 3, Staging(False), Buffers(), prefetch=True):
                for k, v in chunk.items():
                    assert torch.equal(v, got[k][ids[0]:ids[-1] + 1]), (layer, ids, k)
            assert factory.resident_bytes(layer) == pfactory.resident_bytes(layer)
        assert factory.resident_bytes(1) == pfactory.resident_bytes(1)  # the dense layer, its MLP packed


def test_resident_layer_gets_decoded_weights(qwen_w4):
    """Attention and the dense MLP come out of the packed tensors as the plain checkpoint's weights."""
    out, plain = qwen_w4
    with Checkpoint(out) as ckpt, Checkpoint(plain) as pckpt:
        factory = LayerFactory(MoEModel(ckpt), torch.float32, torch.device("cpu"))
        pfactory = LayerFactory(MoEModel(pckpt), torch.float32, torch.device("cpu"))
        for layer in (0, 1):
            got = factory.read_state_dict(layer, exclude=(factory.expert_prefix,))
            ref = pfactory.read_state_dict(layer, exclude=(factory.expert_prefix,))
            assert got.keys() == ref.keys() and "self_attn.q_proj.weight" in got
            for k in ref:
                assert torch.equal(got[k], ref[k]), (layer, k)


def test_act_order_is_refused(qwen_w4, tmp_path):
    import json
    import shutil

    out, _ = qwen_w4
    bad = tmp_path / "desc-act"
    shutil.copytree(out, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["desc_act"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with Checkpoint(bad) as ckpt, pytest.raises(SurgeryError, match="act order"):
        LayerFactory(MoEModel(ckpt), torch.float32, torch.device("cpu"))
