"""Plans: ranking, ties, counts, renumbering, refusals, and validation of hand-edited plans."""

from __future__ import annotations

import copy
import json
import math

import pytest
from typer.testing import CliRunner

from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import (
    METHODS,
    kept_map,
    load_plan,
    make_plan,
    n_keep_for,
    plan_hash,
    save_plan,
    validate_plan,
)
from surgery.rewrite import plan_summary

STATS = ("frequency", "weighted_frequency", "ean", "reap", "max_activation")


@pytest.fixture
def model(tiny_checkpoint):
    with Checkpoint(tiny_checkpoint("minimax_m2")) as ckpt:
        yield MoEModel(ckpt)


def saliency_for(model: MoEModel, scores: dict[int, dict[str, list[float]]] | None = None) -> dict:
    """A saliency.json as calibration writes it; every statistic defaults to a distinct ranking."""
    layers = {}
    for layer in model.moe_layers:
        base = {s: [float((e * (i + 3) + layer) % model.num_experts) for e in range(model.num_experts)]
                for i, s in enumerate(STATS)}
        base.update((scores or {}).get(layer, {}))
        layers[str(layer)] = base
    return {"model": fingerprint(model.ckpt), "model_path": str(model.ckpt.directory), "num_tokens": 100,
            "routing": "model", "layers": layers}


def test_keeps_the_highest_in_original_order(model):
    reap = [0.5, 9.0, 0.1, 7.0, 3.0, 8.0, 0.2, 6.0]
    sal = saliency_for(model, {layer: {"reap": reap} for layer in model.moe_layers})
    plan = make_plan(sal, model, "reap", 0.5)
    for entry in plan["layers"].values():
        assert entry == {"keep": [1, 3, 5, 7], "drop": [0, 2, 4, 6]}
    assert plan["method"] == "reap" and plan["ratio"] == 0.5
    assert plan["source"] == fingerprint(model.ckpt)
    assert kept_map(plan)[0] == {1: 0, 3: 1, 5: 2, 7: 3}  # renumbered 0..n_keep-1 in original order


def test_ties_go_to_the_lower_index(model):
    sal = saliency_for(model, {layer: {"ean": [1.0, 2.0, 2.0, 2.0, 0.0, 2.0, 1.0, 2.0]}
                               for layer in model.moe_layers})
    plan = make_plan(sal, model, "ean", 0.5)
    assert plan["layers"]["0"]["keep"] == [1, 2, 3, 5]
    sal = saliency_for(model, {layer: {"ean": [1.0] * 8} for layer in model.moe_layers})
    assert make_plan(sal, model, "ean", 0.25)["layers"]["2"]["keep"] == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "random"])
def test_each_method_ranks_by_its_own_statistic(model, method):
    sal = saliency_for(model)
    plan = make_plan(sal, model, method, 0.5)
    for layer, entry in plan["layers"].items():
        scores = sal["layers"][layer][method]
        worst_kept = min(scores[e] for e in entry["keep"])
        assert all(scores[e] <= worst_kept for e in entry["drop"])


@pytest.mark.parametrize("ratio,n_keep", [(0.0, 8), (0.1, 8), (0.125, 7), (0.25, 6), (0.5, 4), (0.74, 3),
                                          (0.75, 2)])
def test_counts(model, ratio, n_keep):
    assert n_keep_for(8, ratio) == n_keep
    plan = make_plan(saliency_for(model), model, "reap", ratio)
    assert {len(e["keep"]) for e in plan["layers"].values()} == {n_keep}
    assert all(sorted(e["keep"] + e["drop"]) == list(range(8)) for e in plan["layers"].values())


def test_floating_point_ratios_drop_what_they_say():
    assert n_keep_for(10, 0.3) == 7 and n_keep_for(10, 0.7) == 3 and n_keep_for(100, 0.29) == 71
    assert n_keep_for(256, 0.5) == 128 and n_keep_for(256, 0.4) == 154


def test_random_is_deterministic_and_needs_no_saliency(model):
    a = make_plan({}, model, "random", 0.5, seed=1)
    assert a == make_plan({}, model, "random", 0.5, seed=1)
    b = make_plan({}, model, "random", 0.5, seed=2)
    assert a["layers"] != b["layers"] and a["seed"] == 1
    assert a["layers"]["0"]["keep"] != a["layers"]["1"]["keep"] or a["layers"]["1"] != a["layers"]["2"]
    validate_plan(a, model)


