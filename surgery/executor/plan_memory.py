"""How one layer runs under the memory budget: experts per chunk, tokens per captured group, experts
built at once, and (on a device with room) how many tokens a forward batch holds.

The planner measures what is free once the layer's resident part is loaded (staging and chunk buffers
kept from earlier layers are reused, so what they hold counts as free; the next layer's resident part,
being read meanwhile, does not) and subtracts what a batch's activations need at most
(`activation_bytes`, an upper estimate). On the CPU a chunk is read as stored and dequantised one
expert at a time into a buffer that stays in cache (`BUILD`), which measured faster there than building
a whole chunk's float weights; on CUDA every expert of a chunk is built at once (its raw bytes copied to
the device in one piece) so that a projection over the chunk is one grouped matmul.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from surgery.errors import SurgeryError
from surgery.executor.budget import plan_chunk
from surgery.executor.stream import Batch, real_length

RESIDENT_MAX = 256 << 20  # float bytes of a layer's experts up to which they are built all at once
BUILD = 1  # experts dequantised at a time when streaming on the CPU (each reads its float weights from cache)
READ_MAX = 512 << 20  # stored bytes of one streamed chunk at most
BATCH_SHARE = 4  # an automatic batch's activations take at most 1/BATCH_SHARE of the device's free memory
BATCH_TOKENS_MAX = 1 << 18  # tokens per automatic batch at most (keeps every kernel's index math in 32 bits)


def plan_layer(engine, store, batches: Sequence[Batch], mask: np.ndarray, passes: Sequence = (),
               layer: int = 0) -> tuple[int, int, int]:
    """(experts per chunk, tokens per captured group, experts built at once) for `layer` under the
    engine's budget; tokens per group 0: every expert built at once and computed inside one pass over
    the batches."""
    if any(p.tunes_layer for p in passes):
        return plan_tuned(engine, store, batches, mask, passes, layer)
    engine._track()
    opts, device = engine.opts, engine.device
    tokens = int(mask.sum())
    capture = any(p.needs_capture for p in passes)
    batched = any(p.batch_experts for p in passes) or device.type == "cuda"
    sizes = [padded(b, mask) for b in batches]  # positions as captured
    held_tokens = sum(sizes)  # a group this large holds every batch (a capture pass needs that)
    if opts.experts_per_chunk:
        per = min(opts.experts_per_chunk, store.num_experts)
        build = per if batched else BUILD
        if per >= store.num_experts and not capture:
            return per, 0, build
        return per, held_tokens if capture else (opts.tokens_per_group or tokens), build
    hidden = engine.model.ckpt.info(engine.model.spec.embed).shape[1]
    item = torch.empty((), dtype=engine.dtype).element_size()
    act = max((activation_bytes(engine.factory.config, b, mask, hidden, item, device) for b in batches), default=0)
    act += sum(p.extra_bytes(layer) for p in passes)
    per_expert = sum(p.expert_bytes(layer) for p in passes)
    on_device = device.type == "cuda"
    free_host = engine.budget.host_free() + engine.staging.nbytes() - engine.factory.pending_bytes()
    if on_device:
        free_dev = engine.budget.device_free(device) + engine.buffers.nbytes()
    else:
        free_host += engine.buffers.nbytes()
        free_dev = free_host
    e, compute, raw = store.num_experts, store.compute_bytes(), store.raw_bytes()
    staging = 2 * store.read_chunk() * raw
    # every expert built at once and computed inside one pass over the batches: only for layers whose
    # float experts are small (the passes then need no capture / replay); a full-width layer streams
    # even when the budget would hold it, since dequantising one expert at a time into a buffer the
    # cache keeps is faster than writing the whole layer's float weights to memory and reading them
    # back (measured: MiniMax-M2 shapes, 2 cores)
    small = e * compute <= RESIDENT_MAX and not capture
    if small and on_device and e * (compute + raw) + act <= free_dev and staging <= free_host:
        return e, 0, e
    if small and not on_device and e * compute + act + staging <= free_host:
        return e, 0, e
    # on the device a built expert also holds its raw bytes there (the chunk's one host->device copy)
    build_bytes = compute + per_expert + (raw if on_device else 0)
    # paging: a group of captured tokens (layer input, MoE input, routed output) takes up to a quarter
    per_token = 4 * hidden * item
    # a quarter of what is free, or less when that would leave no room for one expert (at least a batch)
    one = (1 if batched else BUILD) * build_bytes + (0 if on_device else 2 * raw)
    room = max(min(free_dev // 4, free_dev - act - one), 0) // per_token
    group = max(1, min(held_tokens if capture else tokens, max(room, max(sizes, default=1))))
    if capture and group < held_tokens:
        raise SurgeryError(f"layer {layer}: this command needs the MoE inputs of all {held_tokens} calibration "
                           f"positions at once ({held_tokens * per_token / 1e6:.0f} MB), and the memory budget "
                           "leaves room for "
                           f"{group}; raise --memory-budget or calibrate on fewer tokens",
                           engine.model.ckpt.directory)
    held = max(sum(padded(b, mask) for b in part) for part in groups(batches, mask, group)) * per_token
    n = plan_chunk(free_dev - held, free_host - (0 if on_device else held), build_bytes, raw, e, act,
                   on_device, engine.model.ckpt.directory, BUILD,
                   engine.budget.total if engine.budget.given else None, batched)
    # reads beyond ~512 MB buy no speed (one token group streams every chunk once either way)
    n = min(n, max(1, READ_MAX // max(raw, 1)))
    return n, group, n if batched else BUILD


def plan_tuned(engine, store, batches: Sequence[Batch], mask: np.ndarray, passes: Sequence,
               layer: int) -> tuple[int, int, int]:
    """Every expert built at once for a pass that tunes the whole layer, or a one-line refusal naming
    what does not fit: the experts in the compute dtype, the pass's tuning state, the layer's inputs."""
    engine._track()
    e = store.num_experts
    if engine.opts.experts_per_chunk is None:
        hidden = engine.model.ckpt.info(engine.model.spec.embed).shape[1]
        item = torch.empty((), dtype=engine.dtype).element_size()
        experts = e * store.compute_bytes()
        inputs = sum(padded(b, mask) for b in batches) * hidden * item
        state = sum(p.tune_bytes(layer, int(mask.sum())) for p in passes)
        staging = 2 * store.read_chunk() * store.raw_bytes()
        on_device = engine.device.type == "cuda"
        free_dev = (engine.budget.device_free(engine.device) if on_device else engine.budget.host_free()) \
            + engine.buffers.nbytes()
        host = staging + (0 if on_device else experts + state + inputs)
        need = experts + state + inputs
        if need > free_dev or host > engine.budget.host_free() + engine.staging.nbytes():
            raise SurgeryError(f"layer {layer}: tuning holds the whole layer at once: its {e} routed experts "
                               f"({experts / 1e6:.0f} MB as {str(engine.dtype).removeprefix('torch.')}), the "
                               f"tuning state ({state / 1e6:.0f} MB) and its inputs ({inputs / 1e6:.0f} MB) "
                               f"need {need / 1e6:.0f} MB and the memory budget leaves "
                               f"{max(free_dev, 0) / 1e6:.0f} MB{' on the device' if on_device else ''}; "
                               "raise --memory-budget (or calibrate on fewer tokens)", engine.model.ckpt.directory)
    return e, 0, e


def batch_tokens(engine, mask: np.ndarray) -> int | None:
    """Tokens per forward batch when the batch size is automatic: on CUDA as many as a share of the
    device's free memory holds in activations (`activation_bytes` of one row at the longest length,
    per token), at least one row; None on the CPU (batches of `DEFAULT_ROWS` rows there: more tokens
    per batch buy a CPU nothing, and the default keeps its results what they were)."""
    if engine.device.type != "cuda":
        return None
    length = real_length(mask)
    hidden = engine.model.ckpt.info(engine.model.spec.embed).shape[1]
    item = torch.empty((), dtype=engine.dtype).element_size()
    one_row = np.ones((1, length), dtype=mask.dtype)
    per_token = activation_bytes(engine.factory.config, (0, 1), one_row, hidden, item, engine.device) / length
    # the captured group holds 4 hidden vectors a token beside the activations when a layer pages
    per_token += 4 * hidden * item
    room = engine.budget.device_free(engine.device) // BATCH_SHARE
    return int(max(length, min(BATCH_TOKENS_MAX, room // max(per_token, 1))))


def groups(batches: Sequence[Batch], mask: np.ndarray, tokens: int) -> list[list[Batch]]:
    """Consecutive batches holding about `tokens` real-length positions each (at least one batch)."""
    out, part, held = [], [], 0
    for b in batches:
        n = padded(b, mask)
        if part and held + n > tokens:
            out.append(part)
            part, held = [], 0
        part.append(b)
        held += n
    if part:
        out.append(part)
    return out


def padded(batch: Batch, mask: np.ndarray) -> int:
    """Positions of a batch as it runs and is captured: rows x its longest real length."""
    return (batch[1] - batch[0]) * real_length(mask[batch[0]:batch[1]])


def activation_bytes(config, batch: Batch, mask: np.ndarray, hidden: int, item: int,
                     device: torch.device | None = None) -> int:
    """An upper estimate of one batch's live transient tensors in a decoder layer: the attention phase
    (scores and their softmax for every head where they are materialised: eager attention, or any
    attention on the CPU; on CUDA a fused kernel holds only the mask), q/k/v/o and the residual stream's
    copies; the MoE phase: the routing sorted by expert, and a chunk's part of at most every token's
    pairs at once (input, intermediate, output, weighted output, and the float64 copy the output sums
    are taken from). Measured on the 24-layer benchmark (batch 8 x 256): 70 MB estimated for 40-60 MB
    live before the grouped compute."""
    rows = batch[1] - batch[0]
    t = real_length(mask[batch[0]:batch[1]])
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    inter = int(getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", hidden))
    k = int(getattr(config, "num_experts_per_tok", 1) or 1)
    tokens = rows * t
    fused = device is not None and device.type == "cuda" and getattr(config, "_attn_implementation", "") != "eager"
    scores = rows * t * t * (1 + item) if fused else 2 * rows * heads * t * t * 4
    proj = tokens * (3 * heads * head_dim + 4 * hidden) * item
    experts = tokens * (3 * inter + 3 * hidden) * item + tokens * hidden * 8 + tokens * k * 64
    # attention and the MoE block run one after the other: the larger phase, with the residual stream's
    # copies live in both
    return max(scores + proj, experts + 4 * tokens * hidden * item)
