"""How numbers read to people: byte counts and lists of layer (or expert) ids.

At the bottom of the dependency order (with `errors` and `jsonio`) because every layer words its
messages with them: the consistency rules, the plan's refusals, the rewrite's free-space check, the
reports and the commands. Which layers a checkpoint has is the architecture's fact
(`surgery.arch.model.MoEModel`: `moe_layers`, `mtp_expert_layers`, `beyond_layers`); this module only
writes such a list down."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n}"


def layer_ranges(layers: list[int]) -> str:
    """[0,1,2,5] -> '0-2, 5' (sorted ids in; also used for expert ids)."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out) or "none"
