"""Super-expert protection (--protect) against the reference rule written out independently here, and
exact kept counts (--keep, --multiple-of) with their refusals (exit 2, one line, nothing written)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import kept_count, load_plan, make_plan, validate_plan
from surgery.plan.counts import routing_problem

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


def random_saliency(model: MoEModel, seed: int) -> dict:
    """A saliency.json with random, distinct statistics and heavy-tailed max activations (a few outliers)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in model.prunable_layers():
        stats = {s: rng.random(model.num_experts).tolist() for s in STATS}
        stats["max_activation"] = rng.lognormal(0.0, 1.5, model.num_experts).tolist()
        layers[str(layer)] = stats
    return {"model": fingerprint(model.ckpt), "model_path": str(model.ckpt.directory), "num_tokens": 100,
            "routing": "model", "layers": layers}


def reference_keep(saliency: dict, moe_layers: list[int], method: str, n_keep: int, mode: str | None
                   ) -> dict[int, list[int]]:
    """CerebrasResearch/reap's prune(): super experts' saliency -> +inf, then topk(largest=False) of the
    experts to prune, per layer; threshold max(torch.quantile(all, 0.995), max / 10) over all layers."""
    acts = torch.tensor([saliency["layers"][str(layer)]["max_activation"] for layer in moe_layers],
                        dtype=torch.float64)
    mask = torch.zeros_like(acts, dtype=torch.bool)
    if mode:
        flat = acts.flatten()
        threshold = max(torch.quantile(flat, 0.995).item(), flat.max().item() / 10)
        mask = acts > threshold
        if mode == "super":
            mask[int(len(moe_layers) * 0.75):, :] = False
    out = {}
    for i, layer in enumerate(moe_layers):
        scores = torch.tensor(saliency["layers"][str(layer)][method], dtype=torch.float64)
        scores[mask[i]] = float("inf")
        num_experts = scores.shape[0]
        _, pruned = torch.topk(scores, num_experts - n_keep, largest=False)
        out[layer] = sorted(set(range(num_experts)) - set(pruned.tolist()))
    return out


def force_outlier(saliency: dict, layer: int, method: str = "reap") -> int:
    """Give the expert `method` ranks last in `layer` the largest max activation of all: the saliency
    alone drops it, protection must keep it. Returns its id."""
    scores = saliency["layers"][str(layer)][method]
    weakest = int(np.argmin(scores))
    top = max(max(s["max_activation"]) for s in saliency["layers"].values())
    saliency["layers"][str(layer)]["max_activation"][weakest] = 50.0 * top
    return weakest


@pytest.mark.parametrize("family,overrides", [
    ("qwen3_moe", {}),  # MoE layers 0, 2, 3 (layer 1 dense): L = 3, super considers 2
    ("mixtral", {"num_local_experts": 64, "num_hidden_layers": 4}),  # 256 values: two above the 99.5% quantile
    ("olmoe", {}),
])
@pytest.mark.parametrize("mode", ["super", "outliers"])
def test_protected_sets_equal_the_reference_rule(tiny_checkpoint, family, overrides, mode):
    with Checkpoint(tiny_checkpoint(family, **overrides)) as ckpt:
        model = MoEModel(ckpt)
        for seed in range(4):
            sal = random_saliency(model, seed)
            weakest = force_outlier(sal, model.moe_layers[0])
            for ratio in (0.25, 0.5):
                plan = make_plan(sal, model, "reap", ratio, protect=mode)
                n_keep = len(plan["layers"][str(model.moe_layers[0])]["keep"])
                want = reference_keep(sal, model.moe_layers, "reap", n_keep, mode)
                assert {int(k): v["keep"] for k, v in plan["layers"].items()} == want
                validate_plan(plan, model)
                first = plan["layers"][str(model.moe_layers[0])]
                assert weakest in first["keep"] and str(weakest) in first["protected"]
                assert weakest not in make_plan(sal, model, "reap", ratio)["layers"][str(model.moe_layers[0])]["keep"]
            assert plan["protect"]["mode"] == mode


def test_super_ignores_the_last_quarter_of_layers(tiny_checkpoint):
    """The threshold comes from all L layers, but `super` protects only the first int(0.75 L)."""
    with Checkpoint(tiny_checkpoint("mixtral", num_local_experts=64, num_hidden_layers=4)) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 11)
        weakest = force_outlier(sal, 3)
        sup = make_plan(sal, model, "reap", 0.5, protect="super")
        out = make_plan(sal, model, "reap", 0.5, protect="outliers")
        assert sup["protect"]["considered_layers"] == [0, 1, 2] and out["protect"]["considered_layers"] == [0, 1, 2, 3]
        assert weakest not in sup["layers"]["3"]["keep"] and "protected" not in sup["layers"]["3"]
        assert weakest in out["layers"]["3"]["keep"] and out["layers"]["3"]["protected"] == {
            str(weakest): sal["layers"]["3"]["max_activation"][weakest]}
        # the outlier in layer 3 raised max / 10 above every other value: super protects nothing at all
        assert sup["protect"]["threshold"] == pytest.approx(sal["layers"]["3"]["max_activation"][weakest] / 10)


