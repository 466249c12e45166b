"""The layer engine: the one walk over decoder layers that calibrate, eval and fidelity share.

A walk embeds the tokens (or resumes from a durable boundary), then for each layer pages in its
resident part (the next layer's is read in the background meanwhile), runs every batch through it,
pages its routed experts through in chunks the memory budget allows (`surgery.executor.experts`),
and hands the layer's hidden states to the next one through a tier (`surgery.executor.tiers`). What
differs between commands is a *pass* plugged in per layer (`surgery.executor.passes.LayerPass`, imported
here too): it may listen to the routed experts (saliency, fidelity) and finish the layer (write
statistics). Durable progress goes through the command's `Journal` (its manifest), committed only after
a boundary's hidden states and every pass's output for the layer are on disk, so a killed walk resumes
bit for bit.

SIGINT/SIGTERM finish the current batch, checkpoint the in-memory tier and stop (exit 130). When and
how boundaries are checkpointed is `surgery.executor.checkpoints`; how a layer is sized under the
memory budget, `surgery.executor.plan_memory`. Every layer leaves a record of where its time went
(expert reads, host->device copies, dequantisation, expert compute and its FLOPs, checkpoint waits),
which `summary` returns and commands keep in their manifests.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from surgery.arch.layer import LayerFactory
from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError
from surgery.executor import plan_memory
from surgery.executor.budget import MemoryBudget, hold_heap_to_live_memory, release_free_memory, rss_anon
from surgery.executor.cache import HiddenCache
from surgery.executor.checkpoints import Checkpoints
from surgery.executor.distributed import Ranks
from surgery.executor.expert_store import Buffers, ExpertStore, Staging
from surgery.executor.experts import RoutedExperts
from surgery.executor.mtp import walk_mtp
from surgery.executor.passes import Journal, LayerPass
from surgery.executor.progress import layer_progress
from surgery.executor.residual import AfterAttention, ResidualCapture
from surgery.executor.stream import Batch, LayerStream, real_length
from surgery.executor.tiers import MemoryTier, ZarrTier
from surgery.executor.timing import DeviceClock, process_age
from surgery.faults import checkpoint as crash_point

Reader = Callable[[Batch, int], torch.Tensor]
TIMED = ("read", "transfer", "dequant", "compute")  # the routed experts' time split, per layer


@dataclass
class EngineOptions:
    prefetch: bool = True
    progress: bool = True
    cache_budget: int | None = None  # bytes for the memory tier; None = auto, 0 = zarr every layer
    checkpoint_every: int | None = None  # memory tier: layers between zarr checkpoints; None = auto
    keep_hidden: bool = False  # every boundary stays in the zarr cache
    final_checkpoint: bool = True  # the last boundary is written to the zarr cache (its reader needs it)
    memory_budget: int | None = None  # bytes; None = derived from available memory
    crash_prefix: str = ""  # names of this walk's crash points (tests)
    # fixed paging instead of the budget's (tests force small chunks and token groups on tiny models,
    # whose layers fit any budget): SURGERY_EXPERTS_PER_CHUNK / SURGERY_TOKENS_PER_GROUP by default
    experts_per_chunk: int | None = field(default_factory=lambda: _env_int("SURGERY_EXPERTS_PER_CHUNK"))
    tokens_per_group: int | None = field(default_factory=lambda: _env_int("SURGERY_TOKENS_PER_GROUP"))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


class LayerEngine:
    def __init__(self, model: MoEModel, device: torch.device, dtype: torch.dtype, cache: HiddenCache,
                 opts: EngineOptions, ranks: Ranks | None = None) -> None:
        self.model, self.device, self.dtype, self.cache, self.opts = model, device, dtype, cache, opts
        self.ranks = ranks or Ranks()
        self.factory = LayerFactory(model, dtype, device)
        self.stream = LayerStream(self.factory)
        self.budget = MemoryBudget.resolve(opts.memory_budget, device)
        if self.budget.given:
            hold_heap_to_live_memory()
        self.staging = Staging(pinned=device.type == "cuda")
        self.buffers = Buffers()
        self.timings = {"load_wait": 0.0, "layer_compute": 0.0, "checkpoint_write": 0.0, "checkpoint_wait": 0.0}
        self.clock = DeviceClock(device, self.factory.timings)
        self.chunks: dict[int, int] = {}  # layer -> experts per chunk
        self.flops = 0  # of the routed experts' evaluations
        self.records: list[dict] = []  # per layer: where its time went
        self.checkpoints: Checkpoints | None = None
        self.first_layer_at: float | None = None  # seconds from process start to the first layer
        self.peak_anon = rss_anon()
        self.tier: MemoryTier | ZarrTier | None = None
        self.every: int | None = None
        self.stop = threading.Event()

    # ---------------------------------------------------------------- tiers
    def _tier_bytes(self, batches: Sequence[Batch], mask: np.ndarray) -> int:
        hidden = self.model.ckpt.info(self.model.spec.embed).shape[1]
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum((e - s) * real_length(mask[s:e]) * hidden * item for s, e in batches)

    def _choose_tier(self, ids: np.ndarray, mask: np.ndarray, batches: Sequence[Batch]) -> MemoryTier | ZarrTier:
        """Memory when input, output and the copy being checkpointed fit both the cache budget and
        a third of what the memory budget leaves now; on CUDA on the GPU when they fit there too."""
        hidden = self.model.ckpt.info(self.model.spec.embed).shape[1]
        shape = (ids.shape[0], ids.shape[1], hidden)
        need = 3 * self._tier_bytes(batches, mask)
        cache_budget = self.opts.cache_budget
        if cache_budget is None:
            cache_budget = self.budget.host_free() // 3
        if cache_budget > 0 and need <= min(cache_budget, self.budget.host_free() // 3):
            on_device = self.device.type == "cuda" and need <= self.budget.device_free(self.device) // 3
            return MemoryTier(self.cache, shape, self.dtype, self.ranks, on_device)
        return ZarrTier(self.cache, shape, self.dtype, self.ranks)

    # ---------------------------------------------------------------- walk
    def walk(self, passes: Sequence[LayerPass], ids: np.ndarray, mask: np.ndarray, batches: list[Batch],
             start: int | None, journal: Journal, layers: Sequence[int] | None = None,
             mtp: Sequence[int] = ()) -> Reader:
        """Run `layers` (default: every decoder layer) from `start` (a durable boundary; None: embed
        first), then the MTP layers `mtp`, and return a reader of the last boundary's hidden states."""
        handlers = self._install_signal_handlers()
        try:
            return self._walk(passes, ids, mask, batches, start, journal, layers, mtp)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread() or self.ranks.world > 1:
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda *_: self.stop.set())
        return previous

    def _begin(self, ids: np.ndarray, mask: np.ndarray, batches: list[Batch], start: int | None,
               journal: Journal) -> int:
        """Embed into the tier (fresh), or load the durable boundary `start`; returns the first layer."""
        tier, prefix = self.tier, self.opts.crash_prefix
        if start is None:
            rows = {b: self.stream.embed_batch(ids[b[0]:b[1], :real_length(mask[b[0]:b[1]])]) for b in batches}
            if isinstance(tier, ZarrTier):
                tier.put(0, rows)
                crash_point(f"{prefix}embed")
                journal.commit(0)
                self.checkpoints.durable = 0
            else:
                tier.store = rows
                crash_point(f"{prefix}embed")
                if self.opts.keep_hidden:
                    self.checkpoints.save(0, tier.snapshot())
            return 0
        if not self.cache.has_hidden(start):
            raise SurgeryError(f"the manifest says {start} layers are done but hidden_{start} is missing from the "
                               "cache; start with an empty work directory", self.cache.path)
        if self.ranks.main:
            for stale in self.cache.hidden_layers():
                if stale > start:
                    self.cache.delete_hidden(stale)  # interrupted mid-write: recomputed
        self.ranks.barrier()
        tier.load(start, batches, mask)
        return start

    def _walk(self, passes, ids, mask, batches, start, journal, layers, mtp) -> Reader:
        self.tier = tier = self._choose_tier(ids, mask, batches)
        self.checkpoints = points = Checkpoints(self, journal, start)
        order = list(range(self.model.num_layers)) if layers is None else list(layers)
        layer = first = self._begin(ids, mask, batches, start, journal)
        todo = [layer for layer in order if layer >= first]
        try:
            with layer_progress(len(order) + len(mtp), int(mask.sum()),
                                enabled=self.opts.progress and self.ranks.main) as progress:
                progress.start_layers(len(order) - len(todo))
                self.first_layer_at = process_age()
                for i, layer in enumerate(todo):
                    progress.start_layer(layer)
                    compute = self._layer(layer, todo[i + 1] if i + 1 < len(todo) else None, passes, batches, mask,
                                          progress)
                    waited = points.after_layer(layer + 1, compute, i + 1 == len(todo))
                    self.records[-1]["checkpoint_wait_s"] = round(waited, 4)
                if mtp:
                    walk_mtp(self, passes, list(mtp), batches, ids, mask, tier.read, progress)
        except KeyboardInterrupt:
            points.interrupted(layer)
            raise
        finally:
            points.finish()
            self.factory.close()
            self.every = points.every
            self.timings["checkpoint_write"] = tier.write_seconds
            self.timings["checkpoint_wait"] = points.waited
            for rec in self.records:
                rec["checkpoint_write_s"] = points.write_seconds.get(rec["layer"] + 1)
        return tier.read

    def _layer(self, layer: int, nxt: int | None, passes: Sequence[LayerPass], batches: list[Batch],
               mask: np.ndarray, progress) -> float:
        """One decoder layer through the tier, its passes finished and its record kept; returns the
        seconds it computed."""
        t_start = time.perf_counter()
        before, flops = dict(self.factory.timings), self.flops
        module = self.factory.load(layer).eval()
        if self.opts.prefetch and nxt is not None:
            self.factory.prefetch(nxt)
        load_wait = time.perf_counter() - t_start
        self.timings["load_wait"] += load_wait
        self.tier.begin(layer)
        t0 = time.perf_counter()
        try:
            self.run_layer(layer, module, passes, batches, mask, self.tier.read, self.tier.write, progress.advance,
                           overlap_io=self.tier.overlap_io)
        finally:
            self.factory.unload(layer)
            release_free_memory()
        self.clock.flush()  # waits for the device: the layer's time is its real time
        compute = time.perf_counter() - t0
        self.timings["layer_compute"] += compute
        self.tier.swap()
        for p in passes:
            p.end_layer(layer)
        crash_point(f"{self.opts.crash_prefix}layer{layer}.stats")
        t = self.factory.timings
        rec = {"layer": layer, **{f"{k}_s": round(t.get(k, 0.0) - before.get(k, 0.0), 4) for k in TIMED},
               "load_wait_s": round(load_wait, 4), "layer_s": round(compute, 4),
               "wall_s": round(time.perf_counter() - t_start, 4), "expert_flops": self.flops - flops}
        seconds = rec["compute_s"]
        rec["expert_tflops_per_s"] = round(rec["expert_flops"] / seconds / 1e12, 4) if seconds > 0 else None
        self.records.append(rec)
        return compute

    # ---------------------------------------------------------------- summary
    def summary(self, seconds: float, first: int, cache_bytes: int) -> dict:
        """What the walk did and where its time went (read, transfer, dequant, compute of routed
        experts; waiting for resident layers; checkpoints), and its peak memory."""
        import resource

        self._track()
        t = {**self.factory.timings, **self.timings}
        out = {
            "layers": self.model.num_layers - first,
            "seconds": seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_anon_mb": self.peak_anon / 2**20,
            "memory_budget_mb": self.budget.total / 2**20,
            "memory_budget_given": self.budget.given,
            "cache_bytes": cache_bytes,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tier": self.tier.name if self.tier is not None else None,
            "checkpoint_every": self.every,
            "ranks": self.ranks.world,
            "experts_per_chunk": {str(k): v for k, v in sorted(self.chunks.items())},
            **{f"{k}_s": round(v, 3) for k, v in t.items()},
            "expert_flops": self.flops,
            "first_layer_after_s": self.first_layer_at,
            "per_layer": self.records,
        }
        if self.device.type == "cuda":
            out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out

    # ---------------------------------------------------------------- one layer
    def run_layer(self, layer: int, module: nn.Module, passes: Sequence[LayerPass], batches: Sequence[Batch],
                  mask: np.ndarray, read: Reader, write: Callable[[Batch, torch.Tensor], None],
                  advance: Callable[[int], None],
                  scored: Callable[[Batch, torch.Tensor], torch.Tensor] | None = None,
                  overlap_io: bool = False) -> None:
        """Every batch through `layer`. A MoE layer's routed experts come from its `ExpertStore`: all at
        once when they fit the budget, else in chunks streamed over captured groups of batches."""
        block = self.factory.moe_block(module)
        store = ExpertStore(self.factory, layer, self.clock) if block is not None else None
        if store is None:
            self._prepare(layer, module, passes, batches, mask, read, scored)
            self._tune(layer, module, None, passes, batches, mask, read)
            self.stream.run_batches(layer, module, batches, mask, read, write, advance, None, self._should_stop,
                                    scored, overlap_io)
            return
        runner = RoutedExperts(block, store.num_experts, self.model.spec.experts_transposed, layer,
                               where=self.model.ckpt.directory, clock=self.clock)
        try:
            runner.mode = "skip"
            self._prepare(layer, module, passes, batches, mask, read, scored)
            runner.mode = "resident"
            for p in passes:
                runner.listeners.extend(p.listeners(layer, block, runner))
            per_chunk, group, build = plan_memory.plan_layer(self, store, batches, mask, passes, layer)
            self.chunks[layer] = per_chunk
            experts = list(range(store.num_experts))
            if group == 0:  # every expert built at once, computed inside one pass over the batches
                runner.weights = store.load_all(self.staging, self.buffers, self.opts.prefetch)
                self._track()
                self._tune(layer, module, runner, passes, batches, mask, read)
                self.stream.run_batches(layer, module, batches, mask, read, write, advance, runner,
                                        self._should_stop, scored, overlap_io)
                return
            done = 0
            norm = self.factory.moe_norm(module)
            second = AfterAttention(norm, block) if norm is not None else module
            for part in plan_memory.groups(batches, mask, group):
                inputs = {b: read(b, real_length(mask[b[0]:b[1]])) for b in part}
                held = _held(inputs)
                runner.capture()
                with ResidualCapture(norm, inputs, part) if norm is not None else nullcontext():
                    self.stream.run_batches(layer, module, part, mask, held, lambda b, y: None, lambda n: None,
                                            runner, None, scored, first_index=None)
                for ids, weights in store.chunks(experts, per_chunk, self.staging, self.buffers, self.opts.prefetch,
                                                 build):
                    for p in passes:
                        p.chunk(layer, store, ids, weights, runner.captured)
                    runner.compute(ids, weights, runner.captured, ids[0])
                    self._track()
                runner.replay()  # the layer's second half only, where it is pre-norm (executor/residual.py)
                self.stream.run_batches(layer, second, part, mask, held, write, advance, runner, self._should_stop,
                                        scored, first_index=done)
                done += len(part)
        finally:
            self.flops += runner.flops
            runner.detach()

    def _prepare(self, layer: int, module: nn.Module, passes: Sequence[LayerPass], batches: Sequence[Batch],
                 mask: np.ndarray, read: Reader, scored) -> None:
        """The discarded run that passes ask for in `prepare` (routed experts skipped by the caller)."""
        probes = [(p, p.prepare(layer, module)) for p in passes]
        probes = [(p, probe) for p, probe in probes if probe is not None]
        if not probes:
            return
        valid = _Valid([probe for _, probe in probes])
        self.stream.run_batches(layer, module, batches, mask, read, lambda b, y: None, lambda n: None, valid, None,
                                scored, first_index=None)
        for p, _ in probes:
            p.prepared(layer, module)

    def _tune(self, layer: int, module: nn.Module, runner: RoutedExperts | None, passes: Sequence[LayerPass],
              batches: Sequence[Batch], mask: np.ndarray, read: Reader) -> None:
        """The passes that tune the whole layer, on all of its inputs (see `LayerPass.tune`)."""
        tuners = [p for p in passes if p.tunes_layer]
        if not tuners:
            return
        from surgery.executor.stream import mask_builder

        inputs = {b: read(b, real_length(mask[b[0]:b[1]])) for b in batches}
        build = mask_builder(self.factory.config, layer)
        # every expert is built and nothing is read until the next layer: tuning gets the staging bytes
        self.staging = Staging(pinned=self.staging.pinned)

        def forward(x: torch.Tensor, rows_mask: np.ndarray) -> torch.Tensor:
            return self.stream._forward(layer, module, build, x, rows_mask, (0, x.shape[0]), x.shape[1], None, None)

        for p in tuners:
            p.tune(layer, module, runner, inputs, forward)
        self._track()

    def _should_stop(self) -> bool:
        return self.stop.is_set()

    def _track(self) -> None:
        self.peak_anon = max(self.peak_anon, rss_anon())

    def batch_tokens(self, mask: np.ndarray) -> int | None:
        """Tokens per batch an automatic batch size gives on this device (None: rows, the CPU default)."""
        return plan_memory.batch_tokens(self, mask)


class _Valid:
    """The observer a discarded run hands its batches' valid-token masks to (every probe gets them)."""

    def __init__(self, probes: list) -> None:
        self._probes = probes

    @property
    def valid(self):
        return self._probes[0].valid

    @valid.setter
    def valid(self, value) -> None:
        for probe in self._probes:
            probe.valid = value


def _held(inputs: dict[Batch, torch.Tensor]) -> Reader:
    return lambda b, t: inputs[b]
