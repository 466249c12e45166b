"""The output checkpoint, decided from the input headers and the plan before a byte is written.

For every input shard, its tensors in file order become the output shard's tensors: a kept expert's
tensors are renamed to its new index (every tensor under the expert's prefix follows it: weights,
FP8 `weight_scale_inv`, any scales or zeros), a dropped expert's are left out, router tensors
(weight [E, H] and biases [E]) keep the kept rows in the new order, and everything else is copied
as is. Names, dtypes, shapes and therefore every offset are known here, which is what lets the
writer put the header first and stream the data after it. The walk over shards and tensors is the one
every writing command shares (`surgery.checkpoint.layout.plan_shards`); this module says what each
input tensor becomes.
"""

from __future__ import annotations

from dataclasses import dataclass

from surgery.arch.model import MoEModel, TensorRole
from surgery.checkpoint.layout import OutShard, plan_shards
from surgery.checkpoint.reader import TensorInfo
from surgery.checkpoint.writer import TensorEntry
from surgery.errors import SurgeryError
from surgery.plan.files import kept_map


@dataclass(frozen=True)
class OutTensor:
    """One output tensor and where its bytes come from: a byte copy (`rows is None`) or the listed
    indices of the source's expert axis `axis` (router rows, ERNIE's [1, E] bias, fused [E, ...]
    expert tensors), in that order."""

    entry: TensorEntry
    source: TensorInfo
    rows: tuple[int, ...] | None = None
    axis: int = 0


def _expert_name(model: MoEModel, layer: int, expert: int, rest: str) -> str:
    prefix = model.spec.expert_key.split("{expert}")[0]
    return f"{model.moe_prefix(layer)}{prefix}{expert}.{rest}"


def _router_module_prefix(model: MoEModel, layer: int) -> str:
    """`...gate.`: anything else stored under the router module is something we cannot prune."""
    module = model.spec.router_weight.rpartition(".")[0]
    return model.moe_prefix(layer) + module + "." if module else ""


def check_supported(model: MoEModel, drop_mtp: bool = False) -> None:
    """Refuse checkpoints the rewrite would get wrong, before writing anything."""
    model.check_supported()  # MTP layers: validate_plan requires an entry for each unless dropped
    for layer in model.moe_layers:
        if model.router_weight_name(layer) not in model.ckpt:
            raise SurgeryError(f"MoE layer {layer} has no router weight {model.router_weight_name(layer)!r}",
                               model.ckpt.directory)


def plan_layout(model: MoEModel, plan: dict) -> list[OutShard[OutTensor]]:
    """The output shards (one per input shard, possibly empty) for a validated plan."""
    drop_mtp = bool(plan.get("drop_mtp"))
    check_supported(model, drop_mtp)
    keep = kept_map(plan)
    moe = set(model.prunable_layers(drop_mtp))
    router_prefixes = tuple(p for layer in sorted(moe) if (p := _router_module_prefix(model, layer)))
    where = model.ckpt.directory

    def place(info: TensorInfo) -> list[OutTensor]:
        if drop_mtp and (layer := model.layer_of(info.name)) is not None and layer >= model.num_layers:
            return []  # --drop-mtp: the MTP modules go, and config.json says so
        role = model.classify(info.name)
        if role.kind == "expert":
            return _expert(model, info, role, keep, moe)
        if role.kind in ("router", "fused"):
            return [_rows(model, info, role, keep, moe)]
        if router_prefixes and info.name.startswith(router_prefixes):
            raise SurgeryError(f"tensor {info.name!r} belongs to a router but the architecture table "
                               "does not say how to prune it (quantized router?)", where)
        return [OutTensor(TensorEntry(info.name, info.dtype, info.shape), info)]

    return plan_shards(model.ckpt, place)


def _expert(model: MoEModel, info: TensorInfo, role: TensorRole, keep: dict[int, dict[int, int]],
            moe: set[int]) -> list[OutTensor]:
    """A routed expert's tensor, renamed to the expert's new index, or nothing when the plan drops it."""
    where, num_experts = model.ckpt.directory, model.num_experts
    if role.layer not in moe:
        raise SurgeryError(f"tensor {info.name!r} is an expert's but layer {role.layer} is not a "
                           "MoE layer by config.json", where)
    if not 0 <= role.expert < num_experts:
        raise SurgeryError(f"tensor {info.name!r} names expert {role.expert} but config.json says "
                           f"{num_experts} experts", where)
    if _expert_name(model, role.layer, role.expert, role.rest) != info.name:
        raise SurgeryError(f"cannot renumber tensor {info.name!r} (unexpected name form)", where)
    new = keep[role.layer].get(role.expert)
    if new is None:
        return []
    return [OutTensor(TensorEntry(_expert_name(model, role.layer, new, role.rest), info.dtype, info.shape), info)]


def _rows(model: MoEModel, info: TensorInfo, role: TensorRole, keep: dict[int, dict[int, int]],
          moe: set[int]) -> OutTensor:
    """A router (or fused experts) tensor: the kept experts' slices along its expert axis, in the new order."""
    where, num_experts = model.ckpt.directory, model.num_experts
    if role.layer not in moe:
        raise SurgeryError(f"{role.kind} tensor {info.name!r} is in layer {role.layer}, which is not a "
                           "MoE layer by config.json", where)
    if len(info.shape) <= role.axis or info.shape[role.axis] != num_experts:
        raise SurgeryError(f"{role.kind} tensor {info.name!r} has shape {list(info.shape)}; expected "
                           f"{num_experts} experts along axis {role.axis}", where)
    rows = tuple(sorted(keep[role.layer]))
    shape = list(info.shape)
    shape[role.axis] = len(rows)
    return OutTensor(TensorEntry(info.name, info.dtype, tuple(shape)), info, rows, role.axis)
