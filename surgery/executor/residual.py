"""A paged MoE layer's second run without its attention.

When a layer's routed experts are streamed in chunks, the engine runs its batches twice: once to
capture the MoE block's inputs (attention, norms, router), then, once every chunk's experts have
computed, again to replay their outputs into the layer. Every family of the table builds its decoder
layer pre-norm: `h = x + attn(norm1(x)); out = h + mlp(norm2(h))` (`ArchSpec.moe_norm` names norm2).
So the capture run records h, the residual stream as the MoE norm receives it, in place of the
batch's layer input, and the replay computes only `h + mlp(norm2(h))`: the same operations on the same
values as the layer's own second half (the outputs are bit-identical), without attention's projections
and scores a second time. GPTQ pays one attention run fewer of its three, a paged calibration one of
two. The residual takes the held input's place (same shape, on its device), so memory is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from surgery.errors import SurgeryError

Batch = tuple[int, int]


class ResidualCapture:
    """While entered, each batch of `part` run through the layer (in order) leaves the residual stream
    that reaches the MoE norm in `inputs[batch]`, replacing the layer input held there."""

    def __init__(self, norm: nn.Module, inputs: dict[Batch, torch.Tensor], part: Sequence[Batch]) -> None:
        self.norm, self.inputs, self.part = norm, inputs, list(part)
        self.seen = 0
        self._handle = None

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if self.seen < len(self.part):  # more calls than batches: said once the run is over
            batch = self.part[self.seen]
            self.inputs[batch] = args[0].to(self.inputs[batch].device)
        self.seen += 1

    def __enter__(self) -> ResidualCapture:
        self._handle = self.norm.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        if exc[0] is None and self.seen != len(self.part):
            raise SurgeryError(f"internal error: the MoE norm ran {self.seen} times for {len(self.part)} batches "
                               "(a decoder layer that is not pre-norm: set its ArchSpec.moe_norm to None)")


class AfterAttention:
    """The decoder layer's second half, `h + mlp(norm(h))`, called as the stream calls a layer (the
    attention's keyword arguments are not needed and ignored)."""

    def __init__(self, norm: nn.Module, block: nn.Module) -> None:
        self.norm, self.block = norm, block

    def __call__(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
        out = self.block(self.norm(hidden_states))
        out = out[0] if isinstance(out, tuple) else out  # gpt-oss's block also returns its router scores
        return hidden_states + out
