"""Hidden states through decoder layers, one layer resident at a time: the shared engine of
`calibrate` (with saliency observers) and `eval` (followed by the final norm and lm_head).

A layer boundary's hidden states are read and written per batch through two callables, so the same
loop serves the zarr tier (`hidden_<l>` arrays on disk) and the memory tier (per-batch tensors kept
in RAM, checkpointed to zarr now and then). Each batch is trimmed to its longest real sequence
(right padding), with a causal + padding mask and position ids built by transformers' own mask
functions for the layer's attention type, and the model's rotary embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from surgery.arch.layer import LayerFactory
from surgery.compat import causal_mask
from surgery.errors import SurgeryError
from surgery.faults import checkpoint as crash_point
from surgery.faults import delay as test_delay

Batch = tuple[int, int]  # rows [start, stop) of the calibration set


def mask_builder(config, layer: int):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kind = (getattr(config, "layer_types", None) or ["full_attention"] * (layer + 1))[layer]
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    if kind not in builders:
        raise SurgeryError(f"layer {layer} has attention type {kind!r}, which the executor does not support")
    return builders[kind]


def real_length(mask: torch.Tensor | np.ndarray) -> int:
    """Columns up to the last real token of any row (right padding): the rest is not computed."""
    real = np.asarray(mask).sum(axis=0).nonzero()[0]
    return int(real.max()) + 1 if real.size else 1


def batch_ranges(mask: np.ndarray, batch_size: int, batch_tokens: int | None = None) -> list[Batch]:
    """Contiguous batches of rows: `batch_size` rows each, or, with a token budget, as many rows as
    keep rows x (longest real length in the batch) within `batch_tokens` (at least one row), so long
    and short samples fill the device evenly."""
    rows = mask.shape[0]
    if not batch_tokens:
        return [(s, min(s + batch_size, rows)) for s in range(0, rows, batch_size)]
    lengths = [real_length(mask[i:i + 1]) for i in range(rows)]
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        longest_with = max(longest, n)
        if i > start and (i - start + 1) * longest_with > batch_tokens:
            out.append((start, i))
            start, longest_with = i, n
        longest = longest_with
    if start < rows:
        out.append((start, rows))
    return out


class LayerStream:
    """Per-batch primitives of the layer engine: embedding rows, and batches through a loaded layer."""

    def __init__(self, factory: LayerFactory) -> None:
        self.factory = factory
        self.model = factory.model
        self.dtype = factory.dtype
        self.device = factory.device

    # ---------------------------------------------------------------- per-batch primitives
    def embed_batch(self, ids: np.ndarray) -> torch.Tensor:
        """Embedding rows of one batch of tokens; only the needed rows of the embedding are read."""
        uniq, inverse = np.unique(ids, return_inverse=True)
        rows = self.model.ckpt.read_rows(self.model.spec.embed, uniq.tolist())
        table = torch.stack([rows[int(u)] for u in uniq]).to(self.dtype)
        return table[torch.from_numpy(inverse.reshape(ids.shape))]

    @torch.no_grad()
    def run_batches(self, layer: int, module: nn.Module, batches: Sequence[Batch], mask: np.ndarray,
                    read: Callable[[Batch, int], torch.Tensor], write: Callable[[Batch, torch.Tensor], None],
                    advance: Callable[[int], None], observer: object | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    scored: Callable[[Batch, torch.Tensor], torch.Tensor] | None = None,
                    overlap_io: bool = False, first_index: int | None = 0) -> None:
        """Run an already loaded `module` (decoder layer `layer`) over `batches`. The observer scores
        the batch's real tokens, or those `scored(batch, mask)` selects (MTP: next token real too).

        `overlap_io` (the zarr tier): the next batch is read and the last batch's output written in
        background threads while this batch computes, one of each in flight at most, so memory
        stays bounded and the bytes read and written are the same as without it. `first_index`: the
        layer-wide index of the first batch, for the crash points (None: none, e.g. a capture pass)."""
        config = self.factory.config
        build_mask = mask_builder(config, layer)
        lengths = [real_length(mask[s:e]) for s, e in batches]
        io = ThreadPoolExecutor(max_workers=2, thread_name_prefix="surgery-io") if overlap_io else None
        ahead: Future | None = None
        behind: Future | None = None
        try:
            for i, (s, e) in enumerate(batches):
                if io is None:
                    x = read((s, e), lengths[i])
                else:
                    x = (ahead.result() if ahead is not None else read((s, e), lengths[i]))
                    ahead = io.submit(read, batches[i + 1], lengths[i + 1]) if i + 1 < len(batches) else None
                y = self._forward(layer, module, build_mask, x, mask, (s, e), lengths[i], observer, scored)
                if io is None:
                    write((s, e), y)
                else:
                    if behind is not None:
                        behind.result()
                    behind = io.submit(write, (s, e), y)
                advance(int(mask[s:e].sum()))
                if first_index is not None:
                    crash_point(f"layer{layer}.batch{first_index + i}")
                test_delay()
                if should_stop is not None and should_stop():
                    raise KeyboardInterrupt
            if behind is not None:
                behind.result()
        finally:
            if io is not None:
                io.shutdown(wait=True, cancel_futures=True)

    def _forward(self, layer: int, module: nn.Module, build_mask, x: torch.Tensor, mask: np.ndarray, batch: Batch,
                 t: int, observer: object | None,
                 scored: Callable[[Batch, torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        """One batch through the layer: mask, positions, rotary, the observer's scored tokens."""
        s, e = batch
        config = self.factory.config
        m = torch.from_numpy(mask[s:e, :t].astype(np.int64)).to(self.device)
        x = x.to(self.device, self.dtype, non_blocking=True)
        pos = torch.arange(t, device=self.device).unsqueeze(0).expand(m.shape[0], t)
        attn = causal_mask(build_mask, config, x, m, pos)  # keyword names differ across transformers versions
        pe = self.factory.rotary(x, pos) if self.factory.rotary is not None else None
        if observer is not None:
            observer.valid = (scored((s, e), m) if scored is not None else m).reshape(-1).bool()
        y = module(x, attention_mask=attn, position_ids=pos, position_embeddings=pe, use_cache=False)
        y = y[0] if isinstance(y, tuple) else y
        if not torch.isfinite(y[m.bool()]).all():
            raise SurgeryError(f"NaN/Inf in the hidden states after layer {layer} (samples {s}..{e - 1})",
                               self.model.ckpt.directory)
        return y
