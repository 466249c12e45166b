"""`surgery quantize MODEL --out OUT --scheme w4a16 [--method rtn|gptq|autoround]`: W4A16 in AutoRound's
auto_gptq packing, streamed shard by shard (RTN) or layer by layer (GPTQ, AutoRound's tuned SignRound);
resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.errors import SurgeryError

SCHEMES = ("w4a16",)
METHODS = ("rtn", "gptq", "autoround")
ITERS = typer.Option(200, "--iters", help="autoround: tuning steps per layer (AutoRound's default 200).")
LR = typer.Option(None, "--lr", help="autoround: learning rate of the rounding offsets and the scale range "
                  "(default 1 / iters, as AutoRound).")


def check_quant_options(scheme: str, method: str, group_size: int, iters: int = 200, lr: float | None = None,
                        batch_size: int = 8) -> None:
    """Bad options fail in one line before any model work."""
    if iters < 1 or (lr is not None and not lr > 0) or batch_size < 1:
        raise SurgeryError(f"--iters and --batch-size must be at least 1 and --lr positive (got --iters {iters}, "
                           f"--lr {lr}, --batch-size {batch_size})")
    if scheme.lower() not in SCHEMES:
        raise SurgeryError(f"unknown --scheme {scheme!r} (supported: {', '.join(SCHEMES)})")
    if method not in METHODS:
        raise SurgeryError(f"unknown --method {method!r} (use rtn, gptq or autoround)")
    if group_size < 32 or group_size % 32:
        raise SurgeryError(f"--group-size must be a positive multiple of 32, got {group_size}")


@app.command("quantize")
def quantize_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id (bf16/fp32, or FP8 block-scaled)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: new, empty, or an interrupted run."),
    scheme: str = typer.Option("w4a16", "--scheme", help="Quantization scheme (w4a16)."),
    method: str = typer.Option("rtn", "--method", help="rtn (AutoRound's RTN, bit for bit), gptq (calibrated) or "
                                                       "autoround (AutoRound's tuned rounding, SignRound)."),
    group_size: int = typer.Option(128, "--group-size", help="Inputs per scale group."),
    quantize_dense: bool = typer.Option(False, "--quantize-dense", help="Also quantize dense layers' MLPs."),
    work: Path | None = typer.Option(None, "--work", "-w", help="GPTQ work directory (default: OUT.quant-work beside "
                                                                    "OUT)."),
    dataset: list[str] = o.DATASET,
    samples: int = typer.Option(64, "--samples", "--nsamples",
                                help="Documents per dataset (with --pack: rows of --max-length tokens)."),
    max_length: int = typer.Option(512, "--max-length", "--seqlen", help="Tokens per sequence (truncation)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward batch (autoround: also rows "
                                                           "per tuning step, AutoRound's batch_size)."),
    iters: int = ITERS,
    lr: float | None = LR,
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    seed: int = o.SEED,
    pack: bool = o.PACK,
    memory_budget: str | None = o.MEMORY_BUDGET,
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Quantize MODEL's attention and expert weights (routed and shared; dense MLPs with --quantize-dense) to
    4 bits (W4A16, AutoRound's auto_gptq packing) into OUT. rtn reads no data; gptq and autoround calibrate
    on --dataset. Run again to resume."""
    check_quant_options(scheme, method, group_size, iters, lr, batch_size)
    from surgery.data.inputs import DataOptions
    from surgery.quant.pipeline import quantize

    data = DataOptions(list(dataset), samples, max_length, seed, pack)
    summary = quantize(resolve_model(model), out, method=method, group_size=group_size,
                       quantize_dense=quantize_dense, work=work, data=data, batch_size=batch_size, device=device,
                       dtype=dtype, progress=not no_progress, memory_budget=o.memory_bytes(memory_budget),
                       tuning=tuning_options(iters, lr, batch_size, seed))
    report(summary, out)


def tuning_options(iters: int, lr: float | None, batch_size: int, seed: int):
    """autoround's SignRound knobs from the command line."""
    from surgery.quant.signround import SignRoundOptions

    return SignRoundOptions(iters=iters, lr=lr, batch_size=batch_size, seed=seed)


def report(summary: dict, out: Path) -> None:
    """Print what was done and write OUT's own model card (also when OUT was already complete, so a run
    killed between config.json and the card leaves a card after the rerun)."""
    import shlex
    import sys

    from surgery.humanize import human_bytes
    from surgery.report.quant_card import write_quant_card

    write_quant_card(out, "surgery " + shlex.join(sys.argv[1:]))
    console = Console(stderr=True, soft_wrap=True)
    if summary["already_complete"]:
        console.print(f"already complete: {out} (nothing to do)")
        return
    reused = f", {summary['shards_reused']} verified and reused" if summary["shards_reused"] else ""
    fallback = ""
    if summary.get("rtn_fallback"):
        fallback = f"; {summary['rtn_fallback']} expert weights with too few tokens fell back to RTN"
    tuning = summary.get("tuning")
    if tuning:
        seconds = [t["seconds"] for t in tuning.values()]
        fallback += f"; tuned {len(seconds)} layers in {sum(seconds):.1f} s ({max(seconds):.1f} s at most)"
    console.print(f"W4A16 ({summary['method']}, group {summary['group_size']}): {summary['quantized_tensors']} "
                  f"tensors quantized, {summary['kept_linears']} linears kept 16-bit{fallback}; wrote "
                  f"{summary['shards_written']} shards{reused}; {human_bytes(summary['input_bytes'])} -> "
                  f"{human_bytes(summary['output_bytes'])} in {summary['seconds']:.1f} s -> {out}")


def pruned_destination(scheme: str | None, method: str, out: Path, work: Path, group_size: int = 128,
                       iters: int = 200, lr: float | None = None) -> Path:
    """`surgery prune --quantize`: the pruned checkpoint goes to WORK/pruned and OUT is the quantized one
    (options are checked here, before any model work)."""
    if scheme is None:
        return out
    check_quant_options(scheme, method, group_size, iters, lr)
    return work / "pruned"


def quantize_pruned(pruned: Path, out: Path, method: str, work: Path, data, batch_size: int, device: str, dtype: str,
                    progress: bool, memory_budget: int | None = None, group_size: int = 128, iters: int = 200,
                    lr: float | None = None) -> None:
    """The last stage of `surgery prune --quantize w4a16`: quantize the pruned checkpoint into OUT."""
    from surgery.quant.pipeline import quantize

    summary = quantize(pruned, out, method=method, work=work / "quant", data=data, batch_size=batch_size,
                       device=device, dtype=dtype, progress=progress, memory_budget=memory_budget,
                       group_size=group_size, tuning=tuning_options(iters, lr, batch_size, data.seed))
    report(summary, out)
