"""The GPTQ calibration loop, kept in ONE function (`calibrate_gptq`) on the existing layer
primitives so that it can be folded into the layer engine as a pass.

Per decoder layer: load it (`LayerFactory.load`), hold its routed experts here (read from disk per
expert, FP8 dequantised) behind a replaced `experts.forward` that hands each expert's real routed
tokens to `GPTQPass.observe_expert`, run the calibration batches through it once with the layer's
original weights (Hessians), quantize (`end_layer`), store the packed tensors in WORK, put the
*dequantised packed* weights into the layer and its experts, and run the batches again: those outputs
are the next layer's inputs, so every layer sees the already-quantized layers before it.

Resuming: WORK/gptq.json records the identity (model, data, options) and the finished layers, whose
packed tensors are in WORK/layer_NNNN.safetensors; a rerun replays the finished layers' second pass
from their stored tensors (the same computation on the same values, hence the same hidden states)
and continues. MTP layers (past num_hidden_layers) are not calibrated: their weights take RTN.
"""

from __future__ import annotations

import os
import types
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import SCALE_SUFFIX, block_size, dequantize
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.jsonio import read_json, write_json_atomic
from surgery.quant.gptq_pass import GPTQPass, memory_path
from surgery.quant.targets import QuantTargets, find_targets

STATE = "gptq.json"


def layer_file(work: Path, layer: int) -> Path:
    return work / f"layer_{layer:04d}.safetensors"


class LayerExperts:
    """One layer's routed experts held as per-expert (gate_up [2I, H], down [H, I]) in the compute
    dtype, computed by a replacement of the block's `experts.forward` in ascending expert order."""

    def __init__(self, model: MoEModel, layer: int, block, dtype: torch.dtype, device: torch.device) -> None:
        self.block, self.experts = block, block.experts
        ckpt = model.ckpt
        self.gate_up, self.down = [], []
        for e in range(model.num_experts):
            parts = [self._read(ckpt, model.expert_tensor_name(layer, e, r)) for r in ("gate", "up", "down")]
            self.gate_up.append(torch.cat(parts[:2]).to(device, dtype))
            self.down.append(parts[2].to(device, dtype))
        self.observer: GPTQPass | None = None
        self._orig = block.experts.forward
        runner = self

        def forward(module, hidden_states, top_k_index=None, top_k_weights=None):
            return runner.forward(hidden_states, top_k_index, top_k_weights)

        block.experts.forward = types.MethodType(forward, block.experts)

    @staticmethod
    def _read(ckpt: Checkpoint, name: str) -> torch.Tensor:
        w = ckpt.read(name)
        scale = name.removesuffix("weight") + SCALE_SUFFIX
        if scale in ckpt:
            s = ckpt.read(scale)
            w = dequantize(w, s, block_size(ckpt.config, tuple(w.shape), tuple(s.shape)))
        return w

    def set(self, expert: int, role: str, w: torch.Tensor) -> None:
        if role == "down":
            self.down[expert] = w.to(self.down[expert])
        else:
            rows = self.gate_up[expert].shape[0] // 2
            part = slice(0, rows) if role == "gate" else slice(rows, 2 * rows)
            self.gate_up[expert][part] = w.to(self.gate_up[expert])

    def detach(self) -> None:
        self.block.experts.forward = self._orig

    @torch.no_grad()
    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.down)).tolist()
        token_of = torch.div(order, top_k_index.shape[1], rounding_mode="floor")
        weight_of = top_k_weights.reshape(-1)[order]
        obs = self.observer
        valid = obs.valid.to(x.device) if obs is not None and obs.valid is not None else None
        start = 0
        for j, n in enumerate(counts):
            if n == 0:
                continue
            tokens, w = token_of[start:start + n], weight_of[start:start + n]
            start += n
            xin = x[tokens]
            gate, up = F.linear(xin, self.gate_up[j]).chunk(2, dim=-1)
            mid = self.experts.act_fn(gate) * up
            y = F.linear(mid, self.down[j])
            if obs is not None:
                keep = valid[tokens] if valid is not None else slice(None)
                obs.observe_expert(j, xin[keep], mid[keep])
            out.index_add_(0, tokens, (y * w[:, None]).to(out.dtype))
        return out


def _read_hidden(hidden: dict, batch, t: int) -> torch.Tensor:
    return hidden[batch][:, :t]


def _discard(batch, y) -> None:
    pass


