"""The multi-token-prediction modules stored past the last decoder layer (GLM-4.x, DeepSeek-V3), run by
the layer engine after its decoder layers with the same passes.

MTP module k at position i sees the previous hidden state h_i (the last decoder layer's output, or MTP
k-1's) and the token i+k+1: h' = eh_proj(cat(enorm(embed(t_{i+k+1})), hnorm(h_i))), then its decoder
layer, whose experts are scored over positions whose current and predicted-from tokens are both real.
Their outputs stay in memory (they feed nothing but the next MTP module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from surgery.executor.stream import Batch

Reader = Callable[[Batch, int], torch.Tensor]


def walk_mtp(engine, passes: Sequence, layers: list[int], batches: list[Batch], ids: np.ndarray,
             mask: np.ndarray, read_last: Reader, progress) -> None:
    """Run MTP `layers` in order through `engine.run_layer`, starting from `read_last`."""
    factory, device = engine.factory, engine.device
    eps = float(getattr(factory.config, "rms_norm_eps", 1e-6))
    pad = np.zeros((ids.shape[0], len(layers) + 1), dtype=ids.dtype)
    ids_ext, mask_ext = np.concatenate([ids, pad], 1), np.concatenate([mask, pad.astype(mask.dtype)], 1)
    previous = read_last
    for k, layer in enumerate(layers):
        progress.start_layer(layer)
        module, parts = factory.load_mtp(layer)
        outputs: dict[Batch, torch.Tensor] = {}

        def read(b: Batch, t: int, k: int = k, parts: dict = parts, previous=previous) -> torch.Tensor:
            nxt = ids_ext[b[0]:b[1], k + 1:k + 1 + t]
            if "embed_tokens.weight" in parts:
                emb = parts["embed_tokens.weight"][torch.from_numpy(nxt).to(device)]
            else:
                emb = engine.stream.embed_batch(nxt).to(device)
            h = previous(b, t).to(device, engine.dtype)
            x = torch.cat([_rms(emb, parts["enorm.weight"], eps), _rms(h, parts["hnorm.weight"], eps)], -1)
            return torch.nn.functional.linear(x, parts["eh_proj.weight"])

        def scored(b: Batch, m: torch.Tensor, k: int = k) -> torch.Tensor:
            t = m.shape[1]
            return m * torch.from_numpy(mask_ext[b[0]:b[1], k + 1:k + 1 + t].astype(np.int64)).to(m.device)

        engine.run_layer(layer, module, passes, batches, mask, read, outputs.__setitem__, progress.advance, scored)
        for p in passes:
            p.end_layer(layer)
        previous = (lambda out: (lambda b, t: out[b]))(outputs)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the families' own modules compute it (float32 statistics, weight in the input dtype)."""
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
