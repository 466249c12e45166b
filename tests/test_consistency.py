"""A checkpoint that disagrees with itself is refused before any work (issue 14): one test per kind of
damage, each on a copy of the shared fixtures made inside the test, run through the CLI as a user
would: exit 2, one line naming the culprit, no traceback, input and output untouched."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import INDEX_NAME, Checkpoint
from surgery.errors import SurgeryError
from tests.conftest import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


# ---------------------------------------------------------------------------------------------- helpers
def copy_fixture(src: Path, dst: Path) -> Path:
    """A writable copy (the shared fixtures are read-only, and copytree keeps modes)."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)
    return dst


def edit_config(directory: Path, **changes) -> None:
    """Set config.json keys (None deletes one)."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg, indent=2))


def drop_tensor(directory: Path, name: str, *, index: bool = True, shard: bool = True) -> None:
    """Remove a tensor from the index and/or from the shard holding it."""
    from safetensors.torch import load_file, save_file

    index_path = directory / INDEX_NAME
    data = json.loads(index_path.read_text())
    shard_name = data["weight_map"][name]
    if index:
        del data["weight_map"][name]
        index_path.write_text(json.dumps(data, indent=2))
    if shard:
        tensors = load_file(directory / shard_name)
        del tensors[name]
        save_file(tensors, directory / shard_name, metadata={"format": "pt"})


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under `root` (not following symlinks): kind and content hash or link target."""
    if not root.exists() and not root.is_symlink():
        return {}
    out: dict[str, tuple] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def surgery(*args: object, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**ENV, **(env or {})}, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, *culprits: str) -> str:
    """Exit 2, no traceback, one `surgery: error:` line that names every culprit; returns that line."""
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("surgery: error:")]
    assert len(lines) == 1, err[-2000:]
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def refused_untouched(args: list, inputs: list[Path], outputs: list[Path], *culprits: str,
                      env: dict | None = None) -> str:
    """Run a command that must be refused; the inputs stay byte for byte, the outputs are not created."""
    before = {p: snapshot(p) for p in inputs + outputs}
    line = assert_refused(surgery(*args, env=env), *culprits)
    for p in inputs + outputs:
        assert snapshot(p) == before[p], f"{p} changed"
    return line


def calibrate_args(model: Path, work: Path) -> list:
    return ["calibrate", model, "--work", work, "--samples", 2, "--max-length", 16, "--device", "cpu",
            "--no-progress"]


def plan_args(model: Path, tmp: Path) -> list:
    return ["plan", tmp / "no-work", "--method", "random", "--ratio", 0.5, "--model", model, "--out",
            tmp / "plan-out.json"]


@pytest.fixture(scope="module")
def m2(shared_fixtures) -> Path:
    return shared_fixtures / "tinymoe-m2"


@pytest.fixture(scope="module")
def m2_fp8(shared_fixtures) -> Path:
    return shared_fixtures / "tinymoe-m2-fp8"


def random_plan(model_dir: Path, path: Path) -> Path:
    from surgery.plan import make_plan, save_plan

    with Checkpoint(model_dir) as ckpt:
        return save_plan(make_plan({}, MoEModel(ckpt), "random", 0.5, seed=3), path)


