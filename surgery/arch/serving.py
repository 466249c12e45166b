"""Which `vllm serve` settings load a checkpoint, from config.json and the safetensors headers alone.

Why: vLLM is where surgery's outputs are served, and most of what makes a load fail is decided by
shapes and names before a weight is read: a tensor-parallel degree that splits an FP8 block or a
W4A16 group, a quantization config whose module names vLLM does not match, a linear whose stored form
(packed, plain, FP8) is not the one the loader builds. Checking that here lets `verify` fail an output
no loader can read and lets the model card print settings that work instead of a fixed
`--tensor-parallel-size 8`. The rules are vLLM's (`surgery.arch.serving_rules`, with where each was
read); `just serve-check` loads small outputs in a real vLLM to keep them honest.

What is checked, for TP 1/2/4/8, with and without `--enable-expert-parallel`:
- names: every linear of the decoder layers maps to a vLLM module (fused q/k/v and gate/up, one fused
  MoE per layer) and is stored as vLLM's AutoRound loader will build it (both resolution forms of
  `serving_rules.RESOLVERS`), fused parts agree, every routed expert has the same form;
- shapes: heads, intermediate sizes, FP8 blocks and W4A16 groups divide per rank.
Every expert being present and every shape agreeing with config.json is `surgery.arch.consistency`'s.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from surgery.arch import serving_rules as R

if TYPE_CHECKING:
    from surgery.arch.model import MoEModel

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class Linear:
    """One checkpoint linear as vLLM sees it: its vLLM module (fused where vLLM fuses), how it is split,
    how it is stored, and its logical [out, in]."""

    name: str  # on-disk module name
    vllm: str  # vLLM module name (the fused one for q/k/v, gate/up, experts)
    split: str  # "column", "row", "replicated", or "expert-column" / "expert-row"
    form: str  # "packed", "fp8" or "plain"
    out: int
    inp: int
    part: str = ""  # the checkpoint name's last part (q_proj, w1, ...)


@dataclass(frozen=True)
class Setting:
    """One `vllm serve` setting and whether it loads; why not, and what it runs on, in words."""

    tp: int
    expert_parallel: bool
    ok: bool
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def flags(self) -> str:
        return f"--tensor-parallel-size {self.tp}" + (" --enable-expert-parallel" if self.expert_parallel else "")


@dataclass
class ServingReport:
    precision: str  # "bf16" (any plain float), "fp8" or "w4a16"
    name_problems: list[str] = field(default_factory=list)
    settings: list[Setting] = field(default_factory=list)

    def loads(self, tp: int, expert_parallel: bool = False) -> bool:
        return any(s.ok for s in self.settings if s.tp == tp and s.expert_parallel == expert_parallel)

    def working(self) -> list[Setting]:
        """Settings that load: each TP degree plainly where it can, else with expert parallelism."""
        out = []
        for tp in R.TP_DEGREES:
            plain = self._get(tp, False)
            if plain.ok:
                out.append(plain)
            elif self._get(tp, True).ok:
                out.append(self._get(tp, True))
        return out

    def _get(self, tp: int, ep: bool) -> Setting:
        return next(s for s in self.settings if s.tp == tp and s.expert_parallel == ep)

    def summary_lines(self) -> list[str]:
        """One line per TP degree: loads, loads only with expert parallelism (and why), or not (why)."""
        if self.name_problems:
            more = f" ({len(self.name_problems) - 1} more)" if len(self.name_problems) > 1 else ""
            return [f"vLLM cannot load it at any setting: {self.name_problems[0]}{more}"]
        lines = []
        for tp in R.TP_DEGREES:
            plain, ep = self._get(tp, False), self._get(tp, True)
            notes = "; ".join(plain.notes if plain.ok else ep.notes)
            if plain.ok:
                lines.append(f"TP {tp}: loads" + (f" ({notes})" if notes else ""))
            elif ep.ok:
                lines.append(f"TP {tp}: not with tensor parallelism alone ({plain.reasons[0]}); loads with "
                             "--enable-expert-parallel" + (f" ({notes})" if notes else ""))
            else:
                lines.append(f"TP {tp}: does not load ({(plain.reasons or ep.reasons)[0]})")
        return lines

    def to_dict(self) -> dict:
        return {"precision": self.precision, "name_problems": self.name_problems,
                "settings": [{"tensor_parallel_size": s.tp, "enable_expert_parallel": s.expert_parallel,
                              "ok": s.ok, "reasons": list(s.reasons), "notes": list(s.notes)}
                             for s in self.settings]}


# ---------------------------------------------------------------------------------------------- linears
def vllm_name(family: str, name: str) -> str:
    for disk, vllm in R.VLLM_RENAMES.get(family, ()):
        name = name.replace(disk, vllm)
    return name


def linears(model: MoEModel) -> list[Linear]:
    """Every 2-D linear (plain, FP8 or packed) of the decoder layers, as vLLM groups and splits it."""
    ckpt, spec = model.ckpt, model.spec
    family = spec.family
    out: list[Linear] = []
    for name, info in ckpt.tensors.items():
        stem, _, suffix = name.rpartition(".")
        layer = model.layer_of(name)
        if layer is None or layer >= model.num_layers:
            continue  # MTP layers are vLLM's speculative modules (or skipped), not the served model
        if suffix == "qweight" and len(info.shape) == 2:
            form, out_f, in_f = "packed", info.shape[1], info.shape[0] * 8
        elif suffix == "weight" and len(info.shape) == 2 and stem + ".qweight" not in ckpt.tensors:
            form, (out_f, in_f) = ("fp8" if info.dtype in FP8_DTYPES else "plain"), info.shape
        else:
            continue
        part = stem.rsplit(".", 1)[-1]
        role = model.classify(stem + ".weight" if form == "packed" else name)
        if role.kind == "expert":
            projection = role.rest.split(".")[0]
            experts = model.moe_prefix(layer) + spec.expert_key.split(".{expert}")[0]
            split = "expert-row" if projection in R.ROW_PARALLEL else "expert-column"
            out.append(Linear(stem, vllm_name(family, experts), split, form, out_f, in_f, projection))
            continue
        if role.kind in ("router", "fused"):
            split = "replicated"
        elif part in R.ROW_PARALLEL:
            split = "row"
        elif part in R.REPLICATED:
            split = "replicated"
        else:
            split = "column"
        fused = stem[: -len(part)] + R.FUSED_PARTS[part] if part in R.FUSED_PARTS else stem
        out.append(Linear(stem, vllm_name(family, fused), split, form, out_f, in_f, part))
    return out


# ---------------------------------------------------------------------------------------------- names
def resolve_bits(qcfg: dict, module: str, parts: list[str], experts: bool, how: dict) -> int | str:
    """The bits vLLM's AutoRound loader gives `module` (a vLLM module name; `parts` the vLLM names of a
    fused module's parts), or a string saying why it refuses. `how`: one of `serving_rules.RESOLVERS`."""
    extra = qcfg.get("extra_config") or {}
    bits = int(qcfg.get("bits", 4))
    blocks = qcfg.get("block_name_to_quantize")
    if isinstance(blocks, str):
        blocks = [b.strip() for b in blocks.split(",") if b.strip()]

    def explicit(name: str) -> dict | None:
        for key in (name, f"model.{name}"):
            if isinstance(extra.get(key), dict):
                return extra[key]
        if how["suffix"]:
            hit = next((v for k, v in extra.items() if name.endswith(f".{k}") and isinstance(v, dict)), None)
            if hit is not None:
                return hit
        if how["regex"]:
            for key, value in extra.items():
                if isinstance(key, str) and any(c in R.REGEX_CHARS for c in key) and isinstance(value, dict):
                    try:
                        if re.search(key, name):
                            return value
                    except re.error:
                        continue
        return None

    quantized = not blocks or any(module.startswith(b) for b in blocks)

    def of(name: str) -> int:
        cfg = explicit(name)
        return int(cfg.get("bits", bits if quantized else 16)) if cfg is not None else (bits if quantized else 16)

    own = explicit(module)
    if own is not None:
        return of(module)
    if experts and how["moe_subkeys"]:
        found = {int(v.get("bits", bits if quantized else 16)) for k, v in extra.items()
                 if isinstance(v, dict) and k.startswith(module)}
        if len(found) > 1:
            return f"extra_config gives the parts of fused MoE {module!r} different bits ({sorted(found)})"
        if found:
            return found.pop()
    if parts and any(explicit(p) is not None for p in parts):
        found = {of(p) for p in parts}
        if len(found) > 1:
            return f"extra_config gives the parts of fused module {module!r} different bits ({sorted(found)})"
        return found.pop()
    return bits if quantized else 16


