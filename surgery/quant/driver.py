"""`surgery quantize --method gptq`: the layer engine's walk with a GPTQ pass (`surgery.quant.
gptq_pass`), then the W4A16 writer reading what the pass stored.

The walk is the one calibrate uses (hidden-state tiers, routed experts streamed within the memory
budget, signals, progress); WORK/gptq.json records the identity (model, data, options), the last
layer boundary whose hidden states and packed tensors (WORK/layer_NNNN.safetensors) are durable, and
each layer's RTN fallbacks. A killed run continues from that boundary's cached hidden states, which
are the outputs of the already-quantized layers, so it gives the same bytes. MTP layers (past
num_hidden_layers) are not calibrated: their weights take RTN.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.executor.cache import HiddenCache
from surgery.executor.engine import EngineOptions, Journal, LayerEngine
from surgery.executor.manifest import require_same_inputs
from surgery.jsonio import read_json, write_json_atomic
from surgery.quant.gptq_pass import GPTQPass, layer_file
from surgery.quant.targets import QuantTargets, find_targets

STATE = "gptq.json"

__all__ = ["STATE", "calibrate_gptq", "gptq_source", "layer_file", "run_gptq"]


class _State(Journal):
    """WORK/gptq.json: inputs, durable boundary, RTN fallbacks per finished layer (and, of those, the
    weights whose Hessian did not factorise), and once the walk is over, where its time went."""

    def __init__(self, work: Path, identity: dict, gp: GPTQPass, previous: dict | None) -> None:
        self.path, self.identity, self.gp = work / STATE, identity, gp
        self.fallback = dict((previous or {}).get("rtn_fallback", {}))
        self.cholesky = dict((previous or {}).get("cholesky_fallback", {}))
        self.boundary: int | None = None
        self.timings: dict[str, float] = {}

    def commit(self, boundary: int | None) -> None:
        if boundary is not None:
            for layer in range(boundary):
                if layer in self.gp.rtn_fallback:
                    self.fallback[str(layer)] = self.gp.rtn_fallback[layer]
                    self.cholesky[str(layer)] = self.gp.cholesky_fallback.get(layer, 0)
        self.boundary = boundary
        state = {"tool": f"surgery {surgery.__version__}", "command": "quantize --method gptq",
                 "identity": self.identity, "completed_layers": boundary, "rtn_fallback": self.fallback,
                 "cholesky_fallback": self.cholesky}
        if self.timings:
            state["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        write_json_atomic(self.path, state)


def calibrate_gptq(model: MoEModel, targets: QuantTargets, work: Path, identity: dict, ids: np.ndarray,
                   mask: np.ndarray, *, group_size: int, batch_size: int, device: torch.device,
                   dtype: torch.dtype, progress: bool = True, min_tokens: int | None = None,
                   memory_budget: int | None = None) -> int:
    """Run GPTQ layer by layer into WORK (resumable); returns the number of weights that fell back to RTN."""
    from surgery.executor.stream import batch_ranges, real_length

    work = Path(work)
    state_path = work / STATE
    previous = read_json(state_path, "GPTQ state") if state_path.is_file() else None
    if previous is not None:
        require_same_inputs({"inputs": previous.get("identity")}, identity, "holds GPTQ results for", work)
    work.mkdir(parents=True, exist_ok=True)
    cache = HiddenCache(work / "cache.zarr")
    batches = batch_ranges(mask, batch_size)
    gp = GPTQPass(model, targets, work, group_size, min_tokens=min_tokens, device=device,
                  positions=sum((e - s) * real_length(mask[s:e]) for s, e in batches))
    journal = _State(work, identity, gp, previous)
    start = None if previous is None else previous.get("completed_layers")
    if start is None:
        journal.commit(None)
        cache.write_tokens(ids, mask, batch_size)
    if start is not None and start >= model.num_layers:
        return sum(journal.fallback.values())
    engine = LayerEngine(model, device, dtype, cache, EngineOptions(progress=progress, memory_budget=memory_budget,
                                                                    crash_prefix="gptq."))
    engine.walk([gp], ids, mask, batches, start, journal)  # its last checkpoint commits every layer
    # where the time went (host-side seconds): the engine's split, then the pass's stages within it
    journal.timings = {**{f"engine: {k}": v for k, v in {**engine.factory.timings, **engine.timings}.items()},
                       **gp.timings}
    journal.commit(journal.boundary)
    return sum(journal.fallback.values())


def gptq_source(model: MoEModel, work: Path, group_size: int):
    """The writer's source for GPTQ: packed tensors from WORK; RTN for layers GPTQ does not calibrate
    (MTP layers). `source.rtn` counts those."""
    from safetensors import safe_open

    from surgery.quant.run import rtn_source

    rtn = rtn_source(model.ckpt, group_size)
    handles: dict[int, object] = {}

    def run(t):
        path = layer_file(work, t.layer)
        if t.layer < model.num_layers:
            if t.layer not in handles:
                handles.clear()  # one layer file open at a time
                handles[t.layer] = safe_open(str(path), framework="pt")
            f = handles[t.layer]
            return {p: f.get_tensor(f"{t.module}.{p}") for p in ("qweight", "qzeros", "scales")}
        run.rtn += 1
        return rtn(t)

    run.rtn = 0
    return run


def run_gptq(model_dir: Path, out: Path, work: Path, data, *, group_size: int = 128, quantize_dense: bool = False,
             batch_size: int = 8, device: str = "auto", dtype: str = "auto", progress: bool = True,
             memory_budget: int | None = None, inputs=None) -> dict:
    """`surgery quantize --method gptq`: calibration data -> GPTQ layer by layer in WORK -> OUT.
    `inputs` (a `CalibrationInputs`: ids, mask and what identifies them) replaces `data` when given, for
    callers whose calibration tokens `DataOptions` cannot express (e.g. fixed windows of a file)."""
    from surgery.executor.calibrate import resolve_device, resolve_dtype
    from surgery.pipeline import DataOptions, calibration_inputs
    from surgery.quant.gptq import DAMP
    from surgery.quant.run import output_complete, write_quantized

    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, quantize_dense)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, model)
        if inputs is None:
            inputs = calibration_inputs(model_dir, data or DataOptions())
        identity = {"datasets": inputs.datasets, "data": inputs.settings, "batch_size": batch_size,
                    "dtype": str(dt).removeprefix("torch."), "damp": DAMP, "min_tokens": 2 * group_size,
                    "group_size": group_size, "quantize_dense": quantize_dense}
        extra = {"gptq": identity}
        if output_complete(ckpt, out, "gptq", group_size, quantize_dense, extra):
            return write_quantized(model_dir, out, None, method="gptq", group_size=group_size,
                                   quantize_dense=quantize_dense, job_extra=extra, progress=progress)
        fallback = calibrate_gptq(model, targets, work, identity, inputs.input_ids, inputs.attention_mask,
                                  group_size=group_size, batch_size=batch_size, device=dev, dtype=dt,
                                  progress=progress, memory_budget=memory_budget)
        source = gptq_source(model, work, group_size)
        summary = write_quantized(model_dir, out, source, method="gptq", group_size=group_size,
                                  quantize_dense=quantize_dense, job_extra=extra, progress=progress,
                                  gptq_config={"nsamples": int(inputs.input_ids.shape[0]),
                                               "calibration_tokens": int(inputs.attention_mask.sum())})
        summary["rtn_fallback"] = fallback + source.rtn
        return summary
