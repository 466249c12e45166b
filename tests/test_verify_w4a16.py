"""`verify` on W4A16 output: every family's `surgery quantize` output passes (also with AutoRound's regex
extra_config keys), and each damage a rewrite or a hand edit could do is refused in one line: a group
count that disagrees with group_size, a packed linear the config calls 16-bit, a plain attention or
expert weight where 4 bits are declared (a whole layer's experts too, which the per-expert tensor-set
rule cannot see), and a linear stored both ways."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from surgery.arch.rules.w4a16 import declared_bits
from surgery.checkpoint.reader import INDEX_NAME
from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.errors import SurgeryError
from surgery.quant.pipeline import quantize
from surgery.rewrite import verify_checkpoint
from surgery.synth import FAMILIES

QUANTIZABLE = [f for f in FAMILIES if f != "gpt_oss"]  # gpt-oss (experts fused on disk) is refused by quantize


@pytest.fixture(scope="module")
def w4(tiny_checkpoint, tmp_path_factory):
    """family -> its W4A16 checkpoint (hidden 160 in groups of 32: every linear whole groups, so vLLM's
    loader rules pass; dense MLPs packed)."""
    root = tmp_path_factory.mktemp("verify-w4")
    cache: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in cache:
            cache[family] = root / family
            quantize(tiny_checkpoint(family, hidden_size=160), cache[family], method="rtn", quantize_dense=True,
                     progress=False, group_size=32)
        return cache[family]

    return build


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_qcfg(out: Path, fn) -> None:
    cfg = json.loads((out / "config.json").read_text())
    fn(cfg["quantization_config"])
    (out / "config.json").write_text(json.dumps(cfg))


def unpack(out: Path, stems: list[str], keep_packed: bool = False) -> None:
    """Store linears `stems` as plain (decoded) `.weight`s, as a rewrite that forgot to pack would."""
    from safetensors.torch import load_file, save_file

    index = json.loads((out / INDEX_NAME).read_text())
    group = json.loads((out / "config.json").read_text())["quantization_config"]["group_size"]
    for stem in stems:
        shard = index["weight_map"][stem + ".qweight"]
        tensors = load_file(out / shard)
        parts = [tensors[f"{stem}.{p}"] for p in ("qweight", "qzeros", "scales")]
        tensors[stem + ".weight"] = dequantize_w4a16(*parts, group, torch.bfloat16)
        if not keep_packed:
            for p in ("qweight", "qzeros", "scales"):
                del tensors[f"{stem}.{p}"]
                del index["weight_map"][f"{stem}.{p}"]
        index["weight_map"][stem + ".weight"] = shard
        save_file(tensors, out / shard, metadata={"format": "pt"})
    (out / INDEX_NAME).write_text(json.dumps(index))


def refusal(out: Path) -> str:
    with pytest.raises(SurgeryError) as exc:
        verify_checkpoint(out, data=False)
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("family", QUANTIZABLE)
def test_quantized_families_verify(family, w4):
    info = verify_checkpoint(w4(family))
    assert info["ok"] and info["num_experts"] == 8


def test_autoround_regex_extra_config_is_read_as_vllm_does(w4, tmp_path):
    """AutoRound 0.16.1 writes `.*model\\.layers\\.0\\.mlp\\.gate.*`-style keys (re.search, as vLLM
    matches them); with ours replaced by those, the output still verifies, and a pattern that also
    catches a packed linear is refused."""
    out = copy(w4("qwen3_moe"), tmp_path / "ar")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    routers = [k for k in cfg["extra_config"] if k.endswith(".mlp.gate")]
    assert routers and declared_bits(cfg, "model.layers.0.self_attn.q_proj") == 4

    def regex_keys(q):
        q["extra_config"] = {f".*{re.escape(k)}.*": {"bits": 16, "data_type": "float"} for k in routers}
        q["extra_config"]["lm_head"] = {"bits": 16, "data_type": "float"}

    edit_qcfg(out, regex_keys)
    verify_checkpoint(out, data=False)
    edit_qcfg(out, lambda q: q["extra_config"].update({r".*layers\.2\.mlp\.experts\.3\..*": {"bits": 16}}))
    message = refusal(out)
    assert "model.layers.2.mlp.experts.3." in message and "16-bit" in message and "packed" in message


def test_group_count_disagreeing_with_group_size_is_refused(w4, tmp_path):
    out = copy(w4("qwen3_moe"), tmp_path / "g")
    edit_qcfg(out, lambda q: q.update(group_size=64))  # in 160: 3 groups of 64, but 5 (of 32) are stored
    message = refusal(out)
    assert "group_size 64" in message and ("qzeros" in message or "scales" in message) and "[3, " in message


def test_packed_linear_declared_16_bit_is_refused(w4, tmp_path):
    out = copy(w4("glm4_moe"), tmp_path / "x")
    stem = "model.layers.1.self_attn.o_proj"
    edit_qcfg(out, lambda q: q["extra_config"].update({stem: {"bits": 16, "data_type": "float"}}))
    message = refusal(out)
    assert f"'{stem}.qweight' is packed" in message and "16-bit" in message


def test_plain_attention_where_4_bits_are_declared_is_refused(w4, tmp_path):
    out = copy(w4("deepseek_v3"), tmp_path / "a")
    stem = "model.layers.2.self_attn.q_b_proj"
    unpack(out, [stem])
    message = refusal(out)
    assert f"'{stem}' is stored plain" in message and "4-bit" in message
    edit_qcfg(out, lambda q: q["extra_config"].update({stem: {"bits": 16, "data_type": "float"}}))
    verify_checkpoint(out, data=False)  # declared 16-bit: a plain weight is what a loader expects


def test_a_whole_layer_of_plain_experts_is_refused(w4, tmp_path):
    """Every expert of a layer unpacked (e.g. merged experts written plain): each has the same tensor set,
    so only the declaration rule sees it."""
    out = copy(w4("qwen3_moe"), tmp_path / "e")
    index = json.loads((out / INDEX_NAME).read_text())
    stems = sorted({k.removesuffix(".qweight") for k in index["weight_map"]
                    if k.startswith("model.layers.2.mlp.experts.") and k.endswith(".qweight")})
    assert len(stems) == 24
    unpack(out, stems)
    message = refusal(out)
    assert "model.layers.2.mlp.experts." in message and "stored plain" in message


def test_linear_stored_both_ways_is_refused(w4, tmp_path):
    out = copy(w4("minimax_m2"), tmp_path / "b")
    stem = "model.layers.0.block_sparse_moe.experts.5.w2"
    unpack(out, [stem], keep_packed=True)
    message = refusal(out)
    assert f"'{stem}' is stored both packed" in message


def test_cli_refuses_in_one_line(w4, tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    out = copy(w4("mixtral"), tmp_path / "c")
    assert CliRunner().invoke(app, ["verify", str(out)]).exit_code == 0
    unpack(out, ["model.layers.1.self_attn.k_proj"])
    result = CliRunner().invoke(app, ["verify", str(out)])
    assert result.exit_code != 0 and "stored plain" in (result.output + str(result.exception))
