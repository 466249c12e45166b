"""GPTQ as a pass of the layer engine: what it does at each decoder layer, and nothing more.

Sequential at the granularity of a layer's parts, so every weight is quantized from the inputs it sees
once everything before it is quantized (earlier layers, and this layer's attention before its
experts):

1. `prepare` hooks the layer's resident quantized linears (attention q/k/v/o, shared experts, dense
   MLP when asked); the engine runs the batches once with the routed experts skipped and the outputs
   discarded, and the hooks accumulate each linear's input Hessian over the real tokens.
2. `prepared` quantizes those linears (weights read from the checkpoint by their on-disk names, FP8
   dequantised) and puts the *decoded* quantized weights into the layer.
3. The engine then runs the layer for real with its routed experts streamed over the captured MoE
   inputs (now from the quantized attention). `chunk` sees each group of experts as it is built, before
   it runs: per expert, the Hessian of its routed real tokens (gate and up share it) and of
   act(gate)·up under its original weights (down's inputs), GPTQ per projection, and the decoded
   quantized weights written over the built ones, so the layer's outputs (the next layer's inputs)
   come from the quantized experts. Experts with fewer than `min_tokens` routed tokens take RTN.
4. Packed tensors stream into `WORK/layer_NNNN.safetensors` as they are made (header known from the
   targets), renamed into place at `end_layer`, before the engine commits the layer's boundary.

Memory: the Hessians of one expert group at a time (`extra_bytes`, planned into the budget) and one
layer's attention Hessians, never a whole layer's packed experts.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import read_weight
from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.checkpoint.writer import SafetensorsWriter, TensorEntry
from surgery.errors import SurgeryError
from surgery.executor.engine import LayerPass
from surgery.quant.gptq import DAMP, Hessian, gptq_quantize
from surgery.quant.pack import SUFFIXES, pack, packed_shapes
from surgery.quant.rtn import num_groups, rtn_quantize
from surgery.quant.targets import QuantTargets, Target


def memory_path(model: MoEModel, target: Target) -> str:
    """The module path of a (non-routed) target inside its transformers decoder layer."""
    rel = "." + target.module[len(model.layer_prefix(target.layer)):]
    for disk, mem in model.spec.disk_to_memory:
        rel = rel.replace(disk, mem)
    return rel[1:]


def layer_file(work: Path, layer: int) -> Path:
    return work / f"layer_{layer:04d}.safetensors"


class GPTQPass(LayerPass):
    needs_capture = True

    def __init__(self, model: MoEModel, targets: QuantTargets, work: Path, group_size: int = 128,
                 damp: float = DAMP, min_tokens: int | None = None, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.targets = targets
        self.work = Path(work)
        self.group_size = group_size
        self.damp = damp
        # fewer routed tokens than two groups' worth: the Hessian is mostly dampening, RTN is as good
        self.min_tokens = 2 * group_size if min_tokens is None else min_tokens
        self.device = torch.device(device)
        self.valid: torch.Tensor | None = None  # set by the engine per batch of the discarded run
        self.rtn_fallback: dict[int, int] = {}
        self._hooks: list = []
        self._hess: dict[str, Hessian] = {}
        self._experts: nn.Module | None = None
        self._writer: SafetensorsWriter | None = None
        roles = [r for _, rs in model.spec.fused_experts for r in rs]
        self._role_order = {r: i for i, r in enumerate(roles)}

    # ---------------------------------------------------------------- the layer's file
    def _order(self, layer: int) -> list[Target]:
        """Targets in the order they are quantized: resident linears, then experts ascending, each
        expert's projections in the order its fused parameters are built."""
        resident = [t for t in self.targets.by_layer(layer) if t.kind != "expert"]
        experts = sorted((t for t in self.targets.by_layer(layer) if t.kind == "expert"),
                         key=lambda t: (t.expert, self._role_order.get(t.role, 0)))
        return resident + experts

    def _open(self, layer: int) -> None:
        entries = []
        for t in self._order(layer):
            shapes = packed_shapes(t.out_features, t.in_features, num_groups(t.in_features, self.group_size))
            entries += [TensorEntry(f"{t.module}.{part}", shapes[part][1], shapes[part][0]) for part in SUFFIXES]
        if self._writer is not None:
            self._writer.abort()
        self._writer = SafetensorsWriter(layer_file(self.work, layer), entries, fsync=True)
        self._writer.open()

    def _emit(self, t: Target, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Pack and stream one quantized weight; returns what a W4A16 reader decodes it to."""
        from surgery.quant.run import tensor_bytes

        packed = {k: v.cpu() for k, v in pack(q.cpu(), s.cpu()).items()}
        for part in SUFFIXES:
            self._writer.write(f"{t.module}.{part}", tensor_bytes(packed[part]))
        return dequantize_w4a16(packed["qweight"], packed["qzeros"], packed["scales"], self.group_size)

    def _quantize(self, t: Target, w: torch.Tensor, h: Hessian | None, minimum: int) -> torch.Tensor:
        w = w.to(self.device, torch.float32)
        if h is None or h.count < minimum:
            q, s = rtn_quantize(w, self.group_size)
            self.rtn_fallback[t.layer] = self.rtn_fallback.get(t.layer, 0) + 1
        else:
            q, s = gptq_quantize(w, h.value(), self.group_size, self.damp)
        return self._emit(t, q, s)

    # ---------------------------------------------------------------- engine hooks
    def prepare(self, layer: int, module: nn.Module) -> object | None:
        self._hess.clear()
        self.rtn_fallback[layer] = 0
        self._open(layer)
        for t in self.targets.by_layer(layer):
            if t.kind == "expert":
                continue
            path = memory_path(self.model, t)
            try:
                lin = module.get_submodule(path)
            except AttributeError:
                lin = None
            if not isinstance(lin, nn.Linear):
                raise SurgeryError(f"layer {layer}: {t.name!r} is not an nn.Linear at {path!r} in the "
                                   f"{self.model.spec.family} decoder layer", self.model.ckpt.directory)
            h = self._hess[t.name] = Hessian(t.in_features, self.device)
            self._hooks.append(lin.register_forward_pre_hook(partial(self._record, h)))
        return self

    def _record(self, h: Hessian, _module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        if self.valid is not None and self.valid.numel() == x.shape[0]:
            x = x[self.valid.to(x.device)]
        h.add(x)

    def prepared(self, layer: int, module: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for t in self._order(layer):
            if t.kind == "expert":
                continue
            lin = module.get_submodule(memory_path(self.model, t))
            decoded = self._quantize(t, read_weight(self.model.ckpt, t.name, t.scale), self._hess.get(t.name), 1)
            lin.weight.data.copy_(decoded.to(lin.weight.device, lin.weight.dtype))
        self._hess.clear()

    def listeners(self, layer: int, block: nn.Module, runner) -> list:
        self._experts = block.experts
        return []

    def extra_bytes(self, layer: int) -> int:
        """One expert's two Hessians (its input's and its intermediate's), float32."""
        ins = {t.role: t.in_features for t in self.targets.by_layer(layer) if t.kind == "expert" and t.expert == 0}
        return 4 * sum(n * n for n in {ins.get("gate", 0), ins.get("down", 0)})

    def chunk(self, layer: int, store, ids: list[int], weights: dict[str, torch.Tensor], captured: list) -> None:
        for i, j in enumerate(ids):
            rows_of = [b.routed(j)[0] for b in captured]
            xs = [b.x[r][b.valid[r]] for b, r in zip(captured, rows_of, strict=True)]
            x = torch.cat(xs) if xs else None
            h_in = h_mid = None
            if x is not None and x.shape[0]:
                h_in = Hessian(x.shape[-1], self.device)
                h_in.add(x)
                gate_up = weights.get("gate_up_proj")
                if gate_up is not None:
                    gate, up = F.linear(x, gate_up[i]).chunk(2, dim=-1)
                    mid = self._experts.act_fn(gate) * up
                    h_mid = Hessian(mid.shape[-1], self.device)
                    h_mid.add(mid)
            for param in store.params:
                for piece in param.pieces[j]:
                    t = self.targets.targets.get(piece.name)
                    if t is None:
                        continue
                    rows = weights[param.name][i, piece.row:piece.row + t.out_features]
                    h = h_mid if t.role == "down" else h_in
                    rows.copy_(self._quantize(t, rows, h, self.min_tokens).to(rows.dtype))

    def end_layer(self, layer: int) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
