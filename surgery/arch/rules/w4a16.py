"""W4A16 forms (auto-round's auto_gptq packing) and what the quantization_config declares.

Per packed linear: qweight int32 [in/8, out], qzeros int32 [ceil(in/G), out/8], scales float
[ceil(in/G), out], g_idx int32 [in] (`W4A16_FORMS`, the rule as data), the triple stored together,
and under a W4A16 config only. Per linear: stored packed or plain as `block_name_to_quantize` /
`extra_config` declare it (`declared_bits`, what vLLM's AutoRound loader reads)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from surgery.arch.rules.problem import FLOATS, Problem

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel
    from surgery.arch.rules.tensors import TensorChecker
    from surgery.checkpoint.reader import TensorInfo

REGEX_CHARS = frozenset("*+?^$()[]{}|\\")  # an extra_config key with one of these is a pattern (as vLLM reads it)
I32 = frozenset({"I32"})
# part -> (its shape from (out, in, groups), its dtypes)
W4A16_FORMS: dict[str, tuple[Callable[[int, int, int], tuple[int, ...]], frozenset[str]]] = {
    "qweight": (lambda out, in_, groups: (in_ // 8, out), I32),
    "qzeros": (lambda out, in_, groups: (groups, math.ceil(out / 8)), I32),
    "scales": (lambda out, in_, groups: (groups, out), FLOATS),
    "g_idx": (lambda out, in_, groups: (in_,), I32),
}


def check_w4a16_part(checker: TensorChecker, name: str, stem: str, suffix: str, info: TensorInfo,
                     logical: tuple[int, int] | None, exprs: tuple[str, ...] | None) -> None:
    """One part (`suffix` in W4A16_FORMS) of the packed linear `stem`; `logical` is the [out, in]
    config.json implies (None: unknown role, then the qweight's own shape says it)."""
    quant = checker.quant
    if quant.kind != "w4a16":
        checker.add("quantization", name, f"tensor {name!r} is a W4A16 {suffix} but config.json has "
                    f"{'no' if quant.kind is None else 'a ' + quant.kind} quantization_config; expected "
                    "quant_method 'auto-round' with packing_format 'auto_round:auto_gptq' and bits 4")
        return
    qweight = checker.tensors.get(stem + "qweight")
    if suffix != "qweight" and qweight is None:
        checker.add("quantization", name, f"tensor {name!r} has no {stem + 'qweight'!r} beside it; expected the "
                    "W4A16 triple qweight, qzeros, scales")
        return
    if suffix == "qweight":
        for part in ("qzeros", "scales"):
            if stem + part not in checker.tensors:
                checker.add("quantization", name, f"W4A16 tensor {name!r} has no {stem + part!r}; expected "
                            "the triple qweight, qzeros, scales")
        if len(info.shape) != 2:
            checker.add("shape", name, f"W4A16 tensor {name!r} has shape {list(info.shape)}; expected [in/8, out]")
            return
    assert qweight is not None or suffix == "qweight"
    ref = info if suffix == "qweight" else qweight
    if len(ref.shape) != 2:
        return  # reported on the qweight itself
    out_dim, in_dim = logical if logical is not None else (ref.shape[1], ref.shape[0] * 8)
    groups = 1 if quant.group == -1 else math.ceil(in_dim / quant.group)
    shape_of, dtypes = W4A16_FORMS[suffix]
    want = shape_of(out_dim, in_dim, groups)
    checker.want_dtype(name, info.dtype, dtypes, f"the W4A16 {suffix} dtype")
    if info.shape != want:
        source = (f"[out, in] {list(logical)} {checker.how(exprs)}" if logical is not None
                  else f"qweight {list(ref.shape)}")
        checker.add("shape", name, f"W4A16 tensor {name!r} has shape {list(info.shape)}; {source} with group_size "
                    f"{quant.group} implies {list(want)}")


def declared_bits(qcfg: dict, module: str) -> int:
    """The bits vLLM's AutoRound loader gives linear `module`: an exact `extra_config` key, else the
    first regex key (one with a regex metacharacter) found in the name by `re.search`, else the
    checkpoint's bits inside `block_name_to_quantize` (comma-separated or a list; absent: everywhere)
    and 16 outside. AutoRound writes regex keys (`.*model[.]layers[.]0[.]mlp[.]gate.*`, with escaped dots),
    surgery exact names."""
    bits = int(qcfg.get("bits", 4))
    extra = qcfg.get("extra_config") or {}
    cfg = extra.get(module)
    if cfg is None:
        for key, value in extra.items():
            if isinstance(key, str) and any(c in REGEX_CHARS for c in key):
                try:
                    if re.search(key, module):
                        cfg = value
                        break
                except re.error:
                    continue
    if isinstance(cfg, dict) and "bits" in cfg:
        return int(cfg["bits"])
    blocks = qcfg.get("block_name_to_quantize")
    if isinstance(blocks, str):
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]
    return bits if not blocks or any(module.startswith(b) for b in blocks) else 16