def test_more_protected_than_kept_is_refused(tiny_checkpoint):
    """512 values: the three largest are strictly above the interpolated 99.5% quantile."""
    with Checkpoint(tiny_checkpoint("mixtral", num_local_experts=64, num_hidden_layers=8)) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 5)
        acts = sal["layers"]["0"]["max_activation"]
        for e in range(3):  # three experts far above everything else, all in layer 0
            acts[e] = 1000.0 + e
        plan = make_plan(sal, model, "reap", None, keep=3, protect="super")
        assert plan["layers"]["0"]["keep"] == [0, 1, 2] and sorted(plan["layers"]["0"]["protected"]) == ["0", "1", "2"]
        with pytest.raises(SurgeryError, match=r"layer 0 has 3 protected experts \[0, 1, 2\].*keeps only 2"):
            make_plan(sal, model, "reap", None, keep=2, protect="super")


def test_grouped_routing_protects_within_groups(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("glm4_moe")) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 2)
        weakest = force_outlier(sal, 1)
        plan = make_plan(sal, model, "reap", 0.5, protect="outliers")
        assert weakest in plan["layers"]["1"]["keep"]
        validate_plan(plan, model)  # still two per routing group


def test_edited_plan_may_not_drop_a_protected_expert(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("qwen3_moe")) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 0)
        weakest = force_outlier(sal, 0)
        plan = make_plan(sal, model, "reap", 0.5, protect="super")
        bad = copy.deepcopy(plan)
        entry = bad["layers"]["0"]
        other = entry["drop"][0]
        entry["keep"] = sorted(set(entry["keep"]) - {weakest} | {other})
        entry["drop"] = sorted(set(entry["drop"]) - {other} | {weakest})
        with pytest.raises(SurgeryError, match=f"drops expert {weakest}, which \"protected\" lists"):
            validate_plan(bad, model)
        del entry["protected"]
        validate_plan(bad, model)  # a person who removes the protection may drop it
        bad["layers"]["0"]["protected"] = {"x": 1.0}
        with pytest.raises(SurgeryError, match="not an expert id"):
            validate_plan(bad, model)


# ---------------------------------------------------------------------------------------------- counts
def fake_model(num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1) -> SimpleNamespace:
    """Just what the count rules read: expert count, top-k and the group-limited routing facts."""
    facts = {"n_group": n_group, "topk_group": topk_group} if n_group > 1 else {}
    return SimpleNamespace(num_experts=num_experts, top_k=top_k, ckpt=SimpleNamespace(directory=Path(".")),
                           routing_facts=lambda: facts, min_experts_to_keep=lambda: top_k)


def test_keep_is_exact(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("minimax_m2")) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 1)
        for n in range(model.top_k, model.num_experts + 1):
            plan = make_plan(sal, model, "reap", None, keep=n)
            assert {len(v["keep"]) for v in plan["layers"].values()} == {n}
            assert plan["n_keep"] == n and "ratio" not in plan
            validate_plan(plan, model)
            scores = sal["layers"]["0"]["reap"]
            assert plan["layers"]["0"]["keep"] == sorted(np.argsort(scores)[::-1][:n].tolist())


@pytest.mark.parametrize("experts,top_k,n_group,ratio,keep,multiple,want", [
    (256, 8, 1, 0.4, None, None, 154),
    (256, 8, 1, 0.4, None, 8, 152),  # MiniMax-M2.1 at 0.4: 154 splits over no EP size of 4 or 8; 152 does
    (256, 8, 1, 0.4, None, 4, 152),
    (256, 8, 1, None, 154, 16, 144),
    (256, 8, 1, None, 128, 128, 128),
    (256, 8, 8, 0.5, None, 3, 120),  # lcm(3, n_group 8) = 24: 128 -> 120, still 8 whole groups
    (256, 8, 8, None, 200, None, 200),
    (8, 2, 1, 0.25, None, 4, 4),
    (8, 2, 1, None, 8, 3, 6),
    (8, 2, 1, None, 2, 1, 2),
    (160, 8, 8, None, 64, 16, 64),
])
def test_multiple_of_rounds_down(experts, top_k, n_group, ratio, keep, multiple, want):
    model = fake_model(experts, top_k, n_group)
    n = kept_count(model, ratio, keep, multiple)
    assert n == want
    if multiple:
        assert n % multiple == 0
    assert n % n_group == 0 and n >= top_k and routing_problem(model, n) is None


