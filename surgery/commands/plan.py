"""`surgery plan WORK --method M (--ratio R | --keep N)`: choose the experts each MoE layer keeps."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import Checkpoint
from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.errors import SurgeryError
from surgery.humanize import human_bytes, layer_ranges
from surgery.jsonio import read_json
from surgery.lock import directory_lock
from surgery.plan import PLAN_METHODS, make_plan, save_plan
from surgery.plan.merge import SALIENCIES, outputs_loader
from surgery.plan.protect import MODES
from surgery.rewrite.summary import plan_summary

PROTECT_HELP = ("Never prune super experts (CerebrasResearch/reap's rule): max activation > max(quantile 0.995, "
                "max / 10) over all MoE layers; 'super' protects them in the first 75% of MoE layers, 'outliers' "
                "in all.")


def print_summary(info: dict, console: Console) -> None:
    """Kept experts per layer (grouped when equal), protected and merged experts, bytes before and after."""
    by_count: dict[int, list[int]] = {}
    for layer, n in info["kept"].items():
        by_count.setdefault(n, []).append(layer)
    for n, layers in sorted(by_count.items()):
        console.print(f"keep {n} of {info['num_experts']} experts in MoE layers {layer_ranges(layers)}")
    if "protect" in info:
        p = info["protect"]
        console.print(f"protect {p['mode']}: max activation > {p['threshold']:.6g} = max(quantile 0.995 "
                      f"{p['quantile_value']:.6g}, max {p['max_value']:.6g} / 10), experts of MoE layers "
                      f"{layer_ranges(p['considered_layers']) or 'none'}")
        if not info["protected"]:
            console.print("  no expert is above the threshold: nothing protected")
        for layer, experts in info["protected"].items():
            listed = ", ".join(f"{e} (max activation {v:.6g})" for e, v in experts.items())
            console.print(f"  layer {layer}: protected expert(s) {listed}")
    if "merge" in info:
        merged = sum(len(ds) for groups in info["merge"].values() for ds in groups.values())
        targets = sum(len(groups) for groups in info["merge"].values())
        unmerged = sum(len(v) for v in info["unmerged"].values())
        console.print(f"merge: {merged} dropped experts folded into {targets} kept experts (cosine of mean outputs, "
                      f"frequency-weighted average); {unmerged} dropped without routed tokens, not merged")
        for layer, groups in info["merge"].items():
            text = "; ".join(f"{c} <- {', '.join(map(str, ds))}" for c, ds in groups.items()) or "no groups"
            console.print(f"  layer {layer}: {text}")
    before, after = info["bytes_before"], info["bytes_after"]
    console.print(f"tensor bytes {human_bytes(before)} -> {human_bytes(after)} "
                  f"({100 * (1 - after / max(before, 1)):.1f}% smaller)")
    console.print(f"output size {human_bytes(info['files_after'])} in {info['shards_after']} shards "
                  f"(input {human_bytes(info['files_before'])})")


@app.command("plan")
def plan_cmd(
    work: Path = typer.Argument(..., help="Work directory holding saliency.json from `surgery calibrate`."),
    method: str = typer.Option(..., "--method", "-m", help=f"{', '.join(PLAN_METHODS)} (merge: keep what "
                                                           "--merge-saliency keeps, fold the dropped in)."),
    ratio: float | None = typer.Option(None, "--ratio", "-r", help="Fraction of experts to drop per MoE layer, "
                                                                   "in [0, 1)."),
    keep: int | None = typer.Option(None, "--keep", help="Exact number of experts kept per MoE layer "
                                                         "(instead of --ratio)."),
    multiple_of: int | None = typer.Option(None, "--multiple-of", help="Round the kept count down to a multiple "
                                                                       "of M (and of n_group); refused if that "
                                                                       "leaves fewer than top-k."),
    protect: str | None = typer.Option(None, "--protect", help=PROTECT_HELP),
    merge_saliency: str = typer.Option("reap", "--merge-saliency",
                                       help=f"--method merge: saliency choosing the kept experts "
                                            f"({', '.join(SALIENCIES)})."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Plan file to write (default WORK/plan.json)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --method random."),
    drop_mtp: bool = typer.Option(False, "--drop-mtp",
                                  help="Remove multi-token-prediction layers (and set the config's MTP count to 0)."),
    summary: bool = typer.Option(False, "--summary", help="Print kept, protected and merged experts and sizes."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the summary; write no file."),
    model: str | None = typer.Option(None, "--model", help="Checkpoint (default: saliency.json's model_path)."),
) -> None:
    """Keep the most salient experts of every MoE layer (E - floor(E * ratio), or --keep N, rounded down by
    --multiple-of; --method merge folds the dropped ones into kept ones); write the plan (default
    WORK/plan.json)."""
    console = Console(soft_wrap=True)
    if protect is not None and protect not in MODES:
        raise SurgeryError(f"unknown --protect {protect!r}; choose one of {', '.join(MODES)}")
    target = out or work / "plan.json"
    # the plan's directory (WORK by default) is locked from reading saliency.json to writing the plan;
    # --dry-run writes nothing and takes no lock
    with directory_lock(target.parent, enabled=not dry_run):
        sal_path = work / "saliency.json"
        if sal_path.is_file() or method != "random" or model is None or protect:
            saliency = read_json(sal_path, "saliency (run `surgery calibrate` first)")
        else:
            saliency = {}
        model_ref = model or saliency.get("model_path")
        if not model_ref:
            raise SurgeryError("saliency.json names no model_path; pass --model", sal_path)
        with Checkpoint(resolve_model(str(model_ref))) as ckpt:
            moe = MoEModel(ckpt)
            plan = make_plan(saliency, moe, method, ratio, seed=seed, drop_mtp=drop_mtp, keep=keep,
                             multiple_of=multiple_of, protect=protect, merge_saliency=merge_saliency,
                             outputs=outputs_loader(work) if method == "merge" else None)
            info = plan_summary(moe, plan)
        if summary or dry_run:
            print_summary(info, console)
        if dry_run:
            return
        path = save_plan(plan, target)
        n_keep = next(iter(info["kept"].values()), info["num_experts"])
        how = f"ratio {ratio}" if ratio is not None else f"--keep {keep}"
        console.print(f"plan ({method}, {how}): keep {n_keep} of {info['num_experts']} experts in "
                      f"{info['moe_layers']} MoE layers -> {path}")
