"""The layer-by-layer executor: embed, then page each decoder layer in, run every calibration
sequence through it, write its outputs to the zarr cache (the next layer's input), record expert
saliency, page it out. Only one layer's weights and one batch's activations are ever resident.

Resumable: `WORK/manifest.json` records the inputs and the number of completed layers, and is
rewritten (atomically) only after that layer's outputs and statistics are on disk. A killed run,
started again with the same inputs, continues from the cached hidden states of the next layer, so
its result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass
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
from surgery.executor.progress import layer_progress
from surgery.executor.stream import LayerStream
from surgery.faults import checkpoint as crash_point
from surgery.jsonio import read_json, write_json_atomic
from surgery.saliency.observer import SaliencyObserver


@dataclass
class CalibrateOptions:
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    routing: str = "model"
    keep_hidden: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.routing not in ("model", "reference"):
            raise SurgeryError(f"unknown routing {self.routing!r} (use model or reference)")
        if self.batch_size < 1:
            raise SurgeryError(f"batch size must be at least 1, got {self.batch_size}")

    def identity(self) -> dict:
        """Options that change the result (and so must match on resume)."""
        return {"batch_size": self.batch_size, "dtype": self.dtype, "routing": self.routing}


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


@dataclass
class CalibrationInputs:
    """What a calibration run is made of: tokens plus what identifies them for the manifest."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    datasets: dict[str, str]  # spec -> content hash
    settings: dict  # samples, max_length, seed, pack ...


class Calibrator:
    def __init__(self, model_dir: Path, work: Path, opts: CalibrateOptions) -> None:
        self.model_dir = Path(model_dir)
        self.work = Path(work)
        self.opts = opts
        self.ckpt = Checkpoint(self.model_dir)
        self.model = MoEModel(self.ckpt)
        self.fingerprint = fingerprint(self.ckpt)
        self.device = resolve_device(opts.device)
        self.dtype = resolve_dtype(opts.dtype, self.device, self.model)
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

    # ---------------------------------------------------------------- run
    def run(self, inputs: CalibrationInputs) -> dict:
        identity = self._identity(inputs)
        manifest = self._check_work(identity)
        if manifest and manifest.get("complete") and (self.work / "saliency.json").exists():
            return read_json(self.work / "saliency.json", "saliency")
        self.work.mkdir(parents=True, exist_ok=True)
        self.stats_dir.mkdir(exist_ok=True)
        cache = HiddenCache(self.work / "cache.zarr")
        t0 = time.perf_counter()
        stream = LayerStream(LayerFactory(self.model, self.dtype, self.device), cache, self.opts.batch_size)
        if manifest is None or manifest["completed_layers"] is None:
            # the manifest exists before the cache does, so a run killed while embedding is ours to redo
            self._write_manifest(identity, None)
            cache.write_tokens(inputs.input_ids, inputs.attention_mask, self.opts.batch_size)
            stream.embed(inputs.input_ids)
            crash_point("embed")
            self._write_manifest(identity, 0)
            completed = 0
        else:
            completed = int(manifest["completed_layers"])
            if not cache.has_hidden(completed):
                raise SurgeryError(f"manifest says {completed} layers are done but hidden_{completed} is "
                                   "missing from the cache; start with an empty --work", self.work)
        ids, mask = cache.tokens()
        for stale in cache.hidden_layers():
            if stale > completed:
                cache.delete_hidden(stale)  # a layer interrupted mid-write: recomputed below
        num_experts, routing = self.model.num_experts, self.opts.routing
        real_tokens = int(mask.sum())
        n_layers = self.model.num_layers
        with layer_progress(n_layers, real_tokens, enabled=self.opts.progress) as progress:
            progress.start_layers(completed)
            for layer in range(completed, n_layers):
                progress.start_layer(layer)
                observer = stream.run_layer(layer, mask, progress.advance,
                                            lambda block: SaliencyObserver(block, num_experts, routing))
                if observer is not None:
                    write_json_atomic(self.stats_dir / f"layer_{layer:04d}.json", observer.stats.result(),
                                      indent=None)
                crash_point(f"layer{layer}.stats")
                self._write_manifest(identity, layer + 1)
                crash_point(f"layer{layer}.manifest")
                if not self.opts.keep_hidden:
                    cache.delete_hidden(layer)
        saliency = {
            "model": self.fingerprint,
            "model_path": str(self.model_dir.resolve()),
            "num_tokens": real_tokens,
            "routing": self.opts.routing,
            "layers": {str(layer): read_json(self.stats_dir / f"layer_{layer:04d}.json", "layer statistics")
                       for layer in self.model.moe_layers},
        }
        write_json_atomic(self.work / "saliency.json", saliency, indent=None)
        self._write_manifest(identity, n_layers, complete=True)
        self.summary = {
            "layers": n_layers - completed,
            "tokens": real_tokens,
            "seconds": time.perf_counter() - t0,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cache_bytes": cache.disk_bytes(),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
        }
        if self.device.type == "cuda":
            self.summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return saliency
