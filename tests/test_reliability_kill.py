"""kill -9 at seeded crash points of `rewrite`, `quantize --method gptq` and `prune --method merge`, twice,
then the same command again: the output is byte for byte one uninterrupted run's. (calibrate, RTN
quantize and prune are killed in tests/test_reliability_concurrent.py, then resumed by one of two
racing processes.) Crash points are the engine's boundaries, batches and every tensor the writer
finishes (`surgery.faults`); nothing here depends on how GPTQ or a layer computes inside."""

from __future__ import annotations

import pytest

from tests.reliability import DATA, clean, draw, run, seed, snapshot, trace_points


@pytest.fixture(scope="module")
def plan_file(reliability_model, tmp_path_factory):
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.plan import make_plan, save_plan

    with Checkpoint(reliability_model) as ckpt:
        plan = make_plan({}, MoEModel(ckpt), "random", 0.5, seed=3)
    return save_plan(plan, tmp_path_factory.mktemp("plan") / "plan.json")


def jobs(model, plan, r):
    return {
        "rewrite": (["rewrite", model, plan, "--out", r / "out", "--no-progress"], [r / "out"]),
        "gptq": (["quantize", model, "--out", r / "out", "--method", "gptq", "--group-size", "32", *DATA,
                  "--no-progress"], [r / "out", r / "out.quant-work"]),
        "merge": (["prune", model, "--out", r / "out", *DATA, "--method", "merge", "--ratio", "0.5", "--no-progress"],
                  [r / "out", r / "out.work"]),
    }


@pytest.mark.parametrize("name", ["rewrite", "gptq", "merge"])
def test_killed_twice_then_resumed_gives_identical_bytes(reliability_model, plan_file, tmp_path, name):
    args, dirs = jobs(reliability_model, plan_file, tmp_path)[name]
    trace = tmp_path / "trace.txt"
    ref = run(args, SURGERY_FAULT_TRACE=str(trace))
    assert ref.rc == 0, ref.stderr[-3000:]
    reference, points = snapshot(*dirs), trace_points(trace)
    clean(*dirs)

    first, second = draw(seed(name), len(points), 2)
    killed = run(args, SURGERY_DIE_AFTER=str(first))
    assert killed.rc == -9, (first, points[first - 1], killed.stderr[-3000:])
    again = run(args, SURGERY_DIE_AFTER=str(max(1, second // 2)))  # a resumed run passes fewer points
    assert again.rc in (-9, 0), again.stderr[-3000:]
    done = run(args)
    assert done.rc == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert snapshot(*dirs) == reference, (name, first, points[first - 1], second)
