"""Deterministic crash points for the kill -9 tests.

`SURGERY_DIE_AT=<point>` makes the process SIGKILL itself when it reaches that named point (e.g.
`layer2.batch1`, `layer2.stats`, `layer2.manifest`, `embed`, `write.<tensor>`), so the resume tests
can interrupt a run exactly between two writes instead of racing a timer.
`SURGERY_DIE_AFTER=<n>` kills it at the n-th crash point it reaches, whatever its name, and
`SURGERY_FAULT_TRACE=<file>` appends the name of every point reached to that file: a test traces one
run, then kills others at points drawn from the trace with a fixed seed (tests/reliability.py), which
stays valid however the code between the points changes. Unset, each costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_reached = 0  # crash points this process has passed (SURGERY_DIE_AFTER)


def checkpoint(point: str) -> None:
    env = os.environ
    if env.get("SURGERY_DIE_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    trace = env.get("SURGERY_FAULT_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(point + "\n")
    after = env.get("SURGERY_DIE_AFTER")
    if after:
        global _reached
        _reached += 1
        if _reached >= int(after):
            os.kill(os.getpid(), signal.SIGKILL)


_lock_delayed = False


def lock_taken() -> None:
    """`SURGERY_TEST_LOCK_DELAY=<seconds>` waits that long after the process takes its first directory lock,
    so a race test's second process surely finds the lock held (however short the first one's work)."""
    global _lock_delayed
    seconds = os.environ.get("SURGERY_TEST_LOCK_DELAY")
    if seconds and not _lock_delayed:
        import time

        _lock_delayed = True
        time.sleep(float(seconds))


def delay() -> None:
    """`SURGERY_TEST_BATCH_DELAY=<seconds>` slows every batch, so a signal test can land mid-run."""
    seconds = os.environ.get("SURGERY_TEST_BATCH_DELAY")
    if seconds:
        import time

        time.sleep(float(seconds))
