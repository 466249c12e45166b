"""The layer engine: the one walk over decoder layers that calibrate, eval and fidelity share.

A walk embeds the tokens (or resumes from a durable boundary), then for each layer pages in its
resident part (the next layer's is read in the background meanwhile), runs every batch through it,
pages its routed experts through in chunks the memory budget allows (`surgery.executor.experts`),
and hands the layer's hidden states to the next one through a tier (`surgery.executor.tiers`). What
differs between commands is a *pass* plugged in per layer: it may listen to the routed experts
(saliency, fidelity) and finish the layer (write statistics). Durable progress goes through the
command's `Journal` (its manifest), committed only after a boundary's hidden states and every pass's
output for the layer are on disk, so a killed walk resumes bit for bit.

SIGINT/SIGTERM finish the current batch, checkpoint the in-memory tier and stop (exit 130).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from surgery.arch.layer import LayerFactory
from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError
from surgery.executor.budget import (
    MemoryBudget,
    hold_heap_to_live_memory,
    plan_chunk,
    release_free_memory,
    rss_anon,
)
from surgery.executor.cache import HiddenCache
from surgery.executor.distributed import Ranks
from surgery.executor.experts import Buffers, ExpertListener, RoutedExperts, Staging
from surgery.executor.progress import layer_progress
from surgery.executor.stream import Batch, LayerStream, real_length
from surgery.executor.tiers import MemoryTier, ZarrTier
from surgery.faults import checkpoint as crash_point

Reader = Callable[[Batch, int], torch.Tensor]
RESIDENT_MAX = 256 << 20  # float bytes of a layer's experts up to which they are built all at once
BUILD = 1  # experts dequantised at a time when streaming (each reads its float weights from cache)
READ_MAX = 512 << 20  # stored bytes of one streamed chunk at most


class LayerPass:
    """A command's work at each layer; the base does nothing.

    Hooks, in the order the engine calls them for one layer: `prepare` (an object whose `valid` the
    engine sets per batch, or None) and, if it asked, one run of the batches with the outputs discarded
    and the routed experts skipped, then `prepared` (GPTQ: quantize the resident linears from the input
    statistics that run gathered); `listeners`; `chunk` for every group of routed experts as it is built,
    before it is computed (GPTQ: quantize them in place); `end_layer`."""

    # the routed experts must be computed over captured tokens, all of the layer's in one group (a pass
    # that needs every token's statistics before it changes an expert's weights)
    needs_capture: bool = False
    # every expert of a chunk is built at once and handed to `chunk` together (a pass that works on a
    # batch of experts, e.g. GPTQ across experts); otherwise `BUILD` at a time on the CPU
    batch_experts: bool = False

    def prepare(self, layer: int, module: nn.Module) -> object | None:
        return None

    def prepared(self, layer: int, module: nn.Module) -> None:
        """After the discarded run that `prepare` asked for."""

    def listeners(self, layer: int, block: nn.Module, runner: RoutedExperts) -> list[ExpertListener]:
        return []

    def chunk(self, layer: int, store, ids: list[int], weights: dict[str, torch.Tensor], captured: list) -> None:
        """Experts `ids` are built in `weights` (`[n, ...]`, expert ids[0] first) and about to run over
        the `captured` batches (`BatchRouting`); a pass may change the weights in place."""

    def extra_bytes(self, layer: int) -> int:
        """Memory the pass holds while one group of routed experts is built (planned into the budget)."""
        return 0

    def expert_bytes(self, layer: int) -> int:
        """Memory the pass holds per expert built at once (e.g. GPTQ's Hessians), planned into the
        budget for every expert of a build, so it bounds how many experts are batched."""
        return 0

    def end_layer(self, layer: int) -> None:
        """After all of the layer's batches, before its boundary is committed (write what it recorded)."""

    # ------------------------------------------------------------ whole-layer tuning (AutoRound)
    # the pass changes a layer's weights from all of its inputs at once: every routed expert is built
    # (never paged), then `tune` runs before the run that writes the layer's outputs
    tunes_layer: bool = False

    def tune(self, layer: int, module: nn.Module, runner: RoutedExperts | None,
             inputs: dict[Batch, torch.Tensor], forward: Callable[[torch.Tensor, np.ndarray], torch.Tensor]) -> None:
        """`inputs`: the layer's input hidden states per batch; `runner.weights`: every routed expert as
        `[E, ...]` parameters (None for a dense layer); `forward(x, mask)` runs the layer on rows `x`
        `[n, t, H]` with their `mask` `[n, t]`, with autograd. The pass may change the module's and
        `runner.weights`' values in place; the layer's outputs are then computed from them."""

    def tune_bytes(self, layer: int, tokens: int) -> int:
        """Memory `tune` holds besides the layer's built experts and inputs (planned into the budget)."""
        return 0


class Journal:
    """Where a walk records durable progress (a command's manifest); the base records nothing."""

    def commit(self, boundary: int | None) -> None:
        """`boundary` layers are done and their hidden states durable; None: embedding has started."""


@dataclass
class EngineOptions:
    prefetch: bool = True
    progress: bool = True
    cache_budget: int | None = None  # bytes for the memory tier; None = auto, 0 = zarr every layer
    checkpoint_every: int | None = None  # memory tier: layers between zarr checkpoints; None = auto
    keep_hidden: bool = False  # every boundary stays in the zarr cache
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
        self.timings = {"load_wait": 0.0, "layer_compute": 0.0, "checkpoint_write": 0.0}
        self.chunks: dict[int, int] = {}  # layer -> experts per chunk
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
            else:
                tier.store = rows
                crash_point(f"{prefix}embed")
                if self.opts.keep_hidden:
                    self._checkpoint(journal, 0)
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

    def _checkpoint(self, journal: Journal, boundary: int, snapshot=None) -> None:
        """Make `boundary` durable and the resume point, then drop older hidden states."""
        self.tier.save(boundary, self.tier.snapshot() if snapshot is None else snapshot)
        journal.commit(boundary)
        crash_point(f"{self.opts.crash_prefix}layer{boundary - 1}.manifest")
        if self.ranks.main and not self.opts.keep_hidden:
            for old in self.cache.hidden_layers():
                if old < boundary:
                    self.cache.delete_hidden(old)

    def _walk(self, passes, ids, mask, batches, start, journal, layers, mtp) -> Reader:
        self.tier = tier = self._choose_tier(ids, mask, batches)
        order = list(range(self.model.num_layers)) if layers is None else list(layers)
        first = self._begin(ids, mask, batches, start, journal)
        todo = [layer for layer in order if layer >= first]
        every = self.opts.checkpoint_every or (1 if self.opts.keep_hidden else None)
        durable = start
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-checkpoint") \
            if isinstance(tier, MemoryTier) and self.ranks.world == 1 else None
        pending: Future | None = None
        layer = first
        tokens = int(mask.sum())
        try:
            with layer_progress(len(order) + len(mtp), tokens,
                                enabled=self.opts.progress and self.ranks.main) as progress:
                progress.start_layers(len(order) - len(todo))
                for i, layer in enumerate(todo):
                    progress.start_layer(layer)
                    t0 = time.perf_counter()
                    module = self.factory.load(layer).eval()
                    if self.opts.prefetch and i + 1 < len(todo):
                        self.factory.prefetch(todo[i + 1])
                    self.timings["load_wait"] += time.perf_counter() - t0
                    tier.begin(layer)
                    t0 = time.perf_counter()
                    try:
                        self.run_layer(layer, module, passes, batches, mask, tier.read, tier.write, progress.advance,
                                       overlap_io=tier.overlap_io)
                    finally:
                        self.factory.unload(layer)
                        release_free_memory()
                    compute = time.perf_counter() - t0
                    self.timings["layer_compute"] += compute
                    tier.swap()
                    for p in passes:
                        p.end_layer(layer)
                    crash_point(f"{self.opts.crash_prefix}layer{layer}.stats")
                    boundary = layer + 1
                    if tier.on_disk_every_layer:
                        self.ranks.barrier()
                        self._checkpoint(journal, boundary)
                        durable = boundary
                        continue
                    last = i + 1 == len(todo)
                    if every is None or last or boundary - (durable or 0) >= every:
                        if pending is not None:
                            pending.result()
                        w0 = time.perf_counter()
                        snapshot = tier.snapshot()
                        if writer is None:
                            self._checkpoint(journal, boundary, snapshot)
                        else:
                            pending = writer.submit(self._checkpoint, journal, boundary, snapshot)
                        if every is None:
                            # auto, decided at the first checkpoint: its disk traffic should cost < 10% of the
                            # compute it protects (the write itself runs behind the next layers)
                            if pending is not None:
                                pending.result()
                            every = self.ranks.agree_max(
                                max(1, math.ceil((time.perf_counter() - w0) / max(0.1 * compute, 1e-9))))
                        durable = boundary
                if pending is not None:
                    pending.result()
                if mtp:
                    self._walk_mtp(passes, list(mtp), batches, ids, mask, tier.read, progress)
        except KeyboardInterrupt:
            if isinstance(tier, MemoryTier) and self.ranks.world == 1:
                if pending is not None:
                    pending.result()
                if durable != layer:  # the tier holds the complete input of `layer`
                    self._checkpoint(journal, layer, tier.snapshot())
            raise
        finally:
            if writer is not None:
                writer.shutdown(wait=True)
            self.factory.close()
            self.every = every
            self.timings["checkpoint_write"] = tier.write_seconds
        return tier.read

    def _walk_mtp(self, passes: Sequence[LayerPass], layers: list[int], batches: list[Batch], ids: np.ndarray,
                  mask: np.ndarray, read_last: Reader, progress) -> None:
        """The multi-token-prediction modules stored past the last decoder layer (GLM-4.x, DeepSeek-V3).
        MTP module k at position i sees the previous hidden state h_i (the last decoder layer's output,
        or MTP k-1's) and the token i+k+1: h' = eh_proj(cat(enorm(embed(t_{i+k+1})), hnorm(h_i))), then
        its decoder layer, whose experts are scored over positions whose current and predicted-from
        tokens are both real. Their outputs stay in memory (they feed nothing but the next MTP module)."""
        factory, dtype, device = self.factory, self.dtype, self.device
        eps = float(getattr(factory.config, "rms_norm_eps", 1e-6))
        pad = np.zeros((ids.shape[0], len(layers) + 1), dtype=ids.dtype)
        ids_ext, mask_ext = np.concatenate([ids, pad], 1), np.concatenate([mask, pad.astype(mask.dtype)], 1)
        previous = read_last
        for k, layer in enumerate(layers):
            progress.start_layer(layer)
            module, parts = factory.load_mtp(layer)
            outputs: dict[Batch, torch.Tensor] = {}

            def read(b: Batch, t: int, k: int = k, parts: dict = parts, previous=previous) -> torch.Tensor:
                nxt = ids_ext[b[0]:b[1], k + 1:k + 1 + t]
                if "embed_tokens.weight" in parts:
                    emb = parts["embed_tokens.weight"][torch.from_numpy(nxt).to(device)]
                else:
                    emb = self.stream.embed_batch(nxt).to(device)
                h = previous(b, t).to(device, dtype)
                x = torch.cat([_rms(emb, parts["enorm.weight"], eps), _rms(h, parts["hnorm.weight"], eps)], -1)
                return torch.nn.functional.linear(x, parts["eh_proj.weight"])

            def scored(b: Batch, m: torch.Tensor, k: int = k) -> torch.Tensor:
                t = m.shape[1]
                return m * torch.from_numpy(mask_ext[b[0]:b[1], k + 1:k + 1 + t].astype(np.int64)).to(m.device)

            self.run_layer(layer, module, passes, batches, mask, read, outputs.__setitem__, progress.advance, scored)
            for p in passes:
                p.end_layer(layer)
            previous = (lambda out: (lambda b, t: out[b]))(outputs)

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
        store = self.factory.expert_store(layer, module) if block is not None else None
        if store is None:
            self._prepare(layer, module, passes, batches, mask, read, scored)
            self._tune(layer, module, None, passes, batches, mask, read)
            self.stream.run_batches(layer, module, batches, mask, read, write, advance, None, self._should_stop,
                                    scored, overlap_io)
            return
        runner = RoutedExperts(block, store.num_experts, self.model.spec.experts_transposed, layer,
                               where=self.model.ckpt.directory)
        runner.timings = self.factory.timings
        try:
            runner.mode = "skip"
            self._prepare(layer, module, passes, batches, mask, read, scored)
            runner.mode = "resident"
            for p in passes:
                runner.listeners.extend(p.listeners(layer, block, runner))
            per_chunk, group, build = self._plan(store, batches, mask, passes, layer)
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
            for part in _groups(batches, mask, group):
                inputs = {b: read(b, real_length(mask[b[0]:b[1]])) for b in part}
                held = _held(inputs)
                runner.capture()
                self.stream.run_batches(layer, module, part, mask, held, lambda b, y: None, lambda n: None, runner,
                                        None, scored, first_index=None)
                for ids, weights in store.chunks(experts, per_chunk, self.staging, self.buffers, self.opts.prefetch,
                                                 build):
                    for p in passes:
                        p.chunk(layer, store, ids, weights, runner.captured)
                    runner.compute(ids, weights, runner.captured, ids[0])
                    self._track()
                runner.replay()
                self.stream.run_batches(layer, module, part, mask, held, write, advance, runner, self._should_stop,
                                        scored, first_index=done)
                done += len(part)
        finally:
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

    def _plan_tuned(self, store, batches: Sequence[Batch], mask: np.ndarray, passes: Sequence[LayerPass],
                    layer: int) -> tuple[int, int, int]:
        """Every expert built at once for a pass that tunes the whole layer, or a one-line refusal naming
        what does not fit: the experts in the compute dtype, the pass's tuning state, the layer's inputs."""
        self._track()
        e = store.num_experts
        if self.opts.experts_per_chunk is None:
            hidden = self.model.ckpt.info(self.model.spec.embed).shape[1]
            item = torch.empty((), dtype=self.dtype).element_size()
            experts = e * store.compute_bytes()
            inputs = sum(_padded(b, mask) for b in batches) * hidden * item
            state = sum(p.tune_bytes(layer, int(mask.sum())) for p in passes)
            staging = 2 * store.read_chunk() * store.raw_bytes()
            on_device = self.device.type == "cuda"
            free_dev = (self.budget.device_free(self.device) if on_device else self.budget.host_free()) \
                + self.buffers.nbytes()
            host = staging + (0 if on_device else experts + state + inputs)
            need = experts + state + inputs
            if need > free_dev or host > self.budget.host_free() + self.staging.nbytes():
                raise SurgeryError(f"layer {layer}: tuning holds the whole layer at once: its {e} routed experts "
                                   f"({experts / 1e6:.0f} MB as {str(self.dtype).removeprefix('torch.')}), the "
                                   f"tuning state ({state / 1e6:.0f} MB) and its inputs ({inputs / 1e6:.0f} MB) "
                                   f"need {need / 1e6:.0f} MB and the memory budget leaves "
                                   f"{max(free_dev, 0) / 1e6:.0f} MB{' on the device' if on_device else ''}; "
                                   "raise --memory-budget (or calibrate on fewer tokens)", self.model.ckpt.directory)
        return e, 0, e

    def _should_stop(self) -> bool:
        return self.stop.is_set()

    def _track(self) -> None:
        self.peak_anon = max(self.peak_anon, rss_anon())

    def _plan(self, store, batches: Sequence[Batch], mask: np.ndarray, passes: Sequence[LayerPass] = (),
              layer: int = 0) -> tuple[int, int, int]:
        """(experts per chunk, tokens per captured group, experts built at once) for this layer under
        the budget, measured after its resident part is loaded. Staging and chunk buffers kept from
        earlier layers are reused, so what they hold counts as free; the next layer's resident part,
        being read meanwhile, does not."""
        if any(p.tunes_layer for p in passes):
            return self._plan_tuned(store, batches, mask, passes, layer)
        self._track()
        tokens = int(mask.sum())
        capture = any(p.needs_capture for p in passes)
        batched = any(p.batch_experts for p in passes)
        sizes = [_padded(b, mask) for b in batches]  # positions as captured
        held_tokens = sum(sizes)  # a group this large holds every batch (a capture pass needs that)
        if self.opts.experts_per_chunk:
            per = min(self.opts.experts_per_chunk, store.num_experts)
            build = per if batched else BUILD
            if per >= store.num_experts and not capture:
                return per, 0, build
            return per, held_tokens if capture else (self.opts.tokens_per_group or tokens), build
        hidden = self.model.ckpt.info(self.model.spec.embed).shape[1]
        item = torch.empty((), dtype=self.dtype).element_size()
        act = max((_activation_bytes(self.factory.config, b, mask, hidden, item) for b in batches), default=0)
        act += sum(p.extra_bytes(layer) for p in passes)
        per_expert = sum(p.expert_bytes(layer) for p in passes)
        on_device = self.device.type == "cuda"
        free_host = self.budget.host_free() + self.staging.nbytes() - self.factory.pending_bytes()
        if on_device:
            free_dev = self.budget.device_free(self.device) + self.buffers.nbytes()
        else:
            free_host += self.buffers.nbytes()
            free_dev = free_host
        e, compute, raw = store.num_experts, store.compute_bytes(), store.raw_bytes()
        staging = 2 * store.read_chunk() * raw
        # every expert built at once and computed inside one pass over the batches: only for layers whose
        # float experts are small (the passes then need no capture / replay); a full-width layer streams
        # even when the budget would hold it, since dequantising one expert at a time into a buffer the
        # cache keeps is faster than writing the whole layer's float weights to memory and reading them
        # back (measured: MiniMax-M2 shapes, 2 cores)
        small = e * compute <= RESIDENT_MAX and not capture
        if small and on_device and e * compute + act <= free_dev and staging <= free_host:
            return e, 0, e
        if small and not on_device and e * compute + act + staging <= free_host:
            return e, 0, e
        # paging: a group of captured tokens (layer input, MoE input, routed output) takes up to a quarter
        per_token = 4 * hidden * item
        # a quarter of what is free, or less when that would leave no room for one expert (at least a batch)
        one = BUILD * (compute + per_expert) + (0 if on_device else 2 * raw)
        room = max(min(free_dev // 4, free_dev - act - one), 0) // per_token
        group = max(1, min(held_tokens if capture else tokens, max(room, max(sizes, default=1))))
        if capture and group < held_tokens:
            raise SurgeryError(f"layer {layer}: this command needs the MoE inputs of all {held_tokens} calibration "
                               f"positions at once ({held_tokens * per_token / 1e6:.0f} MB), and the memory budget "
                               "leaves room for "
                               f"{group}; raise --memory-budget or calibrate on fewer tokens",
                               self.model.ckpt.directory)
        held = max(sum(_padded(b, mask) for b in part) for part in _groups(batches, mask, group)) * per_token
        n = plan_chunk(free_dev - held, free_host - (0 if on_device else held), compute + per_expert, raw, e, act,
                       on_device, self.model.ckpt.directory, BUILD, self.budget.total if self.budget.given else None,
                       batched)
        # reads beyond ~512 MB buy no speed (one token group streams every chunk once either way)
        n = min(n, max(1, READ_MAX // max(raw, 1)))
        return n, group, n if batched else BUILD


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


def _groups(batches: Sequence[Batch], mask: np.ndarray, tokens: int) -> list[list[Batch]]:
    """Consecutive batches holding about `tokens` real-length positions each (at least one batch)."""
    out, part, held = [], [], 0
    for b in batches:
        n = _padded(b, mask)
        if part and held + n > tokens:
            out.append(part)
            part, held = [], 0
        part.append(b)
        held += n
    if part:
        out.append(part)
    return out


def _padded(batch: Batch, mask: np.ndarray) -> int:
    """Positions of a batch as it runs and is captured: rows x its longest real length."""
    return (batch[1] - batch[0]) * real_length(mask[batch[0]:batch[1]])


def _activation_bytes(config, batch: Batch, mask: np.ndarray, hidden: int, item: int) -> int:
    """An upper estimate of one batch's live transient tensors in a decoder layer: attention scores and
    their softmax for every head (eager attention materialises them), q/k/v/o and the residual stream's
    copies, the MoE block's routing, and one expert's input, intermediate and output for every token
    (experts run one at a time, so no more than every token is ever routed to the one computing).
    Measured on the 24-layer benchmark (batch 8 x 256): 70 MB estimated for 40-60 MB live."""
    rows = batch[1] - batch[0]
    t = real_length(mask[batch[0]:batch[1]])
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden))
    k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    tokens = rows * t
    scores = 2 * rows * heads * t * t * 4
    proj = tokens * (3 * heads * head_dim + 4 * hidden) * item
    experts = tokens * (3 * inter + 3 * hidden) * item + tokens * k * 24
    # attention and the MoE block run one after the other: the larger phase, with the residual stream's
    # copies live in both
    return max(scores + proj, experts + 4 * tokens * hidden * item)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the families' own modules compute it (float32 statistics, weight in the input dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
