"""Crash safety of `surgery quantize`: killed with SIGKILL between shards, mid-shard and just before
config.json, then run again, the output is byte-identical to an uninterrupted run, and an interrupted
OUT never has a config.json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from surgery.quant.run import MANIFEST

REPO = Path(__file__).resolve().parents[1]


def run(src: Path, out: Path, *, die_at: str | None = None, slow: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SURGERY_DIE_AT", None)
    env.pop("SURGERY_TEST_SLOW_WRITE", None)
    if die_at:
        env["SURGERY_DIE_AT"] = die_at
    if slow:
        env["SURGERY_TEST_SLOW_WRITE"] = str(slow)
    # group 64: the fixture's hidden size 192 holds whole groups of 64 (128 would leave a partial group)
    return subprocess.Popen([sys.executable, "-m", "surgery", "quantize", str(src), "--out", str(out), "--no-progress",
                             "--group-size", "64"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def test_killed_quantize_resumes_to_identical_bytes(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    ref = tmp_path / "ref"
    proc = run(src, ref)
    assert proc.wait(timeout=300) == 0, proc.communicate()

    out = tmp_path / "out"
    # 1: killed right after the second shard was recorded
    proc = run(src, out, die_at="quantize.model-00002-of-00006.safetensors")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert not (out / "config.json").exists() and len(finished(out)) == 2

    # 2: killed in the middle of a shard
    proc = run(src, out, slow=0.01)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".partial") for p in out.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "config.json").exists()

    # 3: killed after every shard and file, just before config.json
    proc = run(src, out, die_at="quantize.config")
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert not (out / "config.json").exists() and len(finished(out)) == 6

    # 4: to completion, then once more (nothing to do)
    proc = run(src, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr.decode()
    names = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names and MANIFEST not in names and "README.md" in names
    for name in names:
        if name != "README.md":  # the card names its own directory
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    proc = run(src, out)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and b"already complete" in stderr


def test_out_with_another_job_is_refused(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    out = tmp_path / "out"
    proc = run(src, out, die_at="quantize.model-00001-of-00006.safetensors")
    proc.wait(timeout=300)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bad = subprocess.run([sys.executable, "-m", "surgery", "quantize", str(src), "--out", str(out), "--group-size",
                          "32", "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "another job" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
