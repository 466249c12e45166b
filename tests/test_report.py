"""The work-directory report and the pruned model's card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import SCALE_SUFFIX
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.plan import make_plan, save_plan
from surgery.report import build_report, write_model_card
from surgery.report.card import base_model_id, pruned_counts
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from tests.oracle import make_batch

LENGTHS = [17, 5, 11, 17, 2, 9, 13]


def calibrated(model_dir: Path, work: Path) -> dict:
    ids, mask = make_batch(256, LENGTHS, seed=31)
    opts = CalibrateOptions(batch_size=3, dtype="float32", device="cpu", keep_hidden=True, progress=False)
    inputs = CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"code.jsonl": "abc"}, {"samples": 7})
    return Calibrator(model_dir, work, opts).run(inputs)


def plan_for(model_dir: Path, saliency: dict, method: str = "reap", ratio: float = 0.5) -> dict:
    with Checkpoint(model_dir) as ckpt:
        return make_plan(saliency, MoEModel(ckpt), method, ratio)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_full_report(tiny_checkpoint, tmp_path):
    from surgery.eval.fidelity import run_fidelity

    model_dir = tiny_checkpoint("glm4_moe")  # dense layer 0: MoE layers are 1 and 2
    work = tmp_path / "w"
    saliency = calibrated(model_dir, work)
    plan = plan_for(model_dir, saliency)
    save_plan(plan, work / "plan.json")
    run_fidelity(work, ["reap", "random"], [0.25, 0.5], progress=False)
    evaluation = {"datasets": {"code.jsonl": {"base": {"loss": 2.5, "perplexity": 12.18, "tokens": 90},
                                              "pruned": {"loss": 2.75, "perplexity": 15.64, "tokens": 90}}},
                  "models": {"base": {}, "pruned": {}}}
    (work / "eval.json").write_text(json.dumps(evaluation))
    report = build_report(work)
    assert json.loads((work / "report.json").read_text()) == report
    assert report["plan"]["method"] == "reap" and report["plan_note"] is None
    assert report["plan"]["layers"] == {k: {"keep": sorted(v["keep"]), "drop": sorted(v["drop"])}
                                        for k, v in plan["layers"].items()}
    assert list(report["plan"]["layers"]) == ["1", "2"]
    for method in ("reap", "frequency", "ean"):
        for layer, stats in report["saliency"][method].items():
            values = np.array(saliency["layers"][layer][method])
            assert stats == {"min": values.min(), "median": float(np.median(values)), "max": values.max()}
    assert report["calibration"]["datasets"] == {"code.jsonl": "abc"}
    assert report["fidelity"]["methods"] == ["reap", "random"] and report["eval"] == evaluation
    assert set(report["figures"]) == {"saliency_heatmap", "fidelity"}
    for name in report["figures"].values():
        w, h = png_size(work / name)
        assert w >= 400 and h >= 250
    md = (work / "report.md").read_text()
    drop1 = plan["layers"]["1"]["drop"]
    assert f"| 1 | {8 - len(drop1)} |" in md
    assert "![saliency heatmap](report-saliency.png)" in md and "![fidelity](report-fidelity.png)" in md
    assert "| reap | " in md and "2.7500 (15.64)" in md and "Not measured" not in md


def test_report_without_plan_fidelity_or_eval(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("mixtral")
    work = tmp_path / "w"
    saliency = calibrated(model_dir, work)
    for ratio in (0.25, 0.5):
        save_plan(plan_for(model_dir, saliency, ratio=ratio), work / f"plan-reap-{ratio:g}.json")
    report = build_report(work)
    assert report["plan"] is None and "several plans" in report["plan_note"]
    assert report["fidelity"] is None and report["eval"] is None
    assert list(report["figures"]) == ["saliency_heatmap"] and not (work / "report-fidelity.png").exists()
    md = (work / "report.md").read_text()
    assert "several plans" in md and "Not measured" in md and "Not run" in md
    chosen = build_report(work, work / "plan-reap-0.25.json")
    assert chosen["plan"]["ratio"] == 0.25
    with Checkpoint(tiny_checkpoint("olmoe")) as ckpt:
        save_plan(make_plan({}, MoEModel(ckpt), "random", 0.5), tmp_path / "other.json")
    with pytest.raises(SurgeryError, match="another model"):
        build_report(work, tmp_path / "other.json")


@pytest.mark.parametrize("fp8", [False, True])
def test_model_card(fp8, tiny_checkpoint, tmp_path):
    """Parameters and sizes on the card are those of the checkpoint the rewrite actually writes."""
    from surgery.rewrite import rewrite_checkpoint

    model_dir = tiny_checkpoint("minimax_m2", fp8=fp8)
    work = tmp_path / "w"
    saliency = calibrated(model_dir, work)
    plan = plan_for(model_dir, saliency, ratio=0.5)
    out = tmp_path / "pruned"
    rewrite_checkpoint(model_dir, plan, out, progress=False)
    with Checkpoint(model_dir) as src, Checkpoint(out) as dst:
        counts = pruned_counts(MoEModel(src), plan)
        params = {name: sum(t.numel for n, t in c.tensors.items() if not n.endswith(SCALE_SUFFIX))
                  for name, c in (("before", src), ("after", dst))}
        assert counts == {"params_before": params["before"], "params_after": params["after"],
                          "bytes_before": src.total_bytes, "bytes_after": dst.total_bytes}
    command = f"surgery prune {model_dir} --out {out} --method reap --ratio 0.5"
    evaluation = {"datasets": {"prose.jsonl": {str(model_dir): {"loss": 1.5, "perplexity": 4.48, "tokens": 10},
                                               str(out): {"loss": 1.75, "perplexity": 5.75, "tokens": 10}}}}
    manifest = json.loads((work / "manifest.json").read_text())
    path = write_model_card(out, model_dir, plan, saliency, command, evaluation, calibration=manifest)
    card = path.read_text()
    assert path == out / "README.md"
    assert "| Experts per MoE layer | 8 → 4 (top-k 2, unchanged) |" in card
    assert "50% of routed experts removed, method `reap`" in card
    assert f"{int(saliency['num_tokens']):,} calibration tokens" in card and "`code.jsonl`" in card
    assert command in card and "--trust-remote-code" not in card  # no auto_map
    # computed from the output's shapes (4 heads: TP 8 cannot split them), not a fixed 8; the FP8 copy's
    # 24-wide blocks do not divide its 32-wide experts, which vLLM refuses at any TP
    if fp8:
        assert "vLLM loads this checkpoint at no setting" in card and "FP8 block 24" in card
    else:
        assert f"vllm serve {out}" in card and "--tensor-parallel-size 4  # loads at TP 1, 2, 4" in card
        assert "- TP 8: does not load (4 attention heads do not divide by TP 8)" in card
    assert "1.7500 (5.75)" in card and "AutoModelForCausalLM.from_pretrained" in card
    assert ("fp8" in card) == fp8


def test_model_card_merge(tiny_checkpoint, tmp_path):
    """A `--method merge` checkpoint is described as expert merging, not as pruning."""
    from surgery.plan.merge import outputs_loader

    model_dir = tiny_checkpoint("minimax_m2")
    work = tmp_path / "w"
    saliency = calibrated(model_dir, work)
    with Checkpoint(model_dir) as ckpt:
        plan = make_plan(saliency, MoEModel(ckpt), "merge", 0.5, outputs=outputs_loader(work))
    card = write_model_card(tmp_path / "merged", model_dir, plan, saliency, "surgery prune --method merge").read_text()
    assert "- expert-merging" in card and "expert pruning" not in card and "expert-pruning" not in card
    assert "by expert merging: the experts REAP (router-weighted expert activation) ranks highest are kept" in card
    assert "routed-frequency-weighted average" in card
    assert "| Merging | 50% of routed experts removed (folded into kept experts), method `merge` |" in card


def test_base_model_id(tmp_path):
    snap = tmp_path / "hub" / "models--MiniMaxAI--MiniMax-M2.1" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert base_model_id(snap, {}) == "MiniMaxAI/MiniMax-M2.1"
    plain = tmp_path / "my-model"
    plain.mkdir()
    assert base_model_id(plain, {"_name_or_path": "org/name"}) == "org/name"
    assert base_model_id(plain, {}) == "my-model"
