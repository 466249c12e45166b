"""Per-layer fidelity: the pruned routing is exactly the pruned checkpoint's, and the command gives the
same figures from kept hidden states as from recomputed ones."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from surgery.eval.fidelity import layer_fidelity, run_fidelity, sliced_router
from surgery.executor.cache import HiddenCache
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from tests.oracle import _router_call, load_model, make_batch, moe_blocks, prune_in_memory

LENGTHS = [17, 5, 11, 17, 2, 9, 13]


@pytest.mark.parametrize("family", ["minimax_m2", "qwen2_moe", "glm4_moe", "mixtral"])
def test_layer_fidelity_equals_pruned_block(family, tiny_checkpoint):
    """‖y − y'‖/‖y‖ where y' is what transformers computes with the block pruned in memory (router rows
    and every per-expert bias sliced): sigmoid + block bias (MiniMax), groups + scaling (GLM), shared
    experts left out (Qwen2), softmax (Mixtral)."""
    model = load_model(tiny_checkpoint(family))
    layer, block = next(iter(moe_blocks(model).items()))
    num = block.gate.weight.shape[0]
    x = torch.randn(60, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    keep_a, keep_b = [0, 1, 2, 4, 5, 7], [1, 3, 4, 6]  # two per routing group for GLM's n_group=2
    got = layer_fidelity(block, x, {("a", 0.25): keep_a, ("b", 0.5): keep_b, ("all", 0.0): list(range(num))})
    with torch.no_grad():
        _, w, idx = _router_call(block, x)
        y = block.experts(x, idx, w)
        for key, keep in ((("a", 0.25), keep_a), (("b", 0.5), keep_b)):
            pruned = moe_blocks(prune_in_memory(copy.deepcopy(model), {layer: keep}))[layer]
            _, pw, pidx = _router_call(pruned, x)
            ref = float((y - pruned.experts(x, pidx, pw)).norm() / y.norm())
            assert got[key]["rel_error"] == pytest.approx(ref, rel=1e-5, abs=1e-6)
            assert got[key]["rel_error"] > 0.05 and got[key]["tokens"] == 60
    assert got[("all", 0.0)]["rel_error"] == 0.0
    assert block.gate.weight.shape[0] == num  # the block itself is untouched
    router, _ = sliced_router(block, keep_b)
    assert router.weight.shape[0] == 4 and block.gate.weight.shape[0] == num
    with pytest.raises(SurgeryError, match="distinct expert ids"):
        sliced_router(block, [0, 0, 1])


def calibrate(model_dir, work, keep_hidden: bool) -> None:
    ids, mask = make_batch(256, LENGTHS, seed=21)
    opts = CalibrateOptions(batch_size=3, dtype="float32", device="cpu", keep_hidden=keep_hidden, progress=False)
    inputs = CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"t": "0"}, {"n": len(ids)})
    Calibrator(model_dir, work, opts).run(inputs)


def test_kept_and_streamed_hidden_states_agree(tiny_checkpoint, tmp_path):
    """qwen3_moe has a dense layer between MoE layers (mlp_only_layers=[1]); without kept hidden states
    every layer input is recomputed by streaming, and the figures are the same."""
    model_dir = tiny_checkpoint("qwen3_moe")
    kept, streamed = tmp_path / "kept", tmp_path / "streamed"
    calibrate(model_dir, kept, keep_hidden=True)
    calibrate(model_dir, streamed, keep_hidden=False)
    before = HiddenCache(kept / "cache.zarr").hidden_layers()
    methods, ratios = ["reap", "random"], [0.0, 0.5]
    a = run_fidelity(kept, methods, ratios, progress=False)
    b = run_fidelity(streamed, methods, ratios, progress=False)
    assert HiddenCache(kept / "cache.zarr").hidden_layers() == before  # the calibration cache is untouched
    assert not (kept / "fidelity").exists() and not (streamed / "fidelity").exists()
    assert (a["hidden_source"], b["hidden_source"]) == ("kept", "streamed")
    assert b["streamed_layers"] == [0, 1, 2, 3]
    assert list(a["layers"]) == ["0", "2", "3"]
    assert json.loads((kept / "fidelity.json").read_text()) == a
    for layer, per in a["layers"].items():
        for m in methods:
            assert per[m]["0"] == 0.0  # ratio 0 keeps every expert
            assert per[m]["0.5"] > 0.05
            assert b["layers"][layer][m]["0.5"] == pytest.approx(per[m]["0.5"], rel=1e-5)
    assert a["n_keep"] == {"0": 8, "0.5": 4}
    assert a["mean"]["random"]["0.5"] == pytest.approx(np.mean([a["layers"][k]["random"]["0.5"] for k in a["layers"]]))


def test_fidelity_command(tiny_checkpoint, tmp_path):
    from typer.testing import CliRunner

    from surgery.cli import app

    work = tmp_path / "w"
    calibrate(tiny_checkpoint("minimax_m2"), work, keep_hidden=True)
    result = CliRunner().invoke(app, ["fidelity", str(work), "--ratios", "0.5", "--methods", "reap,ean",
                                      "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    out = json.loads((work / "fidelity.json").read_text())
    assert out["methods"] == ["reap", "ean"] and out["ratios"] == [0.5]
    assert "mean" in result.stdout and f"{out['mean']['reap']['0.5']:.4f}" in result.stdout
    bad = CliRunner().invoke(app, ["fidelity", str(work), "--ratios", "half"])
    assert isinstance(bad.exception, SurgeryError) and "comma-separated" in str(bad.exception)
    missing = CliRunner().invoke(app, ["fidelity", str(tmp_path / "nowhere")])
    assert isinstance(missing.exception, SurgeryError) and "saliency" in str(missing.exception)
