"""The streaming rewrite against the obvious in-memory computation, for every family.

For each family: rewrite a tiny checkpoint with a random plan, then (a) `verify` passes, (b) every
output tensor is bit-identical to its source (untouched tensors, renamed experts, router rows), and
(c) transformers loads the output with no missing or unexpected keys and its logits equal those of
the input model pruned by hand in memory (slicing the fused expert parameters and the router).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import kept_map, make_plan, plan_hash
from surgery.rewrite import rewrite_checkpoint, verify_checkpoint
from surgery.rewrite.run import MANIFEST
from surgery.synth import FAMILIES
from tests.oracle import prune_in_memory  # the in-memory oracle: slices every routed-expert tensor


def random_plan(model_dir: Path, ratio: float = 0.5, seed: int = 3) -> dict:
    with Checkpoint(model_dir) as ckpt:
        return make_plan({}, MoEModel(ckpt), "random", ratio, seed=seed)


def check_bytes(model_dir: Path, out: Path, plan: dict) -> None:
    """Every output tensor is its source's bytes: same name, renamed expert, or the kept router rows;
    and the output holds exactly the non-expert tensors plus the kept experts."""
    keep = kept_map(plan)
    back = {layer: {new: old for old, new in m.items()} for layer, m in keep.items()}
    with Checkpoint(model_dir) as src, Checkpoint(out) as dst:
        model = MoEModel(src)
        expected = set()
        for name in src.tensors:
            role = model.classify(name)
            if role.kind != "expert" or role.expert in keep[role.layer]:
                expected.add(name if role.kind != "expert" else
                             name.replace(f".experts.{role.expert}.", f".experts.{keep[role.layer][role.expert]}."))
        assert set(dst.tensors) == expected
        for name, info in dst.tensors.items():
            role = model.classify(name)
            if role.kind == "expert":
                old = name.replace(f".experts.{role.expert}.", f".experts.{back[role.layer][role.expert]}.")
                assert dst.read_bytes(info) == src.read_bytes(src.info(old)), name
            elif role.kind in ("router", "fused"):  # the kept experts along the tensor's expert axis
                rows = torch.tensor(sorted(keep[role.layer]))
                want = torch.index_select(src.read(name), role.axis, rows)
                assert torch.equal(dst.read(name).view(torch.uint8), want.contiguous().view(torch.uint8)), name
                assert info.dtype == src.info(name).dtype
            else:
                assert dst.read_bytes(info) == src.read_bytes(src.info(name)), name
                assert (info.dtype, info.shape) == (src.info(name).dtype, src.info(name).shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_rewrite_matches_in_memory_pruning(family, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint(family)
    plan = random_plan(src)
    out = tmp_path / "out"
    summary = rewrite_checkpoint(src, plan, out, progress=False)
    n_keep = summary["num_experts"]["after"]
    assert n_keep == 4 and summary["shards_written"] == summary["shards"]

    info = verify_checkpoint(out)  # (a)
    assert info["num_experts"] == n_keep
    check_bytes(src, out, plan)  # (b)

    pruned, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert not loading.get("mismatched_keys"), loading
    oracle = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    prune_in_memory(oracle, {int(k): v["keep"] for k, v in plan["layers"].items()})
    pruned.eval()
    oracle.eval()
    ids = torch.randint(3, 256, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = pruned(ids).logits, oracle(ids).logits
    assert (got - want).abs().max().item() < 1e-3
    # the pruned model really differs from the unpruned one (the test can fail)
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (full(ids).logits - got).abs().max().item() > 1e-3

    # config: only the expert count changed; provenance lives in surgery.json
    before = json.loads((src / "config.json").read_text())
    after = json.loads((out / "config.json").read_text())
    key = MoEModel(Checkpoint(src)).experts_key
    assert after.pop(key) == n_keep and before.pop(key) == 8
    assert after == before
    prov = json.loads((out / "surgery.json").read_text())
    assert prov["plan_sha256"] == plan_hash(plan) and prov["source"]["sha256"] == plan["source"]["sha256"]
    assert not (out / MANIFEST).exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    with Checkpoint(out) as ckpt:
        assert index["metadata"]["total_size"] == ckpt.total_bytes


def test_fp8_scales_follow_their_experts(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("minimax_m2", fp8=True)
    plan = random_plan(src, ratio=0.25, seed=7)
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    verify_checkpoint(out)
    check_bytes(src, out, plan)
    keep = kept_map(plan)
    with Checkpoint(src) as a, Checkpoint(out) as b:
        scales = [n for n in b.tensors if n.endswith("weight_scale_inv") and ".experts." in n]
        assert len(scales) == 3 * 3 * 6  # 3 layers x 6 kept experts x w1/w2/w3
        for layer, m in keep.items():
            for old, new in m.items():
                for w in ("w1", "w2", "w3"):
                    pre = f"model.layers.{layer}.block_sparse_moe.experts."
                    for suffix in ("weight", "weight_scale_inv"):
                        x, y = a.info(f"{pre}{old}.{w}.{suffix}"), b.info(f"{pre}{new}.{w}.{suffix}")
                        assert (x.dtype, x.shape) == (y.dtype, y.shape)
                        assert a.read_bytes(x) == b.read_bytes(y)
        assert b.info("model.layers.0.block_sparse_moe.experts.0.w1.weight").dtype == "F8_E4M3"
    cfg_in = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]


def test_shared_fixture_copies_tokenizer_and_loads(shared_fixtures, tmp_path):
    """The trained fixture (read-only directory): non-weight files copied unchanged, nothing written
    into MODEL, output verifies and loads."""
    from transformers import AutoModelForCausalLM

    src = shared_fixtures / "tinymoe-m2"
    plan = random_plan(src, ratio=0.25)
    out = tmp_path / "out"
    summary = rewrite_checkpoint(src, plan, out, progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
        assert name in summary["copied_files"]
    assert verify_checkpoint(out)["num_experts"] == 24
    check_bytes(src, out, plan)
    _, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_ratio_zero_is_a_byte_copy_of_every_tensor(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen3_moe")
    plan = random_plan(src, ratio=0.0)
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    with Checkpoint(src) as a, Checkpoint(out) as b:
        assert set(a.tensors) == set(b.tensors)
        for name, info in a.tensors.items():
            assert a.read_bytes(info) == b.read_bytes(b.info(name))


def test_rerun_of_a_finished_rewrite_does_nothing(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("mixtral")
    plan = random_plan(src)
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = rewrite_checkpoint(src, plan, tmp_path / "missing" / ".." / "out", progress=False)
    assert again["already_complete"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp


def test_killed_before_config_resumes_identically(tiny_checkpoint, tmp_path, monkeypatch):
    """Interrupt at the very last step (config.json): OUT does not look complete, and a rerun reuses
    every shard and finishes with the same bytes as an uninterrupted run."""
    import surgery.rewrite.run as run

    src = tiny_checkpoint("glm4_moe")
    plan = random_plan(src)
    ref = tmp_path / "ref"
    rewrite_checkpoint(src, plan, ref, progress=False)

    def interrupted(path, text):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(run, "_write_text_durably", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rewrite_checkpoint(src, plan, out, progress=False)
    assert not (out / "config.json").exists() and (out / MANIFEST).exists()
    summary = rewrite_checkpoint(src, plan, out, progress=False)
    assert summary["shards_reused"] == summary["shards"] and summary["shards_written"] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


def test_unhashed_shards_are_never_reused(tiny_checkpoint, tmp_path, monkeypatch):
    """SURGERY_BENCH_NO_HASH (benchmarks only) records no hash, so a resumed run writes those again."""
    import surgery.rewrite.run as run

    src = tiny_checkpoint("qwen2_moe")
    plan = random_plan(src)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setenv("SURGERY_BENCH_NO_HASH", "1")
        m.setattr(run, "_write_text_durably", lambda path, text: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            rewrite_checkpoint(src, plan, out, progress=False)
    assert all(r["sha256"] is None for r in json.loads((out / MANIFEST).read_text())["shards"].values())
    summary = rewrite_checkpoint(src, plan, out, progress=False)
    assert summary["shards_reused"] == 0 and summary["shards_written"] == summary["shards"]
    verify_checkpoint(out)


# ---------------------------------------------------------------------------------------------- refusals
def test_refuses_out_equal_to_or_inside_model(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe")
    plan = random_plan(src)
    before = sorted(p.name for p in src.iterdir())
    with pytest.raises(SurgeryError, match="is the model directory"):
        rewrite_checkpoint(src, plan, src, progress=False)
    with pytest.raises(SurgeryError, match="inside the model directory"):
        rewrite_checkpoint(src, plan, src / "pruned", progress=False)
    assert sorted(p.name for p in src.iterdir()) == before


def test_refuses_non_empty_unrelated_out(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SurgeryError, match="not empty"):
        rewrite_checkpoint(src, random_plan(src), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_refuses_out_of_another_plan(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("olmoe")
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": 1, "plan_sha256": "0" * 64, "shards": {}}))
    with pytest.raises(SurgeryError, match="unfinished rewrite of another plan"):
        rewrite_checkpoint(src, random_plan(src), out, progress=False)
    done = tmp_path / "done"
    rewrite_checkpoint(src, random_plan(src, seed=1), done, progress=False)
    with pytest.raises(SurgeryError, match="finished rewrite of another plan"):
        rewrite_checkpoint(src, random_plan(src, seed=2), done, progress=False)


def test_refuses_plan_of_another_model(tiny_checkpoint, tmp_path):
    plan = random_plan(tiny_checkpoint("mixtral"))
    other = tiny_checkpoint("minimax_m2")
    with pytest.raises(SurgeryError, match="plan was made for another model.*architecture"):
        rewrite_checkpoint(other, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_edited_plan_with_duplicates(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("minimax_m2")
    plan = random_plan(src)
    entry = plan["layers"]["1"]
    entry["keep"] = [entry["keep"][0], *entry["keep"][:-1]]
    with pytest.raises(SurgeryError, match="more than once"):
        rewrite_checkpoint(src, plan, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_refuses_experts_in_layers_past_num_hidden_layers(tiny_checkpoint, tmp_path):
    """An MTP-like layer holding routed experts: refused rather than written with a count that
    disagrees with config.json."""
    from safetensors.torch import save_file

    src = tmp_path / "mtp"
    shutil.copytree(tiny_checkpoint("minimax_m2"), src)
    extra = {"model.layers.3.block_sparse_moe.experts.0.w1.weight": torch.zeros(32, 64),
             "model.layers.3.block_sparse_moe.gate.weight": torch.zeros(8, 64)}
    save_file(extra, src / "model-mtp.safetensors", metadata={"format": "pt"})
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SurgeryError, match="MTP"):
        rewrite_checkpoint(src, random_plan(src), tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------- layouts
def test_single_file_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    from surgery.synth import make_checkpoint

    src = make_checkpoint(tmp_path / "single", "qwen2_moe", max_shard_size="100MB")
    assert (src / "model.safetensors").exists() and not (src / "model.safetensors.index.json").exists()
    plan = random_plan(src)
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    verify_checkpoint(out)
    check_bytes(src, out, plan)
    _, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def one_shard_per_expert(src: Path, dst: Path) -> Path:
    """Re-shard a checkpoint so every (layer, expert) has a shard of its own."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for shard in src.glob("*.safetensors"):
        tensors.update(load_file(shard))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".experts.")
        key = f"{parts[0].split('.')[2]}-{parts[1].split('.')[0]}" if len(parts) == 2 else "rest"
        groups.setdefault(f"model-{key}.safetensors", {})[name] = t
    weight_map = {}
    for shard, group in groups.items():
        save_file(group, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_shards_left_empty_are_not_written(tiny_checkpoint, tmp_path):
    """The shards of dropped experts end up empty: they are left out of OUT and of the index, and the
    output still loads."""
    from transformers import AutoModelForCausalLM

    src = one_shard_per_expert(tiny_checkpoint("mixtral"), tmp_path / "per-expert")
    plan = random_plan(src)
    out = tmp_path / "out"
    summary = rewrite_checkpoint(src, plan, out, progress=False)
    dropped = summary["shards_dropped"]
    assert len(dropped) == 3 * 4 and summary["shards"] + len(dropped) == len(list(src.glob("*.safetensors")))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert not set(dropped) & set(index["weight_map"].values())
    assert not any((out / name).exists() for name in dropped)
    verify_checkpoint(out)
    check_bytes(src, out, plan)
    _, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def test_non_weight_files(tiny_checkpoint, tmp_path):
    """Tokenizer, templates, remote code and sub-folders are copied unchanged; weights in other formats
    (which would be the unpruned model) and hidden folders are not."""
    src = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("olmoe"), src)
    files = {"tokenizer.json": b'{"x": 1}', "chat_template.jinja": b"{{ messages }}", "modeling_custom.py": b"# code",
             "README.md": b"# card", "assets/vocab.txt": b"a\nb", ".gitattributes": b"*.safetensors lfs"}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    for rel in ("pytorch_model.bin", "consolidated.safetensors", "pytorch_model.bin.index.json", ".cache/x.lock",
                "original/consolidated.00.pth"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"weights")
    out = tmp_path / "out"
    summary = rewrite_checkpoint(src, random_plan(src), out, progress=False)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel
    assert (out / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()
    assert sorted(summary["skipped_files"]) == ["consolidated.safetensors", "original/consolidated.00.pth",
                                                "pytorch_model.bin", "pytorch_model.bin.index.json"]
    for rel in (*summary["skipped_files"], ".cache"):
        assert not (out / rel).exists()
