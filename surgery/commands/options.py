"""CLI options shared by `calibrate`, `prune`, `eval`, `fidelity` and `quantize`, declared once.

Each command still names them in its own signature (`samples: int = o.SAMPLES`): typer reads a command's
options from that signature only and has no supported way to add a group of them to several commands
(fastapi/typer#153: "repeat them or write a decorator"; a decorator rewriting `__signature__` breaks the
parsing of positional arguments, fastapi/typer#1898). What is shared is every option's flags, default and
help, here; the lines that name them stay, one per option, in the order `--help` shows.
"""

from __future__ import annotations

import typer

DATASET = typer.Option([], "--dataset", "-d", help="Calibration data SPEC (repeatable); none = built-in default.")
SAMPLES = typer.Option(64, "--samples", help="Documents per dataset (with --pack: rows of --max-length tokens).")
MAX_LENGTH = typer.Option(512, "--max-length", help="Tokens per sequence (truncation).")
BATCH_SIZE = typer.Option(8, "--batch-size", help="Sequences per forward batch.")
AUTO_BATCH_SIZE = typer.Option("auto", "--batch-size",
                               help="Sequences per forward batch, or auto: on CUDA as many tokens as the memory "
                                    "budget allows, 8 rows on the CPU.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.")
DTYPE = typer.Option("auto", "--dtype", help="auto (bf16 on CUDA, float32 on CPU), bfloat16 or float32.")
SEED = typer.Option(42, "--seed", help="Sampling seed.")
PACK = typer.Option(False, "--pack", help="Pack documents into full rows (the reference REAP's layout).")
ROUTING = typer.Option("model", "--routing",
                       help="model (the model's true routing) or reference (CerebrasResearch/reap's rule).")
KEEP_HIDDEN = typer.Option(False, "--keep-hidden", help="Keep every layer's hidden states in the cache.")
NO_PROGRESS = typer.Option(False, "--no-progress", help="No progress bars.")
BATCH_TOKENS = typer.Option(None, "--batch-tokens",
                            help="Token budget per batch (rows x longest real length) instead of --batch-size rows.")
CACHE_BUDGET = typer.Option(None, "--cache-budget",
                            help="GB of host memory for hidden states between layers (default: 40% of available; "
                                 "0 = zarr on disk every layer).")
CHECKPOINT_EVERY = typer.Option(None, "--checkpoint-every",
                                help="Layers between zarr checkpoints of in-memory hidden states (default: auto, "
                                     "< 10% of compute).")
NO_PREFETCH = typer.Option(False, "--no-prefetch", help="Do not read the next layer while computing this one.")
MEMORY_BUDGET = typer.Option(None, "--memory-budget", envvar="SURGERY_MEMORY_BUDGET",
                             help="Peak memory the run may hold, e.g. 4GB or 450MB (host RSS, and GPU memory on "
                                  "CUDA); routed experts are paged in chunks that fit. Default: derived from the "
                                  "available memory.")
NPROC = typer.Option(1, "--nproc", help="Processes (one per GPU, or CPU processes with gloo) via torchrun.")


def budget_bytes(gb: float | None) -> int | None:
    return None if gb is None else int(gb * 1e9)


def memory_bytes(size: str | None) -> int | None:
    """--memory-budget as bytes (units B/KB/MB/GB/TB or KiB/MiB/GiB/TiB; a bare number is GB)."""
    from surgery.executor.budget import parse_size

    return parse_size(size)
