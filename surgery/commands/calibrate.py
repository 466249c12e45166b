"""`surgery calibrate MODEL --dataset SPEC ... --work WORK`."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.data.inputs import DataOptions
from surgery.executor.options import CalibrateOptions, parse_batch_size
from surgery.pipeline import calibrate


def relaunch_with_torchrun(nproc: int) -> None:
    """`--nproc N`: run this same command under torch.distributed.run with N processes."""
    import os
    import subprocess
    import sys

    args = sys.argv[1:]
    for i, a in enumerate(args):
        if a == "--nproc":
            del args[i:i + 2]
            break
        if a.startswith("--nproc="):
            del args[i]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "surgery", *args]
    raise SystemExit(subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}))


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id."),
    work: Path = typer.Option(..., "--work", "-w", help="Work directory (cache, manifest, saliency.json)."),
    dataset: list[str] = o.DATASET,
    samples: int = o.SAMPLES,
    max_length: int = o.MAX_LENGTH,
    batch_size: str = o.AUTO_BATCH_SIZE,
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    seed: int = o.SEED,
    pack: bool = o.PACK,
    routing: str = o.ROUTING,
    keep_hidden: bool = o.KEEP_HIDDEN,
    batch_tokens: int | None = o.BATCH_TOKENS,
    cache_budget: float | None = o.CACHE_BUDGET,
    checkpoint_every: int | None = o.CHECKPOINT_EVERY,
    no_prefetch: bool = o.NO_PREFETCH,
    memory_budget: str | None = o.MEMORY_BUDGET,
    nproc: int = o.NPROC,
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Stream the calibration data through the model one layer at a time and record expert saliency
    (REAP, frequency, weighted frequency, EAN, max activation) in WORK/saliency.json. Resumable."""
    if nproc > 1:
        relaunch_with_torchrun(nproc)
    model_dir = resolve_model(model)
    data = DataOptions(list(dataset), samples, max_length, seed, pack)
    opts = CalibrateOptions(batch_size=parse_batch_size(batch_size), batch_tokens=batch_tokens, device=device,
                            dtype=dtype, routing=routing, keep_hidden=keep_hidden, progress=not no_progress,
                            prefetch=not no_prefetch, cache_budget=o.budget_bytes(cache_budget),
                            checkpoint_every=checkpoint_every, memory_budget=o.memory_bytes(memory_budget))
    calibrate(model_dir, work, data, opts)
