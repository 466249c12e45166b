"""Where the hidden states between two decoder layers live: one interface, two tiers.

A tier holds the input of the layer being run (`read`) and collects its output (`write`), then `swap`s
so the output becomes the next layer's input. `MemoryTier` keeps per-batch tensors in host memory or,
on CUDA when they fit, on the GPU; the zarr cache is then its spill tier and resume checkpoint
(`save`). `ZarrTier` keeps every boundary in `WORK/.../cache.zarr` (`hidden_<l>`), written every
layer. Either way a boundary that is durable on disk can be resumed from bit for bit.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from surgery.executor.cache import HiddenCache
from surgery.executor.distributed import Ranks
from surgery.executor.stream import Batch, real_length


class MemoryTier:
    """Per-batch hidden states in memory (already trimmed to each batch's real length)."""

    overlap_io = False
    on_disk_every_layer = False

    def __init__(self, cache: HiddenCache, shape: tuple[int, int, int], dtype: torch.dtype, ranks: Ranks,
                 on_device: bool) -> None:
        self.cache, self.shape, self.dtype, self.ranks = cache, shape, dtype, ranks
        self.on_device = on_device
        self.store: dict[Batch, torch.Tensor] = {}
        self._out: dict[Batch, torch.Tensor] = {}
        self.write_seconds = 0.0

    @property
    def name(self) -> str:
        return "memory (GPU)" if self.on_device else "memory (host)"

    def load(self, boundary: int, batches: list[Batch], mask: np.ndarray) -> None:
        """Resume: the durable boundary's rows from the zarr cache."""
        z = self.cache.hidden(boundary)
        self.store = {b: HiddenCache.read_rows(z, b[0], b[1], real_length(mask[b[0]:b[1]])) for b in batches}

    def begin(self, layer: int) -> None:
        self._out = {}

    def read(self, b: Batch, t: int) -> torch.Tensor:
        return self.store[b]

    def write(self, b: Batch, y: torch.Tensor) -> None:
        self._out[b] = y if (self.on_device or y.device.type == "cpu") else y.to("cpu")

    def swap(self) -> None:
        self.store, self._out = self._out, {}

    def snapshot(self) -> dict[Batch, torch.Tensor]:
        return self.store

    def save(self, boundary: int, snapshot: dict[Batch, torch.Tensor], abandon: threading.Event | None = None) -> bool:
        """Write a boundary's rows (this rank's) into the zarr cache: the checkpoint of this tier. False
        when `abandon` was set before every row was written (single rank only: ranks write together)."""
        t0 = time.perf_counter()
        try:
            if self.ranks.main:
                self.cache.create_hidden(boundary, *self.shape, self.dtype, 1)
            self.ranks.barrier()
            z = self.cache.hidden(boundary)
            for (s, _e), y in snapshot.items():
                if abandon is not None and abandon.is_set() and self.ranks.world == 1:
                    return False
                HiddenCache.write_rows(z, s, y)
            self.ranks.barrier()
            return True
        finally:
            self.write_seconds += time.perf_counter() - t0


class ZarrTier:
    """Every boundary in the zarr cache; batches are read ahead and written behind the compute."""

    overlap_io = True
    on_disk_every_layer = True
    name = "disk"

    def __init__(self, cache: HiddenCache, shape: tuple[int, int, int], dtype: torch.dtype, ranks: Ranks) -> None:
        self.cache, self.shape, self.dtype, self.ranks = cache, shape, dtype, ranks
        self.layer = 0
        self.write_seconds = 0.0

    def load(self, boundary: int, batches: list[Batch], mask: np.ndarray) -> None:
        self.layer = boundary
        self._in = self.cache.hidden(boundary)

    def begin(self, layer: int) -> None:
        self.layer = layer
        if self.ranks.main:
            self.cache.create_hidden(layer + 1, *self.shape, self.dtype, 1)
        self.ranks.barrier()
        self._in, self._out = self.cache.hidden(layer), self.cache.hidden(layer + 1)

    def read(self, b: Batch, t: int) -> torch.Tensor:
        return HiddenCache.read_rows(self._in, b[0], b[1], t)

    def write(self, b: Batch, y: torch.Tensor) -> None:
        HiddenCache.write_rows(self._out, b[0], y)

    def swap(self) -> None:
        self.layer += 1
        self._in = self._out

    def save(self, boundary: int, snapshot: object, abandon: threading.Event | None = None) -> bool:
        """Nothing to do: the boundary was written while the layer ran."""
        return True

    def snapshot(self) -> None:
        return None

    def put(self, boundary: int, rows: dict[Batch, torch.Tensor]) -> None:
        """Write a boundary from per-batch tensors (the embeddings)."""
        if self.ranks.main:
            self.cache.create_hidden(boundary, *self.shape, self.dtype, 1)
        self.ranks.barrier()
        z = self.cache.hidden(boundary)
        for (s, _e), y in rows.items():
            HiddenCache.write_rows(z, s, y)
        self.ranks.barrier()
        self.layer = boundary
        self._in = z
