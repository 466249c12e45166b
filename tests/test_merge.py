"""Expert merging (--method merge) against an independent in-memory merge written plainly here.

The plan's groups are recomputed with numpy from saliency.json and the output sums (cosine of mean
outputs); the rewritten checkpoint must verify, load in transformers with no missing or unexpected
keys, and give the logits of the original model with each group's fused expert parameters averaged
by routed frequency and the router rows of the kept experts sliced. FP8 experts are re-quantised in
their block layout; the output sums calibration records survive kill -9 and resume bit for bit.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import load_plan, make_plan, validate_plan
from surgery.plan.merge import outputs_loader
from surgery.rewrite import plan_summary, rewrite_checkpoint, verify_checkpoint
from tests.oracle import dequantize_checkpoint, moe_blocks, prune_in_memory

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


def write_work(model: MoEModel, work: Path, seed: int, hidden: int, unrouted: dict[int, list[int]] | None = None
               ) -> dict:
    """saliency.json and stats/layer_NNNN.outputs.npy as calibration writes them, random but consistent:
    frequencies are token counts, experts listed in `unrouted` have frequency 0 and output sum 0."""
    rng = np.random.default_rng(seed)
    (work / "stats").mkdir(parents=True, exist_ok=True)
    layers = {}
    for layer in model.prunable_layers():
        stats = {s: rng.random(model.num_experts).tolist() for s in STATS}
        freq = rng.integers(1, 200, model.num_experts).astype(float)
        sums = rng.standard_normal((model.num_experts, hidden)) * freq[:, None]
        for e in (unrouted or {}).get(layer, []):
            freq[e], sums[e] = 0.0, 0.0
        stats["frequency"] = freq.tolist()
        layers[str(layer)] = stats
        np.save(work / "stats" / f"layer_{layer:04d}.outputs.npy", sums)
    saliency = {"model": fingerprint(model.ckpt), "model_path": str(model.ckpt.directory), "num_tokens": 1000,
                "routing": "model", "layers": layers}
    (work / "saliency.json").write_text(json.dumps(saliency))
    return saliency


def expected_groups(saliency: dict, work: Path, layer: int, keep: list[int], n_group: int = 1
                    ) -> dict[str, list[int]]:
    """Each dropped, routed expert joins the kept, routed expert of its routing group with the highest
    cosine between mean outputs (ties to the lower id)."""
    freq = np.array(saliency["layers"][str(layer)]["frequency"])
    sums = np.load(work / "stats" / f"layer_{layer:04d}.outputs.npy")
    size = len(freq) // n_group
    groups: dict[str, list[int]] = {}
    for d in range(len(freq)):
        if d in keep or freq[d] == 0:
            continue
        md = sums[d] / freq[d]
        best, best_cos = None, -math.inf
        for c in keep:
            if freq[c] == 0 or c // size != d // size:
                continue
            mc = sums[c] / freq[c]
            cos = md @ mc / (np.linalg.norm(md) * np.linalg.norm(mc))
            if cos > best_cos:
                best, best_cos = c, cos
        if best is not None:
            groups.setdefault(str(best), []).append(d)
    return groups


def merge_in_memory(model: torch.nn.Module, plan: dict, round_to: torch.dtype | None = None) -> torch.nn.Module:
    """Average every fused [E, ...] expert parameter over each merge group (weights f_i / Σ f), then
    keep the kept experts and their router rows (prune_in_memory). `round_to`: the checkpoint's dtype."""
    blocks = moe_blocks(model)
    for key, entry in plan["layers"].items():
        experts = blocks[int(key)].experts
        freq = entry["merge_weights"]
        with torch.no_grad():
            for p in list(experts.parameters(recurse=False)):
                if p.ndim == 0 or p.shape[0] != len(freq):
                    continue
                new = p.data.clone()
                for c, dropped in entry["merge"].items():
                    members = sorted([int(c), *dropped])
                    total = math.fsum(freq[m] for m in members)
                    acc = None
                    for m in members:
                        x = p.data[m].float() * (freq[m] / total)
                        acc = x if acc is None else acc + x
                    new[int(c)] = acc.to(round_to).float() if round_to is not None else acc
                p.data.copy_(new)
    return prune_in_memory(model, {int(k): v["keep"] for k, v in plan["layers"].items()})