def w4a16_declared_problems(model: MoEModel, where: str) -> list[Problem]:
    """Each linear stored as the quantization_config declares it. Why: vLLM decides from the config
    alone whether to build a packed or a plain linear and then looks for `qweight` or `weight`, so a
    packed expert written into a checkpoint whose extra_config calls it 16-bit, or a plain attention or
    expert weight (e.g. a rewrite that wrote merged experts unpacked) where 4 bits are declared, loads
    nowhere, while the shapes alone look fine. Plain weights are checked only for the linears every
    loader builds with the quantization config (attention, routed and shared experts, dense MLPs):
    routers and MTP extras are often built unquantized whatever the config says; and only when the
    config names modules at all (`block_name_to_quantize` or `extra_config`, as AutoRound and surgery
    write): a bare GPTQ-style config leaves the choice to its loader's own defaults."""
    ckpt, spec = model.ckpt, model.spec
    qcfg = ckpt.config.get("quantization_config") or {}
    declares = bool(qcfg.get("block_name_to_quantize") or qcfg.get("extra_config"))
    moe = set(model.moe_layers) | set(model.mtp_expert_layers())
    shared = tuple(spec.moe_disk + "." + s for s in spec.shared_experts)
    out: list[Problem] = []
    for name, info in ckpt.tensors.items():
        stem, _, suffix = name.rpartition(".")
        if suffix not in ("qweight", "weight") or (layer := model.layer_of(name)) is None:
            continue
        if suffix == "qweight":
            if stem + ".weight" in ckpt.tensors:
                out.append(Problem("quantization", name, f"linear {stem!r} is stored both packed ({name!r}) and plain "
                                   f"({stem + '.weight'!r}); expected one of them", where))
            elif (bits := declared_bits(qcfg, stem)) >= 16:
                out.append(Problem("quantization", name, f"W4A16 tensor {name!r} is packed but quantization_config "
                                   f"declares {stem!r} {bits}-bit (extra_config / block_name_to_quantize); expected a "
                                   f"plain {stem + '.weight'!r} or the module declared 4-bit", where))
            continue
        if not declares or len(info.shape) != 2 or info.dtype not in FLOATS:
            continue
        rel = name[len(model.layer_prefix(layer)):]
        if layer >= model.num_layers and rel.startswith(spec.mtp_extras):
            continue
        role = model.classify(name).kind
        packable = role == "expert" or (role == "other" and (
            rel.startswith(spec.quant_linears) or (layer in moe and bool(shared) and rel.startswith(shared))
            or (layer not in moe and rel.startswith(spec.dense_mlp))))
        if packable and (bits := declared_bits(qcfg, stem)) < 16:
            out.append(Problem("quantization", name, f"linear {stem!r} is stored plain ({name!r}) but "
                               f"quantization_config declares it {bits}-bit (block_name_to_quantize "
                               f"{qcfg.get('block_name_to_quantize')!r}, not in extra_config with bits 16): a W4A16 "
                               f"loader reads {stem + '.qweight'!r}; expected it packed or listed in extra_config",
                               where))
    return out
