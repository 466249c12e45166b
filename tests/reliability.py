"""The reliability suite's tools (tests/test_reliability_*.py), the way storage tools test themselves:
a tiny job, the real CLI in subprocesses, two of them on one directory at chosen offsets, kill -9 at
crash points drawn with a fixed seed, and results compared byte for byte with one uninterrupted run.

Kill points come from `surgery.faults`: a traced run lists every crash point it passes (engine
boundaries, batches, every tensor the writer finishes, quantize shards); a killed run dies at the n-th
point it reaches, n drawn from `random.Random(seed)`. That is reproducible on any machine and stays
meaningful when the code between points changes (e.g. GPTQ's internals), because only the final
bytes are compared.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT = REPO / "tests" / "data" / "text.jsonl"
HOOKS = ("SURGERY_DIE_AT", "SURGERY_DIE_AFTER", "SURGERY_FAULT_TRACE", "SURGERY_TEST_SLOW_WRITE",
         "SURGERY_TEST_BATCH_DELAY", "SURGERY_TEST_FREE_BYTES", "SURGERY_TEST_LOCK_DELAY")
DATA = ["--dataset", str(TEXT), "--samples", "8", "--max-length", "64", "--batch-size", "2"]
# Files a finished run writes that hold timings (not results): left out of the comparisons.
NOT_RESULTS = {"manifest.json", "summary.json"}
NOT_RESULT_DIRS = {"cache.zarr"}  # hidden-state cache (its tokens feed saliency.json, which is compared)


def make_model(out: Path) -> Path:
    """A tiny MiniMax-M2-layout checkpoint (3 layers, 8 experts, 12 shards) with a byte-level tokenizer
    and ChatML template: calibrates, prunes, merges and quantizes (group 32) in seconds."""
    from surgery.data.tokenizer import byte_tokenizer
    from surgery.synth import make_checkpoint

    make_checkpoint(out, "minimax_m2", vocab_size=260, pad_token_id=3, eos_token_id=0, bos_token_id=0,
                    max_shard_size="100KB")
    byte_tokenizer().save_pretrained(out)
    return out


def env(**hooks: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in HOOKS}
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    e.update(hooks)
    return e


def start(args: list, **hooks: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "surgery", *map(str, args)], cwd=REPO, env=env(**hooks),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@dataclass
class Done:
    pid: int
    rc: int
    stdout: str
    stderr: str


def wait(proc: subprocess.Popen, timeout: float = 600) -> Done:
    out, err = proc.communicate(timeout=timeout)
    return Done(proc.pid, proc.returncode, out, err)


def run(args: list, timeout: float = 600, **hooks: str) -> Done:
    return wait(start(args, **hooks), timeout)


def snapshot(*dirs: Path) -> dict[str, str]:
    """SHA-256 of every result file under `dirs` (relative names), the lock file included if left."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            rel = p.relative_to(d)
            if p.is_dir() or p.name in NOT_RESULTS or NOT_RESULT_DIRS.intersection(rel.parts):
                continue
            out[f"{d.name}/{rel.as_posix()}"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def clean(*dirs: Path) -> None:
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


def trace_points(trace: Path) -> list[str]:
    return trace.read_text().split()


def seed(name: str) -> int:
    """A fixed seed per job; `SURGERY_RELIABILITY_SEED=n` draws other points (to explore, then pin)."""
    return zlib.crc32(name.encode()) + int(os.environ.get("SURGERY_RELIABILITY_SEED", "0"))


def draw(seed: int, count: int, k: int = 1) -> list[int]:
    """k kill points (1-based crash point counts) out of `count`, from a fixed seed."""
    rng = random.Random(seed)
    return [rng.randint(1, count) for _ in range(k)]


def assert_refused(done: Done, holder: int | None = None) -> None:
    """Exit 2, one line naming the holder (its pid when known), no traceback."""
    lines = done.stderr.strip().splitlines()
    assert done.rc == 2, (done.rc, done.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("surgery: error:"), done.stderr[-3000:]
    assert "another surgery process is writing into this directory (pid " in lines[0], lines[0]
    if holder is not None:
        assert f"(pid {holder} on " in lines[0], (holder, lines[0])


def race(args: list, offset: float, **hooks: str) -> tuple[Done, Done]:
    """Two identical commands, the second started `offset` seconds after the first; returns
    (the one that ran, the one that was refused), asserting that exactly one of each happened."""
    a = start(args, **hooks)
    if offset:
        time.sleep(offset)
    b = start(args, **hooks)
    first, second = wait(a), wait(b)
    for d in (first, second):
        assert "Traceback" not in d.stderr, d.stderr[-3000:]
    ran, refused = (first, second) if first.rc == 0 else (second, first)
    assert ran.rc == 0, (first.rc, first.stderr[-2000:], second.rc, second.stderr[-2000:])
    assert_refused(refused, holder=ran.pid)
    return ran, refused
