"""The report's figures (matplotlib, Agg: no display needed): a saliency heatmap with the kept experts
marked, and per-layer fidelity curves by ratio."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MARK_LIMIT = 4096  # cells up to which every kept expert also gets a dot (beyond, the shading alone)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def saliency_heatmap(path: Path, layers: list[int], scores: np.ndarray, kept: np.ndarray | None,
                     method: str, title: str) -> Path:
    """`scores` [layers, experts]; each row is divided by its maximum (saliency scales differ between
    layers, the ranking within a layer is what pruning uses). Dropped experts are shaded dark and, when
    the grid is small enough to see them, kept ones carry a dot."""
    plt = _pyplot()
    n_layers, n_experts = scores.shape
    peak = np.max(np.abs(scores), axis=1, keepdims=True)
    norm = np.divide(scores, peak, out=np.zeros_like(scores, dtype=float), where=peak > 0)
    width = min(18.0, max(6.0, 0.22 * n_experts + 2.5))
    height = min(14.0, max(3.0, 0.32 * n_layers + 1.8))
    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    im = ax.imshow(norm, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    if kept is not None:
        shade = np.where(kept, np.nan, 1.0)
        ax.imshow(shade, aspect="auto", cmap="Greys", alpha=0.65, vmin=0, vmax=1, interpolation="nearest")
        if n_layers * n_experts <= MARK_LIMIT:
            ys, xs = np.nonzero(kept)
            ax.scatter(xs, ys, s=max(4, 200 / max(n_experts, 1)), c="white", marker="o", linewidths=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, n_layers // 24)
    ax.set_yticks(range(0, n_layers, step), [str(layers[i]) for i in range(0, n_layers, step)])
    xstep = max(1, n_experts // 32)
    ax.set_xticks(range(0, n_experts, xstep))
    sub = "kept: bright with a dot; dropped: shaded" if kept is not None and n_layers * n_experts <= MARK_LIMIT \
        else "kept: bright; dropped: shaded" if kept is not None else "no plan: nothing marked"
    ax.set_title(f"{title}\n{method} saliency / layer max ({sub})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01, label=f"{method} (row-normalised)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def fidelity_curves(path: Path, fidelity: dict) -> Path:
    """One panel per ratio: x = MoE layer, y = routed-output relative error, one line per method."""
    plt = _pyplot()
    ratios = list(fidelity["n_keep"])
    layers = sorted(fidelity["layers"], key=int)
    xs = [int(x) for x in layers]
    fig, axes = plt.subplots(1, len(ratios), figsize=(max(6.0, 5.0 * len(ratios)), 4.0), dpi=110, sharey=True,
                             squeeze=False)
    for ax, ratio in zip(axes[0], ratios, strict=True):
        for method in fidelity["methods"]:
            ys = [fidelity["layers"][k][method][ratio] for k in layers]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{method} (mean {np.mean(ys):.3f})")
        ax.set_title(f"ratio {ratio}: keep {fidelity['n_keep'][ratio]} of {fidelity['num_experts']} experts",
                     fontsize=10)
        ax.set_xlabel("MoE layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("||y - y_pruned|| / ||y||")
    fig.suptitle("per-layer fidelity of the routed expert output (lower is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
