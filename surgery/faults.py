"""Deterministic crash points for the kill -9 tests.

`SURGERY_DIE_AT=<point>` makes the process SIGKILL itself when it reaches that named point (e.g.
`layer2.batch1`, `layer2.stats`, `layer2.manifest`, `embed`), so the resume tests can interrupt a
run exactly between two writes instead of racing a timer. Unset, it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def checkpoint(point: str) -> None:
    if os.environ.get("SURGERY_DIE_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def delay() -> None:
    """`SURGERY_TEST_BATCH_DELAY=<seconds>` slows every batch, so a signal test can land mid-run."""
    seconds = os.environ.get("SURGERY_TEST_BATCH_DELAY")
    if seconds:
        import time

        time.sleep(float(seconds))
