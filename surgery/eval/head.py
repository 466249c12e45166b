"""The model's head, one vocabulary block at a time: final norm, then next-token loss without logits.

A 200k-token vocabulary times a few thousand tokens is gigabytes of logits, and the lm_head itself is
over a gigabyte; neither has to be resident. The loss of a token is `logsumexp(logits) - logit[target]`,
and a logsumexp over the vocabulary is the logaddexp of the logsumexps of its row blocks, so we read
`lm_head` rows [a, b) with `Checkpoint.read(rows=...)`, compute that block's logits for the tokens,
fold them into a running logsumexp (float64) and pick the target logits that fall in the block.

The final norm is the family's own transformers module (taken from the meta skeleton and given the
checkpoint's tensors), so norms with offsets or biases behave exactly as in transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from surgery.arch.layer import LayerFactory
from surgery.checkpoint.fp8 import SCALE_SUFFIX, block_size, dequantize
from surgery.errors import SurgeryError

DEFAULT_BLOCK_BYTES = 64 * 2**20  # one lm_head block read at a time (in the checkpoint's dtype)
DEFAULT_RESIDENT_BYTES = 2 * 2**30  # keep the whole lm_head in memory across batches when it is this small


class Head:
    """Final norm + lm_head of one checkpoint, for `token_losses(hidden, targets)`."""

    def __init__(self, factory: LayerFactory, block_rows: int | None = None,
                 resident_bytes: int = DEFAULT_RESIDENT_BYTES) -> None:
        self.factory = factory
        model = factory.model
        self.ckpt = model.ckpt
        self.dtype, self.device = factory.dtype, factory.device
        self.norm = self._load_norm(model.spec.final_norm)
        self.weight_name = self._lm_head_name()
        info = self.ckpt.info(self.weight_name)
        if len(info.shape) != 2:
            raise SurgeryError(f"{self.weight_name} has shape {list(info.shape)}, expected [vocab, hidden]",
                               self.ckpt.directory)
        self.vocab, self.hidden = info.shape
        self.scale_name = self.weight_name.removesuffix("weight") + SCALE_SUFFIX
        self.fp8_block = None
        if self.scale_name in self.ckpt:
            scale = self.ckpt.info(self.scale_name)
            self.fp8_block = block_size(self.ckpt.config, info.shape, scale.shape)
        if block_rows is None:
            block_rows = max(1, DEFAULT_BLOCK_BYTES // max(1, info.nbytes // self.vocab))
        if self.fp8_block is not None:  # whole scale rows per block
            step = self.fp8_block[0]
            block_rows = max(step, block_rows // step * step)
        self.block_rows = min(block_rows, self.vocab)
        cap = getattr(factory.config, "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        elem = torch.finfo(self.dtype).bits // 8
        self.resident = self.vocab * self.hidden * elem <= resident_bytes
        self._blocks: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- loading
    def _load_norm(self, weight_name: str) -> nn.Module:
        """The skeleton's final-norm module with every `<norm>.*` tensor of the checkpoint assigned."""
        prefix = weight_name.rsplit(".", 1)[0]
        try:
            module = self.factory.skeleton.get_submodule(prefix)
        except AttributeError:
            raise SurgeryError(f"the transformers model has no module {prefix!r} (final norm)",
                               self.ckpt.directory) from None
        state = {name[len(prefix) + 1:]: self.ckpt.read(name).to(self.dtype)
                 for name in self.ckpt.tensors if name.startswith(prefix + ".")}
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise SurgeryError(f"final norm {prefix!r} does not match the checkpoint: "
                               f"{str(exc).splitlines()[0]}", self.ckpt.directory) from None
        return module.to(self.device).eval()

    def _lm_head_name(self) -> str:
        spec = self.factory.model.spec
        if spec.lm_head in self.ckpt:
            return spec.lm_head
        if getattr(self.factory.config, "tie_word_embeddings", False) and spec.embed in self.ckpt:
            return spec.embed  # tied: the head is the embedding matrix
        raise SurgeryError(f"no {spec.lm_head!r} in the checkpoint (and the embeddings are not tied)",
                           self.ckpt.directory)

    def _block(self, start: int) -> torch.Tensor:
        cached = self._blocks.get(start)
        if cached is not None:
            return cached
        stop = min(start + self.block_rows, self.vocab)
        w = self.ckpt.read(self.weight_name, rows=(start, stop))
        if self.fp8_block is not None:
            br = self.fp8_block[0]
            scale = self.ckpt.read(self.scale_name, rows=(start // br, math.ceil(stop / br)))
            w = dequantize(w, scale, self.fp8_block)
        w = w.to(self.device, self.dtype)
        if self.resident:
            self._blocks[start] = w
        return w

    def release(self) -> None:
        self._blocks.clear()
        self.norm.to("meta")

    # ---------------------------------------------------------------- loss
    @torch.no_grad()
    def token_losses(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy (float64 [N]) of next tokens `targets` [N] given last-layer states `hidden`
        [N, H] (before the final norm). Logits are computed in the run's dtype and upcast to float32,
        as transformers does before its loss; the reductions are float64."""
        if hidden.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float64)
        if int(targets.max()) >= self.vocab or int(targets.min()) < 0:
            raise SurgeryError(f"token id {int(targets.max())} is outside the vocabulary of {self.vocab}",
                               self.ckpt.directory)
        h = self.norm(hidden.to(self.device, self.dtype))
        targets = targets.to(self.device)
        lse = torch.full((h.shape[0],), -math.inf, dtype=torch.float64, device=self.device)
        picked = torch.zeros(h.shape[0], dtype=torch.float64, device=self.device)
        for start in range(0, self.vocab, self.block_rows):
            w = self._block(start)
            logits = (h @ w.T).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1).double())
            inside = (targets >= start) & (targets < start + w.shape[0])
            if inside.any():
                rows = inside.nonzero().squeeze(1)
                picked[rows] = logits[rows, targets[rows] - start].double()
        return (lse - picked).cpu()
