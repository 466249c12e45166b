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

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.executor.cache import HiddenCache
from surgery.executor.engine import EngineOptions, Journal, LayerEngine, LayerPass
from surgery.executor.manifest import require_same_inputs
from surgery.executor.options import CalibrationInputs
from surgery.jsonio import read_json, write_json_atomic
from surgery.quant.gptq_pass import GPTQPass, layer_file
from surgery.quant.targets import QuantTargets, find_targets

STATE = "gptq.json"
SUMMARY = "summary.json"  # the engine's record of the last walk (per-layer times); not a result

__all__ = ["STATE", "Calibration", "calibrate_gptq", "gptq_source", "layer_file", "open_calibration", "run_gptq",
           "walk_quantizer"]


class _State(Journal):
    """WORK/<state>.json: inputs, durable boundary, RTN fallbacks per finished layer (and, of those, the
    weights whose Hessian did not factorise). Only what a resumed run reproduces byte for byte: the walk's
    timings go to WORK/summary.json."""

    def __init__(self, work: Path, identity: dict, gp: LayerPass, previous: dict | None, name: str = STATE,
                 command: str = "quantize --method gptq") -> None:
        self.path, self.identity, self.gp, self.command = work / name, identity, gp, command
        self.fallback = dict((previous or {}).get("rtn_fallback", {}))
        # only a pass that factorises Hessians (GPTQ) has failed factorisations to record
        self.factorises = hasattr(gp, "cholesky_fallback")
        self.cholesky = dict((previous or {}).get("cholesky_fallback", {}))

    def commit(self, boundary: int | None) -> None:
        if boundary is not None:
            for layer in range(boundary):
                if layer in self.gp.rtn_fallback:
                    self.fallback[str(layer)] = self.gp.rtn_fallback[layer]
                    if self.factorises:
                        self.cholesky[str(layer)] = self.gp.cholesky_fallback.get(layer, 0)
        write_json_atomic(self.path, {"tool": f"surgery {surgery.__version__}", "command": self.command,
                                      "identity": self.identity, "completed_layers": boundary,
                                      "rtn_fallback": self.fallback,
                                      **({"cholesky_fallback": self.cholesky} if self.factorises else {})})
        committed = getattr(self.gp, "committed", None)
        if committed is not None:
            committed(boundary)


def calibrate_gptq(model: MoEModel, targets: QuantTargets, work: Path, identity: dict, ids: np.ndarray,
                   mask: np.ndarray, *, group_size: int, batch_size: int, device: torch.device,
                   dtype: torch.dtype, progress: bool = True, min_tokens: int | None = None,
                   memory_budget: int | None = None) -> int:
    """Run GPTQ layer by layer into WORK (resumable); returns the number of weights that fell back to RTN."""
    from surgery.executor.stream import batch_ranges, real_length

    positions = sum((e - s) * real_length(mask[s:e]) for s, e in batch_ranges(mask, batch_size))
    gp = GPTQPass(model, targets, work, group_size, min_tokens=min_tokens, device=device, positions=positions)
    return walk_quantizer(model, gp, work, identity, ids, mask, batch_size=batch_size, device=device, dtype=dtype,
                          progress=progress, memory_budget=memory_budget)


def walk_quantizer(model: MoEModel, qpass: LayerPass, work: Path, identity: dict, ids: np.ndarray, mask: np.ndarray,
                   *, batch_size: int, device: torch.device, dtype: torch.dtype, progress: bool = True,
                   memory_budget: int | None = None, state: str = STATE, command: str = "quantize --method gptq",
                   crash_prefix: str = "gptq.") -> int:
    """Walk the engine with a quantizing pass (packed tensors per layer in WORK, resumable from the
    journal `state`); returns the number of weights that fell back to RTN."""
    from surgery.executor.stream import batch_ranges

    work = Path(work)
    state_path = work / state
    previous = read_json(state_path, "quantization state") if state_path.is_file() else None
    if previous is not None:
        require_same_inputs({"inputs": previous.get("identity")}, identity, "holds quantization results for", work)
    work.mkdir(parents=True, exist_ok=True)
    cache = HiddenCache(work / "cache.zarr")
    batches = batch_ranges(mask, batch_size)
    journal = _State(work, identity, qpass, previous, state, command)
    start = None if previous is None else previous.get("completed_layers")
    if start is None:
        journal.commit(None)
        cache.write_tokens(ids, mask, batch_size)
    if start is not None and start >= model.num_layers:
        return sum(journal.fallback.values())
    engine = LayerEngine(model, device, dtype, cache, EngineOptions(progress=progress, memory_budget=memory_budget,
                                                                    crash_prefix=crash_prefix))
    t0 = time.perf_counter()
    engine.walk([qpass], ids, mask, batches, start, journal)  # its last checkpoint commits every layer
    # Where the time went, beside the journal rather than in it: the journal holds only what a resumed run
    # must reproduce byte for byte, and timings never repeat. The pass's own stages (host-side seconds)
    # follow the engine's split.
    summary = engine.summary(time.perf_counter() - t0, start or 0, cache.disk_bytes())
    if getattr(qpass, "timings", None):
        summary["pass_stages"] = {k: round(v, 3) for k, v in qpass.timings.items()}
    write_json_atomic(work / SUMMARY, summary)
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


