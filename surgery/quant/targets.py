"""Which tensors of a checkpoint W4A16 quantizes, from the architecture table and the headers alone.

Quantized: every 2-D linear weight of attention (the table's `quant_linears`, e.g. `self_attn.`), of
every routed expert and of the shared experts, in decoder layers and MTP decoder layers alike; a dense
layer's MLP (`dense_mlp`) only when asked. Not quantized: routers and their biases, norms, embeddings,
lm_head, MTP extras (enorm/hnorm/eh_proj/shared_head), and — as AutoRound does — any linear whose
output or input size is not a multiple of 32 (the packing and the serving kernels need it). Linear
modules inside the decoder layers that stay 16-bit are listed so that `extra_config` can say so.

Partial groups (`partial_groups`): a linear whose input size is not a multiple of the group size has a
partial last group. AutoRound pads it with zeros and quantizes it, but no vLLM kernel sizes the scales of
such a weight (`surgery.arch.serving_rules`), so by default ("keep") it stays 16-bit; and because vLLM
fuses q/k/v, gate/up and a layer's routed experts into modules that are quantized or not as a whole,
one part kept 16-bit keeps its whole fused module 16-bit. "pad" is AutoRound's selection exactly (the
bit-identity tests and the comparisons with AutoRound's own outputs use it; `verify` reports such an
output as loadable by no vLLM setting). Nothing left to quantize is refused in one line.

FP8 block-scaled inputs: a quantized weight's `weight_scale_inv` is consumed; an FP8 weight that is not
quantized is written dequantised in the checkpoint's compute dtype (the output's quantization_config
is W4A16, so nothing may stay FP8).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from surgery.arch.model import MoEModel
from surgery.errors import SurgeryError

SCALE_SUFFIX = "weight_scale_inv"  # FP8 block scales (surgery.checkpoint.fp8; not imported: it needs torch)
ALIGN = 32  # AutoRound keeps linears with a dimension not divisible by 32 in 16 bits (vLLM's kernels need it)
FLOAT_DTYPES = ("BF16", "F16", "F32", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Target:
    """One linear weight to quantize: its on-disk name, shape and where it sits."""

    name: str  # ".../q_proj.weight"
    out_features: int
    in_features: int
    layer: int
    kind: str  # "attention", "expert", "shared" or "dense"
    expert: int | None = None  # routed experts: the expert index
    role: str | None = None  # routed experts: "gate", "up" or "down"
    scale: str | None = None  # FP8: the weight_scale_inv it consumes

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


@dataclass
class QuantTargets:
    targets: dict[str, Target] = field(default_factory=dict)  # weight name -> target
    kept_linears: list[str] = field(default_factory=list)  # module names left 16-bit inside the layers
    fp8_dequant: dict[str, str] = field(default_factory=dict)  # FP8 weight kept unquantized -> its scale
    consumed: set[str] = field(default_factory=set)  # scale tensors that are not written
    kept_expert_layers: set[int] = field(default_factory=set)  # layers whose routed experts stay 16-bit

    def by_layer(self, layer: int) -> list[Target]:
        return [t for t in self.targets.values() if t.layer == layer]


def check_quantizable(model: MoEModel) -> None:
    """Refuse, in one line, what this packing cannot express."""
    model.check_supported()
    if model.spec.fused_on_disk:
        raise SurgeryError(f"{model.spec.family}: routed experts are stored fused on disk ([E, ...] tensors); "
                           "W4A16 packs 2-D linear weights only", model.ckpt.directory)


PARTIAL_GROUPS = ("keep", "pad")


def find_targets(model: MoEModel, quantize_dense: bool = False, group_size: int = 128,
                 partial_groups: str = "keep") -> QuantTargets:
    """Classify every tensor of the checkpoint for W4A16 (headers only, no tensor data read)."""
    check_quantizable(model)
    if partial_groups not in PARTIAL_GROUPS:
        raise ValueError(f"partial_groups must be one of {PARTIAL_GROUPS}, not {partial_groups!r}")
    partial = group_size if partial_groups == "keep" else None
    spec, ckpt = model.spec, model.ckpt
    moe_layers = set(model.moe_layers) | set(model.mtp_expert_layers())
    shared = tuple(spec.moe_disk + "." + s for s in spec.shared_experts)
    out = QuantTargets()
    for name, info in ckpt.tensors.items():
        layer = model.layer_of(name)
        has_scale = name.endswith("weight") and (name.removesuffix("weight") + SCALE_SUFFIX) in ckpt
        is_linear = name.endswith(".weight") and len(info.shape) == 2 and info.dtype in FLOAT_DTYPES
        if not is_linear or layer is None:
            if has_scale:
                out.fp8_dequant[name] = name.removesuffix("weight") + SCALE_SUFFIX
            continue
        rel = name[len(model.layer_prefix(layer)):]
        role = model.classify(name)
        kind = None
        if layer >= model.num_layers and rel.startswith(spec.mtp_extras):
            kind = None  # MTP extras: embedding, norms' partners, eh_proj, shared head
        elif role.kind == "expert":
            kind = "expert"
        elif role.kind in ("router", "fused"):
            kind = None
        elif rel.startswith(spec.quant_linears):
            kind = "attention"
        elif layer in moe_layers and shared and rel.startswith(shared):
            kind = "shared"
        elif layer not in moe_layers and rel.startswith(spec.dense_mlp) and quantize_dense:
            kind = "dense"
        out_f, in_f = info.shape
        if kind is None or out_f % ALIGN or in_f % ALIGN or (partial and in_f % partial):
            out.kept_linears.append(name.removesuffix(".weight"))
            if has_scale:
                out.fp8_dequant[name] = name.removesuffix("weight") + SCALE_SUFFIX
            continue
        scale = name.removesuffix("weight") + SCALE_SUFFIX if has_scale else None
        proj_role = None
        if kind == "expert":
            role_of = {proj: r for r, proj in spec.projections.items()}
            proj_role = role_of.get(role.rest.removesuffix(".weight"))
            if proj_role is None:
                raise SurgeryError(f"unexpected expert tensor {name!r} for family {spec.family}", ckpt.directory)
        out.targets[name] = Target(name, out_f, in_f, layer, kind, role.expert if kind == "expert" else None,
                                   proj_role, scale)
        if scale:
            out.consumed.add(scale)
    if partial_groups == "keep":  # "pad" is AutoRound's selection exactly, loadable or not
        _keep_fused_modules_whole(out)
        _keep_whole_expert_layers(model, out)
    for scale in out.fp8_dequant.values():
        out.consumed.add(scale)
    out.kept_linears.sort()
    if not out.targets:
        raise SurgeryError(f"nothing to quantize at group size {group_size}: no attention or expert linear has "
                           f"an input size that is a multiple of it (a partial group loads in no vLLM kernel); "
                           f"choose a --group-size that divides the hidden and intermediate sizes", ckpt.directory)
    return out


def _keep_fused_modules_whole(out: QuantTargets) -> None:
    """vLLM fuses q/k/v (and gate/up of a dense or shared MLP) into one module, quantized or not as a
    whole: if one part stays 16-bit (e.g. k/v with an output that is not a multiple of 32), all do."""
    from surgery.arch.serving_rules import FUSED_PARTS

    def fused(module: str) -> str | None:
        stem, _, part = module.rpartition(".")
        return f"{stem}.{FUSED_PARTS[part]}" if part in FUSED_PARTS else None

    kept = {fused(m) for m in out.kept_linears} - {None}
    for name, t in list(out.targets.items()):
        if t.kind != "expert" and fused(t.module) in kept:
            del out.targets[name]
            out.kept_linears.append(t.module)
            if t.scale:
                out.fp8_dequant[name] = t.scale


def _keep_whole_expert_layers(model: MoEModel, out: QuantTargets) -> None:
    """A layer's routed experts are one module in vLLM, quantized or not as a whole: if any expert
    linear of a layer stays 16-bit, all of them do."""
    kept = {model.layer_of(n) for n in out.kept_linears if model.classify(n + ".weight").kind == "expert"}
    kept.discard(None)
    if not kept:
        return
    for name, t in list(out.targets.items()):
        if t.kind == "expert" and t.layer in kept:
            del out.targets[name]
            out.kept_linears.append(t.module)
            if t.scale:
                out.fp8_dequant[name] = t.scale
    out.kept_expert_layers = set(kept)
