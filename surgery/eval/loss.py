"""Streaming evaluation: mean next-token loss and perplexity of one or more checkpoints on the same tokens.

Each model's hidden states go through every decoder layer in the layer engine (`surgery.executor.
engine`, no pass; routed experts paged within the memory budget), then the final norm and a
vocabulary-blocked loss (`surgery.eval.head`). Several
models (typically the original and its pruned versions) see exactly the same token rows, so their
figures are comparable side by side.

Layout of WORK (everything under `WORK/eval/`, so a calibration work directory can hold an
evaluation too without either touching the other's cache):

    WORK/eval/manifest.json            inputs (datasets, settings, options) and per-model progress
    WORK/eval/cache.zarr               input_ids, attention_mask (written once, shared by all models)
    WORK/eval/models/<key>/hidden.zarr hidden_<l> of one model; at most two layers on disk at a time

`<key>` identifies the model (fingerprint, location, shard files, provenance; see `model_key`) and the
dtype of the run. The manifest is
rewritten atomically after each layer's outputs are on disk, so a killed run continues from the next
layer of the model it was on and gives bit-identical figures.

Which tokens count: position t predicts token t+1 when both are real (attention_mask 1). With right
padding this is exactly transformers' causal-LM loss with labels = -100 at the pads.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.eval.head import Head
from surgery.executor.cache import HiddenCache
from surgery.executor.device import resolve_device, resolve_dtype
from surgery.executor.engine import EngineOptions, Journal, LayerEngine
from surgery.executor.manifest import require_same_inputs
from surgery.executor.stream import batch_ranges, real_length
from surgery.faults import checkpoint as crash_point
from surgery.jsonio import read_json, write_json_atomic

TOKENS_PER_HEAD_CALL = 4096  # bounds the [tokens, vocab block] logits held at once


@dataclass
class EvalOptions:
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    block_rows: int | None = None  # lm_head rows per block; None: about 64 MB of the checkpoint's tensor
    memory_budget: int | None = None  # bytes the process may hold; None = derived from available memory

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise SurgeryError(f"batch size must be at least 1, got {self.batch_size}")

    def identity(self) -> dict:
        """Options that change the figures (and so must match on resume)."""
        return {"batch_size": self.batch_size, "dtype": self.dtype}


@dataclass
class EvalInputs:
    """Token rows for evaluation, grouped by dataset."""

    input_ids: np.ndarray  # int64 [S, L], right-padded
    attention_mask: np.ndarray  # uint8 [S, L], 1 = real token
    rows: dict[str, tuple[int, int]]  # dataset spec -> its rows [start, stop)
    hashes: dict[str, str]  # dataset spec -> content hash of its tokens
    settings: dict  # samples, max_length, seed, pack, tokenizer ...


@dataclass
class ModelRef:
    """A model as the user named it (`label`, the key of the results) and where it is on disk."""

    label: str
    directory: Path


def predicted(mask: np.ndarray) -> np.ndarray:
    """bool [S, L-1]: position t is scored (predicts token t+1) when tokens t and t+1 are both real."""
    real = mask.astype(bool)
    return real[:, :-1] & real[:, 1:]


def summarize(loss_sum: float, tokens: int) -> dict:
    """{"loss", "perplexity", "tokens"} from a float64 loss sum over `tokens` predictions."""
    if tokens == 0:
        return {"loss": None, "perplexity": None, "tokens": 0}
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": tokens}


def model_key(ckpt: Checkpoint, dtype: torch.dtype) -> tuple[str, str]:
    """(key of this model's entry in the manifest, its fingerprint's sha256).

    The fingerprint (config + shard headers) alone cannot tell apart checkpoints with the same shapes:
    two plans pruning to the same expert count, or a fine-tune and its base. The key adds where the
    model is, its shard files' sizes and modification times, and its `surgery.json` provenance, so a
    different model (or one rewritten in place) is evaluated afresh; reading the weights to hash them
    would cost as much as the evaluation."""
    fp = fingerprint(ckpt)["sha256"]
    h = hashlib.sha256(f"{fp}\0{ckpt.directory.resolve()}\0".encode())
    for name in sorted(ckpt.shards):
        st = ckpt.shards[name].path.stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    prov = ckpt.directory / "surgery.json"
    if prov.is_file():
        h.update(prov.read_bytes())
    return f"{h.hexdigest()[:16]}-{str(dtype).removeprefix('torch.')}", fp


class _ModelJournal(Journal):
    """One model's progress inside the evaluation manifest."""

    def __init__(self, evaluator: Evaluator, manifest: dict, entry: dict) -> None:
        self.evaluator, self.manifest, self.entry = evaluator, manifest, entry

    def commit(self, boundary: int | None) -> None:
        self.entry["completed_layers"] = boundary or 0
        self.evaluator._save(self.manifest)


