"""The consistency check reads headers only and does a constant amount of work per tensor, whatever the
checkpoint's size, valid or wholly wrong; on MiniMax-M2's full-size FP8 layout split into 1,000 shards
(96k tensors, 230 GB as sparse files) it finds nothing wrong.

Counted, not timed: a wall-clock limit fails on a loaded machine and passes a regression on a fast one.
The work is counted with `sys.setprofile` (every Python and builtin call the check makes, which is
deterministic) on three sizes of the same layout: reading a file, evaluating a shape expression per
tensor, compiling a rule per tensor, or anything worse than linear in the tensors shows in the counts.
The time it takes is the benchmark's (tools/bench_consistency.py; figures in docs/rewrite.md).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tools.bench_inspect import write_sparse_checkpoint

SIZES = {"small": (8, 32, 20), "medium": (16, 64, 80), "full": (62, 256, 1005)}  # layers, experts, shards asked
IO = ("open", "read", "pread", "preadv", "readinto", "stat", "fstat", "listdir", "scandir")


@dataclass
class Work:
    tensors: int
    shards: int
    problems: list[str]
    ops: int  # Python and builtin calls made by the check
    calls: Counter  # Python functions by qualified name
    builtins: Counter  # builtins by name
    headers_read: int  # shard headers parsed opening the checkpoint


def _profiled(fn):
    calls: Counter = Counter()
    builtins: Counter = Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[frame.f_code.co_qualname] += 1
        elif event == "c_call":
            builtins[getattr(arg, "__name__", "?")] += 1

    sys.setprofile(profile)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, calls, builtins


def count(directory: Path) -> Work:
    """Open the checkpoint and run the check once, counting what each does."""
    from surgery.arch.consistency import find_problems
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint

    ckpt, opening, _ = _profiled(lambda: Checkpoint(directory))
    try:
        model = MoEModel(ckpt, check=False)
        problems, calls, builtins = _profiled(lambda: find_problems(model))
    finally:
        ckpt.close()
    return Work(len(ckpt.tensors), len(ckpt.shards), [p.message for p in problems],
                sum(calls.values()) + sum(builtins.values()), calls, builtins, opening["read_shard_header"])


def wrong_config(directory: Path) -> None:
    cfg = json.loads((directory / "config.json").read_text())
    cfg["hidden_size"] = 4096  # every tensor disagrees: the list stops at a hundred
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, dict[str, Work]]:
    """{size: {"valid": Work, "wrong": Work}}, after one unmeasured check (process-wide caches warm)."""
    out: dict[str, dict[str, Work]] = {}
    for size, (layers, experts, shards) in SIZES.items():
        directory = tmp_path_factory.mktemp(size)
        write_sparse_checkpoint(directory, layers, experts, shards)
        if not out:
            count(directory)  # warm-up: functools caches (parsed shape expressions) fill on the first check
        valid = count(directory)
        wrong_config(directory)
        out[size] = {"valid": valid, "wrong": count(directory)}
    return out


def test_the_full_size_layout_is_consistent(work):
    full = work["full"]["valid"]
    assert full.shards == 1000 and full.tensors > 95_000
    assert full.problems == []


def test_a_wrong_config_is_reported_in_a_hundred_lines(work):
    problems = work["full"]["wrong"].problems
    assert len(problems) == 100 and problems[-1].startswith("... and ")
    assert "hidden_size=4096" in problems[0]


@pytest.mark.parametrize("case", ["valid", "wrong"])
def test_the_check_reads_headers_only(work, case):
    """Opening parses each shard's header once; the check itself opens, reads and stats no file."""
    for size, w in work.items():
        w = w[case]
        assert w.headers_read == w.shards, size
        io = {name: n for name, n in w.builtins.items() if name in IO}
        assert not io, (size, io)


def test_rules_are_compiled_per_key_not_per_tensor(work):
    """A checkpoint has ~100k tensors but a few dozen rule keys: rules are compiled, and shape expressions
    evaluated, as often on 96k tensors as on 1.6k."""
    compiled = {size: w["valid"].calls["TensorChecker._compile"] for size, w in work.items()}
    evaluated = {size: w["valid"].calls["Dims.eval"] for size, w in work.items()}
    assert 0 < compiled["small"] < 100 and len(set(compiled.values())) == 1, compiled
    assert 0 < evaluated["small"] < 100 and len(set(evaluated.values())) == 1, evaluated


@pytest.mark.parametrize("case, budget", [("valid", 20), ("wrong", 40)])
def test_work_grows_linearly_with_the_tensors(work, case, budget):
    """The calls each added tensor costs are the same from the small to the medium size as from the medium
    to the full one (anything quadratic would multiply them), and stay within a budget (today about 15
    valid, 27 with every tensor wrong: a dict lookup, one rule, a message when it fails)."""
    s, m, f = (work[size][case] for size in ("small", "medium", "full"))
    lower = (m.ops - s.ops) / (m.tensors - s.tensors)
    upper = (f.ops - m.ops) / (f.tensors - m.tensors)
    assert upper <= 1.1 * lower and upper <= budget, (lower, upper)
