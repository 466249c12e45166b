"""tools/gen_fullwidth.py at a tiny scaled-down shape: the benchmarks' full-width checkpoints are only
as good as their layout, so the layout is checked here where it is cheap — `surgery inspect` accepts it,
FP8 weights are float8_e4m3fn with float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] on exactly
the hub's quantised linears, routers / norms / embeddings keep the hub's dtypes and shapes, the values
dequantise to a real init's scale, and expert e's bytes do not depend on the expert count."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from surgery.cli import app

REPO = Path(__file__).resolve().parents[1]
TINY = dict(hidden=256, intermediate=192, experts=8, layers=1, heads=4, kv_heads=2, head_dim=64, top_k=2, vocab=512)
QUANTISED = ("q_proj", "k_proj", "v_proj", "o_proj", ".w1", ".w2", ".w3")


def _gen_module():
    """tools/ is not a package: load the script as a module (registered first, as dataclasses need)."""
    if "gen_fullwidth" in sys.modules:
        return sys.modules["gen_fullwidth"]
    spec = importlib.util.spec_from_file_location("gen_fullwidth", REPO / "tools" / "gen_fullwidth.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_fullwidth"] = module
    spec.loader.exec_module(module)
    return module


def generate(out: Path, dtype: str = "fp8", **overrides) -> Path:
    shape = {**TINY, **overrides}
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in shape.items()] + ["--dtype", dtype, "--out", str(out), "--quiet"]
    _gen_module().main(argv)
    return out


def tensors(directory: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (safetensors dtype, shape, shard)"""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                s = f.get_slice(name)
                out[name] = (s.get_dtype(), tuple(s.get_shape()), shard.name)
    return out


@pytest.fixture(scope="module")
def fp8_model(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("gen") / "fp8")


def test_inspect_accepts_it(fp8_model: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", "--json", str(fp8_model)])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["architecture"] == "MiniMaxM2ForCausalLM" and info["family"] == "minimax_m2"
    assert info["num_experts"] == 8 and info["moe_layers"] == [0]
    assert not info.get("problems"), info.get("problems")  # the consistency rules, where inspect has them


def test_config_is_the_hubs(fp8_model: Path) -> None:
    cfg = json.loads((fp8_model / "config.json").read_text())
    assert cfg["architectures"] == ["MiniMaxM2ForCausalLM"] and cfg["model_type"] == "minimax_m2"
    assert cfg["num_hidden_layers"] == 1 and cfg["num_local_experts"] == 8 and cfg["num_experts_per_tok"] == 2
    assert cfg["scoring_func"] == "sigmoid" and cfg["use_routing_bias"] is True and cfg["use_qk_norm"] is True
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["vocab_size"] == 512 and cfg["rotary_dim"] == 64 and cfg["attn_type_list"] == [1]
    assert (fp8_model / "tokenizer.json").is_file()


def test_fp8_layout(fp8_model: Path) -> None:
    t = tensors(fp8_model)
    h, inter, q, kv = TINY["hidden"], TINY["intermediate"], TINY["heads"] * TINY["head_dim"], \
        TINY["kv_heads"] * TINY["head_dim"]
    expected_shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                       ".w1": (inter, h), ".w3": (inter, h), ".w2": (h, inter)}
    weights = [n for n in t if n.endswith(".weight") and any(k in n for k in QUANTISED)]
    assert len(weights) == 4 + 3 * TINY["experts"]
    for name in weights:
        dtype, shape, shard = t[name]
        kind = next(k for k in QUANTISED if k in name)
        assert dtype == "F8_E4M3" and shape == expected_shapes[kind], name
        sdtype, sshape, sshard = t[name.removesuffix("weight") + "weight_scale_inv"]
        assert sdtype == "F32" and sshape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), name
        assert sshard == shard
    scales = [n for n in t if n.endswith("weight_scale_inv")]
    assert len(scales) == len(weights)
    p = "model.layers.0."
    assert t[p + "block_sparse_moe.gate.weight"][:2] == ("F32", (8, h))
    assert t[p + "block_sparse_moe.e_score_correction_bias"][:2] == ("F32", (8,))
    assert t[p + "self_attn.q_norm.weight"][:2] == ("BF16", (q,))
    assert t[p + "self_attn.k_norm.weight"][:2] == ("BF16", (kv,))
    for name in (p + "input_layernorm.weight", p + "post_attention_layernorm.weight", "model.norm.weight"):
        assert t[name][:2] == ("BF16", (h,))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert t[name][:2] == ("BF16", (512, h))
    # one shard per layer plus one for embeddings / head, and the index says so
    index = json.loads((fp8_model / "model.safetensors.index.json").read_text())
    assert {n: s for n, (_, _, s) in t.items()} == index["weight_map"]
    assert len(set(index["weight_map"].values())) == 2
    assert t["lm_head.weight"][2] != t[p + "self_attn.q_proj.weight"][2]


def test_values_dequantise_to_a_real_init(fp8_model: Path) -> None:
    from surgery.checkpoint.fp8 import dequantize

    shard = fp8_model / tensors(fp8_model)["model.layers.0.block_sparse_moe.experts.3.w2.weight"][2]
    with safe_open(shard, framework="pt") as f:
        w = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight")
        s = f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight_scale_inv")
        gate = f.get_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    real = dequantize(w, s, (128, 128))
    assert torch.isfinite(real).all()
    assert 0.015 < float(real.std()) < 0.025 and abs(float(real.mean())) < 1e-3
    assert float(gate.std()) == pytest.approx(1 / math.sqrt(TINY["hidden"]), rel=0.1)


def test_experts_do_not_depend_on_the_count(fp8_model: Path, tmp_path: Path) -> None:
    wider = generate(tmp_path / "wider", experts=16)
    name = "model.layers.0.block_sparse_moe.experts.5.w1.weight"
    got = []
    for d in (fp8_model, wider):
        with safe_open(d / tensors(d)[name][2], framework="pt") as f:
            got.append(f.get_tensor(name).view(torch.uint8))
    assert torch.equal(got[0], got[1])


def test_bf16_variant(tmp_path: Path) -> None:
    d = generate(tmp_path / "bf16", dtype="bf16")
    t = tensors(d)
    assert not any(n.endswith("weight_scale_inv") for n in t)
    assert t["model.layers.0.self_attn.q_proj.weight"][0] == "BF16"
    assert "quantization_config" not in json.loads((d / "config.json").read_text())
