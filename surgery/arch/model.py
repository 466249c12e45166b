"""A checkpoint seen through its family's table entry: which layers are MoE, how many experts, and
what every on-disk tensor is (an expert's, a router's, or anything else)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

from surgery.arch.table import BY_ARCHITECTURE, ArchSpec
from surgery.checkpoint.reader import Checkpoint, TensorInfo
from surgery.errors import SurgeryError


@dataclass(frozen=True)
class TensorRole:
    """What a tensor is to the pruner: `expert` (one expert's tensor: layer, expert), `router` or
    `fused` (an [.., E, ..] tensor of a layer, sliced along `axis` to the kept experts), or `other`."""

    kind: str
    layer: int | None = None
    expert: int | None = None
    rest: str = ""  # the part of the name after the expert index (e.g. "w1.weight_scale_inv")
    axis: int = 0  # the expert axis of a router or fused tensor


def find_spec(config: dict, where: object) -> ArchSpec:
    archs = config.get("architectures") or []
    for arch in archs:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    supported = ", ".join(sorted(BY_ARCHITECTURE))
    raise SurgeryError(f"unsupported architecture {archs or '(none given)'}; supported: {supported}", where)


class MoEModel:
    """Architecture facts about one checkpoint, from `config.json`, the table and the headers."""

    def __init__(self, ckpt: Checkpoint, check: bool = True) -> None:
        """`check`: refuse, in one line, a checkpoint that disagrees with itself (index vs shards, shapes
        vs config.json, quantization, routing fields; `surgery.arch.consistency`) before any weight is
        read. Every command opens checkpoints through here; only `inspect` (which reports the problems)
        and `verify` (which names the failed rule) pass False and call the check themselves."""
        self.ckpt = ckpt
        if not ckpt.config:
            raise SurgeryError("config.json is missing or empty", ckpt.config_path)
        self.spec = find_spec(ckpt.config, ckpt.config_path)
        spec, cfg = self.spec, ckpt.config
        self.experts_key = next((k for k in spec.num_experts_keys if k in cfg), spec.num_experts_keys[0])
        try:
            self.num_layers = int(cfg[spec.num_layers_key])
        except (KeyError, TypeError, ValueError):
            raise SurgeryError(f"config has no valid {spec.num_layers_key!r}", ckpt.config_path) from None
        try:
            self.num_experts = int(self.cfg_value(self.experts_key) or self.cfg_value("num_local_experts"))
            self.top_k = int(self.cfg_value(spec.top_k_key) or self.cfg_value("num_experts_per_tok"))
        except (TypeError, ValueError):
            raise SurgeryError(f"config has no valid expert count ({self.experts_key}) or top-k "
                               f"({spec.top_k_key})", ckpt.config_path) from None
        layer_re = re.escape(spec.layer_prefix).replace(r"\{layer\}", r"(\d+)")
        self._layer_re = re.compile("^" + layer_re)
        moe_re = layer_re + re.escape(spec.moe_disk + ".")
        expert_re = re.escape(spec.expert_key.split("{expert}")[0])
        self._expert_re = re.compile(f"^{moe_re}{expert_re}(\\d+)\\.(.+)$")
        router_names = "|".join(re.escape(n) for n in (spec.router_weight, *spec.router_biases))
        self._router_re = re.compile(f"^{moe_re}(?:{router_names})$")
        self._bias_re = re.compile(f"^{moe_re}(?:{'|'.join(re.escape(n) for n in spec.router_biases) or '$^'})$")
        fused = "|".join(re.escape(n) for n in spec.fused_on_disk) or "$^"
        self._fused_re = re.compile(f"^{moe_re}(?:{fused})$")
        if check:
            from surgery.arch.consistency import check_consistency

            check_consistency(self)

    def problems(self) -> list:
        """Every consistency problem of this checkpoint (`surgery.arch.rules.problem.Problem`s)."""
        from surgery.arch.consistency import find_problems

        return find_problems(self)

    @cached_property
    def hf_config(self):
        """The transformers config (defaults and attribute maps applied), read from config.json only."""
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.ckpt.directory, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            detail = " ".join(str(exc).split())  # one line: some transformers messages span several
            raise SurgeryError(f"transformers cannot read this config: {detail}", self.ckpt.config_path) from None

    # ---------------------------------------------------------------- layers
    def cfg_value(self, key: str | None, default=None):
        """A config value: as config.json states it, else transformers' default for the family.

        Reading config.json first means header-only commands (inspect, plan, verify) need not import
        transformers' config classes, which import torch (~220 MB); the transformers config is only
        consulted for keys the file leaves out."""
        if key is None:
            return default
        value = self.ckpt.config.get(key)
        if value is None:
            value = getattr(self.hf_config, key, None)
        return default if value is None else value

    @cached_property
    def moe_layers(self) -> list[int]:
        spec = self.spec
        first_dense = int(self.cfg_value(spec.first_dense_key, 0))
        mlp_only = set(self.cfg_value(spec.mlp_only_key, []) or [])
        step = int(self.cfg_value(spec.sparse_step_key, 1) or 1)
        start = int(self.cfg_value(spec.start_key, 0))
        end = int(self.cfg_value(spec.end_key, self.num_layers - 1))
        end = self.num_layers - 1 if end < 0 else end
        return [
            i for i in range(self.num_layers)
            if first_dense <= i and start <= i <= end and i not in mlp_only and (i + 1) % step == 0
        ]

    def layer_prefix(self, layer: int) -> str:
        return self.spec.layer_prefix.format(layer=layer)

    def moe_prefix(self, layer: int) -> str:
        return self.layer_prefix(layer) + self.spec.moe_disk + "."

    def router_weight_name(self, layer: int) -> str:
        return self.moe_prefix(layer) + self.spec.router_weight

    def router_bias_names(self, layer: int) -> list[str]:
        names = [self.moe_prefix(layer) + b for b in self.spec.router_biases]
        return [n for n in names if n in self.ckpt]

    def expert_tensor_name(self, layer: int, expert: int, role: str, suffix: str = "weight") -> str:
        proj = self.spec.projections[role]
        return self.moe_prefix(layer) + self.spec.expert_key.format(expert=expert, proj=proj) + "." + suffix

    def layer_tensors(self, layer: int) -> list[TensorInfo]:
        prefix = self.layer_prefix(layer)
        return [t for n, t in self.ckpt.tensors.items() if n.startswith(prefix)]

    # ---------------------------------------------------------------- classification
    def classify(self, name: str) -> TensorRole:
        m = self._expert_re.match(name)
        if m:
            return TensorRole("expert", int(m.group(1)), int(m.group(2)), m.group(3))
        m = self._router_re.match(name)
        if m:
            axis = self.spec.router_bias_axis if self._bias_re.match(name) else 0
            return TensorRole("router", int(m.group(1)), axis=axis)
        m = self._fused_re.match(name)
        if m:
            return TensorRole("fused", int(m.group(1)))
        return TensorRole("other")

    def check_supported(self) -> None:
        """Refuse, in one line, a variant of a known family that we cannot operate on."""
        if not self.spec.mtp_key and (beyond := self._expert_layers_beyond()):
            raise SurgeryError(f"layer(s) {beyond} past num_hidden_layers ({self.num_layers}) hold routed experts "
                               f"(MTP modules?), but the {self.spec.family} table entry has no MTP layout: refusing "
                               "rather than writing experts that disagree with config.json", self.ckpt.directory)
        for suffix, why in self.spec.unsupported_suffixes:
            hit = next((n for n in self.ckpt.tensors if n.endswith(suffix)), None)
            if hit is not None:
                raise SurgeryError(f"{self.spec.family}: {why} (tensor {hit!r})", self.ckpt.directory)

    def layer_of(self, name: str) -> int | None:
        """The decoder-layer index a tensor belongs to, or None (embeddings, final norm, head)."""
        m = self._layer_re.match(name)
        return int(m.group(1)) if m else None

    def beyond_layers(self) -> list[int]:
        """Layer indices stored in the checkpoint at or past num_hidden_layers (MTP modules)."""
        found = {i for n in self.ckpt.tensors if (i := self.layer_of(n)) is not None}
        return sorted(i for i in found if i >= self.num_layers)

    def prunable_layers(self, drop_mtp: bool = False) -> list[int]:
        """Layers whose routed experts a plan covers: the MoE decoder layers, then the MTP layers
        (unless they are being dropped)."""
        return self.moe_layers + ([] if drop_mtp else self.mtp_expert_layers())

    def _expert_layers_beyond(self) -> list[int]:
        return sorted({r.layer for n in self.ckpt.tensors
                       if (r := self.classify(n)).kind in ("expert", "fused") and r.layer >= self.num_layers})

    def mtp_expert_layers(self) -> list[int]:
        """MTP layers (past num_hidden_layers) whose MoE holds routed experts, for families whose MTP
        layout the table knows (`mtp_key`); `check_supported` refuses such layers in other families."""
        return self._expert_layers_beyond() if self.spec.mtp_key else []

    def routing_facts(self) -> dict:
        r = self.spec.routing
        renorm = r.renormalize if isinstance(r.renormalize, bool) else bool(self.cfg_value(r.renormalize, False))
        facts = {"scoring": r.scoring, "bias_for_choice": r.bias_for_choice, "renormalize": renorm,
                 "routed_scaling_factor": float(self.cfg_value(r.scaling_key, 1.0))}
        if r.group_keys:
            facts["n_group"] = int(self.cfg_value(r.group_keys[0], 1) or 1)
            facts["topk_group"] = int(self.cfg_value(r.group_keys[1], 1) or 1)
        return facts

    def min_experts_to_keep(self) -> int:
        """The fewest experts per layer that can still fill the top-k. What group-limited routing
        additionally needs (equal groups of at least 2) is `surgery.plan.counts.routing_problem`'s."""
        return self.top_k
