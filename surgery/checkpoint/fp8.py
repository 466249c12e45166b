"""FP8 block-scaled weights (DeepSeek-V3, MiniMax-M2.1, GLM/Qwen FP8 releases): dequantise on the fly.

A weight W [out, in] of float8_e4m3fn comes with `weight_scale_inv` S [ceil(out/b), ceil(in/b)]; the
real weight is W * S broadcast over its b x b block (edge blocks partial). The rewriter never calls
this: it copies FP8 bytes and scales as they are.
"""

from __future__ import annotations

import math

import torch

SCALE_SUFFIX = "weight_scale_inv"


def block_size(config: dict, weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[int, int]:
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("weight_block_size"):
        br, bc = qcfg["weight_block_size"]
        return int(br), int(bc)
    # no block size in the config: infer the smallest block consistent with the shapes
    return math.ceil(weight_shape[0] / scale_shape[0]), math.ceil(weight_shape[1] / scale_shape[1])


def read_weight(ckpt, name: str, scale_name: str | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor `name` of a checkpoint as stored, or, with its `scale_name`, dequantised into `dtype`."""
    w = ckpt.read(name)
    if scale_name is None:
        return w
    s = ckpt.read(scale_name)
    return dequantize(w, s, block_size(ckpt.config, tuple(w.shape), tuple(s.shape)), dtype)


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    rows, cols = weight.shape
    br, bc = block
    scale = scale_inv.float().repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    return (weight.float() * scale).to(dtype)
