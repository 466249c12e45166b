"""Merge groups for `--method merge`: which kept expert each dropped expert is folded into.

The kept experts are the ones a saliency (`--merge-saliency`, REAP by default, with `--protect` if
asked) keeps. Each dropped expert d joins the kept expert c whose mean output on the calibration
tokens is most similar:

    mean_j = outputs_j / frequency_j     (outputs_j = sum of E_j(x) over the real tokens routed to j,
                                          calibration's WORK/stats/layer_NNNN.outputs.npy)
    c(d)   = argmax over kept c of cos(mean_d, mean_c)    (ties: the lower expert id)

With group-limited routing (n_group > 1) only kept experts of d's own routing group are candidates:
a token that chose d had d's group selected, so the merged expert stays reachable for it.

An expert with frequency 0 (never routed during calibration) has no mean output: if dropped it is
simply dropped (nothing to merge, its weight would be 0 anyway); if kept it is no candidate and stays
as it is. The same holds for a mean output of norm 0. The rewrite then averages each group's weights
with the routed frequencies as weights (`surgery.rewrite.merge`); the plan records both the groups
and the frequencies, so it stays editable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError

SALIENCIES = ("reap", "frequency", "ean", "weighted_frequency")


def outputs_loader(work: str | Path) -> Callable[[int], np.ndarray]:
    """Reads WORK/stats/layer_NNNN.outputs.npy on demand (one layer's [E, H] float64 at a time)."""
    stats = Path(work) / "stats"

    def load(layer: int) -> np.ndarray:
        path = stats / f"layer_{layer:04d}.outputs.npy"
        try:
            return np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise SurgeryError(f"--method merge needs the expert output sums of MoE layer {layer}, which "
                               "calibration writes since this version; calibrate again", path) from None
        except ValueError as exc:
            raise SurgeryError(f"expert output sums do not load: {exc}", path) from None

    return load


def mean_outputs(outputs: np.ndarray, frequency: list[float], layer: int) -> np.ndarray:
    """[E, H] mean expert outputs; rows of never-routed experts are 0 (no mean)."""
    outputs = np.asarray(outputs, dtype=np.float64)
    freq = np.asarray(frequency, dtype=np.float64)
    if outputs.ndim != 2 or outputs.shape[0] != freq.shape[0]:
        raise SurgeryError(f"expert output sums of layer {layer} have shape {list(outputs.shape)}, expected "
                           f"[{freq.shape[0]}, hidden]")
    if not np.all(np.isfinite(outputs)):
        raise SurgeryError(f"expert output sums of layer {layer} hold NaN or inf (calibration diverged?)")
    return np.divide(outputs, freq[:, None], out=np.zeros_like(outputs), where=freq[:, None] > 0)


def merge_groups(means: np.ndarray, frequency: list[float], keep: list[int], n_group: int = 1) -> dict[int, list[int]]:
    """{kept expert: [dropped experts merged into it]} (only non-empty groups, ascending ids)."""
    num_experts = means.shape[0]
    norms = np.linalg.norm(means, axis=1)
    usable = (np.asarray(frequency, dtype=np.float64) > 0) & (norms > 0)
    size = num_experts // max(n_group, 1)
    kept = set(keep)
    groups: dict[int, list[int]] = {}
    for d in range(num_experts):
        if d in kept or not usable[d]:
            continue
        candidates = [c for c in sorted(kept) if usable[c] and (n_group <= 1 or c // size == d // size)]
        if not candidates:
            continue
        cos = [float(means[d] @ means[c] / (norms[d] * norms[c])) for c in candidates]
        best = candidates[max(range(len(candidates)), key=lambda i: (cos[i], -candidates[i]))]
        groups.setdefault(best, []).append(d)
    return dict(sorted(groups.items()))
