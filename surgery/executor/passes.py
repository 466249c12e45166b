"""What a command plugs into the layer engine (`surgery.executor.engine.LayerEngine.walk`): a `LayerPass`
per layer and a `Journal` for durable progress.

Apart from the engine because it is the contract, not the walk: a pass reads this page and nothing of how
the engine pages experts, tiers hidden states or checkpoints them. `surgery.executor.engine` imports both
names back, so `from surgery.executor.engine import LayerPass` keeps working.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from surgery.executor.experts import ExpertListener, RoutedExperts
from surgery.executor.stream import Batch


class LayerPass:
    """A command's work at each layer; the base does nothing.

    Hooks, in the order the engine calls them for one layer: `prepare` (an object whose `valid` the
    engine sets per batch, or None) and, if it asked, one run of the batches with the outputs discarded
    and the routed experts skipped, then `prepared` (GPTQ: quantize the resident linears from the input
    statistics that run gathered); `listeners`; `chunk` for every group of routed experts as it is built,
    before it is computed (GPTQ: quantize them in place); `end_layer`."""

    # the routed experts must be computed over captured tokens, all of the layer's in one group (a pass
    # that needs every token's statistics before it changes an expert's weights)
    needs_capture: bool = False
    # every expert of a chunk is built at once and handed to `chunk` together (a pass that works on a
    # batch of experts, e.g. GPTQ across experts); otherwise `plan_memory.BUILD` at a time on the CPU
    # (on CUDA a chunk is always built at once)
    batch_experts: bool = False

    def prepare(self, layer: int, module: nn.Module) -> object | None:
        return None

    def prepared(self, layer: int, module: nn.Module) -> None:
        """After the discarded run that `prepare` asked for."""

    def listeners(self, layer: int, block: nn.Module, runner: RoutedExperts) -> list[ExpertListener]:
        return []

    def chunk(self, layer: int, store, ids: list[int], weights: dict[str, torch.Tensor], captured: list) -> None:
        """Experts `ids` are built in `weights` (`[n, ...]`, expert ids[0] first) and about to run over
        the `captured` batches (`BatchRouting`); a pass may change the weights in place."""

    def extra_bytes(self, layer: int) -> int:
        """Memory the pass holds while one group of routed experts is built (planned into the budget)."""
        return 0

    def expert_bytes(self, layer: int) -> int:
        """Memory the pass holds per expert built at once (e.g. GPTQ's Hessians), planned into the
        budget for every expert of a build, so it bounds how many experts are batched."""
        return 0

    def end_layer(self, layer: int) -> None:
        """After all of the layer's batches, before its boundary is committed (write what it recorded)."""

    # ------------------------------------------------------------ whole-layer tuning (AutoRound)
    # the pass changes a layer's weights from all of its inputs at once: every routed expert is built
    # (never paged), then `tune` runs before the run that writes the layer's outputs
    tunes_layer: bool = False

    def tune(self, layer: int, module: nn.Module, runner: RoutedExperts | None,
             inputs: dict[Batch, torch.Tensor], forward: Callable[[torch.Tensor, np.ndarray], torch.Tensor]) -> None:
        """`inputs`: the layer's input hidden states per batch; `runner.weights`: every routed expert as
        `[E, ...]` parameters (None for a dense layer); `forward(x, mask)` runs the layer on rows `x`
        `[n, t, H]` with their `mask` `[n, t]`, with autograd. The pass may change the module's and
        `runner.weights`' values in place; the layer's outputs are then computed from them."""

    def tune_bytes(self, layer: int, tokens: int) -> int:
        """Memory `tune` holds besides the layer's built experts and inputs (planned into the budget)."""
        return 0


class Journal:
    """Where a walk records durable progress (a command's manifest); the base records nothing."""

    def commit(self, boundary: int | None) -> None:
        """`boundary` layers are done and their hidden states durable; None: embedding has started."""
