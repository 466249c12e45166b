"""W4A16 RTN equals AutoRound 0.16.1's RTN bit for bit.

AutoRound (its regular flow: iters=0, optimised RTN disabled, group 128, symmetric, on CPU) quantizes
the trained MiniMax-M2 fixture, a pruned copy of it and tiny bf16 checkpoints of the other families,
once per module in one subprocess; `surgery quantize --method rtn --quantize-dense` must produce the
same qweight/qzeros/scales for every linear AutoRound quantizes (mapped from AutoRound's in-memory
names to the input's on-disk names), quantize exactly those linears, and leave every other tensor's
name, dtype and bytes as the input has them. AutoRound must be importable (dev extra): the test fails,
it does not skip, when it is missing.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.arch.table import SWIGLU_PROJ
from surgery.checkpoint.reader import Checkpoint
from surgery.quant.pipeline import quantize
from surgery.quant.targets import find_targets

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "ernie4_5_moe")

AUTOROUND = r"""
import os, sys
os.environ.setdefault("AR_DISABLE_META_LOAD", "1")
def main():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from auto_round import AutoRound
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    for src, out in zip(sys.argv[2::2], sys.argv[3::2]):
        model = AutoModelForCausalLM.from_pretrained(src, dtype="auto")
        ar = AutoRound(model, tokenizer=tok, scheme="W4A16", iters=0, disable_opt_rtn=True, group_size=128,
                       sym=True, bits=4, device_map="cpu", nsamples=1, seqlen=32)
        ar.quantize_and_save(out, format="auto_round")
if __name__ == "__main__":
    main()
