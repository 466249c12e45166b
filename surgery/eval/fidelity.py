"""Per-layer fidelity of pruned MoE blocks, without building a pruned model.

For one MoE block and the tokens that reach it, `layer_fidelity` compares the block's routed output y
(every expert available, the model's own router) with y' computed by the block as the pruned
checkpoint will compute it: the router restricted to the kept rows (its weight, and every per-expert
bias, sliced; its expert count set to the kept count) routes among the kept experts only, with the
model's own scoring, bias, groups, renormalisation and scaling. The figure is ‖y − y'‖ / ‖y‖ over all
real tokens (Frobenius), a cheap preview of which method and ratio hurt a layer least. Shared experts
are left out: pruning never touches them, so they would only dilute the difference.

`run_fidelity` (the `surgery fidelity` command) needs each MoE layer's input. A calibration run with
`--keep-hidden` leaves `hidden_<l>` for every layer in `WORK/cache.zarr`, and those are used as they
are; any layer input that is missing is recomputed by streaming from the calibration tokens (the
embedding, then layer after layer, two layers of hidden states at a time in
`WORK/fidelity/cache.zarr`). Either way only MoE blocks are measured and nothing is written besides
`WORK/fidelity.json`.
"""

from __future__ import annotations

import copy
import inspect
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from surgery.arch.model import MoEModel
from surgery.arch.table import TABLE
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.executor.cache import HiddenCache
from surgery.executor.device import resolve_device
from surgery.executor.engine import EngineOptions, Journal, LayerEngine, LayerPass
from surgery.executor.experts import BatchRouting, ChunkRows, ExpertListener, grouped_forward
from surgery.executor.routing import SortedPairs
from surgery.executor.stream import batch_ranges
from surgery.jsonio import read_json, write_json_atomic

KeySet = tuple[str, float]


# ---------------------------------------------------------------------------------------------- routing
_ROUTER_NAMES = tuple(dict.fromkeys(spec.router_module for spec in TABLE))  # "gate", "router" (gpt-oss)


def router_of(block: nn.Module) -> nn.Module:
    """The MoE block's router module, by the attribute names the architecture table gives."""
    for name in _ROUTER_NAMES:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            return router
    raise SurgeryError(f"{type(block).__name__} has no router module (looked for {', '.join(_ROUTER_NAMES)})")


def _wants_block_bias(block: nn.Module) -> bool:
    """MiniMax-M2 keeps e_score_correction_bias on the block and passes it to the router."""
    return "e_score_correction_bias" in inspect.signature(router_of(block).forward).parameters


def _route(block: nn.Module, gate: nn.Module, x: torch.Tensor, block_bias: torch.Tensor | None):
    out = gate(x, block_bias) if block_bias is not None else gate(x)
    _, weights, index = out
    return index, weights


def sliced_router(block: nn.Module, keep: list[int]) -> tuple[nn.Module, torch.Tensor | None]:
    """A copy of the block's router that knows only the experts `keep` (sorted: new id = position), as
    the rewritten checkpoint's router: every parameter or buffer with one row per expert is sliced (and
    a `[1, E]` one, ERNIE-4.5's `moe_statics.e_score_correction_bias`, along its experts axis, in the
    router's submodules too) and `num_experts` follows. Returns (router, the block-level bias sliced,
    if the router takes one). The block and its router are not modified; expert weights are not copied."""
    gate = router_of(block)
    num = gate.weight.shape[0]
    idx = torch.as_tensor(sorted(keep), dtype=torch.long, device=gate.weight.device)
    if idx.numel() == 0 or len(set(idx.tolist())) != idx.numel() or int(idx.min()) < 0 or int(idx.max()) >= num:
        raise SurgeryError(f"keep set must be distinct expert ids in 0..{num - 1}, got {list(keep)[:8]}...")

    def cut(t):
        if t is None or not t.ndim:
            return t
        if t.shape[0] == num:
            return t.index_select(0, idx)
        if t.ndim == 2 and t.shape[0] == 1 and t.shape[1] == num:
            return t.index_select(1, idx)
        return t

    def sliced(module: nn.Module) -> nn.Module:
        new = copy.copy(module)  # shares nothing mutable below: the registries are replaced
        new.__dict__["_parameters"] = {n: (nn.Parameter(cut(p.data), requires_grad=False) if p is not None else None)
                                       for n, p in module._parameters.items()}
        new.__dict__["_buffers"] = {n: cut(b) for n, b in module._buffers.items()}
        new.__dict__["_modules"] = {n: (sliced(m) if m is not None else None) for n, m in module._modules.items()}
        for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(module, attr, None), int):
                setattr(new, attr, idx.numel())
        return new

    bias = cut(block.e_score_correction_bias) if _wants_block_bias(block) else None
    return sliced(gate), bias