def test_refusals(model, tiny_checkpoint):
    sal = saliency_for(model)
    with pytest.raises(SurgeryError, match="needs at least 2"):
        make_plan(sal, model, "reap", 0.9)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(SurgeryError, match=r"ratio must be in \[0, 1\)"):
            make_plan(sal, model, "reap", bad)
    with pytest.raises(SurgeryError, match="unknown method"):
        make_plan(sal, model, "magnitude", 0.5)
    other = copy.deepcopy(sal)
    other["model"]["sha256"] = "f" * 64
    with pytest.raises(SurgeryError, match="saliency was computed on model ffffffffffff"):
        make_plan(other, model, "reap", 0.5)
    missing = copy.deepcopy(sal)
    del missing["layers"]["1"]
    with pytest.raises(SurgeryError, match="no 'reap' statistics for MoE layer 1"):
        make_plan(missing, model, "reap", 0.5)
    short = copy.deepcopy(sal)
    short["layers"]["2"]["reap"] = [1.0] * 7
    with pytest.raises(SurgeryError, match="has 7 values, expected 8"):
        make_plan(short, model, "reap", 0.5)
    nan = copy.deepcopy(sal)
    nan["layers"]["0"]["ean"][3] = math.nan
    with pytest.raises(SurgeryError, match="NaN"):
        make_plan(nan, model, "ean", 0.5)


def test_grouped_routing_limits(tiny_checkpoint):
    """GLM/DeepSeek: experts must split into n_group equal groups of at least 2."""
    with Checkpoint(tiny_checkpoint("glm4_moe")) as ckpt:
        glm = MoEModel(ckpt)
        assert make_plan({}, glm, "random", 0.5)  # 4 = 2 groups of 2
        with pytest.raises(SurgeryError, match="n_group=2"):
            make_plan({}, glm, "random", 0.625)  # 3 experts
        with pytest.raises(SurgeryError, match="1 per routing group"):
            make_plan({}, glm, "random", 0.75)  # 2 experts = top-k, but groups of 1


# ---------------------------------------------------------------------------------------------- edited plans
def edited(plan: dict, layer: str, **entry) -> dict:
    plan = copy.deepcopy(plan)
    plan["layers"][layer].update(entry)
    return plan


@pytest.mark.parametrize("change,message", [
    (dict(keep=[0, 0, 1, 2], drop=[3, 4, 5, 6, 7]), "more than once in \"keep\""),
    (dict(keep=[0, 1, 2, 3], drop=[4, 5, 6, 7, 7]), "more than once in \"drop\""),
    (dict(keep=[0, 1, 2, 8], drop=[3, 4, 5, 6, 7]), "expert 8, outside 0..7"),
    (dict(keep=[-1, 1, 2, 3], drop=[0, 4, 5, 6, 7]), "expert -1, outside"),
    (dict(keep=[0, 1, 2, 3], drop=[4, 5, 6]), r"neither keeps nor drops expert\(s\) \[7\]"),
    (dict(keep=[0, 1, 2, 3], drop=[3, 4, 5, 6, 7]), r"both keeps and drops expert\(s\) \[3\]"),
    (dict(keep=[0, 1, 2, 3, 4], drop=[5, 6, 7]), "transformers builds every MoE layer"),
    (dict(keep=["0", 1, 2, 3], drop=[4, 5, 6, 7]), "list of integer expert ids"),
    (dict(keep=[0, 1.0, 2, 3], drop=[4, 5, 6, 7]), "list of integer expert ids"),
])
def test_validate_rejects_edited_plans(model, change, message):
    plan = make_plan({}, model, "random", 0.5)
    with pytest.raises(SurgeryError, match=message):
        validate_plan(edited(plan, "1", **change), model)