class Evaluator:
    def __init__(self, work: Path, opts: EvalOptions) -> None:
        self.work = Path(work)
        self.root = self.work / "eval"
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.manifest_path = self.root / "manifest.json"

    # ---------------------------------------------------------------- manifest
    def _identity(self, inputs: EvalInputs) -> dict:
        return {"datasets": inputs.hashes, "rows": {k: list(v) for k, v in inputs.rows.items()},
                "data": inputs.settings, "options": self.opts.identity()}

    def _open(self, identity: dict) -> dict | None:
        if not self.manifest_path.exists():
            if (self.root / "cache.zarr").exists():
                raise SurgeryError("has an evaluation cache but no manifest; delete WORK/eval or use another "
                                   "--work", self.root)
            return None
        manifest = read_json(self.manifest_path, "evaluation manifest")
        require_same_inputs(manifest, identity, "holds an evaluation of", self.root)
        return manifest

    def _save(self, manifest: dict) -> None:
        write_json_atomic(self.manifest_path, manifest)

    # ---------------------------------------------------------------- run
    def run(self, models: list[ModelRef], inputs: EvalInputs) -> dict:
        """Evaluate every model on the inputs; returns {"datasets": {spec: {label: figures}}, "models":
        {label: {"path", "sha256", "dtype"}}}."""
        if not models:
            raise SurgeryError("no model to evaluate")
        labels = [m.label for m in models]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise SurgeryError(f"model {dup[0]!r} is given more than once")
        opened = self._check_models(models, inputs)
        identity = self._identity(inputs)
        manifest = self._open(identity)
        self.root.mkdir(parents=True, exist_ok=True)
        tokens = HiddenCache(self.root / "cache.zarr")
        if manifest is None:
            tokens.write_tokens(inputs.input_ids, inputs.attention_mask, self.opts.batch_size)
            manifest = {"tool": f"surgery {surgery.__version__}", "command": "eval", "inputs": identity,
                        "models": {}}
            self._save(manifest)
        ids, mask = tokens.tokens()
        rows = {spec: tuple(r) for spec, r in manifest["inputs"]["rows"].items()}
        out: dict = {"datasets": {spec: {} for spec in rows}, "models": {}}
        for ref, (model, key, fp, dtype) in zip(models, opened, strict=True):
            entry = manifest["models"].setdefault(key, {"path": str(ref.directory.resolve()), "sha256": fp,
                                                        "dtype": str(dtype).removeprefix("torch."),
                                                        "completed_layers": 0, "result": None})
            if entry.get("result") is None:
                entry["result"] = self._run_model(ref, model, key, dtype, ids, mask, rows, manifest)
            else:  # killed between saving the result and removing the hidden states
                shutil.rmtree(self.root / "models" / key, ignore_errors=True)
            for spec, r in entry["result"].items():
                out["datasets"][spec][ref.label] = summarize(r["loss_sum"], r["tokens"])
            out["models"][ref.label] = {"path": entry["path"], "sha256": fp, "dtype": entry["dtype"]}
            model.ckpt.close()
        return out

    def _check_models(self, models: list[ModelRef], inputs: EvalInputs) -> list[tuple[MoEModel, str, str, torch.dtype]]:
        """Open every model before any work: all must share the first model's vocabulary size (the tokens
        were made with its tokenizer), and every token id must be inside it."""
        opened = []
        first_vocab = None
        top = int(inputs.input_ids[inputs.attention_mask.astype(bool)].max(initial=0))
        for ref in models:
            ckpt = Checkpoint(ref.directory)
            model = MoEModel(ckpt)
            vocab = int(getattr(model.hf_config, "vocab_size", 0) or 0)
            if first_vocab is None:
                first_vocab = vocab
            elif vocab != first_vocab:
                raise SurgeryError(f"vocabulary size {vocab} differs from {models[0].label}'s {first_vocab}; "
                                   "models compared on the same tokens must share a tokenizer", ref.directory)
            if top >= vocab:
                raise SurgeryError(f"token id {top} is outside this model's vocabulary of {vocab}", ref.directory)
            dtype = resolve_dtype(self.opts.dtype, self.device, model)
            key, fp = model_key(ckpt, dtype)
            opened.append((model, key, fp, dtype))
        return opened

    def _run_model(self, ref: ModelRef, model: MoEModel, key: str, dtype: torch.dtype, ids: np.ndarray,
                   mask: np.ndarray, rows: dict[str, tuple[int, int]], manifest: dict) -> dict:
        """One model through the layer engine (zarr tier: each layer's outputs and the manifest are
        durable before the next layer), then the loss head over the last boundary."""
        entry = manifest["models"][key]
        model_root = self.root / "models" / key
        model_root.mkdir(parents=True, exist_ok=True)
        cache = HiddenCache(model_root / "hidden.zarr")
        completed = int(entry.get("completed_layers", 0))
        if completed and not cache.has_hidden(completed):
            completed = 0  # this model's own cache was removed: start it again (its results are not mixed in)
        for stale in cache.hidden_layers():
            if stale != completed or completed == 0:
                cache.delete_hidden(stale)  # interrupted mid-write, or consumed but not yet deleted
        if self.opts.progress:
            Console(stderr=True).print(f"[bold]eval[/bold] {ref.label}" + (f" (resuming at layer {completed})"
                                                                             if completed else ""))
        engine = LayerEngine(model, self.device, dtype, cache, EngineOptions(
            progress=self.opts.progress, cache_budget=0, memory_budget=self.opts.memory_budget,
            crash_prefix="eval."))
        journal = _ModelJournal(self, manifest, entry)
        engine.walk([], ids, mask, batch_ranges(mask, self.opts.batch_size), completed or None, journal)
        head = Head(engine.factory, block_rows=self.opts.block_rows)
        try:
            result = self._losses(head, cache.hidden(model.num_layers), ids, mask, rows)
        finally:
            head.release()
        entry["result"] = result
        self._save(manifest)
        shutil.rmtree(model_root, ignore_errors=True)
        return result

    def _losses(self, head: Head, z, ids: np.ndarray, mask: np.ndarray,
                rows: dict[str, tuple[int, int]]) -> dict:
        """Per dataset: float64 sum of next-token losses and the number of predictions."""
        bs = self.opts.batch_size
        result = {}
        for spec, (start, stop) in rows.items():
            total, count = 0.0, 0
            for s in range(start, stop, bs):
                e = min(s + bs, stop)
                m = mask[s:e]
                t = real_length(torch.from_numpy(m.astype(np.int64)))
                if t < 2:
                    continue
                scored = torch.from_numpy(predicted(m[:, :t]))
                if not scored.any():
                    continue
                x = HiddenCache.read_rows(z, s, e, t)[:, :-1][scored]
                targets = torch.from_numpy(ids[s:e, 1:t])[scored]
                for a in range(0, x.shape[0], TOKENS_PER_HEAD_CALL):
                    losses = head.token_losses(x[a:a + TOKENS_PER_HEAD_CALL], targets[a:a + TOKENS_PER_HEAD_CALL])
                    if not torch.isfinite(losses).all():
                        raise SurgeryError(f"non-finite loss on dataset {spec!r} (rows {s}..{e - 1})",
                                           head.ckpt.directory)
                    total += float(losses.sum())
                count += int(scored.sum())
            result[spec] = {"loss_sum": total, "tokens": count}
        crash_point("eval.head")
        return result
