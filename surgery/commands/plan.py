"""`surgery plan WORK --method M --ratio R`: choose the experts each MoE layer keeps."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.errors import SurgeryError
from surgery.inspect import human_bytes, layer_ranges
from surgery.jsonio import read_json
from surgery.plan import METHODS, make_plan, plan_summary, save_plan


def print_summary(info: dict, console: Console) -> None:
    """Kept experts per layer (grouped when equal), tensor and file bytes before and after."""
    by_count: dict[int, list[int]] = {}
    for layer, n in info["kept"].items():
        by_count.setdefault(n, []).append(layer)
    for n, layers in sorted(by_count.items()):
        console.print(f"keep {n} of {info['num_experts']} experts in MoE layers {layer_ranges(layers)}")
    before, after = info["bytes_before"], info["bytes_after"]
    console.print(f"tensor bytes {human_bytes(before)} -> {human_bytes(after)} "
                  f"({100 * (1 - after / max(before, 1)):.1f}% smaller)")
    console.print(f"output size {human_bytes(info['files_after'])} in {info['shards_after']} shards "
                  f"(input {human_bytes(info['files_before'])})")


@app.command("plan")
def plan_cmd(
    work: Path = typer.Argument(..., help="Work directory holding saliency.json from `surgery calibrate`."),
    method: str = typer.Option(..., "--method", "-m", help=f"Saliency to rank by: {', '.join(METHODS)}."),
    ratio: float = typer.Option(..., "--ratio", "-r", help="Fraction of experts to drop per MoE layer, in [0, 1)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Plan file to write (default WORK/plan.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --method random."),
    drop_mtp: bool = typer.Option(False, "--drop-mtp",
                                  help="Remove multi-token-prediction layers (and set the config's MTP count to 0)."),
    summary: bool = typer.Option(False, "--summary", help="Print kept counts and sizes before and after."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the summary; write no file."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint (default: saliency.json's model_path)."),
) -> None:
    """Keep the E - floor(E * ratio) most salient experts of every MoE layer; write PLAN.json."""
    console = Console(soft_wrap=True)
    sal_path = work / "saliency.json"
    if sal_path.is_file() or method != "random" or model is None:
        saliency = read_json(sal_path, "saliency (run `surgery calibrate` first)")
    else:
        saliency = {}
    model_ref = model or saliency.get("model_path")
    if not model_ref:
        raise SurgeryError("saliency.json names no model_path; pass --model", sal_path)
    with Checkpoint(resolve_model(str(model_ref))) as ckpt:
        moe = MoEModel(ckpt)
        plan = make_plan(saliency, moe, method, ratio, seed=seed, drop_mtp=drop_mtp)
        info = plan_summary(moe, plan)
    if summary or dry_run:
        print_summary(info, console)
    if dry_run:
        return
    path = save_plan(plan, out or work / "plan.json")
    n_keep = next(iter(info["kept"].values()), info["num_experts"])
    console.print(f"plan ({method}, ratio {ratio}): keep {n_keep} of {info['num_experts']} experts in "
                  f"{info['moe_layers']} MoE layers -> {path}")
