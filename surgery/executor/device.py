"""Which device and dtype a run computes in: `--device auto|cpu|cuda[:N]`, `--dtype auto|bfloat16|float32`.

Every command that walks layers (calibrate, eval, fidelity, quantize) resolves them the same way."""

from __future__ import annotations

import torch

from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise SurgeryError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SurgeryError(f"device {spec!r} requested but CUDA is not available")
    return device


def resolve_dtype(spec: str, device: torch.device, model: MoEModel) -> torch.dtype:
    """auto: the checkpoint's dtype (bf16) on CUDA, float32 on CPU (reference-exact, and CPUs have no
    fast float16)."""
    names = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
    if spec != "auto":
        if spec not in names:
            raise SurgeryError(f"unknown dtype {spec!r} (use auto, bfloat16 or float32)")
        return names[spec]
    if device.type == "cpu":
        return torch.float32
    declared = str(model.ckpt.config.get("dtype") or model.ckpt.config.get("torch_dtype") or "bfloat16")
    return names.get(declared, torch.bfloat16)