class _Routed:
    """Σ_slots w · E_j(x) (float32 [N, H]) for several routings of the same tokens (index in original
    expert ids [N, k], weights [N, k]), built chunk by chunk of experts: each expert runs once, on the
    union of the tokens any routing sends it (one grouped forward per chunk), so measuring many keep
    sets costs little more than one. Each routing's pairs and the union are sorted by expert once."""

    def __init__(self, x: torch.Tensor, routings: list[tuple[torch.Tensor, torch.Tensor]], num: int) -> None:
        self.x = x
        n = x.shape[0]
        self.outs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for _ in routings]
        self.parts = [SortedPairs(index, weights, num) for index, weights in routings]
        keys = [index.reshape(-1)[p.slot_of] * n + p.token_of
                for (index, _), p in zip(routings, self.parts, strict=True)]
        union = torch.unique(torch.cat(keys))  # sorted: by expert, then token
        self.union = SortedPairs(torch.div(union, n, rounding_mode="floor")[:, None], None, num, rounds=False)
        self.union_tokens = union % n
        self.position = [torch.searchsorted(union, k) for k in keys]  # each pair's row in the union

    def add(self, lo: int, hi: int, run) -> None:
        """Experts [lo, hi)'s contributions; `run(x, tokens, counts, lengths)` evaluates them on pairs
        sorted by expert."""
        ua, ub = self.union.rows(lo, hi)
        if ua == ub:
            return
        y = run(self.x, self.union_tokens[ua:ub], self.union.counts(lo, hi), self.union.lengths[lo:hi]).float()
        for out, p, pos in zip(self.outs, self.parts, self.position, strict=True):
            a, b = p.rows(lo, hi)
            if b > a:
                p.add_into(out, lo, hi, y[pos[a:b] - ua] * p.weight_of[a:b, None].float())


def routed_outputs(experts: nn.Module, x: torch.Tensor, routings: list[tuple[torch.Tensor, torch.Tensor]],
                   num: int) -> list[torch.Tensor]:
    """`_Routed` over a resident block's experts (every expert as one chunk)."""
    acc = _Routed(x, routings, num)
    params = dict(experts.named_parameters())
    acc.add(0, num, lambda rows, tokens, counts, lengths: grouped_forward(experts, params, rows, tokens, counts,
                                                                         lengths))
    return acc.outs


def _routings(block: nn.Module, x: torch.Tensor, keep_sets: dict[KeySet, list[int]]):
    """The block's own routing of x, then each keep set's (as the pruned checkpoint's router routes)."""
    full_bias = block.e_score_correction_bias if _wants_block_bias(block) else None
    routings = [_route(block, router_of(block), x, full_bias)]
    for keep in keep_sets.values():
        ids = torch.as_tensor(sorted(keep), dtype=torch.long, device=x.device)
        gate, bias = sliced_router(block, sorted(keep))
        p_index, p_weights = _route(block, gate, x, bias)
        routings.append((ids[p_index], p_weights))
    return routings


def _errors(keys, outs: list[torch.Tensor], tokens: int) -> dict:
    y, *pruned = outs
    y = y.double()
    ref_sq = float((y * y).sum())
    out = {}
    for key, yp in zip(keys, pruned, strict=True):
        diff = y - yp.double()
        err_sq = float((diff * diff).sum())
        out[key] = {"err_sq": err_sq, "ref_sq": ref_sq, "tokens": tokens,
                    "rel_error": math.sqrt(err_sq / ref_sq) if ref_sq > 0 else 0.0}
    return out


