"""`surgery calibrate MODEL --dataset SPEC ... --work WORK`."""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.executor.calibrate import CalibrateOptions
from surgery.pipeline import DataOptions, calibrate


@app.command("calibrate")
def calibrate_cmd(
    model: str = typer.Argument(..., help="Checkpoint directory or hub id."),
    work: Path = typer.Option(..., "--work", "-w", help="Work directory (cache, manifest, saliency.json)."),
    dataset: list[str] = o.DATASET,
    samples: int = o.SAMPLES,
    max_length: int = o.MAX_LENGTH,
    batch_size: int = o.BATCH_SIZE,
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    seed: int = o.SEED,
    pack: bool = o.PACK,
    routing: str = o.ROUTING,
    keep_hidden: bool = o.KEEP_HIDDEN,
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Stream the calibration data through the model one layer at a time and record expert saliency
    (REAP, frequency, weighted frequency, EAN, max activation) in WORK/saliency.json. Resumable."""
    model_dir = resolve_model(model)
    data = DataOptions(list(dataset), samples, max_length, seed, pack)
    opts = CalibrateOptions(batch_size=batch_size, device=device, dtype=dtype, routing=routing,
                            keep_hidden=keep_hidden, progress=not no_progress)
    calibrate(model_dir, work, data, opts)
