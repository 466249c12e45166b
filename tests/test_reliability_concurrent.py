"""Two runs of `calibrate`, `quantize` or `prune` on one directory, started together, one second apart,
or together after the holder was killed with SIGKILL at seeded crash points: one runs, the other exits
2 with one line naming the first (pid), no traceback anywhere, and the directory ends up byte for byte
what one uninterrupted run writes. The commands are the real CLI in subprocesses (tests/reliability.py).
"""

from __future__ import annotations

import pytest

from tests.reliability import DATA, clean, draw, race, run, seed, snapshot, trace_points

# Each job: its arguments and the directories it writes.
JOBS = {
    "calibrate": (lambda m, r: ["calibrate", m, *DATA, "--work", r / "work", "--no-progress"],
                  lambda r: [r / "work"]),
    "quantize": (lambda m, r: ["quantize", m, "--out", r / "out", "--group-size", "32", "--no-progress"],
                 lambda r: [r / "out"]),
    "prune": (lambda m, r: ["prune", m, "--out", r / "out", *DATA, "--ratio", "0.5", "--no-progress"],
              lambda r: [r / "out", r / "out.work"]),
}
# The first process waits this long after taking its lock, so the second one (started with it, or a
# second later) surely finds it held, however little work a resumed run has left.
HOLD = {"SURGERY_TEST_LOCK_DELAY": "4"}


@pytest.fixture(scope="module")
def references(reliability_model, tmp_path_factory):
    """Per job: (args, dirs, snapshot of one uninterrupted run, crash points it passed).
    Every scenario of a job runs with the same paths, so paths written into files match too."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            make_args, make_dirs = JOBS[name]
            args, dirs = make_args(reliability_model, root), make_dirs(root)
            trace = root / "trace.txt"
            done = run(args, SURGERY_FAULT_TRACE=str(trace))
            assert done.rc == 0, done.stderr[-3000:]
            cache[name] = (args, dirs, snapshot(*dirs), len(trace_points(trace)))
            clean(*dirs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(JOBS))
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["together", "1s-apart"])
def test_second_run_is_refused_and_the_result_is_one_runs(references, name, offset):
    args, dirs, reference, _ = references(name)
    clean(*dirs)
    race(args, offset, **HOLD)
    assert snapshot(*dirs) == reference


@pytest.mark.parametrize("name", sorted(JOBS))
def test_after_kill_9_the_lock_is_taken_over_and_resume_gives_identical_bytes(references, name):
    """Killed at a seeded crash point (its lock file stays behind, naming a dead pid), then started twice
    together: one takes the lock over and resumes, the other is refused; the bytes are one run's.
    (tests/test_reliability_kill.py kills rewrite, GPTQ and merge several times.)"""
    args, dirs, reference, points = references(name)
    clean(*dirs)
    (point,) = draw(seed(name), points)
    killed = run(args, SURGERY_DIE_AFTER=str(point))
    assert killed.rc == -9, (point, killed.stderr[-3000:])
    assert any((d / ".surgery.lock").is_file() for d in dirs), "the killed holder's lock file is left behind"
    race(args, 0.0, **HOLD)
    assert snapshot(*dirs) == reference

