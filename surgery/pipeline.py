"""The stages a command strings together: calibration data -> calibrate -> plan -> rewrite -> verify.

Each stage is skipped when its result is already complete (the manifests say so), which is what
makes `surgery prune` resumable as a whole.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rich.console import Console

from surgery.data.inputs import DataOptions, calibration_inputs
from surgery.executor.options import CalibrateOptions
from surgery.humanize import human_bytes

console = Console(stderr=True)


def calibrate(model_dir: Path, work: Path, data: DataOptions, opts: CalibrateOptions) -> dict:
    """WORK's lock first (a second calibrate is refused before it tokenises anything; under torchrun rank 0
    holds it for the job), then the data, then the layer walk."""
    import os

    from surgery.lock import directory_lock
    from surgery.saliency.calibrate import Calibrator

    with directory_lock(work, enabled=os.environ.get("RANK", "0") == "0"):
        inputs = calibration_inputs(model_dir, data)  # first: a missing dataset fails before any model work
        calibrator = Calibrator(model_dir, work, opts)
        saliency = calibrator.run(inputs)
        if calibrator.ranks.main and inputs.categories is not None:
            from surgery.jsonio import write_json_atomic

            write_json_atomic(work / "data.json", {"categories": inputs.categories})
    summary = getattr(calibrator, "summary", None)
    if not calibrator.ranks.main:
        return saliency
    if summary:
        extra = f", peak GPU {summary['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in summary else ""
        console.print(
            f"calibrated {summary['layers']} layers, {summary['tokens']} tokens in {summary['seconds']:.1f} s "
            f"({summary['tokens'] * summary['layers'] / max(summary['seconds'], 1e-9):,.0f} token-layers/s) on "
            f"{summary['device']} ({summary['dtype']}); peak RSS {summary['peak_rss_mb']:.0f} MB{extra}; "
            f"cache {human_bytes(summary['cache_bytes'])} -> {work / 'saliency.json'}")
        console.print(
            f"[dim]routed experts: read {summary['read_s']:.1f} s, to device {summary['transfer_s']:.1f} s, "
            f"dequantise {summary['dequant_s']:.1f} s, compute {summary['compute_s']:.1f} s; layers computed in "
            f"{summary['layer_compute_s']:.1f} s (waiting {summary['load_wait_s']:.1f} s for resident parts); "
            f"memory budget {summary['memory_budget_mb']:.0f} MB "
            f"({'given' if summary['memory_budget_given'] else 'auto'}), "
            f"peak anonymous {summary['peak_anon_mb']:.0f} MB; experts per chunk "
            f"{sorted(set(summary['experts_per_chunk'].values())) or '-'}[/dim]")
    else:
        console.print(f"calibration already complete: {work / 'saliency.json'}")
    return saliency


def prune(model_dir: Path, out: Path, work: Path, data: DataOptions, opts: CalibrateOptions, method: str,
          ratio: float | None, seed: int = 0, progress: bool = True, drop_mtp: bool = False, *,
          keep: int | None = None, multiple_of: int | None = None, protect: str | None = None,
          merge_saliency: str = "reap") -> dict:
    """calibrate -> plan -> rewrite -> verify; returns the verify report. `keep` / `multiple_of` /
    `protect` / `merge_saliency` are `make_plan`'s; an impossible expert count is refused first."""
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.extra_files import checkpoint_extra_files
    from surgery.checkpoint.output import check_paths
    from surgery.checkpoint.reader import Checkpoint
    from surgery.jsonio import read_json, write_json_atomic
    from surgery.lock import directory_lock
    from surgery.plan import check_request, make_plan, plan_file_name
    from surgery.plan.merge import outputs_loader
    from surgery.rewrite import rewrite_checkpoint, verify_checkpoint

    with Checkpoint(model_dir) as ckpt:  # before calibration: an impossible count costs nothing, writes nothing
        check_request(MoEModel(ckpt), method, ratio, keep=keep, multiple_of=multiple_of, protect=protect,
                      merge_saliency=merge_saliency)
        checkpoint_extra_files(ckpt)  # a dangling symlink or a FIFO is refused before calibration, too
    check_paths(model_dir, out)  # OUT is never the model directory, not even for its lock file
    with directory_lock(out), directory_lock(work):  # held by the whole job; each stage takes them again
        saliency = calibrate(model_dir, work, data, opts)
        plan_path = work / plan_file_name(method, ratio, drop_mtp, keep=keep, multiple_of=multiple_of, protect=protect,
                                          merge_saliency=merge_saliency)
        with Checkpoint(model_dir) as ckpt:
            model = MoEModel(ckpt)
            if plan_path.exists():
                plan = read_json(plan_path, "plan")
            else:
                plan = make_plan(saliency, model, method, ratio, seed=seed, drop_mtp=drop_mtp, keep=keep,
                                 multiple_of=multiple_of, protect=protect, merge_saliency=merge_saliency,
                                 outputs=outputs_loader(work) if method == "merge" else None)
                write_json_atomic(plan_path, plan)
            kept = {len(v["keep"]) for v in plan["layers"].values()}
            how = f"ratio {ratio:g}" if ratio is not None else f"--keep {keep}"
            console.print(f"plan: {method} at {how}: keep {sorted(kept)} of {model.num_experts} experts in "
                          f"{len(plan['layers'])} MoE layers -> {plan_path}")
        rewrite_checkpoint(model_dir, plan, out, progress=progress)
        report = verify_checkpoint(out)
        from surgery.report import write_model_card

        evaluation = read_json(work / "eval.json", "evaluation") if (work / "eval.json").is_file() else None
        calibration = read_json(work / "manifest.json", "manifest")
        if (work / "data.json").is_file():
            calibration["categories"] = read_json(work / "data.json", "data report")["categories"]
        write_model_card(out, model_dir, plan, saliency, command="surgery " + shlex.join(sys.argv[1:]),
                         eval=evaluation, calibration=calibration)
        console.print(f"[green]pruned checkpoint verified:[/green] {out} (model card: {out / 'README.md'})")
        return report
