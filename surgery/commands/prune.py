"""`surgery prune MODEL --out OUT [--dataset ... | --recipe r.toml] --method M --ratio R`."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.data.inputs import DataOptions
from surgery.executor.options import DEFAULT_ROWS, CalibrateOptions, parse_batch_size
from surgery.pipeline import prune


@app.command("prune")
def prune_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory."),
    work: Path | None = typer.Option(None, "--work", "-w", help="Work directory (default: OUT.work beside OUT)."),
    recipe: Path | None = typer.Option(None, "--recipe", help="TOML recipe, a file or a shipped name (e.g. "
                                       "reap-code-tools-agentic): datasets, samples, length, method, ratio."),
    method: str | None = typer.Option(None, "--method",
                                      help="reap, frequency, ean, weighted_frequency, random or merge (fold the "
                                           "dropped experts into kept ones); default: the recipe's, else reap."),
    ratio: float | None = typer.Option(None, "--ratio", help="Fraction of experts to drop per layer (default: the "
                                                             "recipe's, else 0.5)."),
    keep: int | None = typer.Option(None, "--keep", help="Exact number of experts kept per layer (not with --ratio)."),
    multiple_of: int | None = typer.Option(None, "--multiple-of",
                                           help="Round the kept count down to a multiple of M (and of n_group); "
                                                "refused if that leaves fewer than top-k."),
    protect: str | None = typer.Option(None, "--protect", help="Never prune super experts: super (in the first 75% "
                                       "of MoE layers) or outliers (in all); see `surgery plan --help`."),
    merge_saliency: str = typer.Option("reap", "--merge-saliency",
                                       help="--method merge: saliency choosing the kept experts."),
    dataset: list[str] = o.DATASET,
    samples: int | None = typer.Option(None, "--samples", help="Documents per dataset, with --pack rows "
                                                               "(default: the recipe's, else 64)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens per sequence (default: the recipe's, "
                                                                     "else 512)."),
    batch_size: str = o.AUTO_BATCH_SIZE,
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    seed: int | None = typer.Option(None, "--seed", help="Sampling seed, also --method random's (default: the "
                                                         "recipe's, else 42)."),
    pack: bool = o.PACK,
    drop_mtp: bool = typer.Option(False, "--drop-mtp",
                                  help="Remove multi-token-prediction layers (and set the config's MTP count to 0)."),
    routing: str = o.ROUTING,
    memory_budget: str | None = o.MEMORY_BUDGET,
    quantize_scheme: str | None = typer.Option(None, "--quantize", help="Then quantize the pruned model: w4a16 "
                                               "(OUT is W4A16; the pruned checkpoint stays in WORK/pruned)."),
    quantize_method: str = typer.Option("rtn", "--quantize-method",
                                        help="rtn, gptq or autoround (calibrated on the same data as the "
                                             "pruning)."),
    quantize_group_size: int = typer.Option(128, "--quantize-group-size", help="--quantize: inputs per scale group."),
    iters: int = typer.Option(200, "--iters", help="--quantize-method autoround: tuning steps per layer."),
    lr: float | None = typer.Option(None, "--lr", help="--quantize-method autoround: learning rate (default "
                                                       "1 / iters)."),
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Calibrate, plan, rewrite, verify and write a model card (OUT/README.md) in one command, then quantize
    with --quantize; each stage is skipped when already complete, so run it again to resume."""
    data = DataOptions(list(dataset), 64, 512, 42, pack)
    chosen_method, chosen_ratio = "reap", 0.5
    if recipe is not None:
        from surgery.data import load_recipe

        r = load_recipe(recipe)
        data = DataOptions(list(dataset) or list(r.datasets), r.samples, r.max_length, r.seed, r.pack or pack)
        chosen_method, chosen_ratio = r.method, r.ratio
    data.samples = samples if samples is not None else data.samples
    data.max_length = max_length if max_length is not None else data.max_length
    data.seed = seed if seed is not None else data.seed
    opts = CalibrateOptions(batch_size=parse_batch_size(batch_size), device=device, dtype=dtype,
                            routing=routing, progress=not no_progress, memory_budget=o.memory_bytes(memory_budget))
    chosen_ratio = ratio if ratio is not None else (None if keep is not None else chosen_ratio)
    from surgery.checkpoint.output import check_paths as _check_paths
    from surgery.commands.quantize import pruned_destination, quantize_pruned
    from surgery.lock import directory_lock

    work = work or out.with_name(out.name + ".work")
    pruned = pruned_destination(quantize_scheme, quantize_method, out, work, quantize_group_size, iters, lr)
    model_dir = resolve_model(model)
    _check_paths(model_dir, out)  # OUT is never the model directory, not even for its lock file
    with directory_lock(out), directory_lock(work):  # the whole job, quantization included
        prune(model_dir, pruned, work, data, opts,
              method or chosen_method, chosen_ratio, seed=data.seed,
              progress=not no_progress, drop_mtp=drop_mtp, keep=keep, multiple_of=multiple_of, protect=protect,
              merge_saliency=merge_saliency)
        if quantize_scheme is not None:
            quantize_pruned(pruned, out, quantize_method, work, data, opts.batch_size or DEFAULT_ROWS, device, dtype,
                            not no_progress, o.memory_bytes(memory_budget), group_size=quantize_group_size,
                            iters=iters, lr=lr)
