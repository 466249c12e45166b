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
