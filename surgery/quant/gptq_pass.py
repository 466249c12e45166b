"""GPTQ as a pass of the layer engine: what it does at each decoder layer, and nothing more.

Sequential at the granularity of a layer's parts, so every weight is quantized from the inputs it sees
once everything before it is quantized (earlier layers, and this layer's attention before its
experts):

1. `prepare` hooks the layer's resident quantized linears (attention q/k/v/o, shared experts, dense
   MLP when asked); the engine runs the batches once with the routed experts skipped and the outputs
   discarded, and the hooks accumulate one input Hessian per distinct input: linears that are called
   on the same tensor (q/k/v, a shared expert's gate/up) share one, and are quantized together as the
   rows of one weight.
2. `prepared` quantizes them (weights read from the checkpoint by their on-disk names, FP8
   dequantised; `surgery.quant.gptq_batch`) and puts the *decoded* quantized weights into the layer.
3. The engine then runs the layer for real with its routed experts streamed over the captured MoE
   inputs (now from the quantized attention), building every expert of a chunk at once
   (`batch_experts`); `chunk` quantizes the chunk's experts together before they run
   (`surgery.quant.gptq_experts`: Hessians of their routed real tokens and of act(gate)·up under their
   original weights, batched GPTQ, RTN for experts with fewer than `min_tokens` tokens) and writes the
   decoded weights over the built ones, so the layer's outputs (the next layer's inputs) come from the
   quantized experts.
4. Packed tensors go to the host and into `WORK/layer_NNNN.safetensors` on a writer thread
   (`surgery.quant.gptq_writer`) while the next chunk is computed; `end_layer` waits for it, and the
   file is renamed into place before the engine commits the layer's boundary.

Memory: per expert built at once, its Hessians, working copies and routed-token share
(`expert_bytes`, planned into the budget, so it bounds how many experts are batched), one layer's
attention Hessians, and a bounded queue of packed bytes, never a whole layer's packed experts.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import read_weight
from surgery.checkpoint.writer import TensorEntry
from surgery.errors import SurgeryError
from surgery.executor.engine import LayerPass
from surgery.quant.gptq import DAMP, Hessian
from surgery.quant.gptq_batch import quantize_batch, rtn_batch
from surgery.quant.gptq_experts import Slot, quantize_chunk, timed
from surgery.quant.gptq_writer import DEPTH, LayerWriter, host_ready, to_host
from surgery.quant.pack import SUFFIXES, decode_batch, pack_batch, packed_shapes, qzeros
from surgery.quant.rtn import num_groups
from surgery.quant.targets import QuantTargets, Target


def memory_path(model: MoEModel, target: Target) -> str:
    """The module path of a (non-routed) target inside its transformers decoder layer."""
    rel = "." + target.module[len(model.layer_prefix(target.layer)):]
    for disk, mem in model.spec.disk_to_memory:
        rel = rel.replace(disk, mem)
    return rel[1:]


def resident_linear(model: MoEModel, module: nn.Module, target: Target) -> nn.Linear:
    """The `nn.Linear` a (non-routed) target is in the built decoder layer `module`; anything else there is
    an architecture row that does not match transformers' layer, said in one line."""
    path = memory_path(model, target)
    try:
        lin = module.get_submodule(path)
    except AttributeError:
        lin = None
    if not isinstance(lin, nn.Linear):
        raise SurgeryError(f"layer {target.layer}: {target.name!r} is not an nn.Linear at {path!r} in the "
                           f"{model.spec.family} decoder layer", model.ckpt.directory)
    return lin


def layer_file(work: Path, layer: int) -> Path:
    return work / f"layer_{layer:04d}.safetensors"


