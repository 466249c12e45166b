"""`surgery rewrite MODEL PLAN.json --out OUT`: write the pruned checkpoint, streaming; resumable."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from surgery.checkpoint.output import check_paths
from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.humanize import human_bytes
from surgery.lock import directory_lock
from surgery.plan import load_plan
from surgery.rewrite import rewrite_checkpoint


@app.command("rewrite")
def rewrite_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id (local HF cache); read only."),
    plan: Path = typer.Argument(..., help="Plan file from `surgery plan` (possibly edited)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: new, empty, or an interrupted run."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar (stderr)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object on stdout."),
) -> None:
    """Stream MODEL shard by shard into OUT, keeping the plan's experts. Run again to resume."""
    console = Console(stderr=True, soft_wrap=True)
    model_dir, plan_obj = resolve_model(model), load_plan(plan)
    check_paths(model_dir, out)  # OUT is never the model directory, not even for its lock file
    with directory_lock(out):  # first: a second rewrite into OUT is refused naming the one writing it
        summary = rewrite_checkpoint(model_dir, plan_obj, out, progress=progress)
    if as_json:
        print(json.dumps(summary))
    if summary["already_complete"]:
        console.print(f"already complete: {out} (nothing to do)")
        return
    secs = summary["seconds"]
    rate = summary["bytes_written"] / max(secs, 1e-9)
    reused = f", {summary['shards_reused']} verified and reused" if summary["shards_reused"] else ""
    console.print(
        f"wrote {summary['shards_written']} shards{reused}, {human_bytes(summary['bytes_written'])} in "
        f"{secs:.1f} s ({human_bytes(rate)}/s); experts {summary['num_experts']['before']} -> "
        f"{summary['num_experts']['after']}; {human_bytes(summary['input_bytes'])} -> "
        f"{human_bytes(summary['output_bytes'])} -> {out}")
    if summary["shards_dropped"]:
        console.print(f"shards left with no tensors (not written, not in the index): "
                      f"{', '.join(summary['shards_dropped'])}")
    if summary["skipped_files"]:
        console.print(f"[yellow]not copied (weights in another format): "
                      f"{', '.join(summary['skipped_files'])}[/yellow]")

