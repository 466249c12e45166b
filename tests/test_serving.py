"""vLLM's loader rules (`surgery.arch.serving`) and what surgery writes for them: the settings reported
for MiniMax-M2.1-shaped outputs (header-only, `tools/serve/fullwidth.py`), W4A16 outputs whose hidden
size is not a multiple of the group (partial groups kept 16-bit; AutoRound's "pad" flagged), the
names extra_config must use for vLLM, and the transformers versions surgery accepts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from surgery.arch.model import MoEModel
from surgery.arch.serving import resolve_bits, serving_report
from surgery.arch.serving_rules import RESOLVERS
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.quant.pipeline import quantize
from surgery.rewrite import verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


def fullwidth():
    if "serve_fullwidth" not in sys.modules:
        spec = importlib.util.spec_from_file_location("serve_fullwidth", REPO / "tools" / "serve" / "fullwidth.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["serve_fullwidth"] = module
        spec.loader.exec_module(module)
    return sys.modules["serve_fullwidth"]


def report(path: Path):
    with Checkpoint(path) as ckpt:
        return serving_report(MoEModel(ckpt))


@pytest.fixture(scope="module")
def m21(tmp_path_factory):
    """MiniMax-M2.1's shapes pruned to 128 experts: bf16, FP8 and surgery's W4A16 of the bf16 (headers)."""
    return fullwidth().build_all(tmp_path_factory.mktemp("m21"))


def test_minimax_m21_bf16_loads_at_tp_1_4_8(m21):
    r = report(m21["bf16"])
    assert r.precision == "bf16" and not r.name_problems
    assert all(r.loads(tp) for tp in (1, 2, 4, 8))


def test_minimax_m21_fp8_not_at_tp_8_says_why_and_what_works(m21):
    r = report(m21["fp8"])
    assert r.precision == "fp8" and [r.loads(tp) for tp in (1, 2, 4, 8)] == [True, True, True, False]
    assert r.loads(8, expert_parallel=True)
    line = r.summary_lines()[3]
    assert "1536 / TP 8 = 192 is not a multiple of the FP8 block 128" in line and "--enable-expert-parallel" in line
    info = verify_checkpoint(m21["fp8"])  # headers only: no tensor manifest to read data against
    assert info["serve_flags"][-1] == "--tensor-parallel-size 8 --enable-expert-parallel"


def test_minimax_m21_w4a16_loads_at_tp_1_4_8(m21):
    r = report(m21["w4a16"])
    assert r.precision == "w4a16" and not r.name_problems
    assert all(r.loads(tp) for tp in (1, 2, 4, 8))
    assert "moe_wna16, group 128 -> 64" in r.summary_lines()[3]  # Marlin needs 192 % 128 at TP 8
    extra = json.loads((m21["w4a16"] / "config.json").read_text())["quantization_config"]["extra_config"]
    assert "model.layers.0.mlp.gate" in extra and "model.layers.0.block_sparse_moe.gate" in extra


@pytest.fixture(scope="module")
def hidden192(tiny_checkpoint):
    """Qwen3-MoE with hidden 192 (not a multiple of 128), attention 4 x 32 = 128 wide, experts 128 wide."""
    return tiny_checkpoint("qwen3_moe", hidden_size=192, head_dim=32, moe_intermediate_size=128)


def test_partial_groups_stay_16_bit_and_verify(hidden192, tmp_path):
    out = tmp_path / "w4"
    quantize(hidden192, out, method="rtn", progress=False)
    with Checkpoint(out) as ckpt:
        names = set(ckpt.tensors)
    assert "model.layers.0.self_attn.o_proj.qweight" in names  # input 128: whole groups, packed
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.self_attn.k_proj.weight" in names
    # gate/up read the 192-wide hidden state: the layer's routed experts stay 16-bit together (down too)
    assert "model.layers.0.mlp.experts.0.down_proj.weight" in names
    assert not any(".experts." in n and n.endswith(".qweight") for n in names)
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert "model.layers.0.mlp.experts" in extra and "model.layers.0.self_attn.q_proj" in extra
    info = verify_checkpoint(out)
    assert info["serving"]["precision"] == "w4a16" and "--tensor-parallel-size 1" in info["serve_flags"]


def test_autoround_padding_is_flagged_by_verify(hidden192, tmp_path):
    out = tmp_path / "pad"
    quantize(hidden192, out, method="rtn", progress=False, partial_groups="pad")
    with pytest.raises(SurgeryError, match="verify failed: serving: .*not a multiple of the W4A16 group 128"):
        verify_checkpoint(out)


def test_nothing_to_quantize_is_one_line(monkeypatch, capsys, tiny_checkpoint, tmp_path):
    from tests.test_plan_protect import run_cli

    src = tiny_checkpoint("mixtral")  # hidden 64 < group 128
    capsys.readouterr()  # the build's progress bars
    code, _out, err = run_cli(monkeypatch, capsys, "quantize", str(src), "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "nothing to quantize at group size 128" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "config.json").exists()


def test_minimax_extra_config_under_vllm_names(tiny_checkpoint, tmp_path):
    """MiniMax-M2 stores block_sparse_moe.*, vLLM builds mlp.*: the 16-bit experts must be named its way
    (the fused module: vLLM 0.32 matches only that) or vLLM builds them 4-bit and finds no qweight."""
    src = tiny_checkpoint("minimax_m2", hidden_size=192, head_dim=32, intermediate_size=128)
    out = tmp_path / "w4"
    quantize(src, out, method="rtn", progress=False)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    extra = cfg["quantization_config"]["extra_config"]
    assert {"model.layers.0.mlp.experts", "model.layers.0.block_sparse_moe.experts.0.w1",
            "model.layers.0.mlp.experts.0.w1"} <= set(extra)
    for how in RESOLVERS.values():
        assert resolve_bits(cfg["quantization_config"], "model.layers.0.mlp.experts", [], True, how) == 16
    verify_checkpoint(out)
    # what surgery wrote before: on-disk names only -> vLLM 0.32 builds the experts 4-bit
    cfg["quantization_config"]["extra_config"] = {k: v for k, v in extra.items() if ".mlp." not in k}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(SurgeryError, match=r"vLLM 0\.\d+ .* builds 'model\.layers\.0\.mlp\.experts' 4-bit"):
        verify_checkpoint(out)


def test_fused_parts_with_different_bits_are_refused():
    qcfg = {"bits": 4, "block_name_to_quantize": "model.layers",
            "extra_config": {"model.layers.0.self_attn.k_proj": {"bits": 16}}}
    parts = [f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    for how in RESOLVERS.values():
        got = resolve_bits(qcfg, "model.layers.0.self_attn.qkv_proj", parts, False, how)
        assert isinstance(got, str) and "different bits" in got


def test_old_transformers_is_refused_in_one_line(monkeypatch, capsys):
    from surgery.compat import check_transformers
    from tests.test_plan_protect import run_cli

    with pytest.raises(SurgeryError, match=r"transformers 4\.57\.1 is installed but surgery needs transformers >= 5"):
        check_transformers("4.57.1")
    check_transformers("5.0.0")
    check_transformers("5.25.0")
    monkeypatch.setattr("surgery.compat.TRANSFORMERS_FLOOR", "99.0")
    code, _out, err = run_cli(monkeypatch, capsys, "inspect", "nowhere")
    assert code == 2 and "surgery needs transformers >= 99.0" in err and len(err.strip().splitlines()) == 1


def test_causal_mask_keywords_of_either_version():
    import torch

    from surgery.compat import causal_mask

    seen = {}

    def new(config, inputs_embeds, attention_mask, cache, position_ids=None):  # 5.17+
        seen["new"] = (inputs_embeds.shape, cache)

    def old(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None):  # 5.0
        seen["old"] = (input_embeds.shape, cache_position.tolist(), past_key_values)

    x = torch.zeros(1, 3, 4)
    causal_mask(new, None, x, None, None)
    causal_mask(old, None, x, None, None)
    assert seen == {"new": ((1, 3, 4), None), "old": ((1, 3, 4), [0, 1, 2], None)}
