"""When a walk's layer boundaries become durable, and the writes that make them so.

A boundary is *durable* once its hidden states are completely in the zarr cache and the command's
journal (its manifest) says so; only then may older boundaries be deleted, and a killed run resumes
from the last durable boundary with identical results. The zarr tier writes every boundary while the
layer runs, so its checkpoint is the commit alone. The memory tier writes a snapshot of a boundary's
hidden states in a writer thread (one write in flight at most, its snapshot counted in the tier's
share of the budget), so layer L's checkpoint overlaps layer L+1's compute:

- `--checkpoint-every N`: every N layers (the walk waits for the previous write if it is still going);
- automatic: the first boundary is written at once, in the background, and its measured duration
  sets the interval so that checkpoint traffic costs < 10% of the compute it protects; a boundary that
  is due while a write is in flight is skipped (the next one is taken instead) rather than waited for;
- the last boundary only when the caller needs it on disk (`EngineOptions.final_checkpoint`:
  `--keep-hidden`, or a command that reads it afterwards). A calibration needs no hidden states once
  its statistics are written: a write still in flight when the walk ends is abandoned between batches
  (never committed) and its partial array removed.

With several ranks every write is collective, so it runs in the walk's thread and the interval is
agreed across ranks (`Ranks.agree_max`).
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from surgery.executor.tiers import MemoryTier
from surgery.faults import checkpoint as crash_point


class Checkpoints:
    """The checkpoint policy of one walk (see the module docstring)."""

    def __init__(self, engine, journal, durable: int | None) -> None:
        self.engine, self.journal = engine, journal
        self.tier, self.ranks, self.opts = engine.tier, engine.ranks, engine.opts
        self.every = self.opts.checkpoint_every or (1 if self.opts.keep_hidden else None)
        self.explicit = self.every is not None  # a due boundary waits for the write before it
        self.durable = durable
        background = isinstance(self.tier, MemoryTier) and self.ranks.world == 1
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-checkpoint") if background else None
        self.pending: tuple[int, Future] | None = None
        self.abandon = threading.Event()
        self.started = False  # a write was started (automatic interval: the first one is taken at once)
        self.compute: list[float] = []
        self.write_seconds: dict[int, float] = {}  # boundary -> seconds its write took
        self.waited = 0.0  # seconds the walk waited for checkpoints

    # ---------------------------------------------------------------- the walk's calls
    def after_layer(self, boundary: int, compute: float, last: bool) -> float:
        """Layer `boundary - 1` is done (`compute` seconds) and the tier holds its output; returns the
        seconds the walk waited here."""
        t0 = time.perf_counter()
        self.compute.append(compute)
        if self.tier.on_disk_every_layer:
            self.ranks.barrier()
            self.commit(boundary)
        elif last:
            if self.opts.final_checkpoint or self.opts.keep_hidden:
                self._wait()
                self._write(boundary)
                self._wait()
        elif self._due(boundary):
            if self.writer is None:
                w0 = time.perf_counter()
                self._write(boundary)
                if self.every is None:
                    self._set_every(time.perf_counter() - w0)
            elif self._settle() or self.explicit:
                self._wait()
                self._write(boundary)
        waited = time.perf_counter() - t0
        self.waited += waited
        return waited

    def interrupted(self, layer: int) -> None:
        """SIGINT/SIGTERM in `layer`: the tier still holds the layer's complete input; make it durable."""
        if not isinstance(self.tier, MemoryTier) or self.ranks.world > 1:
            return
        self._wait()
        if self.durable != layer:
            self.save(layer, self.tier.snapshot())

    def finish(self) -> None:
        """The walk is over: a write nobody needs is abandoned, then the writer stops."""
        if self.pending is not None and not self.pending[1].done():
            self.abandon.set()
        self._wait()
        if self.writer is not None:
            self.writer.shutdown(wait=True)

    # ---------------------------------------------------------------- policy
    def _due(self, boundary: int) -> bool:
        last = self.pending[0] if self.pending is not None else (self.durable or 0)
        if self.every is None:
            return not self.started
        return boundary - last >= self.every

    def _settle(self) -> bool:
        """Whether no write is in flight (a finished one is collected: it may set the interval)."""
        if self.pending is None:
            return True
        if not self.pending[1].done():
            return False
        self._wait()
        return True

    def _set_every(self, seconds: float) -> None:
        mean = sum(self.compute) / max(len(self.compute), 1)
        self.every = self.ranks.agree_max(max(1, math.ceil(seconds / max(0.1 * mean, 1e-9))))

    def _write(self, boundary: int) -> None:
        self.started = True
        snapshot = self.tier.snapshot()
        if self.writer is None:
            self.save(boundary, snapshot)
        else:
            self.pending = (boundary, self.writer.submit(self.save, boundary, snapshot))

    def _wait(self) -> None:
        if self.pending is None:
            return
        boundary, future = self.pending
        self.pending = None
        seconds = future.result()
        if seconds is not None and self.every is None:
            self._set_every(seconds)

    # ---------------------------------------------------------------- one checkpoint
    def save(self, boundary: int, snapshot) -> float | None:
        """Write `boundary`'s hidden states and commit it; the seconds the write took, or None when it
        was abandoned (then nothing is committed and its partial array is removed)."""
        t0 = time.perf_counter()
        if not self.tier.save(boundary, snapshot, self.abandon):
            if self.ranks.main:
                self.engine.cache.delete_hidden(boundary)
            return None
        seconds = time.perf_counter() - t0
        self.write_seconds[boundary] = seconds
        self.commit(boundary)
        return seconds

    def commit(self, boundary: int) -> None:
        """`boundary` is on disk: make it the resume point, then drop older hidden states."""
        self.journal.commit(boundary)
        self.durable = boundary
        crash_point(f"{self.opts.crash_prefix}layer{boundary - 1}.manifest")
        if self.ranks.main and not self.opts.keep_hidden:
            for old in self.engine.cache.hidden_layers():
                if old < boundary:
                    self.engine.cache.delete_hidden(old)
