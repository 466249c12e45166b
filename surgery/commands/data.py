"""`surgery data preview [SPEC...] [--model MODEL] [--recipe RECIPE] [--samples N] [--max-length L]`."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from surgery.checkpoint.resolve import resolve_model
from surgery.cli import app
from surgery.data import DEFAULT_NOTE, collect, load_recipe, load_tokenizer, open_sources, pad_id_of
from surgery.data.sampling import assemble
from surgery.data.tokenizer import byte_tokenizer

data_app = typer.Typer(help="Calibration data: preview how datasets render and tokenise.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
def preview_cmd(
    specs: list[str] = typer.Argument(None, help="Dataset SPECs (see docs/data.md); none: the built-in default."),
    model: str = typer.Option(None, "--model", help="Checkpoint directory whose tokenizer and chat template to use "
                              "(without it: UTF-8 bytes and a generic ChatML template)."),
    recipe: str = typer.Option(None, "--recipe", help="Preview a recipe's datasets (file or shipped name)."),
    samples: int = typer.Option(None, "--samples",
                                help="Documents (packed: rows) per spec (default: the recipe's, else 8)."),
    max_length: int = typer.Option(None, "--max-length", help="Tokens per row (default: the recipe's, else 512)."),
    seed: int = typer.Option(None, "--seed", help="Sampling seed (default: the recipe's, else 42)."),
    pack: bool = typer.Option(None, "--pack/--no-pack", help="Reference REAP packing (default: recipe's, else off)."),
    show: int = typer.Option(2, "--show", help="Rendered documents to print per spec."),
    chars: int = typer.Option(1200, "--chars", help="Characters of each rendered document to print."),
) -> None:
    """Show how the first samples render and tokenise, and the per-category statistics; runs no model."""
    console = Console(highlight=False)
    specs = list(specs or [])
    settings = {"samples": 8, "max_length": 512, "seed": 42, "pack": False}
    if recipe:
        r = load_recipe(recipe)
        specs = specs or r.datasets
        settings = {"samples": r.samples, "max_length": r.max_length, "seed": r.seed, "pack": r.pack}
    for key, value in (("samples", samples), ("max_length", max_length), ("seed", seed), ("pack", pack)):
        if value is not None:
            settings[key] = value
    sources = open_sources(specs)  # before the tokenizer: a missing dataset fails at once
    if model:
        tokenizer = load_tokenizer(resolve_model(model))
    else:
        tokenizer = byte_tokenizer()
        console.print("no --model: tokens are UTF-8 bytes and chats use a generic ChatML template", style="yellow")
    categories = collect(sources, tokenizer, keep_examples=max(0, show), **settings)
    if not specs:
        console.print(DEFAULT_NOTE, style="yellow")
    for cat in categories:
        for n, ex in enumerate(cat.examples):
            title = f"{cat.stats.name} #{n + 1}: row {ex.row} of {cat.stats.spec}, {len(ex.ids)} tokens" + (
                " (truncated)" if ex.truncated else "")
            console.rule(Text(title))
            console.print(Text(ex.text[:chars] + ("\n[...]" if len(ex.text) > chars else "")))
            pieces = [tokenizer.decode([i]) for i in ex.ids[:48]]
            console.print(Text("tokens: " + " | ".join(repr(p)[1:-1] for p in pieces)
                               + (" | ..." if len(ex.ids) > 48 else ""), style="dim"))
    input_ids, _ = assemble(categories, pad_id_of(tokenizer))
    table = Table(title=f"calibration set: {input_ids.shape[0]} rows x {input_ids.shape[1]} tokens "
                        f"(max_length {settings['max_length']}, seed {settings['seed']}"
                        f"{', packed' if settings['pack'] else ''})")
    for col in ("category", "spec", "requested", "documents", "tokens", "truncated", "skipped"):
        table.add_column(col, justify="left" if col in ("category", "spec") else "right", overflow="fold")
    for cat in categories:
        s = cat.stats
        table.add_row(Text(s.name), Text(s.spec), str(s.requested), str(s.documents), str(s.tokens),
                      str(s.truncated), str(s.skipped))
    console.print(table)
