"""Build one transformers decoder layer from on-disk tensors, and nothing else of the model.

The whole model is instantiated once on the meta device (no memory), so every layer is exactly the
class, attention, rotary and norm code transformers uses for the family. For layer l we read only
that layer's tensors, dequantise FP8 blocks and W4A16 packed linears (`X.qweight/qzeros/scales`, read
as stored and decoded on the compute device, so transformers' plain `nn.Linear` gets a `weight`),
fuse the hub's per-expert tensors into transformers 5's `[E, ...]` parameters, and assign them with
`load_state_dict(strict=True, assign=True)`; afterwards the layer goes back to the meta device, so
only one layer is ever resident.
"""

from __future__ import annotations

import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import SCALE_SUFFIX, read_weight
from surgery.checkpoint.w4a16 import (
    QWEIGHT,
    check_readable,
    is_packed_part,
    logical_shape,
    read_packed_weight,
    weight_shape,
)
from surgery.errors import SurgeryError


class LayerFactory:
    """Pages decoder layers of one checkpoint in and out of a meta-device skeleton."""

    def __init__(self, model: MoEModel, dtype: torch.dtype, device: torch.device,
                 attn_implementation: str | None = None) -> None:
        from transformers import AutoModelForCausalLM

        self.model = model
        self.dtype = dtype
        if any(n.endswith("." + QWEIGHT) for n in model.ckpt.tensors):
            check_readable(model.ckpt.config, model.ckpt.directory)
        self.device = device
        config = model.hf_config
        if attn_implementation:
            config._attn_implementation = attn_implementation
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.skeleton.eval()
        self.config = self.skeleton.config
        inner = self.skeleton.model
        self.rotary = type(inner.rotary_emb)(config=self.config).to(device) if hasattr(inner, "rotary_emb") else None
        self._prefetcher: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}
        # seconds spent reading, moving to the device, dequantising and computing routed experts
        self.timings = {"read": 0.0, "transfer": 0.0, "dequant": 0.0, "compute": 0.0}
        spec = model.spec
        self.expert_prefix = spec.moe_disk + "." + spec.expert_key.split("{expert}")[0]

    # ---------------------------------------------------------------- state dict from disk
    def _to_memory_key(self, rel: str) -> str:
        key = "." + rel
        for disk, mem in self.model.spec.disk_to_memory:
            key = key.replace(disk, mem)
        return key[1:]

    def read_state_dict(self, layer: int, exclude: tuple[str, ...] = (),
                        only: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """The layer's tensors under their in-memory names, FP8 and W4A16 dequantised (a packed `X.qweight`
        becomes `X.weight`), experts fused (tensors whose layer-relative name starts with one of `exclude`
        are left out; with `only`, just those)."""
        model, spec, ckpt = self.model, self.model.spec, self.model.ckpt
        prefix = model.layer_prefix(layer)
        names = [t.name for t in model.layer_tensors(layer)
                 if not t.name[len(prefix):].startswith(exclude)
                 and (only is None or t.name[len(prefix):].startswith(only))]
        present = set(names)
        router_biases = set(model.router_bias_names(layer))
        state: dict[str, torch.Tensor] = {}
        experts: dict[int, dict[str, str]] = defaultdict(dict)  # expert -> role -> tensor name
        role_of = {proj: role for role, proj in spec.projections.items()}
        for name in names:
            if name.endswith(SCALE_SUFFIX) or (is_packed_part(name, present) and not name.endswith(QWEIGHT)):
                continue  # consumed with its weight (FP8 scale; W4A16 qzeros/scales/g_idx)
            role = model.classify(name)
            if role.kind == "expert":
                suffix = ".qweight" if role.rest.endswith(".qweight") else ".weight"
                proj = role.rest.removesuffix(suffix)
                if proj not in role_of or not role.rest.endswith(suffix):
                    raise SurgeryError(f"unexpected expert tensor {name!r} for family {spec.family}",
                                       ckpt.directory)
                experts[role.expert][role_of[proj]] = name
                continue
            tensor = self._read(name, present)
            if tensor.is_floating_point() and name not in router_biases:
                tensor = tensor.to(self.dtype)
            state[self._to_memory_key(_weight_name(name)[len(prefix):])] = tensor
        if experts:
            moe = spec.moe_module + ".experts."
            ids = sorted(experts)
            if ids != list(range(len(ids))):
                raise SurgeryError(f"layer {layer} has experts {ids[:3]}... not numbered 0..n-1", ckpt.directory)
            for param, roles in spec.fused_experts:
                state[moe + param] = self._fuse(experts, ids, roles, present)
        return state

    def _read(self, name: str, present: set[str]) -> torch.Tensor:
        """One tensor as stored, FP8 block-scaled weights dequantised (float32); a W4A16 `X.qweight` is
        read with its qzeros and scales as stored, moved to the compute device and decoded there in the
        compute dtype (the packed bytes are a quarter of bf16's, and decoding where the weight is used
        keeps the host out of it), bit for bit `dequantize_w4a16`."""
        ckpt = self.model.ckpt
        if name.endswith("." + QWEIGHT):
            return read_packed_weight(ckpt, _weight_name(name), self.dtype, self.device)
        scale_name = name.removesuffix("weight") + SCALE_SUFFIX
        return read_weight(ckpt, name, scale_name if name.endswith("weight") and scale_name in present else None)

    def _fuse(self, experts: dict[int, dict[str, str]], ids: list[int], roles: tuple[str, ...],
              present: set[str]) -> torch.Tensor:
        """Stack the per-expert tensors of `roles` (concatenated on dim 0) into one [E, ...] tensor,
        filled in place one expert at a time, so a layer's experts are never held twice."""
        ckpt = self.model.ckpt
        shapes = [weight_shape(ckpt, experts[ids[0]][r]) for r in roles]
        rows = sum(s[0] for s in shapes)
        fused = torch.empty((len(ids), rows, *shapes[0][1:]), dtype=self.dtype)
        for e in ids:
            row = 0
            for r in roles:
                part = self._read(experts[e][r], present)
                fused[e, row:row + part.shape[0]].copy_(part)
                row += part.shape[0]
        return fused

    # ---------------------------------------------------------------- paging
    def _read_for_device(self, layer: int) -> dict[str, torch.Tensor]:
        """The layer's resident tensors (everything but its routed experts, which `ExpertStore` pages)."""
        t0 = time.perf_counter()
        state = self.read_state_dict(layer, exclude=(self.expert_prefix,))
        if self.device.type == "cuda":  # pinned host memory: the host->GPU copy can run asynchronously
            # (W4A16 weights are already on the device, decoded there)
            state = {k: v.pin_memory() if v.device.type == "cpu" else v for k, v in state.items()}
        self.timings["read"] += time.perf_counter() - t0
        return state

    def resident_bytes(self, layer: int) -> int:
        """Bytes of a layer's resident part in the compute dtype (headers only); a W4A16 linear counts as
        the plain weight it is decoded into, not its packed bytes."""
        item = torch.empty((), dtype=self.dtype).element_size()
        prefix = self.model.layer_prefix(layer)
        tensors = self.model.layer_tensors(layer)
        present = {t.name for t in tensors}
        total = 0
        for t in tensors:
            if t.name[len(prefix):].startswith(self.expert_prefix) or t.name.endswith(SCALE_SUFFIX):
                continue
            if t.name.endswith("." + QWEIGHT):
                out_f, in_f = logical_shape(t.shape)
                total += out_f * in_f * item
            elif not is_packed_part(t.name, present):
                total += t.numel * (item if t.torch_dtype.is_floating_point else t.itemsize)
        return total

    def _assign(self, module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
        """Assign the resident tensors; the routed experts' parameters (and only they) stay on meta."""
        state = {k: v.to(self.device, non_blocking=True) for k, v in state.items()}
        try:
            missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise SurgeryError(f"{what} does not match the {self.model.spec.family} layout: {first}",
                               self.model.ckpt.directory) from None
        experts = self.model.spec.moe_module + ".experts."
        missing = [k for k in missing if not k.startswith(experts)]
        if missing or unexpected:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
            raise SurgeryError(f"{what} does not match the {self.model.spec.family} layout: {detail}",
                               self.model.ckpt.directory)

    def prefetch(self, layer: int) -> None:
        """Start reading `layer`'s tensors in a background thread (one layer ahead at most), so disk
        reads, FP8 dequantisation and expert fusion overlap the current layer's compute. The bytes
        read are the same either way, so results do not depend on prefetching."""
        if layer in self._pending or layer >= len(self.skeleton.model.layers):
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-prefetch")
        for stale in [k for k in self._pending if k != layer]:
            self._pending.pop(stale).cancel()
        self._pending[layer] = self._prefetcher.submit(self._read_for_device, layer)

    def pending_bytes(self) -> int:
        """Bytes the prefetch of a next layer is about to hold (0 once it is done: then it is resident)."""
        return sum(self.resident_bytes(layer) for layer, fut in self._pending.items() if not fut.done())

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None

    def load(self, layer: int) -> nn.Module:
        module = self.skeleton.model.layers[layer]
        pending = self._pending.pop(layer, None)
        state = pending.result() if pending is not None else self._read_for_device(layer)
        self._assign(module, state, f"layer {layer}")
        return module

    def load_mtp(self, layer: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        """An MTP module stored as layer `layer` (past num_hidden_layers): its decoder layer, built with
        the family's decoder-layer class for that index, and its extra tensors (enorm, hnorm, eh_proj,
        optional embed_tokens) by layer-relative name, in the compute dtype."""
        extras = self.model.spec.mtp_extras
        with torch.device("meta"):
            module = type(self.skeleton.model.layers[-1])(self.config, layer)
        self._assign(module, self.read_state_dict(layer, exclude=(*extras, self.expert_prefix)), f"MTP layer {layer}")
        parts = self.read_state_dict(layer, only=extras)
        for need in ("enorm.weight", "hnorm.weight", "eh_proj.weight"):
            if need not in parts:
                raise SurgeryError(f"MTP layer {layer} has no {need!r}", self.model.ckpt.directory)
        return module.eval(), {k: v.to(self.device) for k, v in parts.items()}

    def unload(self, layer: int) -> None:
        self.skeleton.model.layers[layer].to("meta")

    def moe_block(self, module: nn.Module) -> nn.Module | None:
        block = getattr(module, self.model.spec.moe_module, None)
        if block is not None and hasattr(block, "experts") and hasattr(block, self.model.spec.router_module):
            return block
        return None

    def moe_norm(self, module: nn.Module) -> nn.Module | None:
        """The norm before a pre-norm decoder layer's MoE block (`ArchSpec.moe_norm`), or None."""
        name = self.model.spec.moe_norm
        norm = getattr(module, name, None) if name else None
        return norm if isinstance(norm, nn.Module) else None


def _weight_name(name: str) -> str:
    """`X.weight` for a packed `X.qweight` (the name transformers' module and the table know), else `name`."""
    return name.removesuffix(QWEIGHT) + "weight" if name.endswith("." + QWEIGHT) else name

