"""Super-expert protection: the CerebrasResearch/reap rule (`--perserve_super_experts` /
`--perserve_outliers`, `reap.model_util.get_super_expert_indices`), computed from saliency.json.

Over the `max_activation` of every expert of every MoE decoder layer (L layers, E experts each:
L * E values), the threshold is

    T = max(quantile(values, 0.995), max(values) / 10)

with the quantile's linear interpolation (numpy's and torch's default, which the reference uses via
`torch.quantile`). An expert whose max activation is strictly above T is protected: its saliency
becomes +inf before the per-layer top-k, so it is never pruned. `super` protects only experts of the
first int(0.75 * L) MoE layers (the threshold still comes from all L, as in the reference);
`outliers` protects them in all L layers. Multi-token-prediction layers (past num_hidden_layers),
which the reference never observes, take no part: they add no values and are never protected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surgery.errors import SurgeryError
from surgery.plan.scores import layer_scores

MODES = ("super", "outliers")
QUANTILE = 0.995
TIMES = 10
SUPER_FRACTION = 0.75


@dataclass
class Protection:
    """Which experts the rule protects, and the numbers that decided it (for plan.json and --summary)."""

    mode: str
    threshold: float
    quantile_value: float
    max_value: float
    considered: list[int]  # the MoE layers whose experts may be protected
    experts: dict[int, dict[int, float]] = field(default_factory=dict)  # layer -> {expert: max activation}

    def record(self) -> dict:
        """The plan's top-level "protect" object (per-layer experts are recorded in each layer's entry)."""
        return {"mode": self.mode, "rule": f"max_activation > max(quantile {QUANTILE}, max / {TIMES})",
                "threshold": self.threshold, "quantile_value": self.quantile_value, "max_value": self.max_value,
                "considered_layers": self.considered}


def max_activations(saliency_layers: dict, layers: list[int], num_experts: int) -> np.ndarray:
    """[L, E] float64 of saliency.json's `max_activation`, in layer order; one-line refusal if absent."""
    rows = [layer_scores(saliency_layers, layer, "max_activation", num_experts,
                         missing=f"--protect needs saliency 'max_activation' with {num_experts} values for MoE "
                                 f"layer {layer} (calibration incomplete or for another model?)")
            for layer in layers]
    return np.asarray(rows, dtype=np.float64).reshape(len(layers), num_experts)


def protected_experts(saliency_layers: dict, moe_layers: list[int], num_experts: int, mode: str) -> Protection:
    """The reference rule over the MoE decoder layers `moe_layers` (ascending)."""
    if mode not in MODES:
        raise SurgeryError(f"unknown --protect {mode!r}; choose one of {', '.join(MODES)}")
    layers = sorted(moe_layers)
    acts = max_activations(saliency_layers, layers, num_experts)
    flat = acts.reshape(-1)
    q = float(np.quantile(flat, QUANTILE)) if flat.size else 0.0
    top = float(flat.max()) if flat.size else 0.0
    threshold = max(q, top / TIMES)
    considered = layers if mode == "outliers" else layers[:int(len(layers) * SUPER_FRACTION)]
    prot = Protection(mode, threshold, q, top, considered)
    for i, layer in enumerate(layers):
        if layer not in considered:
            continue
        hits = {int(e): float(acts[i, e]) for e in np.flatnonzero(acts[i] > threshold)}
        if hits:
            prot.experts[layer] = hits
    return prot
