"""One MoE layer's saliency statistic read from saliency.json, checked: pruning ranks experts by it and
`--protect` thresholds `max_activation` with it, and both refuse the same malformed input in one line."""

from __future__ import annotations

import math

from surgery.errors import SurgeryError


def layer_scores(layers_in: dict, layer: int, stat: str, num_experts: int, missing: str | None = None) -> list[float]:
    """Layer `layer`'s saliency `stat` as floats, or a one-line refusal saying what is wrong with it
    (`missing`: the caller's own message for an absent statistic or one of the wrong length)."""
    stats = layers_in.get(str(layer))
    if not isinstance(stats, dict) or stat not in stats:
        raise SurgeryError(missing or f"saliency has no {stat!r} statistics for MoE layer {layer} "
                           "(calibration incomplete or for another model?)")
    scores = stats[stat]
    if not isinstance(scores, list) or len(scores) != num_experts:
        raise SurgeryError(missing or f"saliency {stat!r} of layer {layer} has "
                           f"{len(scores) if isinstance(scores, list) else 'no'} values, expected {num_experts}")
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise SurgeryError(f"saliency {stat!r} of layer {layer} holds a non-number") from None
    if any(math.isnan(s) for s in scores):
        raise SurgeryError(f"saliency {stat!r} of layer {layer} holds NaN (calibration diverged?)")
    return scores
