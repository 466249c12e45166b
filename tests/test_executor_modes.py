"""Prefetch, cache tiers, checkpoint intervals, token budgets, signals and ranks must not change a
bit of the result (or, across ranks, only the float summation order)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from surgery.executor.stream import batch_ranges
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from tests.oracle import make_batch, oracle_saliency

LENGTHS = [17, 5, 11, 17, 2, 9, 13, 4]


def run(model_dir: Path, work: Path, **kw) -> tuple[dict, dict]:
    ids, mask = make_batch(256, LENGTHS, seed=11)
    opts = CalibrateOptions(batch_size=3, dtype="float32", device="cpu", progress=False, **kw)
    cal = Calibrator(model_dir, work, opts)
    sal = cal.run(CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"t": "0"}, {}))
    return sal, cal.summary


@pytest.fixture(scope="module")
def glm(tiny_checkpoint):
    return tiny_checkpoint("glm4_moe")


def test_tiers_prefetch_and_checkpoints_give_identical_bits(glm, tmp_path):
    ref, summary = run(glm, tmp_path / "disk", cache_budget=0)
    assert summary["tier"] == "disk"
    variants = {
        "memory-auto": dict(cache_budget=10**9),
        "memory-every-1": dict(cache_budget=10**9, checkpoint_every=1),
        "memory-every-2": dict(cache_budget=10**9, checkpoint_every=2),
        "no-prefetch": dict(cache_budget=0, prefetch=False),
    }
    for name, kw in variants.items():
        sal, summary = run(glm, tmp_path / name, **kw)
        assert json.dumps(sal["layers"]) == json.dumps(ref["layers"]), name
        assert summary["tier"] == ("memory (host)" if kw.get("cache_budget") else "disk"), name


def test_token_budget_batches(glm, tmp_path):
    ids, mask = make_batch(256, LENGTHS, seed=11)
    batches = batch_ranges(mask.numpy(), 3, batch_tokens=34)
    assert batches[0][0] == 0 and batches[-1][1] == len(LENGTHS)
    assert all(b[1] == c[0] for b, c in zip(batches, batches[1:], strict=False))
    for s, e in batches:  # every batch within budget unless it is a single row
        longest = max(LENGTHS[s:e])
        assert (e - s) * longest <= 34 or e - s == 1
    sal, _ = run(glm, tmp_path / "w", batch_tokens=34)
    oracle, _ = oracle_saliency(glm, ids, mask)
    for layer, ref in oracle.items():
        np.testing.assert_array_equal(sal["layers"][str(layer)]["frequency"], ref["frequency"])
        np.testing.assert_allclose(sal["layers"][str(layer)]["reap"], ref["reap"], rtol=1e-4)


def _cli(model: Path, data: Path, work: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "surgery", "calibrate", str(model), "--dataset", str(data), "--samples", "7",
            "--max-length", "64", "--batch-size", "2", "--work", str(work), "--no-progress", *extra]


def test_sigterm_checkpoints_memory_tier_and_resumes(shared_fixtures, tmp_path):
    model, data = shared_fixtures / "tinymoe-m2", shared_fixtures / "text" / "code.calib.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    ref = subprocess.run(_cli(model, data, tmp_path / "ref", "--cache-budget", "0"), env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    work = tmp_path / "w"
    # slow every batch down so the signal lands mid-run; checkpoints only at the very end otherwise
    proc = subprocess.Popen(_cli(model, data, work, "--checkpoint-every", "100"),
                            env={**env, "SURGERY_TEST_BATCH_DELAY": "0.3"}, stderr=subprocess.PIPE, text=True)
    manifest = work / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and not (work / "stats" / "layer_0001.json").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    state = json.loads(manifest.read_text())
    assert state["completed_layers"] and state["completed_layers"] >= 2 and not state["complete"], state
    done = subprocess.run(_cli(model, data, work, "--checkpoint-every", "100"), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (work / "saliency.json").read_bytes() == (tmp_path / "ref" / "saliency.json").read_bytes()


def test_two_gloo_ranks_equal_one_process(shared_fixtures, tmp_path):
    model, data = shared_fixtures / "tinymoe-m2", shared_fixtures / "text" / "code.calib.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_cli(model, data, tmp_path / "one"), env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_cli(model, data, tmp_path / "two", "--nproc", "2", "--device", "cpu"), env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "saliency.json").read_text())
    b = json.loads((tmp_path / "two" / "saliency.json").read_text())
    assert a["num_tokens"] == b["num_tokens"]
    for layer, stats in a["layers"].items():
        assert stats["frequency"] == b["layers"][layer]["frequency"]  # exact integers: the last bit
        assert stats["max_activation"] == b["layers"][layer]["max_activation"]
        for key in ("weighted_frequency", "ean", "reap"):
            np.testing.assert_allclose(b["layers"][layer][key], stats[key], rtol=1e-12, atol=0)
