"""`verify`: structure against config.json (headers) and copied bytes against the rewrite's tensor manifest;
one-line errors for each kind of damage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import make_plan
from surgery.rewrite import rewrite_checkpoint, verify_checkpoint
from surgery.synth import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_unpruned_checkpoints_verify(family, tiny_checkpoint):
    info = verify_checkpoint(tiny_checkpoint(family))
    assert info["ok"] and info["num_experts"] == 8


def test_fp8_and_shared_fixture_verify(tiny_checkpoint, shared_fixtures):
    assert verify_checkpoint(tiny_checkpoint("minimax_m2", fp8=True))["num_experts"] == 8
    assert verify_checkpoint(shared_fixtures / "tinymoe-m2-fp8")["num_experts"] == 32


@pytest.fixture
def pruned(tiny_checkpoint, tmp_path) -> Path:
    src = tiny_checkpoint("deepseek_v3")
    with Checkpoint(src) as ckpt:
        plan = make_plan({}, MoEModel(ckpt), "random", 0.5, seed=9)
    out = tmp_path / "pruned"
    rewrite_checkpoint(src, plan, out, progress=False)
    return out


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def drop_from_index(out: Path, predicate) -> None:
    """Remove tensors from the index and their shards (keeping total_size right, so the check under test
    is the one that fires: a shard tensor left out of the index alone is refused by the index rule)."""
    from safetensors.torch import load_file, save_file

    with Checkpoint(out) as ckpt:
        sizes = {n: t.nbytes for n, t in ckpt.tensors.items()}
        shards = {ckpt.shards[t.shard].path for n, t in ckpt.tensors.items() if predicate(n)}
    for path in shards:
        save_file({k: v for k, v in load_file(path).items() if not predicate(k)}, path, metadata={"format": "pt"})

    def fn(index):
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not predicate(k)}
        index["metadata"]["total_size"] = sum(sizes[k] for k in index["weight_map"])

    edit_json(out / "model.safetensors.index.json", fn)


def test_pruned_output_verifies(pruned):
    info = verify_checkpoint(pruned)
    assert info["num_experts"] == 4 and info["moe_layers"] == 2  # first_k_dense_replace=1 of 3 layers


def test_config_count_disagrees_with_experts(pruned):
    edit_json(pruned / "config.json", lambda c: c.update(n_routed_experts=2))
    with pytest.raises(SurgeryError, match="verify failed: .*(expert [23]|router tensor)"):
        verify_checkpoint(pruned)


def test_dropped_expert_remains(tiny_checkpoint, tmp_path):
    """An unpruned checkpoint whose config claims fewer experts: expert 4.. remains."""
    out = tmp_path / "m"
    shutil.copytree(tiny_checkpoint("mixtral"), out)
    edit_json(out / "config.json", lambda c: c.update(num_local_experts=4))
    with pytest.raises(SurgeryError, match="(a dropped expert remains|router tensor .* config.json says 4)"):
        verify_checkpoint(out)


def test_missing_expert(pruned):
    drop_from_index(pruned, lambda k: ".experts.2." in k and "layers.2." in k)
    with pytest.raises(SurgeryError, match=r"MoE layer 2 has no tensors for expert\(s\) 2 of 0..3"):
        verify_checkpoint(pruned)


def test_expert_missing_one_projection(pruned):
    drop_from_index(pruned, lambda k: k == "model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(SurgeryError, match="expert 3's tensors differ from expert 0's"):
        verify_checkpoint(pruned)


def test_missing_router_and_bias_rows(pruned, tiny_checkpoint):
    drop_from_index(pruned, lambda k: k == "model.layers.1.mlp.gate.weight")
    with pytest.raises(SurgeryError, match="MoE layer 1 has no router weight"):
        verify_checkpoint(pruned)


def test_total_size_warns_and_missing_tensor_fails(pruned):
    assert verify_checkpoint(pruned)["warnings"] == []
    edit_json(pruned / "model.safetensors.index.json", lambda i: i["metadata"].update(total_size=1))
    assert "total_size is 1" in verify_checkpoint(pruned)["warnings"][0]  # hub indexes are often off
    edit_json(pruned / "model.safetensors.index.json",
              lambda i: i["weight_map"].update({"model.layers.9.foo.weight": "model-00001-of-00005.safetensors"}))
    with pytest.raises(SurgeryError, match="listed in the index but not in this shard"):
        verify_checkpoint(pruned)


def test_cli_one_line_and_exit_2(pruned):
    from typer.testing import CliRunner

    from surgery.cli import app

    ok = CliRunner().invoke(app, ["verify", str(pruned)])
    assert ok.exit_code == 0 and ok.output.startswith("OK: DeepseekV3ForCausalLM, 4 experts")
    edit_json(pruned / "config.json", lambda c: c.update(n_routed_experts=8))
    bad = CliRunner().invoke(app, ["verify", str(pruned)])
    assert isinstance(bad.exception, SurgeryError) and "\n" not in str(bad.exception)
