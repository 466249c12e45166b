"""`calibrate`: the layer engine's walk with a saliency pass.

The engine (`surgery.executor.engine`) embeds the calibration tokens, pages each decoder layer in with
its routed experts in budget-sized chunks, and keeps hidden states in a tier; `SaliencyPass` listens
to every MoE layer's experts and writes that layer's statistics when it is done. `WORK/manifest.json`
records the inputs and the last layer boundary whose hidden states and statistics are durable, and
is rewritten atomically only after they are on disk. A killed run, started again with the same
inputs, continues from that boundary's cached hidden states, so its result is bit-identical to an
uninterrupted run. Multi-token-prediction layers (GLM-4.x, DeepSeek-V3) run after the last decoder
layer through the same engine.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.executor.cache import HiddenCache
from surgery.executor.device import resolve_device, resolve_dtype
from surgery.executor.distributed import Ranks, init_ranks, sum_stats
from surgery.executor.engine import EngineOptions, Journal, LayerEngine, LayerPass
from surgery.executor.experts import ExpertListener, RoutedExperts
from surgery.executor.manifest import require_same_inputs
from surgery.executor.options import DEFAULT_ROWS, CalibrateOptions, CalibrationInputs
from surgery.executor.stream import batch_ranges
from surgery.jsonio import read_json, save_npy_atomic, write_json_atomic
from surgery.saliency.observer import LayerStats, SaliencyObserver


class SaliencyPass(LayerPass):
    """Records each MoE layer's expert saliency (`SaliencyObserver`) and writes it when the layer is
    done: `WORK/stats/layer_NNNN.json` and the expert output sums beside it, summed across ranks."""

    def __init__(self, model: MoEModel, routing: str, ranks: Ranks, stats_dir: Path) -> None:
        self.model, self.routing, self.ranks, self.stats_dir = model, routing, ranks, stats_dir
        self.observer: SaliencyObserver | None = None

    def listeners(self, layer: int, block: nn.Module, runner: RoutedExperts) -> list[ExpertListener]:
        spec = self.model.spec
        self.observer = SaliencyObserver(block, self.model.num_experts, self.routing, spec.router_module,
                                         spec.experts_transposed, runner=runner)
        return [self.observer]

    def end_layer(self, layer: int) -> None:
        observer, self.observer = self.observer, None
        if observer is None:
            return
        observer.detach()
        parts = self.ranks.gather(observer.stats.raw())
        if self.ranks.main:
            raw = sum_stats(parts) if len(parts) > 1 else parts[0]
            save_npy_atomic(self.stats_dir / f"layer_{layer:04d}.outputs.npy", raw["output_sum"])
            write_json_atomic(self.stats_dir / f"layer_{layer:04d}.json", LayerStats.from_raw(raw).result(),
                              indent=None)


class _Manifest(Journal):
    """WORK/manifest.json, written by the main rank only."""

    def __init__(self, calibrator: Calibrator, identity: dict) -> None:
        self.calibrator, self.identity = calibrator, identity

    def commit(self, boundary: int | None) -> None:
        self.calibrator._write_manifest(self.identity, boundary)


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
        self.manifest_path = self.work / "manifest.json"
        self.stats_dir = self.work / "stats"
        self.batching: dict | None = None  # {"batch_size", "batch_tokens"} once resolved

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
        require_same_inputs(manifest, identity, "was made for", self.work)
        return manifest

    def _write_manifest(self, identity: dict, completed: int | None, complete: bool = False,
                        summary: dict | None = None) -> None:
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
            "batches": self.batching,
            **({"summary": summary} if summary else {}),
        })

    def _batching(self, engine: LayerEngine, mask) -> dict:
        """The run's batches as the options ask, an automatic size resolved now (on CUDA: the tokens the
        memory budget allows, the same on every rank); kept in the manifest so a resumed run, whatever
        memory it finds, uses the same batches."""
        opts = self.opts
        tokens = opts.batch_tokens
        if opts.batch_size is None and tokens is None:
            tokens = engine.batch_tokens(mask)
            if tokens is not None:
                tokens = -self.ranks.agree_max(-tokens)
        return {"batch_size": opts.batch_size or DEFAULT_ROWS, "batch_tokens": tokens}

    # ---------------------------------------------------------------- run
    def run(self, inputs: CalibrationInputs) -> dict:
        identity = self._identity(inputs)
        manifest = self._check_work(identity)
        if manifest and manifest.get("complete") and (self.work / "saliency.json").exists():
            return read_json(self.work / "saliency.json", "saliency")
        ranks, opts = self.ranks, self.opts
        if ranks.main:
            self.work.mkdir(parents=True, exist_ok=True)
            self.stats_dir.mkdir(exist_ok=True)
        ranks.barrier()
        t_start = time.perf_counter()
        cache = HiddenCache(self.work / "cache.zarr")
        ids, mask = inputs.input_ids, inputs.attention_mask
        # the hidden states are not needed once the statistics are written: no checkpoint of the last layer
        engine = LayerEngine(self.model, self.device, self.dtype, cache, EngineOptions(
            prefetch=opts.prefetch, progress=opts.progress, cache_budget=opts.cache_budget,
            checkpoint_every=opts.checkpoint_every, keep_hidden=opts.keep_hidden,
            memory_budget=opts.memory_budget, final_checkpoint=False), ranks)
        self.batching = (manifest or {}).get("batches") or self._batching(engine, mask)
        batches = ranks.share(batch_ranges(mask, self.batching["batch_size"], self.batching["batch_tokens"]))
        journal = _Manifest(self, identity)
        start = None if manifest is None or manifest["completed_layers"] is None else int(manifest["completed_layers"])
        if start is None:
            # the manifest exists before the cache does, so a run killed while embedding is ours to redo
            journal.commit(None)
            if ranks.main:
                cache.write_tokens(ids, mask, self.batching["batch_size"])
            ranks.barrier()
        saliency_pass = SaliencyPass(self.model, opts.routing, ranks, self.stats_dir)
        engine.walk([saliency_pass], ids, mask, batches, start, journal, mtp=self.model.mtp_expert_layers())
        ranks.barrier()
        real_tokens = int(mask.sum())
        saliency = {
            "model": self.fingerprint,
            "model_path": str(self.model_dir.resolve()),
            "num_tokens": real_tokens,
            "routing": opts.routing,
            "layers": {str(layer): read_json(self.stats_dir / f"layer_{layer:04d}.json", "layer statistics")
                       for layer in self.model.prunable_layers()},
        }
        self.summary = engine.summary(time.perf_counter() - t_start, (start or 0), cache.disk_bytes())
        self.summary["tokens"] = real_tokens
        self.summary["batches"] = self.batching
        if ranks.main:
            write_json_atomic(self.work / "saliency.json", saliency, indent=None)
            self._write_manifest(identity, self.model.num_layers, complete=True, summary=self.summary)
            if not opts.keep_hidden:  # nothing resumes from them any more
                for layer in cache.hidden_layers():
                    cache.delete_hidden(layer)
        ranks.barrier()
        return saliency