def name_problems(model: MoEModel, items: list[Linear]) -> list[str]:
    """Every fused module stored in one form, and (W4A16) the form vLLM's loader builds it in."""
    qcfg = model.ckpt.config.get("quantization_config") or {}
    w4a16 = str(qcfg.get("quant_method", "")).lower().replace("_", "-") == "auto-round"
    groups: dict[str, list[Linear]] = defaultdict(list)
    for lin in items:
        groups[lin.vllm].append(lin)
    out = []
    for module, members in groups.items():
        forms = sorted({m.form for m in members})
        if len(forms) > 1:
            example = {f: next(m.name for m in members if m.form == f) for f in forms}
            out.append(f"vLLM module {module!r} fuses linears stored in different forms "
                       f"({', '.join(f'{f}: {n!r}' for f, n in example.items())}); it needs one form for all")
            continue
        if not w4a16 or members[0].split == "replicated":
            continue  # routers and gates are built unquantized whatever the config says
        experts = members[0].split.startswith("expert")
        parts = sorted({module.rsplit(".", 1)[0] + "." + m.part for m in members}) if not experts else []
        if not experts and len(parts) == 1 and parts[0] == module:
            parts = []
        for label, how in R.RESOLVERS.items():
            bits = resolve_bits(qcfg, module, [vllm_name(model.spec.family, p) for p in parts], experts, how)
            if isinstance(bits, str):
                out.append(f"{label}: {bits}")
                continue
            want = "packed" if bits < 16 else "plain"
            if forms[0] != want:
                out.append(f"{label} builds {module!r} {bits}-bit (quantization_config extra_config / "
                           f"block_name_to_quantize) but {members[0].name!r} is stored {forms[0]}; expected "
                           f"it {want}, or the module named in extra_config under vLLM's name")
                break
    return out