"""


def load_all(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(glob.glob(str(directory / "**" / "*.safetensors"), recursive=True)):
        with safe_open(f, "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def autoround_names(model: MoEModel, target) -> list[str]:
    """Where AutoRound's export puts a target: its in-memory module name (experts unfused into
    gate_proj/up_proj/down_proj), under either the in-memory or the on-disk MoE block name."""
    spec, prefix = model.spec, model.layer_prefix(target.layer)
    if target.kind == "expert":
        tail = f"experts.{target.expert}.{SWIGLU_PROJ[target.role]}"
        return [f"{prefix}{spec.moe_module}.{tail}", f"{prefix}{spec.moe_disk}.{tail}"]
    key = "." + target.module[len(prefix):]
    for disk, mem in spec.disk_to_memory:
        key = key.replace(disk, mem)
    return [prefix + key[1:], target.module]


@pytest.fixture(scope="module")
def cases(tmp_path_factory, shared_fixtures) -> dict[str, tuple[Path, Path, Path]]:
    """name -> (source, ours, AutoRound's output) for every checkpoint, AutoRound run once."""
    from surgery.plan import make_plan
    from surgery.rewrite import rewrite_checkpoint
    from surgery.synth import make_checkpoint

    root = tmp_path_factory.mktemp("quant-rtn")
    fixture = shared_fixtures / "tinymoe-m2"
    pruned = root / "m2-pruned"
    with Checkpoint(fixture) as ckpt:
        plan = make_plan({}, MoEModel(ckpt), "random", 0.5, seed=3)
    rewrite_checkpoint(fixture, plan, pruned, progress=False)
    sources = {"tinymoe-m2": fixture, "tinymoe-m2-pruned50": pruned}
    for family in FAMILIES:  # hidden 160: a full and a partial group of 128 along every hidden input
        sources[family] = make_checkpoint(root / family, family, dtype=torch.bfloat16, hidden_size=160)
    args = []
    for name, src in sources.items():
        args += [str(src), str(root / "ar" / name)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AR_DISABLE_META_LOAD": "1"}
    proc = subprocess.run([sys.executable, "-c", AUTOROUND, str(fixture), *args], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, f"AutoRound 0.16.1 must be installed (dev extra) and run: {proc.stderr[-2000:]}"
    out = {}
    for name, src in sources.items():
        ours = root / "ours" / name
        # AutoRound pads a partial last group (hidden 160 and 192 are not multiples of 128): "pad" does too
        quantize(src, ours, method="rtn", quantize_dense=True, progress=False, partial_groups="pad")
        out[name] = (src, ours, root / "ar" / name)
    return out


@pytest.mark.parametrize("name", ["tinymoe-m2", "tinymoe-m2-pruned50", *FAMILIES])
def test_rtn_bit_identical_to_autoround(cases, name):
    src, ours, ar_dir = cases[name]
    ar, mine = load_all(ar_dir), load_all(ours)
    ar_quantized = {k.removesuffix(".qweight") for k in ar if k.endswith(".qweight")}
    with Checkpoint(src) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, quantize_dense=True, partial_groups="pad").targets.values()
        matched = set()
        for t in targets:
            names = [n for n in autoround_names(model, t) if n in ar_quantized]
            assert names, f"{t.module}: AutoRound did not quantize it"
            matched.add(names[0])
            for part in ("qweight", "qzeros", "scales"):
                a, o = ar[f"{names[0]}.{part}"], mine[f"{t.module}.{part}"]
                assert (a.dtype, tuple(a.shape)) == (o.dtype, tuple(o.shape)), f"{t.module}.{part}"
                assert torch.equal(a, o), f"{t.module}.{part} differs from AutoRound"
            assert f"{t.module}.weight" not in mine
        assert matched == ar_quantized, f"AutoRound quantized more: {sorted(ar_quantized - matched)[:4]}"
        # everything not quantized: same name, dtype, shape and bytes as the input
        with Checkpoint(ours) as out:
            quantized = {t.name for t in targets}
            for tname, info in ckpt.tensors.items():
                if tname in quantized:
                    continue
                got = out.info(tname)
                assert (got.dtype, got.shape) == (info.dtype, info.shape), tname
                assert out.read_bytes(got) == ckpt.read_bytes(info), tname
            expected = len(ckpt.tensors) + 2 * len(quantized)
            assert len(out.tensors) == expected


def test_quantization_config(cases):
    src, ours, _ = cases["tinymoe-m2"]
    cfg = json.loads((ours / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "auto-round" and q["packing_format"] == "auto_round:auto_gptq"
    assert (q["bits"], q["group_size"], q["sym"], q["data_type"], q["desc_act"], q["lm_head"]) == (
        4, 128, True, "int", False, False)
    assert q["block_name_to_quantize"] == "model.layers"
    # routers under the checkpoint's names and vLLM's (its MiniMax-M2 module prefix is `mlp`)
    routers = [f"model.layers.{i}.{moe}.gate" for i in range(6) for moe in ("block_sparse_moe", "mlp")]
    assert sorted(q["extra_config"]) == sorted([*routers, "lm_head"])
    assert all(v == {"bits": 16, "data_type": "float"} for v in q["extra_config"].values())
    assert json.loads((ours / "quantization_config.json").read_text()) == q
    qc = json.loads((ours / "quantize_config.json").read_text())
    assert qc["bits"] == 4 and qc["group_size"] == 128 and qc["quant_method"] == "gptq"
    src_cfg = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == src_cfg
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (ours / name).read_bytes() == (src / name).read_bytes()


def test_dense_mlp_kept_unless_asked(cases, tmp_path):
    src, _, _ = cases["glm4_moe"]
    out = tmp_path / "out"
    quantize(src, out, method="rtn", progress=False, group_size=32)  # hidden 160: whole groups of 32
    with Checkpoint(out) as ckpt:
        assert "model.layers.0.mlp.gate_proj.weight" in ckpt  # layer 0 is dense (first_k_dense_replace)
        assert "model.layers.1.mlp.shared_experts.gate_proj.qweight" in ckpt
    q = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    assert "model.layers.0.mlp.gate_proj" in q and "model.layers.1.mlp.gate" in q


def test_fp8_input_is_dequantised_first(shared_fixtures, tmp_path):
    """The FP8 fixture: weights dequantised (float32 product) then quantized; routers stay float32,
    no FP8 tensor or scale is left, and the result equals quantizing the dequantised weights."""
    from surgery.checkpoint.fp8 import block_size, dequantize
    from surgery.quant.pack import pack
    from surgery.quant.rtn import rtn_quantize

    src = shared_fixtures / "tinymoe-m2-fp8"
    out = tmp_path / "out"
    quantize(src, out, method="rtn", progress=False, partial_groups="pad")  # hidden 192: AutoRound's padding
    with Checkpoint(src) as a, Checkpoint(out) as b:
        assert not any(t.dtype.startswith("F8") or n.endswith("weight_scale_inv") for n, t in b.tensors.items())
        assert b.info("model.layers.0.block_sparse_moe.gate.weight").dtype == "F32"
        name = "model.layers.2.block_sparse_moe.experts.5.w2"
        w, s = a.read(name + ".weight"), a.read(name + ".weight_scale_inv")
        ref = pack(*rtn_quantize(dequantize(w, s, block_size(a.config, tuple(w.shape), tuple(s.shape))), 128))
        for part, t in ref.items():
            assert torch.equal(b.read(f"{name}.{part}"), t)
    assert "quant_method" in json.loads((out / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "auto-round"


def test_bad_options_one_line(tmp_path, shared_fixtures):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for extra, msg in ((["--scheme", "w3a8"], "unknown --scheme"), (["--method", "awq"], "unknown --method"),
                       (["--group-size", "100"], "--group-size")):
        proc = subprocess.run([sys.executable, "-m", "surgery", "quantize", str(shared_fixtures / "tinymoe-m2"),
                               "--out", str(tmp_path / "o"), *extra], cwd=REPO, env=env, capture_output=True,
                              text=True)
        assert proc.returncode == 2 and msg in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
