"""`surgery eval MODEL [MODEL2 ...] --dataset SPEC ... --work WORK`: loss and perplexity, side by side.

Also registers `fidelity` and `report` (their modules are imported at the bottom), so the CLI's
command list needs only "eval" for all three.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.commands import options as o
from surgery.jsonio import write_json_atomic
from surgery.lock import directory_lock

EVAL_DATASET = typer.Option([], "--dataset", "-d",
                            help="Evaluation data SPEC (repeatable; figures per SPEC); none = built-in corpus.")


def eval_table(result: dict, title: str = "next-token loss (perplexity)") -> Table:
    """Datasets as rows, models as columns; later models show their difference from the first."""
    labels = list(result["models"]) if "models" in result else sorted(
        {m for per in result["datasets"].values() for m in per})
    table = Table(title=title)
    table.add_column("dataset")
    table.add_column("tokens", justify="right")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    for spec, per in result["datasets"].items():
        cells = []
        base = per.get(labels[0], {}).get("loss")
        for i, label in enumerate(labels):
            fig = per.get(label)
            if not fig or fig.get("loss") is None:
                cells.append("-")
                continue
            cell = f"{fig['loss']:.4f} ({fig['perplexity']:.2f})"
            if i and base is not None:
                cell += f" {fig['loss'] - base:+.4f}"
            cells.append(cell)
        tokens = next((f["tokens"] for f in per.values() if f), 0)
        table.add_row(spec, f"{tokens:,}", *cells)
    return table


@app.command("eval")
def eval_cmd(
    models: list[str] = typer.Argument(..., help="Checkpoints (directories or hub ids); the first one's tokenizer."),
    work: Path = typer.Option(..., "--work", "-w", help="Work directory (WORK/eval/ cache, WORK/eval.json)."),
    dataset: list[str] = EVAL_DATASET,
    samples: int = o.SAMPLES,
    max_length: int = o.MAX_LENGTH,
    batch_size: int = o.BATCH_SIZE,
    device: str = o.DEVICE,
    dtype: str = o.DTYPE,
    seed: int = o.SEED,
    pack: bool = o.PACK,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    memory_budget: str | None = o.MEMORY_BUDGET,
    no_progress: bool = o.NO_PROGRESS,
) -> None:
    """Mean next-token loss and perplexity of each MODEL on each dataset, all on identical tokens,
    streamed one decoder layer at a time (the lm_head in vocabulary blocks). Resumable."""
    from surgery.eval.inputs import eval_inputs
    from surgery.eval.loss import EvalOptions, Evaluator, ModelRef

    err = Console(stderr=True)
    refs = [ModelRef(m, resolve_model(m)) for m in models]
    opts = EvalOptions(batch_size=batch_size, device=device, dtype=dtype, progress=not no_progress,
                       memory_budget=o.memory_bytes(memory_budget))

    def report(spec: str, calib) -> None:
        for cat in calib.categories:
            err.print(f"[dim]data[/dim] {spec}: {cat.documents} documents, {cat.tokens} tokens, "
                      f"{cat.truncated} truncated, {cat.skipped} skipped")

    with directory_lock(work):  # WORK/eval/ and WORK/eval.json
        inputs = eval_inputs(refs[0].directory, list(dataset), samples=samples, max_length=max_length, seed=seed,
                             pack=pack, report=report)
        result = Evaluator(work, opts).run(refs, inputs)
        write_json_atomic(work / "eval.json", {**result, "settings": inputs.settings})
    if as_json:
        print(json.dumps({"datasets": result["datasets"]}))
    else:
        Console(soft_wrap=True).print(eval_table(result))
        err.print(f"-> {work / 'eval.json'}")


# the sibling commands register on import
from surgery.commands import fidelity as _fidelity  # noqa: E402,F401
from surgery.commands import report as _report  # noqa: E402,F401
