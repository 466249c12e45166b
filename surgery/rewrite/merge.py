"""Merged expert tensors for plans made with `--method merge` (computed, not copied).

A kept expert c with merge group G = {c} ∪ merge[c] (ascending expert ids) is written as the
routed-frequency-weighted average of the group's experts, tensor by tensor:

    W_c' = Σ_{i in G} (f_i / Σ_{j in G} f_j) · W_i      for every tensor under the expert's prefix
                                                           (w1/w2/w3 or gate/up/down weights, biases)

with f = the plan's `merge_weights` (calibration's routed frequency). The sum is taken in float32,
one member at a time (memory: two tensors of one expert), and cast back to the tensor's own dtype.
FP8 block-scaled experts (`weight` float8_e4m3fn + `weight_scale_inv`) are dequantised to float32
first and the average is re-quantised into the same block layout: per block scale = block amax / 448
(stored in the scale tensor's dtype), weight = round-to-nearest e4m3 of W / scale; so the output's
`quantization_config` stays true. Experts stored fused on disk ([E, ...] tensors, gpt-oss) average
the group's rows the same way. Kept experts without a group, routers (`gate.weight` rows and
`e_score_correction_bias` of the kept experts are kept as they are: the merged expert is routed
exactly as the kept expert was) and everything else are untouched; the layout is unchanged, only
the bytes of merged tensors differ.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from surgery.arch.model import MoEModel
from surgery.checkpoint.fp8 import SCALE_SUFFIX, block_size, dequantize
from surgery.errors import SurgeryError
from surgery.rewrite.layout import OutTensor

FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
FP8 = "F8_E4M3"
E4M3_MAX = 448.0


def group_weights(entry: dict) -> dict[int, list[tuple[int, float]]]:
    """{kept expert: [(member, normalized weight)]} for one plan layer, members ascending."""
    weights = entry.get("merge_weights") or []
    out: dict[int, list[tuple[int, float]]] = {}
    for key, dropped in (entry.get("merge") or {}).items():
        if not dropped:
            continue
        members = sorted({int(key), *dropped})
        total = math.fsum(float(weights[m]) for m in members)
        out[int(key)] = [(m, float(weights[m]) / total) for m in members]
    return out


class ExpertMerger:
    """Computes the bytes of every merged tensor of a plan's output; `bytes_for` is the rewrite's hook."""

    def __init__(self, model: MoEModel, plan: dict) -> None:
        self.model = model
        self.ckpt = model.ckpt
        self.groups = {int(layer): g for layer, entry in plan["layers"].items() if (g := group_weights(entry))}
        self._prefix = model.spec.expert_key.split("{expert}")[0]
        self._fp8 = lru_cache(maxsize=2)(self._merged_fp8)
        self._check()

    @classmethod
    def for_plan(cls, model: MoEModel, plan: dict) -> ExpertMerger | None:
        """A merger when the plan merges anything, else None (the rewrite stays a pure byte copy)."""
        merger = cls(model, plan)
        return merger if merger.groups else None

    def _name(self, layer: int, expert: int, rest: str) -> str:
        return f"{self.model.moe_prefix(layer)}{self._prefix}{expert}.{rest}"

    def _check(self) -> None:
        """Refuse, before a byte is written, expert tensors we cannot average (integer-packed quantisation,
        FP8 without a block scale, other FP8 kinds)."""
        for name, info in self.ckpt.tensors.items():
            role = self.model.classify(name)
            if role.kind not in ("expert", "fused") or role.layer not in self.groups:
                continue
            if info.dtype in FLOAT_DTYPES:
                continue
            scale = self._name(role.layer, role.expert, role.rest.removesuffix("weight") + SCALE_SUFFIX) \
                if role.kind == "expert" else None
            if info.dtype == FP8 and role.rest.endswith("weight") and scale in self.ckpt:
                continue
            raise SurgeryError(f"--method merge cannot average expert tensor {name!r} of dtype {info.dtype} "
                               "(only float and FP8 block-scaled experts can be merged)", self.ckpt.directory)

    def bytes_for(self, t: OutTensor) -> bytes | None:
        """The merged bytes of output tensor `t`, or None when it is written as the plan layout says."""
        role = self.model.classify(t.source.name)
        groups = self.groups.get(role.layer) if role.layer is not None else None
        if not groups:
            return None
        if role.kind == "expert":
            if role.expert not in groups:
                return None
            members = groups[role.expert]
            if role.rest.endswith(SCALE_SUFFIX):
                return _raw(self._fp8(role.layer, role.expert, role.rest.removesuffix(SCALE_SUFFIX) + "weight")[1])
            if t.source.dtype == FP8:
                return _raw(self._fp8(role.layer, role.expert, role.rest)[0])
            merged = self._average(role.layer, members, role.rest)
            return _raw(merged.to(t.source.torch_dtype))
        if role.kind == "fused" and t.rows is not None:
            return _raw(self._fused(t, groups))
        return None

    def _average(self, layer: int, members: list[tuple[int, float]], rest: str) -> torch.Tensor:
        """Σ w_i · X_i in float32, one member read at a time (FP8 members dequantised)."""
        acc: torch.Tensor | None = None
        for expert, w in members:
            x = self._read_float(self._name(layer, expert, rest))
            acc = x * w if acc is None else acc + x * w
        assert acc is not None
        return acc

    def _read_float(self, name: str) -> torch.Tensor:
        info = self.ckpt.info(name)
        x = self.ckpt.read(name)
        if info.dtype == FP8:
            scale_name = name.removesuffix("weight") + SCALE_SUFFIX
            scale = self.ckpt.read(scale_name)
            block = block_size(self.ckpt.config, tuple(info.shape), tuple(scale.shape))
            return dequantize(x, scale, block, torch.float32)
        return x.to(torch.float32)

    def _merged_fp8(self, layer: int, expert: int, weight_rest: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(float8_e4m3fn weight, scale) of a merged FP8 expert weight, in the source's block layout."""
        members = self.groups[layer][expert]
        merged = self._average(layer, members, weight_rest)
        scale_info = self.ckpt.info(self._name(layer, expert, weight_rest.removesuffix("weight") + SCALE_SUFFIX))
        block = block_size(self.ckpt.config, tuple(merged.shape), tuple(scale_info.shape))
        return quantize_blocks(merged, block, scale_info.torch_dtype)

    def _fused(self, t: OutTensor, groups: dict[int, list[tuple[int, float]]]) -> torch.Tensor:
        """A fused [.., E, ..] expert tensor: kept rows in the new order, merged rows averaged."""
        info = t.source
        if info.dtype not in FLOAT_DTYPES:
            raise SurgeryError(f"--method merge cannot average fused expert tensor {info.name!r} of dtype "
                               f"{info.dtype}", self.ckpt.directory)
        src = self.ckpt.read(info.name)
        rows = []
        for r in t.rows:
            if r in groups:
                acc = None
                for expert, w in groups[r]:
                    x = src.select(t.axis, expert).to(torch.float32) * w
                    acc = x if acc is None else acc + x
                rows.append(acc.to(src.dtype))
            else:
                rows.append(src.select(t.axis, r))
        return torch.stack(rows, dim=t.axis)


def quantize_blocks(w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 block quantisation: scale = block amax / 448 (1 for an all-zero block), q = W / scale.

    The scale is rounded to its stored dtype first and q computed with the rounded scale, so
    dequantising the output (q * scale) is as close to W as e4m3 allows."""
    rows, cols = w.shape
    br, bc = block
    nr, nc = math.ceil(rows / br), math.ceil(cols / bc)
    pad = torch.zeros(nr * br, nc * bc, dtype=torch.float32)
    pad[:rows, :cols] = w
    blocks = pad.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)).to(scale_dtype)
    q = (blocks / scale.float()[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX)
    q = q.reshape(nr * br, nc * bc)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale.contiguous()


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes in its own dtype (little-endian, C order), as safetensors stores them."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