# ---------------------------------------------------------------------------------------------- shapes
def _fp8_block(config: dict) -> tuple[int, int]:
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def _group(config: dict) -> int:
    return int((config.get("quantization_config") or {}).get("group_size", 128))


def _attention(model: MoEModel, tp: int) -> list[str]:
    heads = model.cfg_value("num_attention_heads")
    kv = model.cfg_value("num_key_value_heads") or heads
    why = []
    if heads and heads % tp:
        why.append(f"{heads} attention heads do not divide by TP {tp}")
    if kv and (kv % tp if kv >= tp else tp % kv):
        why.append(f"{kv} key/value heads neither divide by TP {tp} nor divide it")
    return why


def _per_rank(lin: Linear, tp: int, model: MoEModel) -> list[tuple[int, int]]:
    """[(out, in)] per rank of each part of a linear at TP `tp` (q/k/v by heads, with k/v replicated)."""
    if lin.split == "replicated":
        return [(lin.out, lin.inp)]
    if lin.split == "row":
        return [(lin.out, lin.inp // tp)]
    if lin.part in ("k_proj", "v_proj"):
        kv = model.cfg_value("num_key_value_heads") or model.cfg_value("num_attention_heads")
        return [(lin.out // kv * max(1, kv // tp), lin.inp)] if kv else [(lin.out // tp, lin.inp)]
    return [(lin.out // tp, lin.inp)]


def _linear_rules(lin: Linear, tp: int, model: MoEModel, fp8: tuple[int, int], group: int) -> tuple[list, list]:
    why, notes = [], []
    if lin.split == "row" and lin.inp % tp:
        return [f"{lin.name} input {lin.inp} does not divide by TP {tp}"], notes
    if lin.split == "column" and lin.part not in ("k_proj", "v_proj") and lin.out % tp:
        return [f"{lin.name} output {lin.out} does not divide by TP {tp}"], notes
    for out_t, in_t in _per_rank(lin, tp, model):
        if lin.form == "fp8":
            bn, bk = fp8
            split = tp > 1 and lin.split != "replicated"
            if split and lin.split == "column" and out_t % bn:
                why.append(f"{lin.name} output per rank {out_t} is not a multiple of the FP8 block {bn}")
            if split and lin.split == "row" and in_t % bk:
                why.append(f"{lin.name} input per rank {in_t} is not a multiple of the FP8 block {bk}")
        elif lin.form == "packed":
            if group > 0 and in_t % group:
                why.append(f"{lin.name} input per rank {in_t} is not a multiple of the W4A16 group {group}")
            elif out_t % R.MARLIN_MIN_N or in_t % R.MARLIN_MIN_K:
                notes.append(f"{lin.name.rsplit('.', 1)[-1]} on the GPTQ kernel (Marlin needs out % "
                             f"{R.MARLIN_MIN_N} and in % {R.MARLIN_MIN_K} per rank)")
    return why, notes


def _expert_rules(members: list[Linear], moe_tp: int, fp8: tuple[int, int], group: int) -> tuple[list, list]:
    """The fused MoE of one layer at `moe_tp` ranks splitting the intermediate size (1 with EP)."""
    up = next((m for m in members if m.split == "expert-column"), None)
    if up is None:
        return [], []
    hidden, inter = up.inp, up.out
    form = members[0].form
    if inter % moe_tp:
        return [f"expert intermediate {inter} does not divide by TP {moe_tp}"], []
    i_t = inter // moe_tp
    if form == "fp8":
        bn, bk = fp8
        if i_t % bn or (moe_tp > 1 and i_t % bk):
            return [f"expert intermediate {inter} / TP {moe_tp} = {i_t} is not a multiple of the FP8 block "
                    f"{bn if i_t % bn else bk}"], []
    if form != "packed":
        return [], []
    if group > 0 and (hidden % group or inter % group):
        return [f"expert input size {hidden if hidden % group else inter} is not a multiple of the W4A16 group "
                f"{group} (a partial group: no vLLM MoE kernel sizes its scales)"], []
    if hidden % R.MOE_MARLIN_HIDDEN == 0 and group in R.MARLIN_GROUPS and i_t % max(64, group) == 0:
        return [], []
    g = group
    while g >= R.MOE_WNA16_MIN_GROUP and (i_t % g or hidden % g):
        g //= 2
    if g < R.MOE_WNA16_MIN_GROUP:
        return [f"expert intermediate per rank {i_t} fits neither Marlin nor moe_wna16 (group {group})"], []
    return [], ["experts on moe_wna16" + (f", group {group} -> {g}" if g != group else "")
                + f" (Marlin needs the intermediate per rank {i_t} to be a multiple of {max(64, group)})"]


def _setting(model: MoEModel, items: list[Linear], tp: int, ep: bool) -> Setting:
    config = model.ckpt.config
    fp8, group = _fp8_block(config), _group(config)
    why, notes = _attention(model, tp), []
    experts: dict[str, list[Linear]] = defaultdict(list)
    for lin in items:
        if lin.split.startswith("expert"):
            experts[lin.vllm].append(lin)
            continue
        w, n = _linear_rules(lin, tp, model, fp8, group)
        why += w
        notes += n
    if ep and model.num_experts < tp:
        why.append(f"{model.num_experts} experts cannot be spread over {tp} ranks")
    for members in experts.values():
        w, n = _expert_rules(members, 1 if ep else tp, fp8, group)
        why += w
        notes += n
    return Setting(tp, ep, not why, tuple(dict.fromkeys(why)), tuple(dict.fromkeys(notes)))


def serving_report(model: MoEModel) -> ServingReport:
    """The settings at which vLLM loads this checkpoint (headers and config.json only)."""
    items = linears(model)
    forms = {lin.form for lin in items}
    precision = "w4a16" if "packed" in forms else "fp8" if "fp8" in forms else "bf16"
    report = ServingReport(precision, name_problems(model, items))
    for tp in R.TP_DEGREES:
        for ep in (False, True):
            setting = _setting(model, items, tp, ep)
            if report.name_problems:
                setting = Setting(tp, ep, False, (report.name_problems[0], *setting.reasons), setting.notes)
            report.settings.append(setting)
    return report
