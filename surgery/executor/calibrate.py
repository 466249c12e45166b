"""The layer-by-layer executor: embed, then page each decoder layer in (the next one is read in the
background meanwhile), run every calibration sequence through it, record expert saliency, page it
out. Only one layer's weights (two while prefetching) and one batch's activations are resident.

Hidden states between layers live in a tier: in host memory when they fit `cache_budget` (the zarr
cache is then the spill tier and the resume checkpoint, written behind the compute every
`checkpoint_every` layers and when the run is interrupted by a signal), else in the zarr cache,
written every layer. Either way `WORK/manifest.json` records the inputs and the last layer boundary
whose hidden states and statistics are durable, and is rewritten atomically only after they are on
disk. A killed run, started again with the same inputs, continues from that boundary's cached
hidden states, so its result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import math
import resource
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

import surgery
from surgery.arch.layer import LayerFactory
from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.executor.cache import HiddenCache
from surgery.executor.distributed import Ranks, init_ranks, sum_stats
from surgery.executor.options import CalibrateOptions, CalibrationInputs
from surgery.executor.progress import layer_progress
from surgery.executor.stream import Batch, LayerStream, batch_ranges, real_length
from surgery.faults import checkpoint as crash_point
from surgery.jsonio import read_json, save_npy_atomic, write_json_atomic
from surgery.saliency.observer import LayerStats, SaliencyObserver


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SurgeryError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {spec!r} requested but CUDA is not available")
    return device


def resolve_dtype(spec: str, device: torch.device, model: MoEModel) -> torch.dtype:
    """auto: the checkpoint's dtype (bf16) on CUDA, float32 on CPU (reference-exact, and CPUs have no
    fast float16)."""
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if spec != "auto":
        if spec not in names:
            raise SurgeryError(f"unknown dtype {spec!r} (use auto, bfloat16 or float32)")
        return names[spec]
    if device.type == "cpu":
        return torch.float32
    declared = str(model.ckpt.config.get("dtype") or model.ckpt.config.get("torch_dtype") or "bfloat16")
    return names.get(declared, torch.bfloat16)


class Calibrator:
    def __init__(self, model_dir: Path, work: Path, opts: CalibrateOptions) -> None:
        self.model_dir = Path(model_dir)
        self.work = Path(work)
        self.opts = opts
        self.ckpt = Checkpoint(self.model_dir)
        self.model = MoEModel(self.ckpt)
        self.model.check_supported()
        self.fingerprint = fingerprint(self.ckpt)
        self.ranks: Ranks = init_ranks(opts.device)
        self.device = resolve_device(opts.device)
        if self.device.type == "cuda" and self.ranks.world > 1:
            self.device = torch.device("cuda", self.ranks.local_rank)
        self.dtype = resolve_dtype(opts.dtype, self.device, self.model)
        self.timings = {"compute": 0.0, "load_wait": 0.0, "checkpoint_write": 0.0}
        self.manifest_path = self.work / "manifest.json"
        self.stats_dir = self.work / "stats"

    # ---------------------------------------------------------------- manifest
    def _identity(self, inputs: CalibrationInputs) -> dict:
        return {
            "model": self.fingerprint["sha256"],
            "datasets": inputs.datasets,
            "data": inputs.settings,
            "options": {**self.opts.identity(), "dtype": str(self.dtype).removeprefix("torch.")},
        }

    def _check_work(self, identity: dict) -> dict | None:
        if not self.manifest_path.exists():
            if self.work.exists() and any(p.name != "manifest.json" for p in self.work.iterdir()) and (
                    self.work / "cache.zarr").exists():
                raise SurgeryError("has a cache but no manifest; use an empty --work directory", self.work)
            return None
        manifest = read_json(self.manifest_path, "manifest")
        old = manifest.get("inputs", {})
        if old != identity:
            diffs = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
            detail = []
            for k in diffs:
                a, b = old.get(k), identity.get(k)
                if isinstance(a, dict) and isinstance(b, dict):
                    sub = [s for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
                    detail.append(f"{k} ({', '.join(f'{s}: {a.get(s)!r} -> {b.get(s)!r}' for s in sub)})")
                else:
                    detail.append(k)
            raise SurgeryError("was made for other inputs; differs in " + "; ".join(detail)
                               + " (use another --work directory)", self.work)
        return manifest

    def _write_manifest(self, identity: dict, completed: int | None, complete: bool = False) -> None:
        """`completed`: layers whose outputs and statistics are on disk; None while embedding."""
        if not self.ranks.main:
            return
        write_json_atomic(self.manifest_path, {
            "tool": f"surgery {surgery.__version__}",
            "command": "calibrate",
            "model_path": str(self.model_dir.resolve()),
            "inputs": identity,
            "num_layers": self.model.num_layers,
            "moe_layers": self.model.moe_layers,
            "completed_layers": completed,
            "complete": complete,
            "options": asdict(self.opts),
        })

    # ---------------------------------------------------------------- hidden-state tiers
    def _tier_bytes(self, batches: list[Batch], mask: np.ndarray) -> int:
        hidden = self.ckpt.info(self.model.spec.embed).shape[1]
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum((e - s) * real_length(mask[s:e]) * hidden * item for s, e in batches)

    def _use_memory(self, batches: list[Batch], mask: np.ndarray) -> bool:
        """Memory tier when input, output and the one being checkpointed fit the budget."""
        budget = self.opts.cache_budget
        if budget is None:
            budget = int(0.4 * available_memory())
        return budget > 0 and 3 * self._tier_bytes(batches, mask) <= budget

    def _fits_on_device(self, batches: list[Batch], mask: np.ndarray) -> bool:
        """Input, output and one checkpoint copy of the hidden states within half the free GPU memory
        (the other half is for the layer's weights, its prefetched successor and activations)."""
        free, _total = torch.cuda.mem_get_info(self.device)
        return 3 * self._tier_bytes(batches, mask) <= free // 2

    def _save_boundary(self, cache: HiddenCache, boundary: int, store: dict[Batch, torch.Tensor],
                       shape: tuple[int, int, int]) -> None:
        """Write a memory-tier layer boundary into the zarr cache (this rank's rows)."""
        t0 = time.perf_counter()
        if self.ranks.main:
            cache.create_hidden(boundary, *shape, self.dtype, 1)
        self.ranks.barrier()
        z = cache.hidden(boundary)
        for (s, _e), y in store.items():
            HiddenCache.write_rows(z, s, y)
        self.ranks.barrier()
        self.timings["checkpoint_write"] += time.perf_counter() - t0

    def _commit_boundary(self, cache: HiddenCache, identity: dict, boundary: int) -> None:
        """Make `boundary` the resume point, then drop older hidden states."""
        self._write_manifest(identity, boundary)
        crash_point(f"layer{boundary - 1}.manifest")
        if self.ranks.main and not self.opts.keep_hidden:
            for old in cache.hidden_layers():
                if old < boundary:
                    cache.delete_hidden(old)

    # ---------------------------------------------------------------- run
    def run(self, inputs: CalibrationInputs) -> dict:
        identity = self._identity(inputs)
        manifest = self._check_work(identity)
        if manifest and manifest.get("complete") and (self.work / "saliency.json").exists():
            return read_json(self.work / "saliency.json", "saliency")
        ranks = self.ranks
        if ranks.main:
            self.work.mkdir(parents=True, exist_ok=True)
            self.stats_dir.mkdir(exist_ok=True)
        ranks.barrier()
        stop = threading.Event()
        handlers = self._install_signal_handlers(stop)
        try:
            return self._run(inputs, identity, manifest, stop)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _install_signal_handlers(self, stop: threading.Event) -> dict:
        """SIGINT/SIGTERM: finish the current batch, checkpoint what is in memory, then stop."""
        if threading.current_thread() is not threading.main_thread() or self.ranks.world > 1:
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda *_: stop.set())
        return previous

    def _run(self, inputs: CalibrationInputs, identity: dict, manifest: dict | None,
             stop: threading.Event) -> dict:
        ranks, opts = self.ranks, self.opts
        cache = HiddenCache(self.work / "cache.zarr")
        t_start = time.perf_counter()
        factory = LayerFactory(self.model, self.dtype, self.device)
        stream = LayerStream(factory, cache, opts.batch_size)
        ids, mask = inputs.input_ids, inputs.attention_mask
        hidden = self.ckpt.info(self.model.spec.embed).shape[1]
        shape = (ids.shape[0], ids.shape[1], hidden)
        batches = ranks.share(batch_ranges(mask, opts.batch_size, opts.batch_tokens))
        memory = self._use_memory(batches, mask)
        # on CUDA the memory tier stays on the GPU when it fits beside the layer; else on the host
        on_device = memory and self.device.type == "cuda" and self._fits_on_device(batches, mask)
        store: dict[Batch, torch.Tensor] = {}

        fresh = manifest is None or manifest["completed_layers"] is None
        if fresh:
            # the manifest exists before the cache does, so a run killed while embedding is ours to redo
            self._write_manifest(identity, None)
            if ranks.main:
                cache.write_tokens(ids, mask, opts.batch_size)
            ranks.barrier()
            completed = 0
            for s, e in batches:
                store[(s, e)] = self.embed_rows(stream, ids, mask, s, e)
            if not memory:
                self._save_boundary(cache, 0, store, shape)
                store.clear()
                crash_point("embed")
                self._write_manifest(identity, 0)
            else:
                crash_point("embed")
                if opts.keep_hidden:
                    self._save_boundary(cache, 0, store, shape)
                    self._commit_boundary(cache, identity, 0)
        else:
            completed = int(manifest["completed_layers"])
            if not cache.has_hidden(completed):
                raise SurgeryError(f"manifest says {completed} layers are done but hidden_{completed} is "
                                   "missing from the cache; start with an empty --work", self.work)
            if ranks.main:
                for stale in cache.hidden_layers():
                    if stale > completed:
                        cache.delete_hidden(stale)  # interrupted mid-write: recomputed below
            ranks.barrier()
            if memory:
                z = cache.hidden(completed)
                store = {b: HiddenCache.read_rows(z, b[0], b[1], real_length(mask[b[0]:b[1]])) for b in batches}

        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-checkpoint") \
            if memory and ranks.world == 1 else None
        pending: Future | None = None
        every = opts.checkpoint_every or (1 if opts.keep_hidden else None)
        durable = None if fresh else completed  # last boundary on disk
        num_experts, routing, spec = self.model.num_experts, opts.routing, self.model.spec
        n_layers = self.model.num_layers
        mtp_layers = self.model.mtp_expert_layers()
        real_tokens = int(mask.sum())

        def checkpoint(boundary: int, snapshot: dict[Batch, torch.Tensor]) -> None:
            self._save_boundary(cache, boundary, snapshot, shape)
            self._commit_boundary(cache, identity, boundary)

        layer = completed
        try:
            with layer_progress(n_layers, real_tokens, enabled=opts.progress and ranks.main) as progress:
                progress.start_layers(completed)
                for layer in range(completed, n_layers):
                    progress.start_layer(layer)
                    t0 = time.perf_counter()
                    module = factory.load(layer).eval()
                    if opts.prefetch:
                        factory.prefetch(layer + 1)
                    self.timings["load_wait"] += time.perf_counter() - t0
                    block = factory.moe_block(module)
                    observer = SaliencyObserver(block, num_experts, routing, spec.router_module,
                                                spec.experts_transposed) if block is not None else None
                    t0 = time.perf_counter()
                    try:
                        if memory:
                            out: dict[Batch, torch.Tensor] = {}
                            stream.run_batches(layer, module, batches, mask, _reader(store),
                                               _writer(out, on_device), progress.advance, observer, stop.is_set)
                        else:
                            if ranks.main:
                                cache.create_hidden(layer + 1, *shape, self.dtype, 1)
                            ranks.barrier()
                            read, write = stream.zarr_io(cache.hidden(layer), cache.hidden(layer + 1))
                            stream.run_batches(layer, module, batches, mask, read, write, progress.advance,
                                               observer, stop.is_set, overlap_io=True)
                    finally:
                        if observer is not None:
                            observer.detach()
                        factory.unload(layer)
                    compute = time.perf_counter() - t0
                    self.timings["compute"] += compute
                    if observer is not None:
                        self._write_stats(layer, observer.stats)
                    crash_point(f"layer{layer}.stats")
                    if not memory:
                        ranks.barrier()
                        self._commit_boundary(cache, identity, layer + 1)
                        continue
                    store = out
                    boundary = layer + 1
                    if every is None or boundary == n_layers or boundary - (durable or 0) >= every:
                        if pending is not None:
                            pending.result()
                        w0 = time.perf_counter()
                        if writer is None:
                            checkpoint(boundary, store)
                        else:
                            pending = writer.submit(checkpoint, boundary, store)
                        if every is None:
                            # auto, decided at the first checkpoint: its disk traffic should cost < 10%
                            # of the compute it protects (the write itself runs behind the next layers)
                            if pending is not None:
                                pending.result()
                            every = ranks.agree_max(
                                max(1, math.ceil((time.perf_counter() - w0) / max(0.1 * compute, 1e-9))))
                        durable = boundary  # written, or being written behind the compute
                if pending is not None:
                    pending.result()
                if mtp_layers:
                    last = _reader(store) if memory else stream.zarr_io(cache.hidden(n_layers), None)[0]
                    self._run_mtp(factory, stream, mtp_layers, batches, ids, mask, last, progress, stop)
        except KeyboardInterrupt:
            if memory and ranks.world == 1:
                if pending is not None:
                    pending.result()
                if durable != layer:  # `store` holds the complete input of `layer`
                    checkpoint(layer, store)
            factory.close()
            raise
        finally:
            if writer is not None:
                writer.shutdown(wait=True)
        factory.close()
        ranks.barrier()
        saliency = {
            "model": self.fingerprint,
            "model_path": str(self.model_dir.resolve()),
            "num_tokens": real_tokens,
            "routing": opts.routing,
            "layers": {str(layer): read_json(self.stats_dir / f"layer_{layer:04d}.json", "layer statistics")
                       for layer in self.model.prunable_layers()},
        }
        if ranks.main:
            write_json_atomic(self.work / "saliency.json", saliency, indent=None)
            self._write_manifest(identity, n_layers, complete=True)
        ranks.barrier()
        self.summary = {
            "layers": n_layers - completed,
            "tokens": real_tokens,
            "seconds": time.perf_counter() - t_start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cache_bytes": cache.disk_bytes(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "tier": ("memory (GPU)" if on_device else "memory (host)") if memory else "disk",
            "checkpoint_every": every,
            "ranks": ranks.world,
            **{f"{k}_s": round(v, 3) for k, v in self.timings.items()},
        }
        if self.device.type == "cuda":
            self.summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return saliency

    def _run_mtp(self, factory: LayerFactory, stream: LayerStream, layers: list[int], batches: list[Batch],
                 ids: np.ndarray, mask: np.ndarray, read_last, progress, stop: threading.Event) -> None:
        """Calibrate the multi-token-prediction modules stored past the last decoder layer (GLM-4.x,
        DeepSeek-V3). MTP module k at position i sees the previous hidden state h_i (the last decoder
        layer's output, or MTP k-1's) and the token i+k+1: h' = eh_proj(cat(enorm(embed(t_{i+k+1})),
        hnorm(h_i))), then its decoder layer, whose experts are scored over positions whose current
        and predicted-from tokens are both real."""
        spec, dtype, device = self.model.spec, self.dtype, self.device
        eps = float(getattr(factory.config, "rms_norm_eps", 1e-6))
        pad = np.zeros((ids.shape[0], len(layers) + 1), dtype=ids.dtype)
        ids_ext, mask_ext = np.concatenate([ids, pad], 1), np.concatenate([mask, pad.astype(mask.dtype)], 1)
        previous = read_last
        for k, layer in enumerate(layers):
            progress.start_layer(layer)
            module, parts = factory.load_mtp(layer)
            block = factory.moe_block(module)
            observer = SaliencyObserver(block, self.model.num_experts, self.opts.routing, spec.router_module,
                                        spec.experts_transposed)
            outputs: dict[Batch, torch.Tensor] = {}

            def read(b: Batch, t: int, k: int = k, parts: dict = parts, previous=previous) -> torch.Tensor:
                nxt = ids_ext[b[0]:b[1], k + 1:k + 1 + t]
                if "embed_tokens.weight" in parts:
                    emb = parts["embed_tokens.weight"][torch.from_numpy(nxt).to(device)]
                else:
                    emb = stream.embed_batch(nxt).to(device)
                h = previous(b, t).to(device, dtype)
                x = torch.cat([_rms(emb, parts["enorm.weight"], eps), _rms(h, parts["hnorm.weight"], eps)], -1)
                return torch.nn.functional.linear(x, parts["eh_proj.weight"])

            def scored(b: Batch, m: torch.Tensor, k: int = k) -> torch.Tensor:
                t = m.shape[1]
                return m * torch.from_numpy(mask_ext[b[0]:b[1], k + 1:k + 1 + t].astype(np.int64)).to(m.device)

            try:
                stream.run_batches(layer, module, batches, mask, read, outputs.__setitem__, progress.advance,
                                   observer, stop.is_set, scored)
            finally:
                observer.detach()
            self._write_stats(layer, observer.stats)
            previous = _reader(outputs)

    def embed_rows(self, stream: LayerStream, ids: np.ndarray, mask: np.ndarray, s: int, e: int) -> torch.Tensor:
        """Embeddings of rows [s, e), trimmed to the batch's real length like every later layer."""
        return stream.embed_batch(ids[s:e, :real_length(mask[s:e])])

    def _write_stats(self, layer: int, stats: LayerStats) -> None:
        parts = self.ranks.gather(stats.raw())
        if self.ranks.main:
            total = LayerStats.from_raw(sum_stats(parts)) if len(parts) > 1 else stats
            save_npy_atomic(self.stats_dir / f"layer_{layer:04d}.outputs.npy", total.output_sum)
            write_json_atomic(self.stats_dir / f"layer_{layer:04d}.json", total.result(), indent=None)


def _writer(out: dict[Batch, torch.Tensor], on_device: bool):
    """Memory-tier write: keep the batch on the compute device, or move it to host memory."""
    if on_device:
        return out.__setitem__
    return lambda b, y: out.__setitem__(b, y if y.device.type == "cpu" else y.to("cpu"))


def _reader(store: dict[Batch, torch.Tensor]):
    """Memory-tier read: the stored batch is already trimmed to its real length."""
    return lambda b, t: store[b]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the families' own modules compute it (float32 statistics, weight in the input dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
