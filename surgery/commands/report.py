"""`surgery report WORK [--plan PLAN.json]`: WORK/report.md, WORK/report.json and figures."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from surgery.cli import app


@app.command("report")
def report_cmd(
    work: Path = typer.Argument(..., help="Work directory of `surgery calibrate` (fidelity.json, eval.json if run)."),
    plan: Path | None = typer.Option(None, "--plan",
                                     help="Plan to show (default WORK/plan.json, or the one WORK/plan-*.json)."),
) -> None:
    """Write WORK/report.md and WORK/report.json: per-layer kept and dropped experts, saliency distributions,
    fidelity and evaluation figures, with a saliency heatmap and fidelity curves (PNG)."""
    from surgery.lock import directory_lock
    from surgery.report.report import build_report

    with directory_lock(work):  # WORK/report.md, report.json and figures
        report = build_report(work, plan)
    err = Console(stderr=True)
    if report.get("plan_note"):
        err.print(f"[yellow]{report['plan_note']}[/yellow]")
    figures = ", ".join(str(work / f) for f in report["figures"].values())
    err.print(f"-> {work / 'report.md'}, {work / 'report.json'}, {figures}")