def logits(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    ids = torch.randint(3, vocab, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("family", ["minimax_m2", "qwen3_moe", "glm4_moe", "gpt_oss"])
def test_merged_checkpoint_equals_in_memory_merge(family, tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint(family)
    with Checkpoint(src) as ckpt:
        model = MoEModel(ckpt)
        work = tmp_path / "work"
        first = model.moe_layers[0]
        sal = write_work(model, work, seed=7, hidden=64, unrouted={first: [0, 1]})
        plan = make_plan(sal, model, "merge", 0.5, outputs=outputs_loader(work))
        n_group = model.routing_facts().get("n_group", 1)
        for layer in model.prunable_layers():
            entry = plan["layers"][str(layer)]
            assert entry["merge"] == expected_groups(sal, work, layer, entry["keep"], n_group)
            assert entry["merge_weights"] == sal["layers"][str(layer)]["frequency"]
        info = plan_summary(model, plan)
        unrouted_dropped = [e for e in (0, 1) if e in plan["layers"][str(first)]["drop"]]
        assert info["unmerged"][first] == unrouted_dropped  # no routed tokens: no mean, just dropped
        assert not any(c in ("0", "1") for c in plan["layers"][str(first)]["merge"])  # never a target
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    assert verify_checkpoint(out)["num_experts"] == 4
    merged, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"] and not loading.get("mismatched_keys")
    oracle = merge_in_memory(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), plan)
    got, want = logits(merged, 256), logits(oracle, 256)
    assert (got - want).abs().max().item() < 1e-4
    # merging changed the model beyond pruning (the test can fail)
    pruned = prune_in_memory(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32),
                             {int(k): v["keep"] for k, v in plan["layers"].items()})
    assert (logits(pruned, 256) - got).abs().max().item() > 1e-3
    prov = json.loads((out / "surgery.json").read_text())
    assert prov["method"] == "merge" and prov["plan"]["layers"][str(first)]["merge"] == {
        k: sorted(v) for k, v in plan["layers"][str(first)]["merge"].items()}


def test_fp8_experts_are_requantised_in_their_block_layout(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("minimax_m2", fp8=True)  # 24 x 24 blocks, partial edge blocks
    with Checkpoint(src) as ckpt:
        model = MoEModel(ckpt)
        sal = write_work(model, tmp_path / "work", seed=3, hidden=64)
        plan = make_plan(sal, model, "merge", 0.5, outputs=outputs_loader(tmp_path / "work"))
    out = tmp_path / "out"
    rewrite_checkpoint(src, plan, out, progress=False)
    verify_checkpoint(out)
    cfg_in, cfg_out = (json.loads((d / "config.json").read_text()) for d in (src, out))
    assert cfg_out["quantization_config"] == cfg_in["quantization_config"]
    with Checkpoint(src) as a, Checkpoint(out) as b:
        for key, entry in plan["layers"].items():
            new_of = {old: new for new, old in enumerate(sorted(entry["keep"]))}
            pre = f"model.layers.{key}.block_sparse_moe.experts."
            for c in entry["keep"]:
                members = sorted([c, *entry["merge"].get(str(c), [])])
                total = math.fsum(entry["merge_weights"][m] for m in members)
                for w in ("w1", "w2", "w3"):
                    q = b.read(f"{pre}{new_of[c]}.{w}.weight")
                    s = b.read(f"{pre}{new_of[c]}.{w}.weight_scale_inv")
                    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
                    if len(members) == 1:  # not merged: the bytes as shipped
                        assert b.read_bytes(b.info(f"{pre}{new_of[c]}.{w}.weight")) == a.read_bytes(
                            a.info(f"{pre}{c}.{w}.weight"))
                        continue
                    want = sum(dequant(a.read(f"{pre}{m}.{w}.weight"), a.read(f"{pre}{m}.{w}.weight_scale_inv"))
                               * (entry["merge_weights"][m] / total) for m in members)
                    amax = block_amax(want)
                    torch.testing.assert_close(s, amax / 448, rtol=1e-6, atol=0)
                    err = (dequant(q, s) - want).abs()
                    bound = expand(amax)[:want.shape[0], :want.shape[1]] / 448 * 16  # e4m3: half a step of 32
                    assert (err <= bound + 1e-12).all() and err.max() > 0
    plain = dequantize_checkpoint(out, tmp_path / "plain")
    _, loading = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]


def dequant(q: torch.Tensor, s: torch.Tensor, block: int = 24) -> torch.Tensor:
    rows, cols = q.shape
    return q.float() * s.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


def block_amax(w: torch.Tensor, block: int = 24) -> torch.Tensor:
    rows, cols = w.shape
    nr, nc = -(-rows // block), -(-cols // block)
    return torch.stack([torch.stack([w[i * block:(i + 1) * block, j * block:(j + 1) * block].abs().max()
                                     for j in range(nc)]) for i in range(nr)])


def expand(amax: torch.Tensor, block: int = 24) -> torch.Tensor:
    return amax.repeat_interleave(block, 0).repeat_interleave(block, 1)


def test_edited_merge_plans_are_validated(tiny_checkpoint, tmp_path):
    with Checkpoint(tiny_checkpoint("mixtral")) as ckpt:
        model = MoEModel(ckpt)
        sal = write_work(model, tmp_path / "work", seed=1, hidden=64)
        plan = make_plan(sal, model, "merge", None, keep=4, outputs=outputs_loader(tmp_path / "work"))
        validate_plan(plan, model)
        entry = plan["layers"]["1"]
        kept, dropped = entry["keep"], entry["drop"]

        def broken(**change) -> dict:
            bad = copy.deepcopy(plan)
            bad["layers"]["1"].update(change)
            return bad

        cases = [
            (dict(merge={str(dropped[0]): [dropped[1]]}), f"merges into expert {dropped[0]}, which it does not keep"),
            (dict(merge={str(kept[0]): [kept[1]]}), "only dropped experts can be merged"),
            (dict(merge={str(kept[0]): [dropped[0]], str(kept[1]): [dropped[0]]}), "into both"),
            (dict(merge_weights=[1.0] * 7), "must list 8 finite numbers"),
            (dict(merge_weights=[-1.0] + [1.0] * 7), "must list 8 finite numbers"),
            (dict(merge={str(kept[0]): [dropped[0]]}, merge_weights=[0.0] * 8), "total weight 0"),
            (dict(merge={"x": []}), "not an expert id"),
            (dict(merge=[1, 2]), "must be an object"),
        ]
        for change, message in cases:
            with pytest.raises(SurgeryError, match=message):
                validate_plan(broken(**change), model)
        edited = broken(merge={str(kept[0]): [dropped[0]]})  # a person may regroup by hand
        validate_plan(edited, model)
        with pytest.raises(SurgeryError, match="expert output sums of MoE layer 0"):
            make_plan(sal, model, "merge", 0.5, outputs=outputs_loader(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- end to end
def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from surgery.cli import main

    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_plan_cli_merge_summary(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    with Checkpoint(tiny_checkpoint("mixtral")) as ckpt:
        model = MoEModel(ckpt)
        write_work(model, tmp_path / "work", seed=4, hidden=64, unrouted={2: [5, 6, 7]})
    code, out, err = run_cli(monkeypatch, capsys, "plan", str(tmp_path / "work"), "--method", "merge", "--ratio",
                             "0.5", "--summary")
    assert code == 0, err
    plan = load_plan(tmp_path / "work" / "plan.json")
    merged = sum(len(v) for e in plan["layers"].values() for v in e["merge"].values())
    unmerged = sum(e in plan["layers"]["2"]["drop"] for e in (5, 6, 7))
    assert f"merge: {merged} dropped experts folded into" in out and f"{unmerged} dropped without routed" in out
    assert merged + unmerged == 12 and "layer 0: " in out and " <- " in out


def test_prune_method_merge_on_the_trained_fixture(shared_fixtures, tmp_path, monkeypatch, capsys):
    """`surgery prune --method merge`: calibrate, plan, rewrite (bf16 merged in float32, stored bf16), verify,
    load; logits equal the in-memory merge rounded to bf16 like the checkpoint."""
    from transformers import AutoModelForCausalLM

    src = shared_fixtures / "tinymoe-m2"
    out = tmp_path / "out"
    code, _out, err = run_cli(monkeypatch, capsys, "prune", str(src), "--out", str(out), "--method", "merge",
                              "--keep", "16", "--multiple-of", "8", "--protect", "super",
                              "--dataset", str(shared_fixtures / "text" / "code.calib.jsonl"), "--samples", "4",
                              "--max-length", "48", "--no-progress")
    assert code == 0, err
    work = out.with_name("out.work")
    plan = load_plan(work / "plan-merge-keep16-m8-protect-super.json")
    assert plan["method"] == "merge" and plan["merge"]["saliency"] == "reap"
    assert sum(len(v) for e in plan["layers"].values() for v in e["merge"].values()) > 0
    assert verify_checkpoint(out)["num_experts"] == 16
    merged, loading = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    oracle = merge_in_memory(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), plan,
                             round_to=torch.bfloat16)
    got, want = logits(merged, 1000), logits(oracle, 1000)
    assert (got - want).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------- resume
def calibrate(model: Path, data: Path, work: Path, die_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SURGERY_DIE_AT", None)
    if die_at:
        env["SURGERY_DIE_AT"] = die_at
    cmd = [sys.executable, "-m", "surgery", "calibrate", str(model), "--dataset", str(data), "--samples", "5",
           "--max-length", "48", "--batch-size", "2", "--work", str(work), "--no-progress", "--cache-budget", "0"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_output_sums_survive_kill_and_resume(shared_fixtures, tmp_path):
    model, data = shared_fixtures / "tinymoe-m2", shared_fixtures / "text" / "code.calib.jsonl"
    ref = tmp_path / "ref"
    assert calibrate(model, data, ref).returncode == 0
    work = tmp_path / "work"
    for point in ("layer1.batch1", "layer3.stats"):
        killed = calibrate(model, data, work, die_at=point)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
    done = calibrate(model, data, work)
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (ref / "stats").glob("*.outputs.npy"))
    assert names == [f"layer_{i:04d}.outputs.npy" for i in range(6)]
    for name in names:
        assert (work / "stats" / name).read_bytes() == (ref / "stats" / name).read_bytes(), name
    sums = np.load(ref / "stats" / names[0])
    assert sums.dtype == np.float64 and sums.shape == (32, 192) and np.abs(sums).sum() > 0
