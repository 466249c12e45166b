"""Hidden states through decoder layers, one layer resident at a time: the shared engine of
`calibrate` (with saliency observers) and `eval` (followed by the final norm and lm_head).

`hidden_<l>` in the cache is layer l's input; running layer l reads it batch by batch and writes
`hidden_<l+1>`. Each batch is trimmed to its longest real sequence (right padding), with a causal +
padding mask and position ids built by transformers' own mask functions for the layer's attention
type, and the model's rotary embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from surgery.arch.layer import LayerFactory
from surgery.errors import SurgeryError
from surgery.executor.cache import HiddenCache
from surgery.faults import checkpoint as crash_point


def mask_builder(config, layer: int):
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kind = (getattr(config, "layer_types", None) or ["full_attention"] * (layer + 1))[layer]
    builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
    if kind not in builders:
        raise SurgeryError(f"layer {layer} has attention type {kind!r}, which the executor does not support")
    return builders[kind]


def real_length(mask: torch.Tensor) -> int:
    """Columns up to the last real token of any row (right padding): the rest is not computed."""
    real = mask.sum(dim=0).nonzero()
    return int(real.max()) + 1 if real.numel() else 1


class LayerStream:
    def __init__(self, factory: LayerFactory, cache: HiddenCache, batch_size: int) -> None:
        self.factory = factory
        self.model = factory.model
        self.cache = cache
        self.batch_size = batch_size
        self.dtype = factory.dtype
        self.device = factory.device

    def embed(self, ids: np.ndarray) -> None:
        """hidden_0 = embedding rows of the tokens; only the embedding tensor's needed rows are read."""
        name = self.model.spec.embed
        info = self.model.ckpt.info(name)
        bs = self.batch_size
        z = self.cache.create_hidden(0, ids.shape[0], ids.shape[1], info.shape[1], self.dtype, bs)
        for s in range(0, ids.shape[0], bs):
            batch = ids[s:s + bs]
            uniq, inverse = np.unique(batch, return_inverse=True)
            rows = self.model.ckpt.read_rows(name, uniq.tolist())
            table = torch.stack([rows[int(u)] for u in uniq]).to(self.dtype)
            HiddenCache.write_rows(z, s, table[torch.from_numpy(inverse.reshape(batch.shape))])

    @torch.no_grad()
    def run_layer(self, layer: int, mask: np.ndarray, advance: Callable[[int], None],
                  observe: Callable[[nn.Module], object] | None = None) -> object | None:
        """Run layer `layer` over every batch; `observe(moe_block)` may instrument its MoE block and
        returns an observer (with `.valid` and `.detach()`), which is returned at the end."""
        factory, bs = self.factory, self.batch_size
        module = factory.load(layer).eval()
        block = factory.moe_block(module)
        observer = observe(block) if (observe is not None and block is not None) else None
        z_in = self.cache.hidden(layer)
        samples, length, hidden = z_in.shape
        z_out = self.cache.create_hidden(layer + 1, samples, length, hidden, self.dtype, bs)
        build_mask = mask_builder(factory.config, layer)
        try:
            for s in range(0, samples, bs):
                m = torch.from_numpy(mask[s:s + bs].astype(np.int64))
                t = real_length(m)
                m = m[:, :t].to(self.device)
                x = HiddenCache.read_rows(z_in, s, s + m.shape[0], t).to(self.device, self.dtype)
                pos = torch.arange(t, device=self.device).unsqueeze(0).expand(m.shape[0], t)
                attn = build_mask(config=factory.config, inputs_embeds=x, attention_mask=m,
                                  past_key_values=None, position_ids=pos)
                pe = factory.rotary(x, pos) if factory.rotary is not None else None
                if observer is not None:
                    observer.valid = m.reshape(-1).bool()
                y = module(x, attention_mask=attn, position_ids=pos, position_embeddings=pe,
                           past_key_values=None, use_cache=False)
                y = y[0] if isinstance(y, tuple) else y
                if not torch.isfinite(y[m.bool()]).all():
                    raise SurgeryError(f"NaN/Inf in the hidden states after layer {layer} "
                                       f"(samples {s}..{s + m.shape[0] - 1})", self.model.ckpt.directory)
                HiddenCache.write_rows(z_out, s, y)
                advance(int(m.sum()))
                crash_point(f"layer{layer}.batch{s // bs}")
        finally:
            if observer is not None:
                observer.detach()
            factory.unload(layer)
        return observer
