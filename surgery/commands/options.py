"""CLI options shared by `calibrate`, `prune` and `eval`, declared once."""

from __future__ import annotations

import typer

DATASET = typer.Option([], "--dataset", "-d", help="Calibration data SPEC (repeatable); none = built-in default.")
SAMPLES = typer.Option(64, "--samples", help="Documents per dataset.")
MAX_LENGTH = typer.Option(512, "--max-length", help="Tokens per sequence (truncation).")
BATCH_SIZE = typer.Option(8, "--batch-size", help="Sequences per forward batch.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DTYPE = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, float32 on CPU), bfloat16 or float32.")
SEED = typer.Option(42, "--seed", help="Sampling seed.")
PACK = typer.Option(False, "--pack", help="Pack documents into full rows (the reference REAP's layout).")
ROUTING = typer.Option("model", "--routing",
                       help="model (the model's true routing) or reference (CerebrasResearch/reap's rule).")
KEEP_HIDDEN = typer.Option(False, "--keep-hidden", help="Keep every layer's hidden states in the cache.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars.")
