"""GPTQ as a pass over one decoder layer at a time: what the layer engine calls, and nothing more.

    gp.begin_layer(layer, module)       # hooks on the layer's quantized nn.Linear modules (attention,
                                        # shared experts, dense MLP) accumulate their input Hessians
    gp.valid = bool [tokens]            # per batch, before the forward: real (non-padding) tokens
    gp.observe_expert(j, x_in, h_mid)   # routed expert j's real tokens: its input (w1/w3 Hessian)
                                        # and act(gate)·up (w2 Hessian)
    packed = gp.end_layer(layer)        # {weight name: {qweight, qzeros, scales}} (GPTQ; RTN for
                                        # experts that saw fewer than `min_tokens` tokens)
    gp.dequantized(packed)              # {weight name: W [out, in]} from the packed bytes, so the
                                        # layer can be rerun on them for the next layer's inputs

Weights are read from the checkpoint by their on-disk names (FP8 dequantised), never taken from the
module, so the pass does not depend on how the engine holds a layer's experts. Hessian memory is
`in² × 4` bytes per linear input (w1/w3 of an expert share one), for the current layer only.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import block_size, dequantize
from surgery.checkpoint.w4a16 import dequantize_w4a16
from surgery.errors import SurgeryError
from surgery.quant.gptq import DAMP, Hessian, gptq_quantize
from surgery.quant.pack import pack
from surgery.quant.rtn import rtn_quantize
from surgery.quant.targets import QuantTargets, Target


def memory_path(model: MoEModel, target: Target) -> str:
    """The module path of a (non-routed) target inside its transformers decoder layer."""
    rel = "." + target.module[len(model.layer_prefix(target.layer)):]
    for disk, mem in model.spec.disk_to_memory:
        rel = rel.replace(disk, mem)
    return rel[1:]


class GPTQPass:
    def __init__(self, model: MoEModel, targets: QuantTargets, group_size: int = 128, damp: float = DAMP,
                 min_tokens: int | None = None, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.targets = targets
        self.group_size = group_size
        self.damp = damp
        # fewer routed tokens than two groups' worth: the Hessian is mostly dampening, RTN is as good
        self.min_tokens = 2 * group_size if min_tokens is None else min_tokens
        self.device = torch.device(device)
        self.valid: torch.Tensor | None = None
        self.rtn_fallback = 0
        self._hooks: list = []
        self._hess: dict[str, Hessian] = {}
        self._expert_in: dict[int, Hessian] = {}
        self._expert_mid: dict[int, Hessian] = {}

    # ---------------------------------------------------------------- observing
    def begin_layer(self, layer: int, module: nn.Module, block: nn.Module | None = None) -> None:
        self._hess.clear()
        self._expert_in.clear()
        self._expert_mid.clear()
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

    def _record(self, h: Hessian, _module: nn.Module, args: tuple) -> None:
        x = args[0].reshape(-1, args[0].shape[-1])
        if self.valid is not None and self.valid.numel() == x.shape[0]:
            x = x[self.valid.to(x.device)]
        h.add(x)

    def observe_expert(self, j: int, x_in: torch.Tensor, h_mid: torch.Tensor) -> None:
        if j not in self._expert_in:
            self._expert_in[j] = Hessian(x_in.shape[-1], self.device)
            self._expert_mid[j] = Hessian(h_mid.shape[-1], self.device)
        self._expert_in[j].add(x_in)
        self._expert_mid[j].add(h_mid)

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    # ---------------------------------------------------------------- quantizing
    def _weight(self, t: Target) -> torch.Tensor:
        ckpt = self.model.ckpt
        w = ckpt.read(t.name)
        if t.scale is not None:
            s = ckpt.read(t.scale)
            w = dequantize(w, s, block_size(ckpt.config, tuple(w.shape), tuple(s.shape)))
        return w.to(self.device)

    def hessian_of(self, t: Target) -> Hessian | None:
        if t.kind == "expert":
            store = self._expert_mid if t.role == "down" else self._expert_in
            return store.get(t.expert)
        return self._hess.get(t.name)

    def end_layer(self, layer: int) -> dict[str, dict[str, torch.Tensor]]:
        """Quantize every target of the layer; returns the packed tensors by on-disk weight name."""
        self._detach()
        out = {}
        for t in self.targets.by_layer(layer):
            w = self._weight(t)
            h = self.hessian_of(t)
            if h is None or h.count < (self.min_tokens if t.kind == "expert" else 1):
                q, s = rtn_quantize(w, self.group_size)
                self.rtn_fallback += 1
            else:
                q, s = gptq_quantize(w, h.value(), self.group_size, self.damp)
            out[t.name] = {k: v.cpu() for k, v in pack(q.cpu(), s.cpu()).items()}
        self._hess.clear()
        self._expert_in.clear()
        self._expert_mid.clear()
        return out

    def dequantized(self, packed: dict[str, dict[str, torch.Tensor]],
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The weights the packed tensors decode to (what a W4A16 reader computes), by weight name."""
        return {name: dequantize_w4a16(p["qweight"], p["qzeros"], p["scales"], self.group_size, dtype)
                for name, p in packed.items()}