def test_validate_layers_count_and_source(model, tiny_checkpoint):
    plan = make_plan({}, model, "random", 0.5)
    missing = copy.deepcopy(plan)
    del missing["layers"]["2"]
    with pytest.raises(SurgeryError, match=r"MoE layer\(s\) 2 missing"):
        validate_plan(missing, model)
    extra = copy.deepcopy(plan)
    extra["layers"]["7"] = plan["layers"]["0"]
    with pytest.raises(SurgeryError, match="layer 7 is not a MoE layer of this model"):
        validate_plan(extra, model)
    few = {layer: {"keep": [0], "drop": list(range(1, 8))} for layer in plan["layers"]}
    with pytest.raises(SurgeryError, match="needs at least 2"):
        validate_plan({**plan, "layers": few}, model)
    with pytest.raises(SurgeryError, match="not a plan"):
        validate_plan({"keep": [1]}, model)
    with pytest.raises(SurgeryError, match="no source fingerprint"):
        validate_plan({"layers": plan["layers"]}, model)
    with Checkpoint(tiny_checkpoint("mixtral")) as ckpt:
        other = MoEModel(ckpt)
        with pytest.raises(SurgeryError, match="another model.*architecture 'MiniMaxM2ForCausalLM' vs "
                                               "'MixtralForCausalLM'"):
            validate_plan(plan, other)


def test_validate_rejects_dense_layer(tiny_checkpoint):
    """Qwen3 with mlp_only_layers=[1]: layer 1 is dense and may not appear in a plan."""
    with Checkpoint(tiny_checkpoint("qwen3_moe")) as ckpt:
        qwen = MoEModel(ckpt)
        plan = make_plan({}, qwen, "random", 0.5)
        assert sorted(plan["layers"]) == ["0", "2", "3"]
        plan["layers"]["1"] = plan["layers"]["0"]
        with pytest.raises(SurgeryError, match=r"layer 1 is not a MoE layer of this model \(MoE layers: 0, 2-3\)"):
            validate_plan(plan, qwen)


def test_edited_order_and_hash(model, tmp_path):
    """Order within keep/drop does not matter (the new index follows the original order), and the
    plan hash, which identifies a rewrite for resuming, ignores it too."""
    plan = make_plan({}, model, "random", 0.5, seed=5)
    shuffled = copy.deepcopy(plan)
    for entry in shuffled["layers"].values():
        entry["keep"].reverse()
    validate_plan(shuffled, model)
    assert kept_map(shuffled) == kept_map(plan) and plan_hash(shuffled) == plan_hash(plan)
    assert plan_hash(make_plan({}, model, "random", 0.5, seed=6)) != plan_hash(plan)
    path = save_plan(plan, tmp_path / "p" / "plan.json")
    assert load_plan(path) == plan
    assert '"keep": [' in path.read_text()  # one line per list, for people


def test_summary_matches_the_rewrite(model, tiny_checkpoint, tmp_path):
    from surgery.rewrite import rewrite_checkpoint

    plan = make_plan({}, model, "random", 0.5)
    info = plan_summary(model, plan)
    assert info["kept"] == {0: 4, 1: 4, 2: 4} and info["bytes_before"] == model.ckpt.total_bytes
    out = tmp_path / "out"
    summary = rewrite_checkpoint(model.ckpt.directory, plan, out, progress=False)
    assert info["files_after"] == summary["output_bytes"] == sum(
        p.stat().st_size for p in out.glob("*.safetensors"))
    with Checkpoint(out) as ckpt:
        assert info["bytes_after"] == ckpt.total_bytes


# ---------------------------------------------------------------------------------------------- CLI
def test_plan_command(model, tmp_path):
    from surgery.cli import app

    work = tmp_path / "work"
    work.mkdir()
    (work / "saliency.json").write_text(json.dumps(saliency_for(model)))
    runner = CliRunner()
    dry = runner.invoke(app, ["plan", str(work), "--method", "reap", "--ratio", "0.25", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "keep 6 of 8 experts in MoE layers 0-2" in dry.output and "output size" in dry.output
    assert not (work / "plan.json").exists()
    res = runner.invoke(app, ["plan", str(work), "--method", "reap", "--ratio", "0.25"])
    assert res.exit_code == 0, res.output
    plan = load_plan(work / "plan.json")
    assert plan == make_plan(saliency_for(model), model, "reap", 0.25)
    res = runner.invoke(app, ["plan", str(work), "--method", "random", "--ratio", "0.5", "--seed", "4",
                              "--out", str(tmp_path / "r.json"), "--summary"])
    assert res.exit_code == 0 and "tensor bytes" in res.output
    assert load_plan(tmp_path / "r.json")["layers"] == make_plan({}, model, "random", 0.5, seed=4)["layers"]
    refused = runner.invoke(app, ["plan", str(work), "--method", "reap", "--ratio", "0.9"])
    assert isinstance(refused.exception, SurgeryError) and "needs at least 2" in str(refused.exception)
