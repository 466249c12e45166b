"""`surgery fidelity WORK --ratios 0.25,0.5 [--methods reap,frequency,ean,random]`.

A separate command over a finished calibration rather than `calibrate --fidelity`: a layer's kept set
is only known once every calibration token has passed that layer, so measuring it inside calibration
means running each layer twice anyway; as its own command it also works on any existing WORK, for
any methods and ratios, without recalibrating.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.errors import SurgeryError


def parse_list(text: str, what: str, cast=str) -> list:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [cast(t) for t in items]
    except ValueError:
        raise SurgeryError(f"--{what} must be a comma-separated list, got {text!r}") from None
    if not values:
        raise SurgeryError(f"--{what} is empty")
    return list(dict.fromkeys(values))


@app.command("fidelity")
def fidelity_cmd(
    work: Path = typer.Argument(..., help="Work directory of a finished `surgery calibrate`."),
    ratios: str = typer.Option("0.25,0.5", "--ratios", help="Comma-separated pruning ratios."),
    methods: str = typer.Option("reap,frequency,ean,random", "--methods",
                                help="Comma-separated methods (reap, frequency, ean, weighted_frequency, random)."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint (default: saliency.json's model_path)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --methods random."),
    device: str = o.DEVICE,
    memory_budget: str | None = o.MEMORY_BUDGET,
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Per-layer ||y - y_pruned|| / ||y|| of every MoE block's routed output for each method and
    ratio, on the calibration tokens, with the router restricted to the kept experts as in the pruned
    checkpoint. Uses the hidden states a `--keep-hidden` calibration kept, and recomputes any that
    are missing by streaming. Writes WORK/fidelity.json."""
    from surgery.eval.fidelity import run_fidelity
    from surgery.lock import directory_lock

    with directory_lock(work):  # WORK/fidelity/ scratch and WORK/fidelity.json
        out = run_fidelity(work, parse_list(methods, "methods"), parse_list(ratios, "ratios", float),
                           resolve_model(model) if model else None, device=device, seed=seed,
                           progress=not no_progress, memory_budget=o.memory_bytes(memory_budget))
    table = Table(title=f"routed-output relative error ({out['hidden_source']} hidden states, "
                        f"{out['tokens']:,} tokens)")
    table.add_column("layer")
    cols = [(m, r) for r in out["n_keep"] for m in out["methods"]]
    for m, r in cols:
        table.add_column(f"{m} {r}", justify="right")
    for layer, per in out["layers"].items():
        table.add_row(layer, *(f"{per[m][r]:.4f}" for m, r in cols))
    table.add_row("mean", *(f"{out['mean'][m][r]:.4f}" for m, r in cols), style="bold")
    Console(soft_wrap=True).print(table)
    Console(stderr=True).print(f"-> {work / 'fidelity.json'}")
