"""FP8 forms of a linear (the hub's block layout): an FP8 weight under an fp8 quantization_config with
its `weight_scale_inv` beside it, and scales shaped [ceil(out / block), ceil(in / block)]."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from surgery.arch.rules.problem import FLOATS, FP8, FP8_SCALE
from surgery.arch.rules.quantization import DEFAULT_FP8_BLOCK, Quant

if TYPE_CHECKING:
    from surgery.arch.rules.tensors import TensorChecker
    from surgery.checkpoint.reader import TensorInfo


def check_fp8_weight(checker: TensorChecker, name: str, stem: str, info: TensorInfo) -> None:
    """An FP8 `<stem>weight`: the config must say fp8, and its block scales must be stored."""
    q = checker.quant
    scale = stem + FP8_SCALE
    if q.kind != "fp8":
        checker.add("quantization", name, f"tensor {name!r} is {info.dtype} but config.json has "
                    f"{'no' if q.kind is None else 'a ' + q.kind} quantization_config; expected "
                    "quantization_config quant_method 'fp8' with weight_block_size")
    elif scale not in checker.tensors:
        checker.add("quantization", name, f"FP8 tensor {name!r} {list(info.shape)} has no {scale!r}; "
                    f"expected its block scales [{blocks(q, info.shape)}] (the hub FP8 layout)")


def check_fp8_scale(checker: TensorChecker, name: str, stem: str, info: TensorInfo) -> None:
    """A `<stem>weight_scale_inv`: floating point, beside an FP8 weight, one scale per block."""
    q = checker.quant
    weight = checker.tensors.get(stem + "weight")
    checker.want_dtype(name, info.dtype, FLOATS, "floating-point FP8 block scales")
    if weight is None or weight.dtype not in FP8:
        found = "no weight" if weight is None else f"weight {weight.dtype}"
        checker.add("quantization", name, f"scale tensor {name!r} belongs to an FP8 weight but there is "
                    f"{found} {stem + 'weight'!r}; expected an F8_E4M3 weight beside it")
    elif len(weight.shape) == 2:
        want = (-(-weight.shape[0] // q.block[0]), -(-weight.shape[1] // q.block[1]))
        if info.shape != want:
            checker.add("shape", name, f"FP8 scale {name!r} has shape {list(info.shape)} but weight "
                        f"{list(weight.shape)} in blocks of {list(q.block)} (quantization_config "
                        f"weight_block_size) needs {list(want)}")


def blocks(quant: Quant, shape: tuple[int, ...]) -> str:
    """The scale shape a weight of `shape` needs, as text ("?" for a weight that is not 2-D)."""
    if len(shape) != 2:
        return "?"
    b = quant.block if quant.kind == "fp8" else DEFAULT_FP8_BLOCK
    return ", ".join(str(math.ceil(d / x)) for d, x in zip(shape, b, strict=True))