@torch.no_grad()
def layer_fidelity(block: nn.Module, x: torch.Tensor, keep_sets: dict[KeySet, list[int]]) -> dict:
    """For MoE `block` and its input tokens x [N, H]: {(method, ratio): {"rel_error", "err_sq",
    "ref_sq", "tokens"}} where rel_error = ‖y − y_pruned‖ / ‖y‖ of the routed output over all tokens.
    The squared sums are returned too so batches can be added up (`combine`)."""
    x = x.reshape(-1, x.shape[-1])
    num = router_of(block).weight.shape[0]
    outs = routed_outputs(block.experts, x, _routings(block, x, keep_sets), num)
    return _errors(list(keep_sets), outs, int(x.shape[0]))


def combine(total: dict, part: dict) -> dict:
    """Add `part` (a layer_fidelity result) into `total`, in place; rel_error is recomputed."""
    for key, r in part.items():
        t = total.setdefault(key, {"err_sq": 0.0, "ref_sq": 0.0, "tokens": 0, "rel_error": 0.0})
        t["err_sq"] += r["err_sq"]
        t["ref_sq"] += r["ref_sq"]
        t["tokens"] += r["tokens"]
        t["rel_error"] = math.sqrt(t["err_sq"] / t["ref_sq"]) if t["ref_sq"] > 0 else 0.0
    return total


class FidelityPass(LayerPass):
    """At each MoE layer that has keep sets, listens to its routed experts: for every batch's real
    tokens, the full routing's and each keep set's routed outputs are built expert by expert (so this
    works with experts paged in chunks too) and their `layer_fidelity` figures added up."""

    def __init__(self, keep: dict[int, dict[KeySet, list[int]]]) -> None:
        self.keep = keep
        self.results: dict[int, dict] = {}
        self._listener: _FidelityListener | None = None

    def listeners(self, layer: int, block: nn.Module, runner) -> list[ExpertListener]:
        sets = self.keep.get(layer)
        self._listener = _FidelityListener(block, sets) if sets else None
        return [self._listener] if self._listener else []

    def end_layer(self, layer: int) -> None:
        if self._listener is not None:
            self.results[layer] = self._listener.finish()
            self._listener = None


class _FidelityListener(ExpertListener):
    def __init__(self, block: nn.Module, keep_sets: dict[KeySet, list[int]]) -> None:
        self.block, self.keep_sets = block, keep_sets
        self.num = router_of(block).weight.shape[0]
        self.batches: list[tuple[_Routed, int]] = []

    @torch.no_grad()
    def begin(self, batch: BatchRouting) -> None:
        xs = batch.x[batch.valid]
        if not xs.shape[0]:
            return
        acc = _Routed(xs, _routings(self.block, xs, self.keep_sets), self.num)
        batch.notes[self] = acc
        self.batches.append((acc, int(xs.shape[0])))

    def chunk(self, rows: ChunkRows) -> None:
        acc = rows.batch.notes.get(self)
        if acc is not None:
            acc.add(rows.lo, rows.hi, rows.run)

    def finish(self) -> dict:
        total: dict = {}
        for acc, n in self.batches:
            combine(total, _errors(list(self.keep_sets), acc.outs, n))
        return total


