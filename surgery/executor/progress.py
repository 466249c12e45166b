"""Progress for long layer-by-layer runs: one bar over layers, one over the current layer's tokens,
both with rate and ETA (rich, on stderr)."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second with the task's unit (tokens/s for a layer)."""

    def render(self, task) -> Text:
        unit = task.fields.get("unit", "")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed and unit else "")


class _LayerProgress:
    def __init__(self, progress: Progress | None, layers: int, tokens: int) -> None:
        self.progress = progress
        self.tokens = tokens
        if progress is not None:
            self.layers_task = progress.add_task("layers", total=layers, unit="")
            self.tokens_task = progress.add_task("layer", total=tokens, unit="tok")

    def start_layers(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(self.layers_task, completed=done)

    def start_layer(self, layer: int) -> None:
        if self.progress is not None:
            if layer > 0:
                self.progress.advance(self.layers_task)
            self.progress.reset(self.tokens_task, total=self.tokens, description=f"layer {layer}")

    def advance(self, tokens: int) -> None:
        if self.progress is not None:
            self.progress.advance(self.tokens_task, tokens)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress.update(self.layers_task, completed=self.progress.tasks[0].total)


@contextmanager
def layer_progress(layers: int, tokens: int, enabled: bool = True):
    if not enabled:
        yield _LayerProgress(None, layers, tokens)
        return
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               RateColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        lp = _LayerProgress(progress, layers, tokens)
        yield lp
        lp.finish()