class GPTQPass(LayerPass):
    needs_capture = True
    batch_experts = True

    def __init__(self, model: MoEModel, targets: QuantTargets, work: Path, group_size: int = 128,
                 damp: float = DAMP, min_tokens: int | None = None, device: torch.device | str = "cpu",
                 positions: int = 0) -> None:
        self.model = model
        self.targets = targets
        self.work = Path(work)
        self.group_size = group_size
        self.damp = damp
        # fewer routed tokens than two groups' worth: the Hessian is mostly dampening, RTN is as good
        self.min_tokens = 2 * group_size if min_tokens is None else min_tokens
        self.device = torch.device(device)
        self.positions = positions  # captured positions of the walk (the routed-token share per expert)
        self.valid: torch.Tensor | None = None  # set by the engine per batch of the discarded run
        self.rtn_fallback: dict[int, int] = {}  # layer -> weights that took RTN (few tokens, no Cholesky)
        self.cholesky_fallback: dict[int, int] = {}  # layer -> weights whose Hessian did not factorise
        self._failed: torch.Tensor | int = 0  # this layer's failed factorisations, on the device
        self._hooks: list = []
        self._hess: dict[str, Hessian] = {}  # group leader -> Hessian of the group's shared input
        self._group: dict[str, str] = {}  # target name -> its group's leader
        self._last: tuple | None = None  # (input tensor, its version, group leader) of the last hook call
        self._experts: nn.Module | None = None
        self._writer: LayerWriter | None = None
        self._zeros: dict[tuple[int, int], torch.Tensor] = {}
        self.timings: dict[str, float] = {}  # host-side seconds per stage, summed over the walk
        roles = [r for _, rs in model.spec.fused_experts for r in rs]
        self._role_order = {r: i for i, r in enumerate(roles)}

    # ---------------------------------------------------------------- the layer's file
    def _order(self, layer: int) -> list[Target]:
        """Targets in the order they are written: resident linears, then experts ascending, each
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
        self._abort()
        self._writer = LayerWriter(layer_file(self.work, layer), entries)

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def _emit(self, items: list[tuple[str, torch.Tensor, torch.Tensor]]) -> None:
        """Queue packed tensors (module, qweight, scales; host copies started) in the file's order."""
        out = []
        for module, qweight, scales in items:
            key = (scales.shape[0], qweight.shape[1])
            if key not in self._zeros:
                self._zeros[key] = qzeros(*key)
            out += [(f"{module}.qweight", qweight), (f"{module}.qzeros", self._zeros[key]),
                    (f"{module}.scales", scales)]
        with timed(self.timings, "writer: waiting for it"):
            self._writer.put(out, host_ready(self.device))

    def _count(self, layer: int, weights: int) -> None:
        self.rtn_fallback[layer] = self.rtn_fallback.get(layer, 0) + weights

    # ---------------------------------------------------------------- resident linears
    def prepare(self, layer: int, module: nn.Module) -> object | None:
        self._hess.clear()
        self._group.clear()
        self._last = None
        self._failed = 0
        self.rtn_fallback[layer] = 0
        self.cholesky_fallback[layer] = 0
        self._open(layer)
        for t in self.targets.by_layer(layer):
            if t.kind == "expert":
                continue
            lin = resident_linear(self.model, module, t)
            self._hooks.append(lin.register_forward_pre_hook(partial(self._record, t)))
        return self

    def _record(self, t: Target, _module: nn.Module, args: tuple) -> None:
        """Accumulate the input Hessian; a linear called on the very tensor the previous one was (same
        object, unchanged) joins that one's group at the first batch, and adds nothing itself after."""
        x = args[0]
        leader = self._group.get(t.name)
        if leader is None:
            last = self._last
            if last is not None and last[0] is x and last[1] == x._version:
                self._group[t.name] = last[2]
                return
            leader = self._group[t.name] = t.name
            self._hess[t.name] = Hessian(t.in_features, self.device)
        self._last = (x, x._version, leader)
        if leader != t.name:
            return
        with timed(self.timings, "resident: Hessians"):
            x = x.reshape(-1, x.shape[-1])
            if self.valid is not None and self.valid.numel() == x.shape[0]:
                x = x[self.valid.to(x.device)]
            self._hess[leader].add(x)

    def prepared(self, layer: int, module: nn.Module) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._last = None
        resident = [t for t in self._order(layer) if t.kind != "expert"]
        packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with timed(self.timings, "resident: GPTQ, decode and pack"):
            for leader in dict.fromkeys(self._group.get(t.name, t.name) for t in resident):
                members = [t for t in resident if self._group.get(t.name, t.name) == leader]
                packed.update(self._quantize_group(layer, module, members, self._hess.get(leader)))
        self._hess.clear()
        if resident:
            self._emit([(t.module, *packed[t.name]) for t in resident])

    def _quantize_group(self, layer: int, module: nn.Module, members: list[Target],
                        h: Hessian | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """GPTQ of linears sharing one input, as the rows of one weight; decoded into the layer."""
        w = torch.cat([read_weight(self.model.ckpt, t.name, t.scale).to(self.device, torch.float32)
                       for t in members])[None]
        if h is None or h.count < 1:
            levels, scales = rtn_batch(w, self.group_size)
            self._count(layer, len(members))
        else:
            q = quantize_batch(w, h.value()[None], self.group_size, self.damp)
            levels, scales = q.levels, q.scales
            self._failed = self._failed + q.failed.sum() * len(members)
        out, at = {}, 0
        for t in members:
            lv, sc = levels[:, :, at:at + t.out_features], scales[:, at:at + t.out_features]
            lin = module.get_submodule(memory_path(self.model, t))
            decode_batch(lv, sc, self.group_size, lin.weight.data[None])
            qweight, packed_scales = pack_batch(lv, sc)
            out[t.name] = (to_host(qweight[0]), to_host(packed_scales[0]))
            at += t.out_features
        return out

    # ---------------------------------------------------------------- routed experts
    def listeners(self, layer: int, block: nn.Module, runner) -> list:
        self._experts = block.experts
        return []

    def expert_bytes(self, layer: int) -> int:
        """Per expert built at once: its two Hessians (float32), float32 and compute-dtype working copies of
        its weights, levels, the decoded weights, packed bytes queued for the writer, and its share of the
        routed tokens gathered as float32 rows with their gate/up and act(gate)·up products."""
        mine = [t for t in self.targets.by_layer(layer) if t.kind == "expert" and t.expert == 0]
        if not mine:
            return 0
        ins = {t.role: t.in_features for t in mine}
        hidden, inter = ins.get("gate", 0), ins.get("down", 0)
        numel = sum(t.out_features * t.in_features for t in mine)
        share = self.positions * max(1, self.model.top_k) // max(1, self.model.num_experts)
        return (4 * (hidden * hidden + inter * inter) + numel * (4 + 4 + 4 + 1 + (DEPTH + 1) // 2)
                + 4 * share * (2 * hidden + 3 * inter))

    def _slots(self, layer: int, store, ids: list[int]) -> list[Slot]:
        """The quantized pieces of the chunk's fused parameters (the same for every expert of a layer)."""
        slots = []
        for param in store.params:
            for i, piece in enumerate(param.pieces[ids[0]]):
                t = self.targets.targets.get(piece.name)
                names = []
                for j in ids:
                    other = param.pieces[j][i]
                    tj = self.targets.targets.get(other.name)
                    if (tj is None) != (t is None) or other.row != piece.row or \
                            (tj is not None and tj.out_features != t.out_features):
                        raise SurgeryError(f"layer {layer}: experts {ids[0]} and {j} differ in {param.name} "
                                           "(GPTQ quantizes a chunk's experts together)", self.model.ckpt.directory)
                    names.append(other.name)
                if t is not None:
                    slots.append(Slot(param.name, piece.row, t.out_features, tuple(names), t.role))
        return slots

    def chunk(self, layer: int, store, ids: list[int], weights: dict[str, torch.Tensor], captured: list) -> None:
        slots = self._slots(layer, store, ids)
        if not slots:
            return
        result = quantize_chunk(weights, slots, captured, ids, self._experts.act_fn, group_size=self.group_size,
                                damp=self.damp, minimum=self.min_tokens, timings=self.timings)
        self._count(layer, result.few_tokens)
        self._failed = self._failed + result.failed
        host = {s: (to_host(q), to_host(sc)) for s, (q, sc) in result.packed.items()}
        self._emit([(s.names[k].removesuffix(".weight"), host[s][0][k], host[s][1][k])
                    for k in range(len(ids)) for s in slots])

    def end_layer(self, layer: int) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            with timed(self.timings, "writer: waiting for it"):
                writer.close()
        failed = int(self._failed)  # one read per layer of the device's count
        self._failed = 0
        self.cholesky_fallback[layer] = failed
        self._count(layer, failed)
