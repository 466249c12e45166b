"""Crash safety: `surgery rewrite` killed with SIGKILL mid-shard, run again, gives the same bytes.

A checkpoint of about 50 MB in 8 MB shards; the writer's test hook `SURGERY_TEST_SLOW_WRITE` makes
it sleep after each tensor, so the kill lands while a shard is half written. After each kill OUT
has no config.json (it never looks complete); the resumed run re-hashes and keeps the shards the
first runs finished (same inode and mtime), rewrites one that was damaged, and its result equals an
uninterrupted run byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.plan import make_plan, save_plan
from surgery.rewrite.run import MANIFEST

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> tuple[Path, Path]:
    from surgery.synth import make_checkpoint

    root = tmp_path_factory.mktemp("crash")
    src = make_checkpoint(root / "model", "minimax_m2", hidden_size=256, intermediate_size=512,
                          num_hidden_layers=4, max_shard_size="8MB")
    with Checkpoint(src) as ckpt:
        plan = make_plan({}, MoEModel(ckpt), "random", 0.5, seed=11)
        assert len(ckpt.shards) >= 5
    return src, save_plan(plan, root / "plan.json")


def start(src: Path, plan: Path, out: Path, slow: float | None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("SURGERY_TEST_SLOW_WRITE", None)
    if slow:
        env["SURGERY_TEST_SLOW_WRITE"] = str(slow)
    return subprocess.Popen([sys.executable, "-m", "surgery", "rewrite", str(src), str(plan), "--out", str(out),
                             "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(out: Path) -> dict:
    try:
        return json.loads((out / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"rewrite ended before the kill point: {proc.communicate()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("kill point never reached")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def partial_exists(out: Path) -> bool:
    return out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir())


def stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def test_killed_rewrite_resumes_to_identical_bytes(medium, tmp_path):
    src, plan = medium
    ref = tmp_path / "ref"
    proc = start(src, plan, ref, None)
    assert proc.wait(timeout=120) == 0, proc.communicate()

    out = tmp_path / "out"
    # 1: killed in the middle of the first shard
    proc = start(src, plan, out, 0.05)
    kill_when(proc, lambda: partial_exists(out))
    assert not (out / "config.json").exists()
    assert finished(out) == {}

    # 2: killed mid-shard after two shards were finished
    proc = start(src, plan, out, 0.05)
    kill_when(proc, lambda: len(finished(out)) >= 2 and partial_exists(out))
    assert not (out / "config.json").exists()
    done = finished(out)
    assert len(done) >= 2
    kept = {name: stamp(out / name) for name in done}

    # damage one finished shard (same size): the resumed run must notice and write it again
    damaged = sorted(done)[0]
    with open(out / damaged, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))

    # 3: run to completion
    proc = start(src, plan, out, None)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr.decode()
    assert b"verified and reused" in stderr
    for name, before in kept.items():
        if name == damaged:
            assert stamp(out / name) != before
        else:
            assert stamp(out / name) == before, f"{name} was rewritten"

    files = sorted(p.name for p in ref.iterdir())
    assert sorted(p.name for p in out.iterdir()) == files
    assert "config.json" in files and MANIFEST not in files
    for name in files:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_cli_verify_ok_and_one_line_error(medium, tmp_path):
    from surgery.plan import load_plan
    from surgery.rewrite import rewrite_checkpoint

    src, plan = medium
    out = tmp_path / "out"
    rewrite_checkpoint(src, load_plan(plan), out, progress=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ok = subprocess.run([sys.executable, "-m", "surgery", "verify", str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("OK:") and "4 experts" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "surgery", "rewrite", str(src), str(plan), "--out",
                          str(src / "inside"), "--no-progress"], cwd=REPO, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "inside the model directory" in bad.stderr
    assert not (src / "inside").exists()


def test_second_writer_is_refused(medium, tmp_path):
    from surgery.errors import SurgeryError
    from surgery.plan import load_plan
    from surgery.rewrite import rewrite_checkpoint

    src, plan = medium
    out = tmp_path / "out"
    proc = start(src, plan, out, 0.05)
    try:
        deadline = time.monotonic() + 60
        while not partial_exists(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(SurgeryError, match=r"another surgery process is writing into this directory \(pid \d+ on "):
            rewrite_checkpoint(src, load_plan(plan), out, progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
