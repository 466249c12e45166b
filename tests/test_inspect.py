"""`surgery inspect`: its facts against independent sources (safetensors for sizes, transformers'
own model for which layers are MoE, config.json for keys), its human output, and hub ids resolved
through the local Hugging Face cache, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from surgery.cli import app
from surgery.synth import FAMILIES


def inspect_json(directory: Path) -> dict:
    result = CliRunner().invoke(app, ["inspect", "--json", str(directory)])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sizes(directory: Path) -> dict[str, int]:
    """Bytes of every tensor, as the safetensors library sees it."""
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                dtype = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F32": torch.float32,
                         "F16": torch.float16}[t.get_dtype()]
                out[name] = torch.Size(t.get_shape()).numel() * torch.empty(0, dtype=dtype).element_size()
    return out


def meta_moe_layers(directory: Path) -> tuple[list[int], int]:
    """Which decoder layers transformers itself builds with routed experts, and how many experts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    layers = [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]
    counts = {model.model.layers[i].mlp.experts.gate_up_proj.shape[0] for i in layers}
    assert len(counts) == 1
    return layers, counts.pop()


# ---------------------------------------------------------------------------------------------- shared fixtures
@pytest.mark.parametrize("name", ["tinymoe-m2", "tinymoe-m2-fp8"])
def test_inspect_shared_fixtures(shared_fixtures, name: str) -> None:
    directory = shared_fixtures / name
    info = inspect_json(directory)
    assert info["architecture"] == "MiniMaxM2ForCausalLM"
    assert info["family"] == "minimax_m2"
    assert info["moe_layers"] == [0, 1, 2, 3, 4, 5]
    assert info["num_experts"] == 32 and info["experts_per_token"] == 4
    assert info["num_experts_key"] == "num_local_experts"
    by_tensor = sizes(directory)
    assert info["tensors"] == len(by_tensor)
    assert info["shards"] == len(list(directory.glob("*.safetensors")))
    assert info["total_bytes"] == sum(by_tensor.values())
    expert_bytes = sum(v for k, v in by_tensor.items() if ".experts." in k)
    assert info["expert_bytes"] == expert_bytes
    router = sum(v for k, v in by_tensor.items() if k.endswith(("gate.weight", "e_score_correction_bias"))
                 and ".block_sparse_moe." in k)
    assert info["router_bytes"] == router
    moe = expert_bytes + router
    assert info["experts_kept"]["0.50"] == 16
    assert info["pruned_bytes"]["0.50"] == info["total_bytes"] - moe + moe * 16 // 32
    if name.endswith("fp8"):
        q = info["quantization"]
        assert q["quant_method"] == "fp8" and q["weight_block_size"] == [128, 128]
        assert q["scale_tensors"] == sum(k.endswith("weight_scale_inv") for k in by_tensor) > 6 * 32 * 3
        assert "F8_E4M3" in info["dtypes"]
    else:
        assert info["quantization"] is None
        assert set(info["dtypes"]) <= {"BF16", "F32"}


# ---------------------------------------------------------------------------------------------- every family
@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_every_family(tiny_checkpoint, family: str) -> None:
    directory = tiny_checkpoint(family)
    info = inspect_json(directory)
    config = json.loads((directory / "config.json").read_text())
    layers, experts = meta_moe_layers(directory)
    assert info["moe_layers"] == layers
    assert info["num_experts"] == experts
    assert info["num_experts_key"] in config and config[info["num_experts_key"]] == experts
    assert info["experts_per_token"] == config.get("num_experts_per_tok", config.get("moe_k"))
    assert info["num_layers"] == config["num_hidden_layers"]
    assert config["architectures"] == [info["architecture"]]
    by_tensor = sizes(directory)
    assert info["total_bytes"] == sum(by_tensor.values())
    assert info["expert_bytes"] == sum(v for k, v in by_tensor.items() if ".experts." in k) > 0


def test_inspect_fp8_tiny(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("minimax_m2", fp8=True)
    info = inspect_json(directory)
    by_tensor = sizes(directory)
    assert info["quantization"]["quant_method"] == "fp8"
    assert info["quantization"]["weight_block_size"] == [24, 24]
    assert info["quantization"]["scale_tensors"] == sum(k.endswith("weight_scale_inv") for k in by_tensor) > 0
    assert info["total_bytes"] == sum(by_tensor.values())
    # per-expert scales belong to their experts: pruning removes them too
    assert info["expert_bytes"] == sum(v for k, v in by_tensor.items() if ".experts." in k)


def test_inspect_human_output(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("glm4_moe")
    result = CliRunner().invoke(app, ["inspect", str(directory)])
    assert result.exit_code == 0, result.output
    assert "Glm4MoeForCausalLM" in result.stdout
    assert "n_routed_experts" in result.stdout
    assert "1-2 (2)" in result.stdout  # MoE layers: the first layer is dense


# ---------------------------------------------------------------------------------------------- hub ids
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_cache(root: Path, repo: str, source: Path, commit: str = COMMIT) -> Path:
    """The Hugging Face cache layout: blobs, a snapshot of symlinks into them, refs/main -> commit."""
    base = root / ("models--" + repo.replace("/", "--"))
    blobs, snapshot = base / "blobs", base / "snapshots" / commit
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(source.iterdir())):
        blob = blobs / f"{i:040x}"
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snapshot


def run_cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_hub_id_from_local_cache(tiny_checkpoint, tmp_path: Path) -> None:
    snapshot = fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-mixtral", tiny_checkpoint("mixtral"))
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    proc = run_cli("inspect", "--json", "tiny-org/tiny-mixtral", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert Path(info["path"]) == snapshot
    assert info["architecture"] == "MixtralForCausalLM"
    assert info["total_bytes"] == sum(sizes(tiny_checkpoint("mixtral")).values())

    proc = run_cli("inspect", "tiny-org/not-cached", env=env, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "tiny-org/not-cached" in lines[0] and "cache" in lines[0]
