"""kill -9 during calibration, at several points, then the same command again: saliency.json and the
cached tokens are bit-identical to an uninterrupted run. Runs the real CLI in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

DISK = ["--cache-budget", "0"]  # hidden states to zarr after every layer
MEMORY = ["--checkpoint-every", "2"]  # hidden states in RAM, zarr checkpoint every 2 layers


def calibrate(model: Path, data: Path, work: Path, die_at: str | None = None, max_length: int = 64,
              tier: list[str] = DISK):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SURGERY_DIE_AT", None)
    if die_at:
        env["SURGERY_DIE_AT"] = die_at
    cmd = [sys.executable, "-m", "surgery", "calibrate", str(model), "--dataset", str(data), "--samples", "7",
           "--max-length", str(max_length), "--batch-size", "3", "--work", str(work), "--no-progress", *tier]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(shared_fixtures, tmp_path_factory):
    work = tmp_path_factory.mktemp("ref") / "work"
    model, data = shared_fixtures / "tinymoe-m2", shared_fixtures / "text" / "code.calib.jsonl"
    done = calibrate(model, data, work)
    assert done.returncode == 0, done.stderr
    return model, data, work


def assert_same_result(a: Path, b: Path) -> None:
    assert (a / "saliency.json").read_bytes() == (b / "saliency.json").read_bytes()
    za, zb = zarr.open_group(str(a / "cache.zarr"), mode="r"), zarr.open_group(str(b / "cache.zarr"), mode="r")
    for name in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(za[name][...], zb[name][...])


@pytest.mark.parametrize("tier, points", [
    (DISK, ["embed"]), (DISK, ["layer2.stats"]), (DISK, ["layer3.manifest"]),
    (DISK, ["layer0.batch1", "layer3.stats", "layer5.batch2"]),
    (MEMORY, ["layer2.batch1"]), (MEMORY, ["layer3.manifest"]),
    (MEMORY, ["embed", "layer1.manifest", "layer4.stats"]),
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_kill_and_resume_is_bit_identical(reference, tmp_path, tier, points):
    """The reference ran in the disk tier: the memory tier must give the same bytes too."""
    model, data, ref_work = reference
    work = tmp_path / "work"
    for point in points:
        killed = calibrate(model, data, work, die_at=point, tier=tier)
        assert killed.returncode == -9, (point, killed.stderr[-2000:])
        assert not (work / "saliency.json").exists()
    done = calibrate(model, data, work, tier=tier)
    assert done.returncode == 0, done.stderr
    assert_same_result(ref_work, work)


def test_other_inputs_are_refused_with_what_differs(reference, tmp_path):
    model, data, ref_work = reference
    work = tmp_path / "work"
    assert calibrate(model, data, work, die_at="layer1.stats").returncode == -9
    other = calibrate(model, data, work, max_length=32)
    assert other.returncode == 2
    errors = [line for line in other.stderr.splitlines() if line.startswith("surgery: error:")]
    assert len(errors) == 1 and "max_length: 64 -> 32" in errors[0] and str(work) in errors[0], other.stderr
    assert "Traceback" not in other.stderr


def test_complete_run_is_not_redone(reference):
    model, data, ref_work = reference
    before = (ref_work / "saliency.json").stat().st_mtime_ns
    again = calibrate(model, data, ref_work)
    assert again.returncode == 0 and "already complete" in again.stderr
    assert (ref_work / "saliency.json").stat().st_mtime_ns == before
