"""AutoRound's tuned W4A16 (SignRound) as a pass of the layer engine: one decoder layer at a time.

The engine builds the whole layer (resident part, every routed expert as float `[E, ...]` weights) and
hands `tune` all of the layer's input hidden states, which are the outputs of the already-quantized
layers before it. The pass then

1. computes the float layer's reference outputs. By default, as AutoRound does (`enable_quanted_input`),
   on the *float* chain's inputs: the pass carries a second set of hidden states, the unquantized model's,
   from layer to layer (WORK/fp_hidden_NNNN.safetensors, saved before each boundary is committed, so a
   resumed run has them); with `reference="quantized"` on the quantized chain's inputs instead (the float
   layer on the same inputs);
2. tunes every quantized linear of the layer in ONE SignRound optimization (`surgery.quant.signround`):
   attention (and shared experts / dense MLP) as plain linears whose weight is the fake-quantised one, the
   routed experts through the block's own router (the model's routing, recomputed from the quantized
   attention's output at every step) and a differentiable grouped expert forward
   (`surgery.executor.grouped.grouped_linear` over tokens sorted by expert), so each expert learns from
   exactly the tokens routed to it; an expert no token reaches keeps RTN (v = 0, factors 1);
3. packs the best parameters' levels into WORK/layer_NNNN.safetensors (the header known from the
   targets, streamed in order, renamed at `end_layer`) and puts the decoded quantized weights into the
   module and the built experts, so the engine's run of the layer writes the quantized layer's outputs
   (the next layer's inputs).
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery.arch.model import MoEModel
from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.checkpoint.writer import SafetensorsWriter, TensorEntry
from surgery.errors import SurgeryError
from surgery.executor.engine import LayerPass
from surgery.executor.grouped import grouped_linear
from surgery.executor.stream import real_length
from surgery.quant.gptq_pass import layer_file, resident_linear
from surgery.quant.pack import SUFFIXES, pack, packed_shapes
from surgery.quant.rtn import num_groups
from surgery.quant.signround import RoundedWeight, SignRoundOptions, sign_round
from surgery.quant.targets import QuantTargets, Target

REFERENCES = ("float", "quantized")
Batch = tuple[int, int]


def fp_file(work: Path, boundary: int) -> Path:
    """The float chain's hidden states at a layer boundary (AutoRound's reference inputs)."""
    return work / f"fp_hidden_{boundary:04d}.safetensors"


class _Rows:
    """A layer boundary's hidden states, held per engine batch `[b, t_b, H]`, taken by calibration row."""

    def __init__(self, per_batch: dict[Batch, torch.Tensor], mask: np.ndarray) -> None:
        self.per_batch, self.mask = per_batch, mask
        self.where: dict[int, tuple[torch.Tensor, int]] = {}
        for (s, e), x in per_batch.items():
            for r in range(s, e):
                self.where[r] = (x, r - s)

    def take(self, rows: list[int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
        m = self.mask[rows]
        t = real_length(m)
        out = []
        for r in rows:
            x, i = self.where[r]
            row = x[i, :t]
            if row.shape[0] < t:
                row = torch.nn.functional.pad(row, (0, 0, 0, t - row.shape[0]))
            out.append(row)
        return torch.stack(out).to(device, dtype), m[:, :t]


class AutoRoundPass(LayerPass):
    tunes_layer = True

    def __init__(self, model: MoEModel, targets: QuantTargets, work: Path, mask: np.ndarray, group_size: int = 128,
                 opts: SignRoundOptions | None = None, reference: str = "float", progress: bool = True) -> None:
        if reference not in REFERENCES:
            raise SurgeryError(f"unknown tuning reference {reference!r} (use {' or '.join(REFERENCES)})")
        self.model, self.targets, self.work, self.mask = model, targets, Path(work), mask
        self.group_size, self.opts, self.reference = group_size, opts or SignRoundOptions(), reference
        self.progress = progress
        self.rtn_fallback: dict[int, int] = {}  # expert weights no calibration token reached (kept RTN)
        self.stats: dict[int, dict] = {}
        self._writer: SafetensorsWriter | None = None
        self._fp: tuple[int, dict[Batch, torch.Tensor]] | None = None  # (boundary, float chain hidden states)
        self._fp_next: dict[Batch, torch.Tensor] | None = None
        roles = [r for _, rs in model.spec.fused_experts for r in rs]
        self._role_order = {r: i for i, r in enumerate(roles)}

    # ---------------------------------------------------------------- targets of a layer
    def _order(self, layer: int) -> list[Target]:
        resident = [t for t in self.targets.by_layer(layer) if t.kind != "expert"]
        experts = sorted((t for t in self.targets.by_layer(layer) if t.kind == "expert"),
                         key=lambda t: (t.expert, self._role_order.get(t.role, 0)))
        return resident + experts

    def _expert_rows(self, t: Target) -> tuple[str, int]:
        """(fused parameter, first row inside the expert's slice of it) of an expert target."""
        for param, roles in self.model.spec.fused_experts:
            if t.role in roles:
                row = 0
                for r in roles[:roles.index(t.role)]:
                    row += self._role_out(t.layer, r)
                return param, row
        raise SurgeryError(f"expert weight {t.name!r} has no fused parameter in the {self.model.spec.family} layer")

    def _role_out(self, layer: int, role: str) -> int:
        for t in self.targets.by_layer(layer):
            if t.kind == "expert" and t.expert == 0 and t.role == role:
                return t.out_features
        raise SurgeryError(f"layer {layer}: expert 0 has no quantized {role} weight; --method autoround needs "
                           "every projection of the experts quantized", self.model.ckpt.directory)

    # ---------------------------------------------------------------- memory
    def tune_bytes(self, layer: int, tokens: int) -> int:
        """SignRound's state for every quantized weight of the layer, the reference outputs and the float
        chain (float32 at most), and one step's activations (a generous bound: 24 hidden-sized float32
        values per routed slot of a batch's tokens)."""
        hidden = self.model.ckpt.info(self.model.spec.embed).shape[1]
        state = 0
        for t in self.targets.by_layer(layer):
            n = t.out_features * num_groups(t.in_features, self.group_size) * self.group_size
            # v, its gradient, the rounded and kept levels; a resident weight also keeps its fake-quantised
            # values and their gradient (float32) across the step; a padded weight has a bf16 copy
            state += n * (10 if t.kind == "expert" else 18) + (2 * n if t.in_features % self.group_size else 0)
        k = int(getattr(self.model.hf_config, "num_experts_per_tok", 1) or 1)
        step = self.opts.batch_size * self.mask.shape[1] * hidden * 4 * 24 * (k + 1)
        return state + 2 * tokens * hidden * 4 + step

    # ---------------------------------------------------------------- the layer
    def tune(self, layer: int, module: nn.Module, runner, inputs: dict[Batch, torch.Tensor], forward) -> None:
        t0 = time.perf_counter()
        for p in module.parameters():
            p.requires_grad_(False)
        order = self._order(layer)
        resident = {t.name: resident_linear(self.model, module, t) for t in order if t.kind != "expert"}
        floats = {name: lin._parameters.pop("weight") for name, lin in resident.items()}
        experts = runner.experts if runner is not None else None
        built = runner.weights if runner is not None else {}
        tuned_params = {self._expert_rows(t)[0] for t in order if t.kind == "expert"}
        # how the experts' projections run: the float weights for the reference, then the tuned ones
        project = {"run": lambda name, x, counts: grouped_linear(x, built[name], counts)}
        routed: list[torch.Tensor] = []  # tokens per expert, counted during the reference run
        original = experts.forward if experts is not None else None
        if experts is not None:
            experts.forward = types.MethodType(
                lambda mod, x, idx, w: _experts_forward(mod, project["run"], built["gate_up_proj"].shape[0], x,
                                                        idx, w, routed), experts)
        try:
            for name, lin in resident.items():
                lin.weight = floats[name].detach()
            ref = self._reference(layer, inputs, forward)
            reached = sum(routed) if routed else None
            routed.append(None)  # stop counting: the tuning steps route other (sampled, quantized) tokens
            device = _device(module, floats)
            rounded = {name: RoundedWeight(w, self.group_size) for name, w in floats.items()}
            rounded.update({p: RoundedWeight(built[p], self.group_size) for p in sorted(tuned_params)})
            q_rows, ref_rows = _Rows(inputs, self.mask), _Rows(ref, self.mask)
            dtype = next(iter(inputs.values())).dtype

            project["run"] = lambda name, x, counts: rounded[name].linear(x, counts, built[name].dtype) \
                if name in tuned_params else grouped_linear(x, built[name], counts)

            def loss_of(rows: list[int]) -> torch.Tensor:
                for name, lin in resident.items():
                    lin.weight = rounded[name].qdq(dtype)
                x, m = q_rows.take(rows, device, dtype)
                target, _ = ref_rows.take(rows, device, dtype)
                valid = torch.from_numpy(m.astype(bool)).to(device)
                y = forward(x, m)
                return (y.float() - target.float())[valid].pow(2).mean()

            nsamples = self.mask.shape[0]
            result = sign_round(list(rounded.values()), loss_of, nsamples, self.opts,
                                seed=self.opts.seed * 1_000_003 + layer)
            self._emit_layer(layer, order, rounded, floats, built, reached)
        finally:
            for name, lin in resident.items():
                lin.__dict__.pop("weight", None)
                lin._parameters["weight"] = floats[name]
            if experts is not None:
                experts.forward = original
        self.stats[layer] = {"seconds": round(time.perf_counter() - t0, 3), "init_loss": result.init_loss,
                             "best_loss": result.best_loss, "best_iter": result.best_iter}
        if self.progress:
            print(f"layer {layer}: tuned {len(order)} weights in {time.perf_counter() - t0:.1f} s, loss "
                  f"{result.init_loss:.3e} -> {result.best_loss:.3e} (step {result.best_iter})", file=sys.stderr)

    @torch.no_grad()
    def _reference(self, layer: int, inputs: dict[Batch, torch.Tensor], forward) -> dict[Batch, torch.Tensor]:
        """The float layer's outputs on the reference inputs (the float chain's, or `inputs`)."""
        source = inputs
        if self.reference == "float":
            if self._fp is None or self._fp[0] != layer:
                self._fp = (layer, inputs if layer == 0 else _load_fp(self.work, layer, inputs))
            source = self._fp[1]
        out = {}
        for (s, e), x in sorted(source.items()):
            m = self.mask[s:e, :x.shape[1]]
            out[(s, e)] = forward(x, m).to(x.device)
        if self.reference == "float":
            self._fp_next = out
        return out

    def _emit_layer(self, layer: int, order: list[Target], rounded: dict[str, RoundedWeight],
                    floats: dict[str, torch.Tensor], built: dict[str, torch.Tensor],
                    reached: torch.Tensor | None) -> None:
        """Pack the tuned levels, stream them into the layer file, decode them into the layer."""
        entries = []
        for t in order:
            shapes = packed_shapes(t.out_features, t.in_features, num_groups(t.in_features, self.group_size))
            entries += [TensorEntry(f"{t.module}.{part}", shapes[part][1], shapes[part][0]) for part in SUFFIXES]
        if self._writer is not None:
            self._writer.abort()
        self._writer = SafetensorsWriter(layer_file(self.work, layer), entries, fsync=True)
        self._writer.open()
        levels = {name: r.quantized() for name, r in rounded.items()}
        untouched = 0
        for t in order:
            if t.kind != "expert":
                q, s = levels[t.name]
                floats[t.name].data.copy_(self._write(t, q, s).to(floats[t.name].dtype))
                continue
            param, row = self._expert_rows(t)
            per_expert = built[param].shape[1]
            first = t.expert * per_expert + row
            q, s = (x[first:first + t.out_features] for x in levels[param])
            untouched += int(reached is not None and int(reached[t.expert]) == 0)
            rows = built[param][t.expert, row:row + t.out_features]
            rows.copy_(self._write(t, q, s).to(rows.dtype))
        self.rtn_fallback[layer] = untouched

    def _write(self, t: Target, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        from surgery.quant.run import tensor_bytes

        packed = {k: v.cpu() for k, v in pack(q.cpu(), s.cpu()).items()}
        for part in SUFFIXES:
            self._writer.write(f"{t.module}.{part}", tensor_bytes(packed[part]))
        decoded = dequantize_w4a16(packed["qweight"], packed["qzeros"], packed["scales"], self.group_size)
        return decoded.to(q.device)

    def end_layer(self, layer: int) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._fp_next is not None:
            _save_fp(self.work, layer + 1, self._fp_next)
            self._fp = (layer + 1, self._fp_next)
            self._fp_next = None

    def committed(self, boundary: int | None) -> None:
        """The engine made `boundary` durable: older float-chain states are no longer needed."""
        if boundary is None:
            return
        for path in self.work.glob("fp_hidden_*.safetensors"):
            if int(path.stem.rsplit("_", 1)[1]) < boundary:
                path.unlink(missing_ok=True)


def _device(module: nn.Module, floats: dict[str, torch.Tensor]) -> torch.device:
    """The compute device: where the layer's resident tensors are (its routed experts' stay on meta)."""
    for t in (*floats.values(), *module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    raise SurgeryError("a decoder layer with no resident tensor")


def _experts_forward(experts: nn.Module, project, num_experts: int, x: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor, routed: list | None = None) -> torch.Tensor:
    """Σ_k w_k E_k(x) over the routed experts, differentiable: tokens sorted by expert, one grouped
    linear per projection (`project(name, rows, counts)`: `grouped_linear` on the float or the tuned
    weights), the experts module's own activation. `routed` (until it ends with None) collects the
    tokens per expert."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    per_expert = torch.bincount(flat, minlength=num_experts)
    if routed is not None and (not routed or routed[-1] is not None):
        routed.append(per_expert.cpu())
    counts = per_expert.tolist()
    token_of = torch.div(order, top_k_index.shape[1], rounding_mode="floor")
    h = project("gate_up_proj", x[token_of], counts)
    if hasattr(experts, "_apply_gate"):
        h = experts._apply_gate(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    y = project("down_proj", h, counts) * top_k_weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token_of, y.to(x.dtype))


def _key(b: Batch) -> str:
    return f"{b[0]}_{b[1]}"


def _save_fp(work: Path, boundary: int, hidden: dict[Batch, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    path = fp_file(work, boundary)
    tmp = path.with_suffix(".partial")
    save_file({_key(b): x.detach().cpu().contiguous() for b, x in hidden.items()}, str(tmp))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _load_fp(work: Path, boundary: int, like: dict[Batch, torch.Tensor]) -> dict[Batch, torch.Tensor]:
    from safetensors.torch import load_file

    path = fp_file(work, boundary)
    if not path.is_file():
        raise SurgeryError(f"resuming at layer {boundary} needs the float chain's hidden states "
                           f"{path.name}, which are missing; start with an empty work directory", work)
    data = load_file(str(path))
    return {b: data[_key(b)].to(x.device) for b, x in like.items()}
