"""Where a walk's time goes, measured without making the device wait for the host.

Host work (reading shards, waiting for a thread) is timed with the wall clock. Device work on CUDA
(host->device copies, dequantisation, expert GEMMs) is queued asynchronously, so a wall clock around
it measures only the launch; synchronising to time it would serialise the copy engine, the kernels and
the host. Instead `DeviceClock.span` records a pair of CUDA events on the current stream and the
elapsed times are read once, in `flush` (the engine calls it at the end of each layer, where it
synchronises anyway). On the CPU a span is the wall clock.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch


class DeviceClock:
    """Accumulates seconds per category into `totals` (a dict shared with the layer factory, whose
    reader thread adds host read time to it directly)."""

    def __init__(self, device: torch.device, totals: dict[str, float]) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.totals = totals
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def span(self, key: str):
        if not self.cuda:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - t0
            return
        stream = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._pending.append((key, start, end))

    def add(self, key: str, amount: float) -> None:
        self.totals[key] = self.totals.get(key, 0.0) + amount

    def flush(self) -> None:
        """Resolve the recorded device spans (waits for the last one to finish)."""
        for key, start, end in self._pending:
            end.synchronize()
            self.totals[key] = self.totals.get(key, 0.0) + start.elapsed_time(end) / 1000
        self._pending.clear()


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc), e.g. what a run spent before its first layer:
    interpreter, imports, CUDA, data, checks. None where /proc does not say."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return round(float(f.read().split()[0]) - start, 2)
    except (OSError, ValueError, IndexError):
        return None