@pytest.mark.parametrize("ratio,keep,multiple,message", [
    (None, 1, None, "needs at least 2"),
    (None, 9, None, "more than the model's 8 experts"),
    (0.5, 4, None, "not both"),
    (None, None, None, "give --ratio R"),
    (None, 6, 7, "leaves 0, fewer than top-k 2"),
    (0.75, None, 3, "leaves 0, fewer than top-k 2"),
    (None, 4, 0, "--multiple-of must be a whole number >= 1"),
    (1.0, None, None, r"ratio must be in \[0, 1\)"),
])
def test_impossible_counts_are_refused(ratio, keep, multiple, message):
    with pytest.raises(SurgeryError, match=message):
        kept_count(fake_model(8, 2), ratio, keep, multiple)


def test_grouped_counts(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("glm4_moe")) as ckpt:  # 8 experts, n_group 2, top-k 2
        model = MoEModel(ckpt)
        assert kept_count(model, None, 7, 1) == 6  # rounded to a multiple of n_group
        assert kept_count(model, None, 8, 3) == 6  # lcm(3, 2)
        with pytest.raises(SurgeryError, match="n_group=2"):
            kept_count(model, None, 7)
        with pytest.raises(SurgeryError, match="1 per routing group"):
            kept_count(model, None, 2)


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`surgery ARGS` in-process through the real entry point (one-line error, exit 2)."""
    from surgery.cli import main

    monkeypatch.setattr(sys, "argv", ["surgery", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("args,message", [
    (["--keep", "1"], "needs at least 2"),
    (["--keep", "9"], "more than the model's 8 experts"),
    (["--ratio", "0.5", "--keep", "4"], "not both"),
    (["--keep", "6", "--multiple-of", "7"], "fewer than top-k 2"),
    (["--ratio", "0.5", "--protect", "everything"], "unknown --protect"),
])
def test_plan_cli_refuses_in_one_line_and_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch, capsys, args,
                                                         message):
    with Checkpoint(tiny_checkpoint("minimax_m2")) as ckpt:
        sal = random_saliency(MoEModel(ckpt), 0)
    work = tmp_path / "work"
    work.mkdir()
    (work / "saliency.json").write_text(json.dumps(sal))
    code, _out, err = run_cli(monkeypatch, capsys, "plan", str(work), "--method", "reap", *args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("surgery: error:") and message in lines[0], err
    assert sorted(p.name for p in work.iterdir()) == ["saliency.json"]


def test_prune_refuses_an_impossible_count_before_any_work(monkeypatch, capsys, tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    code, _o, err = run_cli(monkeypatch, capsys, "prune", str(tiny_checkpoint("minimax_m2")), "--out", str(out),
                            "--keep", "4", "--multiple-of", "5", "--no-progress")
    assert code == 2 and "fewer than top-k 2" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not out.with_name("out.work").exists()


def test_plan_cli_protect_summary_and_file(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    with Checkpoint(tiny_checkpoint("qwen3_moe")) as ckpt:
        model = MoEModel(ckpt)
        sal = random_saliency(model, 3)
        weakest = force_outlier(sal, 0)
    work = tmp_path / "work"
    work.mkdir()
    (work / "saliency.json").write_text(json.dumps(sal))
    code, out, err = run_cli(monkeypatch, capsys, "plan", str(work), "--method", "reap", "--keep", "6",
                             "--multiple-of", "4", "--protect", "super", "--summary")
    assert code == 0, err
    value = sal["layers"]["0"]["max_activation"][weakest]
    assert "keep 4 of 8 experts" in out and "protect super: max activation >" in out
    assert f"layer 0: protected expert(s) {weakest} (max activation {value:.6g})" in out, out
    plan = load_plan(work / "plan.json")
    assert plan["protect"]["mode"] == "super" and plan["protect"]["considered_layers"] == [0, 2]
    assert plan["layers"]["0"]["protected"] == {str(weakest): value} and weakest in plan["layers"]["0"]["keep"]
    assert plan["requested_keep"] == 6 and plan["multiple_of"] == 4 and plan["n_keep"] == 4
    with Checkpoint(tiny_checkpoint("qwen3_moe")) as ckpt:
        validate_plan(plan, MoEModel(ckpt))