class Calibration(NamedTuple):
    """What a calibrated quantizer (GPTQ, AutoRound) starts from."""

    model: MoEModel
    targets: QuantTargets
    device: torch.device
    dtype: torch.dtype
    inputs: CalibrationInputs


def open_calibration(ckpt: Checkpoint, data, inputs: CalibrationInputs | None, *, group_size: int,
                     quantize_dense: bool, partial_groups: str, device: str, dtype: str) -> Calibration:
    """The model, its quantization targets, the compute device and dtype, and the calibration tokens
    (`inputs` when given, else sampled from `data`, else from the default data)."""
    from surgery.data.inputs import DataOptions, calibration_inputs
    from surgery.executor.device import resolve_device, resolve_dtype

    model = MoEModel(ckpt)
    targets = find_targets(model, quantize_dense, group_size, partial_groups)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, model)
    if inputs is None:
        inputs = calibration_inputs(ckpt.directory, data or DataOptions())
    return Calibration(model, targets, dev, dt, inputs)


def run_gptq(model_dir: Path, out: Path, work: Path, data, *, group_size: int = 128, quantize_dense: bool = False,
             batch_size: int = 8, device: str = "auto", dtype: str = "auto", progress: bool = True,
             memory_budget: int | None = None, inputs=None, partial_groups: str = "keep") -> dict:
    """`surgery quantize --method gptq`: calibration data -> GPTQ layer by layer in WORK -> OUT.
    `inputs` (a `CalibrationInputs`: ids, mask and what identifies them) replaces `data` when given, for
    callers whose calibration tokens `DataOptions` cannot express (e.g. fixed windows of a file).
    `partial_groups`: `surgery.quant.targets.find_targets`'s."""
    from surgery.quant.gptq import DAMP
    from surgery.quant.run import finished_output, write_quantized

    with Checkpoint(model_dir) as ckpt:
        model, targets, dev, dt, inputs = open_calibration(ckpt, data, inputs, group_size=group_size,
                                                           quantize_dense=quantize_dense,
                                                           partial_groups=partial_groups, device=device, dtype=dtype)
        identity = {"datasets": inputs.datasets, "data": inputs.settings, "batch_size": batch_size,
                    "dtype": str(dt).removeprefix("torch."), "damp": DAMP, "min_tokens": 2 * group_size,
                    "group_size": group_size, "quantize_dense": quantize_dense}
        extra = {"gptq": identity}
        done = finished_output(ckpt, out, method="gptq", group_size=group_size, quantize_dense=quantize_dense,
                               extra=extra, partial_groups=partial_groups, progress=progress)
        if done is not None:
            return done
        fallback = calibrate_gptq(model, targets, work, identity, inputs.input_ids, inputs.attention_mask,
                                  group_size=group_size, batch_size=batch_size, device=dev, dtype=dt,
                                  progress=progress, memory_budget=memory_budget)
        source = gptq_source(model, work, group_size)
        summary = write_quantized(model_dir, out, source, method="gptq", group_size=group_size,
                                  quantize_dense=quantize_dense, job_extra=extra, progress=progress,
                                  gptq_config={"nsamples": int(inputs.input_ids.shape[0]),
                                               "calibration_tokens": int(inputs.attention_mask.sum())},
                                  partial_groups=partial_groups)
        summary["rtn_fallback"] = fallback + source.rtn
        return summary
