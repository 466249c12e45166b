"""`surgery inspect MODEL [--json]`."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.humanize import human_bytes, layer_ranges
from surgery.inspect import summarize


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id (from the local HF cache)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What is in a checkpoint and what pruning would do to it; reads headers only, no weights. Problems
    that other commands would refuse the checkpoint for are listed, not refused."""
    with Checkpoint(resolve_model(model)) as ckpt:
        info = summarize(MoEModel(ckpt, check=False))
    if as_json:
        print(json.dumps(info, indent=2))
        return
    t = Table(show_header=False, box=None)
    rows = [
        ("architecture", f"{info['architecture']} (family {info['family']})"),
        ("layers", f"{info['num_layers']}"
         + (f" (+ stored beyond: {info['extra_layers']})" if info["extra_layers"] else "")),
        ("MoE layers", f"{layer_ranges(info['moe_layers'])} ({len(info['moe_layers'])})"),
        ("experts per MoE layer", f"{info['num_experts']} (config key {info['num_experts_key']})"),
        ("top-k", str(info["experts_per_token"])),
        ("routing", ", ".join(f"{k}={v}" for k, v in info["routing"].items())),
        ("dtypes", ", ".join(f"{k} {human_bytes(v)}" for k, v in info["dtypes"].items())),
        ("quantization", json.dumps(info["quantization"]) if info["quantization"] else "none"),
        ("shards / tensors", f"{info['shards']} / {info['tensors']}"),
        ("total", human_bytes(info["total_bytes"])),
        ("routed experts", f"{human_bytes(info['expert_bytes'])} "
                           f"({100 * info['expert_bytes'] / max(1, info['total_bytes']):.1f}%)"),
    ]
    for r, size in info["pruned_bytes"].items():
        rows.append((f"after pruning {float(r):.0%}", f"{human_bytes(size)} "
                     f"({info['experts_kept'][r]} experts per layer)"))
    for r, size in (info.get("w4a16_bytes") or {}).items():
        label = f"after pruning {float(r):.0%} + W4A16" if float(r) else "after W4A16"
        rows.append((label, human_bytes(size)))
    problems = info["problems"]
    rows.append(("consistency", "OK (index, shapes, dtypes, quantization and routing agree with config.json)"
                 if not problems else f"[red]{len(problems)} problem(s): other commands refuse this checkpoint[/red]"))
    for k, v in rows:
        t.add_row(f"[bold]{k}[/bold]", v)
    console = Console(soft_wrap=True)
    console.print(t)
    for p in problems:
        console.print(f"[red]problem[/red] ({p['rule']}): {escape(p['message'])}", highlight=False)