def calibrate_gptq(model: MoEModel, targets: QuantTargets, work: Path, identity: dict, ids: np.ndarray,
                   mask: np.ndarray, *, group_size: int, batch_size: int, device: torch.device,
                   dtype: torch.dtype, progress: bool = True, min_tokens: int | None = None) -> int:
    """Run GPTQ layer by layer into WORK (resumable); returns the number of weights that fell back to RTN."""
    from safetensors.torch import load_file, save_file

    from surgery.arch.layer import LayerFactory
    from surgery.executor.progress import layer_progress
    from surgery.executor.stream import LayerStream, batch_ranges, real_length

    state_path = work / STATE
    state = read_json(state_path, "GPTQ state") if state_path.is_file() else None
    if state is not None and state.get("identity") != identity:
        raise SurgeryError("holds GPTQ results for other inputs (model, data or options); use another --work",
                           work)
    work.mkdir(parents=True, exist_ok=True)
    state = state or {"identity": identity, "completed": [], "rtn_fallback": {}}
    factory = LayerFactory(model, dtype, device)
    try:
        stream = LayerStream(factory)  # the engine's new signature
    except TypeError:
        stream = LayerStream(factory, None, batch_size)
    gp = GPTQPass(model, targets, group_size, device=device, min_tokens=min_tokens)
    batches = batch_ranges(mask, batch_size)
    hidden = {b: stream.embed_batch(ids[b[0]:b[1], :real_length(mask[b[0]:b[1]])]) for b in batches}
    tokens = int(mask.sum())
    with layer_progress(model.num_layers, 2 * tokens, progress) as bar:
        for layer in range(model.num_layers):
            bar.start_layer(layer)
            module = factory.load(layer).eval()
            block = factory.moe_block(module)
            experts = LayerExperts(model, layer, block, dtype, device) if block is not None else None
            nxt: dict = {}
            read = partial(_read_hidden, hidden)
            try:
                path = layer_file(work, layer)
                if layer in state["completed"] and path.is_file():
                    packed = {}
                    for k, v in load_file(path).items():
                        module_name, part = k.rsplit(".", 1)
                        packed.setdefault(module_name + ".weight", {})[part] = v
                    bar.advance(tokens)
                else:
                    gp.begin_layer(layer, module, block)
                    if experts is not None:
                        experts.observer = gp
                    stream.run_batches(layer, module, batches, mask, read, _discard, bar.advance, observer=gp)
                    before = gp.rtn_fallback
                    packed = gp.end_layer(layer)
                    tmp = path.with_name(path.name + ".tmp")
                    save_file({f"{n.removesuffix('.weight')}.{p}": t for n, parts in packed.items()
                               for p, t in parts.items()}, tmp)
                    os.replace(tmp, path)
                    state["completed"].append(layer)
                    state["rtn_fallback"][str(layer)] = gp.rtn_fallback - before
                    write_json_atomic(state_path, state)
                # the next layer's inputs come from this layer's quantized weights
                for name, w in gp.dequantized(packed).items():
                    t = targets.targets[name]
                    if t.kind == "expert":
                        experts.set(t.expert, t.role, w)
                    else:
                        lin = module.get_submodule(memory_path(model, t))
                        lin.weight.data.copy_(w.to(lin.weight.device, lin.weight.dtype))
                if experts is not None:
                    experts.observer = None
                gp.valid = None
                if layer + 1 < model.num_layers:
                    stream.run_batches(layer, module, batches, mask, read, nxt.__setitem__, bar.advance)
            finally:
                if experts is not None:
                    experts.detach()
                factory.unload(layer)
            hidden = nxt
    factory.close()
    return sum(state["rtn_fallback"].values())


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
             batch_size: int = 8, device: str = "auto", dtype: str = "auto", progress: bool = True) -> dict:
    """`surgery quantize --method gptq`: calibration data -> GPTQ layer by layer in WORK -> OUT."""
    from surgery.executor.calibrate import resolve_device, resolve_dtype
    from surgery.pipeline import DataOptions, calibration_inputs
    from surgery.quant.gptq import DAMP
    from surgery.quant.run import output_complete, write_quantized

    data = data or DataOptions()
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, quantize_dense)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev, model)
        inputs = calibration_inputs(model_dir, data)
        identity = {"datasets": inputs.datasets, "data": inputs.settings, "batch_size": batch_size,
                    "dtype": str(dt).removeprefix("torch."), "damp": DAMP, "min_tokens": 2 * group_size,
                    "group_size": group_size, "quantize_dense": quantize_dense}
        extra = {"gptq": identity}
        if output_complete(ckpt, out, "gptq", group_size, quantize_dense, extra):
            return write_quantized(model_dir, out, None, method="gptq", group_size=group_size,
                                   quantize_dense=quantize_dense, job_extra=extra, progress=progress)
        fallback = calibrate_gptq(model, targets, work, identity, inputs.input_ids, inputs.attention_mask,
                                  group_size=group_size, batch_size=batch_size, device=dev, dtype=dt,
                                  progress=progress)
        source = gptq_source(model, work, group_size)
        summary = write_quantized(model_dir, out, source, method="gptq", group_size=group_size,
                                  quantize_dense=quantize_dense, job_extra=extra, progress=progress,
                                  gptq_config={"nsamples": int(inputs.input_ids.shape[0]),
                                               "calibration_tokens": int(inputs.attention_mask.sum())})
        summary["rtn_fallback"] = fallback + source.rtn
        return summary