@pytest.fixture(scope="module")
def plans(m2, m2_fp8, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plans")
    return {"bf16": random_plan(m2, root / "bf16.json"), "fp8": random_plan(m2_fp8, root / "fp8.json")}


# ---------------------------------------------------------------------------------------------- the table's rows
def test_fp8_weight_without_its_scale_is_refused(m2_fp8, plans, tmp_path):
    src = copy_fixture(m2_fp8, tmp_path / "m")
    weight = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    drop_tensor(src, weight.removesuffix("weight") + "weight_scale_inv")
    refused_untouched(calibrate_args(src, tmp_path / "work"), [src], [tmp_path / "work"], weight, "weight_scale_inv")
    refused_untouched(["rewrite", src, plans["fp8"], "--out", tmp_path / "out", "--no-progress"], [src],
                      [tmp_path / "out"], weight, "weight_scale_inv")


def test_index_omitting_a_shard_tensor_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    name = "model.layers.3.self_attn.k_norm.weight"  # no other rule misses it: only the index disagrees
    drop_tensor(src, name, shard=False)
    refused_untouched(calibrate_args(src, tmp_path / "work"), [src], [tmp_path / "work"], name, "index")
    refused_untouched(["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], [src],
                      [tmp_path / "out"], name, "index")


def test_hidden_size_disagreeing_with_tensors_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, hidden_size=256)
    for args, out in ((plan_args(src, tmp_path), tmp_path / "plan-out.json"),
                      (["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], tmp_path / "out"),
                      (["verify", src], tmp_path / "none")):
        refused_untouched(args, [src], [out], "hidden_size=256", "192")
    shown = surgery("inspect", "--json", src)  # inspect reports instead of refusing
    assert shown.returncode == 0, shown.stderr
    problems = json.loads(shown.stdout)["problems"]
    assert problems and all("hidden_size=256" in p["message"] for p in problems if p["rule"] == "shape")


@pytest.mark.parametrize("count", [16, 64])
def test_expert_count_disagreeing_with_stored_experts_is_refused(count, m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, num_local_experts=count)
    for args, out in ((plan_args(src, tmp_path), tmp_path / "plan-out.json"),
                      (["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], tmp_path / "out"),
                      (["verify", src], tmp_path / "none")):
        line = refused_untouched(args, [src], [out], "num_local_experts", f"{count} experts")
        assert "[32" in line  # what was found


def test_architecture_and_model_type_of_different_families_are_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, model_type="qwen3_moe")
    refused_untouched(["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], [src],
                      [tmp_path / "out"], "model_type 'qwen3_moe'", "MiniMaxM2ForCausalLM", "'minimax_m2'")


def test_top_k_above_the_expert_count_is_refused(m2, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, num_experts_per_tok=40)
    refused_untouched(calibrate_args(src, tmp_path / "work"), [src], [tmp_path / "work"], "num_experts_per_tok",
                      "40", "32")


@pytest.mark.parametrize("qcfg, method", [
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq"),
    ({"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}, "mxfp4"),
])
def test_unsupported_quantization_config_is_refused(qcfg, method, m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, quantization_config=qcfg)
    for args, out in ((plan_args(src, tmp_path), tmp_path / "plan-out.json"),
                      (["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], tmp_path / "out")):
        refused_untouched(args, [src], [out], "quant_method", method, "supported: fp8", "auto-round")


def test_fp8_quantization_config_over_bf16_tensors_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    refused_untouched(["rewrite", src, plans["bf16"], "--out", tmp_path / "out", "--no-progress"], [src],
                      [tmp_path / "out"], "quantization_config", "fp8", "no tensor is FP8")


# ---------------------------------------------------------------------------------------------- verify on outputs
@pytest.fixture(scope="module")
def pruned(m2, tmp_path_factory) -> Path:
    from surgery.rewrite import rewrite_checkpoint

    root = tmp_path_factory.mktemp("pruned")
    plan = json.loads(random_plan(m2, root / "plan.json").read_text())
    rewrite_checkpoint(m2, plan, root / "out", progress=False)
    return root / "out"


def test_verify_passes_a_rewrite_and_compares_its_copied_bytes(pruned):
    result = surgery("verify", "--json", pruned)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["num_experts"] == 16 and info["tensors_compared"] > 0 and info["warnings"] == []


def _damage_output(kind: str, out: Path) -> str:
    """Damage a copy of a rewrite's output; returns what the failure must name."""
    if kind == "hidden_size":
        edit_config(out, hidden_size=256)
        return "verify failed: shape"
    if kind == "experts":
        edit_config(out, num_local_experts=8)
        return "verify failed: shape: router tensor"
    if kind == "fp8 config":
        edit_config(out, quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
        return "verify failed: quantization"
    if kind == "index":
        drop_tensor(out, "model.layers.1.self_attn.q_norm.weight", shard=False)
        return "verify failed: index"
    if kind == "lost tensor":  # index and shard agree, every rule holds: only the manifest knows
        drop_tensor(out, "model.layers.1.self_attn.q_norm.weight")
        return "verify failed: manifest: tensor 'model.layers.1.self_attn.q_norm.weight'"
    if kind == "changed bytes":
        with Checkpoint(out) as ckpt:
            info = ckpt.info("model.layers.2.self_attn.o_proj.weight")
            path = ckpt.shards[info.shard].path
        raw = bytearray(path.read_bytes())
        raw[info.begin + 100] ^= 0x01
        path.write_bytes(bytes(raw))
        return "verify failed: manifest: tensor 'model.layers.2.self_attn.o_proj.weight'"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["hidden_size", "experts", "fp8 config", "index", "lost tensor", "changed bytes"])
def test_verify_fails_broken_outputs_naming_the_rule(kind, pruned, tmp_path):
    out = copy_fixture(pruned, tmp_path / "out")
    culprit = _damage_output(kind, out)
    refused_untouched(["verify", out], [out], [], culprit)


# ---------------------------------------------------------------------------------------------- extra files
def _rewrite_refused(src: Path, plan: Path, tmp_path: Path, *culprits: str, env: dict | None = None) -> str:
    return refused_untouched(["rewrite", src, plan, "--out", tmp_path / "out", "--no-progress"], [src],
                             [tmp_path / "out"], *culprits, env=env)


def test_dangling_symlink_among_extra_files_is_refused_before_any_shard(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    (src / "README.md").symlink_to(tmp_path / "gone.md")
    _rewrite_refused(src, plans["bf16"], tmp_path, "README.md", "dangling symlink")


def test_prune_refuses_a_dangling_symlink_before_calibrating(m2, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    (src / "README.md").symlink_to(tmp_path / "gone.md")
    refused_untouched(["prune", src, "--out", tmp_path / "out", "--samples", 2, "--max-length", 16, "--device", "cpu",
                       "--no-progress"], [src], [tmp_path / "out", tmp_path / "out.work"], "README.md",
                      "dangling symlink")


def test_symlink_loop_among_extra_files_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    (src / "a.txt").symlink_to("b.txt")
    (src / "b.txt").symlink_to("a.txt")
    _rewrite_refused(src, plans["bf16"], tmp_path, "a.txt", "symlink loop")


def test_extra_file_linked_to_dev_zero_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    (src / "vocab.txt").symlink_to("/dev/zero")
    _rewrite_refused(src, plans["bf16"], tmp_path, "vocab.txt", "character device", "/dev/zero")


def test_fifo_among_extra_files_is_refused(m2, plans, tmp_path):
    src = copy_fixture(m2, tmp_path / "m")
    os.mkfifo(src / "merges.txt")
    _rewrite_refused(src, plans["bf16"], tmp_path, "merges.txt", "FIFO")


def test_too_little_free_space_is_refused_up_front(m2, plans, tmp_path):
    line = _rewrite_refused(m2, plans["bf16"], tmp_path, "not enough free space", "(1000 bytes) are free",
                            env={"SURGERY_TEST_FREE_BYTES": "1000"})
    assert "the output needs" in line and " MB (" in line  # the output's size, known from the plan


def test_hub_cache_symlinks_into_blobs_are_copied_as_files(m2, plans, tmp_path):
    """A realistic Hugging Face cache: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    from surgery.rewrite import rewrite_checkpoint, verify_checkpoint

    repo = tmp_path / "hub" / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for f in sorted(m2.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blobs / digest)
        (snap / f.name).symlink_to(Path("../..") / "blobs" / digest)
    out = tmp_path / "out"
    rewrite_checkpoint(snap, json.loads(plans["bf16"].read_text()), out, progress=False)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).is_file() and not (out / name).is_symlink()
        assert (out / name).read_bytes() == (m2 / name).read_bytes()
    verify_checkpoint(out)


# ---------------------------------------------------------------------------------------------- MiniMax MTP fields
MTP_FIELDS = {"use_mtp": True, "num_mtp_modules": 3, "mtp_transformer_layers": 1}


def test_minimax_mtp_fields_without_mtp_tensors_prune_and_are_kept(m2, tmp_path):
    from surgery.rewrite import rewrite_checkpoint, verify_checkpoint

    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, **MTP_FIELDS)
    plan = json.loads(random_plan(src, tmp_path / "plan.json").read_text())
    rewrite_checkpoint(src, plan, tmp_path / "out", progress=False)
    verify_checkpoint(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in MTP_FIELDS} == MTP_FIELDS and config["num_local_experts"] == 16


def test_minimax_with_tensors_past_the_last_layer_is_refused(m2, plans, tmp_path):
    import torch
    from safetensors.torch import save_file

    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, **MTP_FIELDS)
    extra = {"model.layers.6.input_layernorm.weight": torch.ones(192, dtype=torch.bfloat16),
             "model.layers.6.self_attn.q_proj.weight": torch.zeros(192, 192, dtype=torch.bfloat16)}
    save_file(extra, src / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"].update(dict.fromkeys(extra, "model-mtp.safetensors"))
    (src / INDEX_NAME).write_text(json.dumps(index))
    line = _rewrite_refused(src, plans["bf16"], tmp_path, "layer(s) 6", "model.layers.6.", "use_mtp=True",
                            "num_mtp_modules=3", "no layout")
    assert "MTP" in line


# ---------------------------------------------------------------------------------------------- other families
def _refusal(directory: Path) -> str:
    """What every command (they all open checkpoints through MoEModel) says about `directory`."""
    with Checkpoint(directory) as ckpt, pytest.raises(SurgeryError) as err:
        MoEModel(ckpt)
    assert "\n" not in str(err.value)
    return str(err.value)


OTHER_FAMILY_DAMAGE = [
    ("qwen3_moe", {"moe_intermediate_size": 48}, "moe_intermediate_size=48"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 16}, "shared_expert_intermediate_size=16"),
    ("deepseek_v3", {"kv_lora_rank": 8}, "kv_lora_rank=8"),
    ("glm4_moe", {"n_group": 3}, "n_group"),
    ("glm4_moe", {"architectures": ["Glm4MoeForCausalLM"], "model_type": "deepseek_v3"}, "model_type"),
    ("ernie4_5_moe", {"moe_num_experts": 4}, "moe_num_experts"),
    ("gpt_oss", {"intermediate_size": 24}, "intermediate_size=24"),
    ("olmoe", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("mixtral", {"vocab_size": 512}, "vocab_size=512"),
]


@pytest.mark.parametrize("family, change, culprit", OTHER_FAMILY_DAMAGE,
                         ids=[f"{f}-{next(iter(c))}" for f, c, _ in OTHER_FAMILY_DAMAGE])
def test_damaged_configs_of_other_families_are_refused(family, change, culprit, tiny_checkpoint, tmp_path):
    src = copy_fixture(tiny_checkpoint(family), tmp_path / "m")
    edit_config(src, **change)
    assert culprit in _refusal(src)


def test_damaged_tensors_of_other_families_are_refused(tiny_checkpoint, tmp_path):
    src = copy_fixture(tiny_checkpoint("glm4_moe", fp8=True), tmp_path / "glm")
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    drop_tensor(src, name.removesuffix("weight") + "weight_scale_inv")
    assert name in _refusal(src)
    src = copy_fixture(tiny_checkpoint("qwen3_moe"), tmp_path / "qwen")
    drop_tensor(src, "model.layers.2.mlp.experts.5.up_proj.weight")
    assert "expert 5" in _refusal(src)
    src = copy_fixture(tiny_checkpoint("deepseek_v3"), tmp_path / "ds")
    drop_tensor(src, "model.layers.1.post_attention_layernorm.weight")
    assert "model.layers.1.post_attention_layernorm.weight" in _refusal(src)


def test_cli_refuses_a_damaged_other_family(tiny_checkpoint, tmp_path):
    src = copy_fixture(tiny_checkpoint("ernie4_5_moe"), tmp_path / "m")
    edit_config(src, moe_k=9)
    refused_untouched(plan_args(src, tmp_path), [src], [tmp_path / "plan-out.json"], "moe_k", "9")


# ---------------------------------------------------------------------------------------------- W4A16 layout
def w4a16_copy(src: Path, dst: Path, group: int = 32) -> Path:
    """`src` with every attention and expert linear in auto-round's auto_gptq packing: X.weight [out, in]
    becomes X.qweight int32 [in/8, out], X.qzeros int32 [in/G, out/8], X.scales float16 [in/G, out]."""
    import torch
    from safetensors.torch import load_file, save_file

    dst = copy_fixture(src, dst)
    index = json.loads((dst / INDEX_NAME).read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(dst / shard)
        out = {}
        for name, t in tensors.items():
            if t.ndim == 2 and ("self_attn." in name or ".experts." in name) and name.endswith(".weight"):
                stem, (rows, cols) = name.removesuffix("weight"), t.shape
                out[stem + "qweight"] = torch.zeros(cols // 8, rows, dtype=torch.int32)
                out[stem + "qzeros"] = torch.zeros(-(-cols // group), rows // 8, dtype=torch.int32)
                out[stem + "scales"] = torch.ones(-(-cols // group), rows, dtype=torch.float16)
            else:
                out[name] = t
        save_file(out, dst / shard, metadata={"format": "pt"})
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update(dict.fromkeys(out, shard))
    (dst / INDEX_NAME).write_text(json.dumps(index))
    edit_config(dst, quantization_config={"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq",
                                          "bits": 4, "group_size": group, "sym": True, "data_type": "int"})
    return dst


def test_w4a16_auto_gptq_layout_is_accepted_and_its_damage_refused(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    src = w4a16_copy(tiny_checkpoint("qwen3_moe"), tmp_path / "w4")
    with Checkpoint(src) as ckpt:
        assert MoEModel(ckpt).problems() == []
    bad = copy_fixture(src, tmp_path / "bad")
    name = "model.layers.0.mlp.experts.3.down_proj.scales"
    index = json.loads((bad / INDEX_NAME).read_text())
    tensors = load_file(bad / index["weight_map"][name])
    zeros = name.replace("scales", "qzeros")
    tensors[zeros] = tensors[zeros][:, :2].clone()  # [1, 2]; down_proj [64, 32] in groups of 32 needs [1, 8]
    save_file(tensors, bad / index["weight_map"][name], metadata={"format": "pt"})
    assert zeros in _refusal(bad) and "[1, 8]" in _refusal(bad)
    edit_config(src, quantization_config=None)
    assert "W4A16" in _refusal(src) and "no quantization_config" in _refusal(src)


# ---------------------------------------------------------------------------------- nothing valid is refused
def test_no_valid_checkpoint_has_a_problem(tiny_checkpoint, m2, m2_fp8):
    from surgery.synth import FAMILIES

    dirs = [tiny_checkpoint(f) for f in FAMILIES] + [tiny_checkpoint(f, fp8=True) for f in
                                                     ("minimax_m2", "glm4_moe", "qwen3_moe", "deepseek_v3")]
    for directory in [*dirs, m2, m2_fp8]:
        with Checkpoint(directory) as ckpt:
            assert MoEModel(ckpt, check=False).problems() == [], directory


def test_mtp_layers_beyond_the_configured_count_are_refused(tiny_checkpoint, tmp_path):
    """GLM-4.x / DeepSeek-V3 store MTP layers past num_hidden_layers; num_nextn_predict_layers counts them."""
    from tests.test_arch_coverage import with_mtp_layer

    src, n = with_mtp_layer(tiny_checkpoint("glm4_moe"), tmp_path / "glm-mtp")
    with Checkpoint(src) as ckpt:
        assert MoEModel(ckpt).problems() == []
    edit_config(src, num_nextn_predict_layers=0)
    message = _refusal(src)
    assert f"layer(s) {n}" in message and "num_nextn_predict_layers 0" in message


def test_inspect_reports_problems_instead_of_refusing(m2, tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    ok = CliRunner().invoke(app, ["inspect", str(m2)])
    assert ok.exit_code == 0 and "consistency" in ok.output and "OK" in ok.output
    src = copy_fixture(m2, tmp_path / "m")
    edit_config(src, num_experts_per_tok=40)
    shown = CliRunner().invoke(app, ["inspect", str(src)])
    assert shown.exit_code == 0, shown.output
    assert "1 problem(s)" in shown.output and "num_experts_per_tok is 40" in shown.output
