"""`surgery demo --out DIR`: the main job on a built-in default, with no network.

Builds a small MiniMax-M2-layout checkpoint (random weights, hub shard layout, a tokenizer trained
on the Python standard library), prunes half its experts with REAP calibrated on the built-in
corpus, verifies the output, loads it with transformers and generates from it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from surgery.cli import app
from surgery.commands import options as o
from surgery.data.inputs import DataOptions
from surgery.executor.options import CalibrateOptions
from surgery.lock import directory_lock
from surgery.pipeline import console, prune


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("demo"), "--out", "-o", help="Folder for the demo model, work and output."),
    ratio: float = typer.Option(0.5, "--ratio", help="Fraction of experts to drop per layer."),
    method: str = typer.Option("reap", "--method", help="reap, frequency, ean, weighted_frequency, random or merge."),
    samples: int = typer.Option(16, "--samples", help="Documents per built-in category."),
    max_length: int = typer.Option(256, "--max-length", help="Tokens per sequence."),
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Prune a built-in MiniMax-M2-layout model end to end (calibrate, plan, rewrite, verify), offline, and
    generate from the result."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.synth import make_demo_model

    with directory_lock(out):  # the demo model, its work and output
        source = make_demo_model(out / "model")
        console.print(f"demo model: {source} (MiniMax-M2 layout, random weights)")
        pruned = out / f"pruned-{method}-{ratio:g}"
        prune(source, pruned, out / "work", DataOptions([], samples, max_length, 42, False),
              CalibrateOptions(progress=not no_progress), method, ratio, progress=not no_progress)
        tok = AutoTokenizer.from_pretrained(pruned)
        model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32)
    prompt = "def main():"
    ids = tok(prompt, return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    console.print(f"loaded {pruned} with AutoModelForCausalLM ({model.config.num_local_experts} experts per layer); "
                  f"greedy generation from {prompt!r} (random weights, so the text is noise):")
    print(repr(tok.decode(gen[0])))
