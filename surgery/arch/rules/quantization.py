"""The `quantization` rule: a quantization_config whose method surgery reads (the hub FP8 block layout,
W4A16 auto-round in auto_gptq packing), tensors that match it (FP8 tensors only under FP8, packed
weights only under W4A16), and no tensor of a form the family table says surgery cannot read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.arch.rules.problem import Problem

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel

DEFAULT_FP8_BLOCK = (128, 128)  # transformers' FineGrainedFP8Config default
SUPPORTED_QUANT = ("fp8 (hub FP8 block layout: float8_e4m3fn weights with weight_scale_inv), "
                   "auto-round W4A16 in auto_round:auto_gptq packing (bits 4)")


@dataclass(frozen=True)
class Quant:
    """What quantization_config says the tensors are: "fp8" (with its block), "w4a16" (with its group)
    or None (plain floating point)."""

    kind: str | None
    block: tuple[int, int] = DEFAULT_FP8_BLOCK
    group: int = 128


def quant_of(config: dict, where: str, problems: list[Problem]) -> Quant:
    """Read quantization_config; an unsupported method is a problem naming it and what is supported."""
    qcfg = config.get("quantization_config")
    if not qcfg:
        return Quant(None)
    if not isinstance(qcfg, dict):
        problems.append(Problem("quantization", "quantization_config", "config.json quantization_config is not "
                                f"an object; expected one of: {SUPPORTED_QUANT}", where))
        return Quant(None)
    method = str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    if method == "fp8":
        fmt = str(qcfg.get("fmt", "e4m3")).lower()
        block = qcfg.get("weight_block_size") or DEFAULT_FP8_BLOCK
        ok_block = (isinstance(block, (list, tuple)) and len(block) == 2
                    and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))
        if "e4m3" not in fmt or not ok_block:
            problems.append(Problem("quantization", "quantization_config", f"config.json quantization_config is fp8 "
                                    f"with fmt {qcfg.get('fmt')!r} and weight_block_size {block!r}; surgery reads "
                                    "e4m3 weights in 2-D blocks (e.g. [128, 128])", where))
            return Quant(None)
        return Quant("fp8", block=(int(block[0]), int(block[1])))
    packing = str(qcfg.get("packing_format", ""))
    if method == "auto-round" and "auto_gptq" in packing and qcfg.get("bits") == 4:
        group = qcfg.get("group_size", 128)
        if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
            problems.append(Problem("quantization", "quantization_config.group_size", f"config.json "
                                    f"quantization_config.group_size is {group!r}; expected a positive integer "
                                    "(or -1 for one group per column)", where))
            return Quant(None)
        return Quant("w4a16", group=group)
    described = method or "(no quant_method)"
    if packing:
        described += f" (packing_format {packing!r}, bits {qcfg.get('bits')!r})"
    elif qcfg.get("bits") is not None:
        described += f" (bits {qcfg.get('bits')!r})"
    problems.append(Problem("quantization", "quantization_config.quant_method", f"config.json "
                            f"quantization_config.quant_method is {described}, which surgery does not read; "
                            f"supported: {SUPPORTED_QUANT}", where))
    return Quant(None)


def quant_presence(config_path: Path, quant: Quant, fp8_count: int, w4_count: int) -> list[Problem]:
    """A quantization_config over tensors that are not quantized that way (e.g. FP8 claimed over bf16)."""
    where = str(config_path)
    if quant.kind == "fp8" and not fp8_count:
        return [Problem("quantization", "quantization_config", "config.json quantization_config says fp8 but no "
                        "tensor is FP8 (F8_E4M3); expected FP8 weights with weight_scale_inv, or no "
                        "quantization_config", where)]
    if quant.kind == "w4a16" and not w4_count:
        return [Problem("quantization", "quantization_config", "config.json quantization_config says W4A16 "
                        "(auto-round) but no tensor is a .qweight; expected packed weights, or no "
                        "quantization_config", where)]
    return []


def unsupported_problems(model: MoEModel) -> list[Problem]:
    """Tensors of a form the family's table entry says surgery does not read (`unsupported_suffixes`)."""
    ckpt, spec = model.ckpt, model.spec
    problems = []
    for suffix, why in spec.unsupported_suffixes:
        hit = next((n for n in ckpt.tensors if n.endswith(suffix)), None)
        if hit is not None:
            problems.append(Problem("quantization", hit, f"{spec.family}: {why} (tensor {hit!r})", str(ckpt.directory)))
    return problems