# ---------------------------------------------------------------------------------------------- command
class _SplitCache(HiddenCache):
    """Reads hidden_<l> from the calibration cache where it kept it, else from this scratch cache; all
    writes go to the scratch cache (the calibration cache is never modified)."""

    def __init__(self, scratch: Path, source: HiddenCache) -> None:
        super().__init__(scratch)
        self.source = source

    def hidden(self, layer: int):
        return self.source.hidden(layer) if self.source.has_hidden(layer) else super().hidden(layer)

    def has_hidden(self, layer: int) -> bool:
        return self.source.has_hidden(layer) or super().has_hidden(layer)


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def run_fidelity(work: Path, methods: list[str], ratios: list[float], model_dir: Path | None = None,
                 device: str = "auto", seed: int = 0, progress: bool = True,
                 memory_budget: int | None = None) -> dict:
    """Fidelity of every MoE layer for each (method, ratio), from a finished calibration in WORK;
    writes and returns WORK/fidelity.json. dtype and batches are the calibration's."""
    from surgery.plan import make_plan, n_keep_for

    work = Path(work)
    saliency = read_json(work / "saliency.json", "saliency (run `surgery calibrate` first)")
    manifest = read_json(work / "manifest.json", "calibration manifest")
    if not manifest.get("complete"):
        raise SurgeryError("calibration is not complete; finish `surgery calibrate` first", work)
    cache_path = work / "cache.zarr"
    if not cache_path.exists():
        raise SurgeryError("has no cache.zarr (the calibration tokens); recalibrate into this directory", work)
    if not (model_dir or saliency.get("model_path")):
        raise SurgeryError("saliency.json names no model_path; pass --model", work / "saliency.json")
    model_dir = Path(model_dir or saliency["model_path"])
    ckpt = Checkpoint(model_dir)
    model = MoEModel(ckpt)
    source_fp = fingerprint(ckpt)
    if source_fp["sha256"] != manifest["inputs"]["model"]:
        raise SurgeryError("is not the model this work directory was calibrated on", model_dir)
    if not methods or not ratios:
        raise SurgeryError("give at least one method and one ratio")
    plans = {(m, r): make_plan(saliency, model, m, r, seed=seed) for m in methods for r in ratios}
    keep = {layer: {key: plan["layers"][str(layer)]["keep"] for key, plan in plans.items()}
            for layer in model.moe_layers}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        manifest["inputs"]["options"]["dtype"]]
    options = manifest["inputs"]["options"]  # the calibration's batches (resolved ones when it had them)
    batching = manifest.get("batches") or {"batch_size": int(options["batch_size"]),
                                           "batch_tokens": options.get("batch_tokens")}
    source = HiddenCache(cache_path)
    ids, mask = source.tokens()
    scratch_path = work / "fidelity" / "cache.zarr"
    shutil.rmtree(scratch_path, ignore_errors=True)
    cache = _SplitCache(scratch_path, source)

    moe = set(model.moe_layers)
    last = max(moe)
    run = {last: True}
    for layer in range(last - 1, -1, -1):
        run[layer] = layer in moe or (run[layer + 1] and not source.has_hidden(layer + 1))
    streamed = [layer for layer in range(last + 1) if run[layer] and not source.has_hidden(layer)]
    todo = [layer for layer in range(last + 1) if run[layer]]
    fidelity = FidelityPass(keep)
    try:
        engine = LayerEngine(model, resolve_device(device), dtype, cache, EngineOptions(
            progress=progress, cache_budget=0, memory_budget=memory_budget, crash_prefix="fidelity."))
        start = None if not source.has_hidden(todo[0]) else todo[0]
        batches = batch_ranges(mask, batching["batch_size"], batching["batch_tokens"])
        engine.walk([fidelity], ids, mask, batches, start, Journal(), layers=todo)
    finally:
        shutil.rmtree(work / "fidelity", ignore_errors=True)
        ckpt.close()
    results = fidelity.results
    rkeys = [ratio_key(r) for r in ratios]
    layers_out = {str(layer): {m: {ratio_key(r): results[layer][(m, r)]["rel_error"] for r in ratios}
                               for m in methods} for layer in sorted(results)}
    mean = {m: {rk: float(np.mean([layers_out[k][m][rk] for k in layers_out])) for rk in rkeys} for m in methods}

    out = {
        "model": source_fp,
        "model_path": str(model_dir.resolve()),
        "tokens": int(mask.sum()),
        "metric": "||y - y_pruned|| / ||y|| of the routed expert output, real calibration tokens",
        "hidden_source": "streamed" if streamed else "kept",
        "streamed_layers": streamed,
        "methods": list(methods),
        "ratios": [float(r) for r in ratios],
        "n_keep": {ratio_key(r): n_keep_for(model.num_experts, r) for r in ratios},
        "num_experts": model.num_experts,
        "layers": layers_out,
        "mean": mean,
    }
    write_json_atomic(work / "fidelity.json", out)
    return out
