"""A MoE layer's routed experts, paged in chunks instead of held whole.

The unit of residency is a chunk of experts whose size the memory budget decides (`surgery.executor.
budget`), not a decoder layer: a DeepSeek-V3 layer (34 GB in bf16) runs in a few GB. Attention, norms,
the router and shared experts stay resident (`LayerFactory.load_resident`); the routed experts'
parameters stay on the meta device and `ExpertStore` supplies them chunk by chunk:

- `read(ids, staging)` reads the chunk's bytes *as stored* (FP8 weights and their float32 scales, W4A16
  `qweight`/`qzeros`/`scales`, or bf16) into a reusable host staging buffer (pinned on CUDA, allocated
  once per shape and reused for every chunk of every layer), in a background thread one chunk ahead of
  the compute;
- `materialize(raw)` moves those bytes to the compute device and dequantises them there, in the compute
  dtype, into reused `[n, ...]` buffers laid out as transformers 5 fuses them (`gate_up_proj [n, 2I, H]`,
  `down_proj [n, H, I]`, gpt-oss biases): FP8 blocks are a broadcast multiply over a block view, W4A16
  groups a broadcast subtract-and-multiply over a [out, groups, group_size] view, neither with
  `repeat_interleave` copies, and on the CPU `copy_`/`mul_` run multithreaded in place.

`RoutedExperts` replaces the block's `experts.forward`. With every expert in one chunk it computes the
layer in one pass; otherwise the executor runs the layer's batches once to *capture* each batch's MoE
input and routing (the experts' contribution returned as zeros), streams the chunks over the captured
tokens, and runs the batches again to *replay* the finished expert outputs into the layer. Per expert
and batch the computation is the same call on the same values in both modes, and each token's output
is accumulated in ascending expert order in both, so paged results are bit-identical to the one-chunk
path. Listeners (saliency, fidelity) see each expert's output on its routed tokens as it is computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from surgery.checkpoint.fp8 import SCALE_SUFFIX, block_size
from surgery.checkpoint.reader import PAGE
from surgery.checkpoint.w4a16 import QWEIGHT, QZEROS, SCALES, dequantize_w4a16_into, group_size_of, weight_shape
from surgery.errors import SurgeryError

GAP = 1 << 20  # bytes between two tensors below which one read covers both

# ---------------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Piece:
    """One on-disk tensor (or rows `rows` of a fused `[E, ...]` one) that fills rows
    [row, row + n) of an expert's in-memory parameter; `scale`: its FP8 `weight_scale_inv`; `packed`:
    for a W4A16 linear (`name` is then its `qweight`), its (`qzeros`, `scales`)."""

    name: str
    row: int
    scale: str | None = None
    rows: tuple[int, int] | None = None  # expert slice of a fused-on-disk tensor
    packed: tuple[str, str] | None = None

    def stored(self) -> tuple[tuple[str, str], ...]:
        """(kind, tensor name) of every tensor read for this piece: "w" (the weight or qweight), then
        "s" (FP8 scale_inv or W4A16 scales) and "z" (W4A16 qzeros)."""
        if self.packed:
            return ("w", self.name), ("z", self.packed[0]), ("s", self.packed[1])
        return (("w", self.name), ("s", self.scale)) if self.scale else (("w", self.name),)


@dataclass(frozen=True)
class ParamLayout:
    """An in-memory fused expert parameter (e.g. `gate_up_proj`): its per-expert shape and where each
    expert's values are on disk."""

    name: str
    shape: tuple[int, ...]
    pieces: tuple[tuple[Piece, ...], ...]  # per expert


class ExpertStore:
    """Where one layer's routed experts live on disk, and how a chunk of them is read and built."""

    def __init__(self, factory, layer: int) -> None:
        self.factory = factory
        self.model = factory.model
        self.ckpt = self.model.ckpt
        self.layer = layer
        self.dtype = factory.dtype
        self.device = factory.device
        self.params = self._layout()
        self.num_experts = len(self.params[0].pieces)
        self.timings = factory.timings

    def _layout(self) -> list[ParamLayout]:
        model, spec, ckpt = self.model, self.model.spec, self.ckpt
        experts: dict[int, dict[str, str]] = {}
        fused: dict[str, str] = {}
        role_of = {proj: role for role, proj in spec.projections.items()}
        for info in model.layer_tensors(self.layer):
            role = model.classify(info.name)
            if role.kind == "expert" and role.rest.endswith((".weight", "." + QWEIGHT)):
                # a W4A16 expert linear has no `.weight`: its qweight stands for it (qzeros/scales beside)
                proj = role.rest.rpartition(".")[0]
                if proj not in role_of:
                    raise SurgeryError(f"unexpected expert tensor {info.name!r} for family {spec.family}",
                                       ckpt.directory)
                experts.setdefault(role.expert, {})[role_of[proj]] = info.name
            elif role.kind == "fused":
                fused[info.name[len(model.moe_prefix(self.layer)):]] = info.name
        if experts:
            ids = sorted(experts)
            if ids != list(range(len(ids))):
                raise SurgeryError(f"layer {self.layer} has experts {ids[:3]}... not numbered 0..n-1", ckpt.directory)
            out = []
            for param, roles in spec.fused_experts:
                per_expert = []
                for e in ids:
                    row, pieces = 0, []
                    for r in roles:
                        if r not in experts[e]:
                            raise SurgeryError(f"layer {self.layer} expert {e} has no {spec.projections[r]!r} "
                                               "weight", ckpt.directory)
                        name = experts[e][r]
                        if name.endswith("." + QWEIGHT):
                            pieces.append(Piece(name, row, packed=self._packed_parts(name)))
                        else:
                            scale = name.removesuffix("weight") + SCALE_SUFFIX
                            pieces.append(Piece(name, row, scale if scale in ckpt else None))
                        row += weight_shape(self.ckpt, pieces[-1].name)[0]
                    per_expert.append(tuple(pieces))
                first = weight_shape(self.ckpt, per_expert[0][0].name)
                out.append(ParamLayout(param, (row, *first[1:]), tuple(per_expert)))
            return out
        # experts fused on disk (gpt-oss): in-memory name = the disk name under the experts module
        out = []
        for rel, name in sorted(fused.items()):
            shape = ckpt.info(name).shape
            param = rel.split("experts.", 1)[1]
            out.append(ParamLayout(param, tuple(shape[1:]),
                                   tuple((Piece(name, 0, None, (e, e + 1)),) for e in range(shape[0]))))
        return out

    def _packed_parts(self, qweight: str) -> tuple[str, str]:
        stem = qweight.removesuffix(QWEIGHT)
        for part in (QZEROS, SCALES):
            if stem + part not in self.ckpt:
                raise SurgeryError(f"W4A16 expert tensor {qweight!r} has no {stem + part!r} beside it",
                                   self.ckpt.directory)
        return stem + QZEROS, stem + SCALES

    # ---------------------------------------------------------------- sizes
    def raw_bytes(self, expert: int = 0) -> int:
        """Bytes of one expert as stored (what staging holds): W4A16 qweight, qzeros and scales, FP8
        weight and scales, or the plain weight."""
        total = 0
        for p in self.params:
            for piece in p.pieces[expert]:
                for kind, name in piece.stored():
                    info = self.ckpt.info(name)
                    total += info.nbytes // info.shape[0] if piece.rows and kind == "w" else info.nbytes
        return total

    def compute_bytes(self) -> int:
        """Bytes of one expert's parameters in the compute dtype (what a chunk buffer holds)."""
        item = torch.empty((), dtype=self.dtype).element_size()
        return sum(item * _numel(p.shape) for p in self.params)

    # ---------------------------------------------------------------- read (background thread)
    def _spans(self, ids: Sequence[int]) -> list[tuple[str, int, int, list[tuple]]]:
        """The stored bytes of experts `ids`, as few large reads as possible: each tensor's byte range
        (or a fused tensor's expert rows), sorted by file position and merged across gaps below
        `GAP`, with the tensors each read holds."""
        wanted = []
        for p in self.params:
            for i, e in enumerate(ids):
                for k, piece in enumerate(p.pieces[e]):
                    for kind, name in piece.stored():
                        info = self.ckpt.info(name)
                        if piece.rows and kind == "w":
                            row = info.nbytes // info.shape[0]
                            n = piece.rows[1] - piece.rows[0]
                            wanted.append((info.shard, info.begin + piece.rows[0] * row, n * row,
                                           (p.name, i, k, kind), info.torch_dtype, (n, *info.shape[1:])))
                        else:
                            wanted.append((info.shard, info.begin, info.nbytes, (p.name, i, k, kind),
                                           info.torch_dtype, info.shape))
        wanted.sort(key=lambda w: (w[0], w[1]))
        spans: list[tuple[str, int, int, list[tuple]]] = []
        for w in wanted:
            if spans and spans[-1][0] == w[0] and w[1] - spans[-1][2] <= GAP:
                shard, begin, end, members = spans[-1]
                spans[-1] = (shard, begin, max(end, w[1] + w[2]), [*members, w])
            else:
                spans.append((w[0], w[1], w[1] + w[2], [w]))
        return spans

    def read(self, ids: Sequence[int], staging: _Half) -> RawChunk:
        """The bytes of experts `ids` as stored, read into `staging` (no conversion, no copy): large
        sequential reads (O_DIRECT where the filesystem allows it) of the merged byte spans."""
        t0 = time.perf_counter()
        spans = self._spans(ids)
        buf = staging.take(sum(end - begin + 2 * PAGE for _, begin, end, _m in spans))
        parts: dict[tuple, torch.Tensor] = {}
        offset = 0
        for shard, begin, end, members in spans:
            start = offset + self.ckpt.read_range(shard, begin, end - begin, buf[offset:])
            for _shard, t_begin, length, key, dtype, shape in members:
                at = start + t_begin - begin
                raw = buf[at:at + length]
                if at % torch.empty((), dtype=dtype).element_size():
                    raw = raw.clone()  # not aligned for its dtype (odd offsets in the file): copy it
                parts[key] = raw.view(dtype).reshape(shape)
            offset = -(-(start + end - begin) // PAGE) * PAGE
        views = {p.name: [[(piece, parts[(p.name, i, k, "w")], parts.get((p.name, i, k, "s")),
                            parts.get((p.name, i, k, "z")))
                           for k, piece in enumerate(p.pieces[e])] for i, e in enumerate(ids)]
                 for p in self.params}
        self.timings["read"] += time.perf_counter() - t0
        return RawChunk(list(ids), views)

    # ---------------------------------------------------------------- build (compute thread)
    def materialize(self, raw: RawChunk, out: dict[str, torch.Tensor], first: int = 0) -> None:
        """Build the chunk's parameters into rows [first, first + n) of `out` (`[*, ...]` buffers on the
        compute device in the compute dtype): bytes moved to the device as stored, FP8 dequantised
        there (a broadcast over 2-D blocks), W4A16 decoded there (a broadcast over groups)."""
        cfg = self.ckpt.config
        cuda = self.device.type == "cuda"
        for p in self.params:
            dst = out[p.name]
            for i, parts in enumerate(raw.views[p.name]):
                for piece, w, s, z in parts:
                    t0 = time.perf_counter()
                    w = w.to(self.device, non_blocking=True)
                    s = s.to(self.device, non_blocking=True) if s is not None else None
                    z = z.to(self.device, non_blocking=True) if z is not None else None
                    if cuda:
                        torch.cuda.current_stream(self.device).synchronize()
                    t1 = time.perf_counter()
                    self.timings["transfer"] += t1 - t0
                    rows = w.shape[1] if piece.packed else w.shape[0]
                    target = dst[first + i] if piece.rows else dst[first + i, piece.row:piece.row + rows]
                    if piece.packed:
                        dequantize_w4a16_into(target, w, z, s, group_size_of(cfg))
                    elif s is None:
                        target.copy_(w.reshape(target.shape))
                    else:
                        dequantize_into(target, w, s, block_size(cfg, tuple(w.shape), tuple(s.shape)))
                    if cuda:
                        torch.cuda.current_stream(self.device).synchronize()
                    self.timings["dequant"] += time.perf_counter() - t1

    def _raw_stream(self, groups: list[list[int]], staging: Staging, prefetch: bool) -> Iterator[RawChunk]:
        """Raw chunks in order, the next one read in a background thread while this one is built and
        computed (two staging halves: at most one chunk read ahead)."""
        if not groups:
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="surgery-experts") if prefetch else None
        try:
            ahead: Future | None = None
            for g, chunk in enumerate(groups):
                if pool is None:
                    raw = self.read(chunk, staging.half(g))
                else:
                    raw = ahead.result() if ahead is not None else self.read(chunk, staging.half(g))
                    ahead = pool.submit(self.read, groups[g + 1], staging.half(g + 1)) \
                        if g + 1 < len(groups) else None
                yield raw
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def read_chunk(self) -> int:
        """Experts per read when all of them are built at once (~64 MB of stored bytes per read)."""
        return max(1, min(self.num_experts, (64 << 20) // max(self.raw_bytes(), 1)))

    def load_all(self, staging: Staging, buffers: Buffers, prefetch: bool = True) -> dict[str, torch.Tensor]:
        """Every expert, as `[E, ...]` parameters, read in chunks that overlap their building."""
        e, per = self.num_experts, self.read_chunk()
        out = {p.name: buffers.get(p.name, (e, *p.shape), self.dtype, self.device) for p in self.params}
        ids = list(range(e))
        for raw in self._raw_stream([ids[i:i + per] for i in range(0, e, per)], staging, prefetch):
            self.materialize(raw, out, raw.ids[0])
        return out

    def chunks(self, ids: list[int], per_chunk: int, staging: Staging, buffers: Buffers,
               prefetch: bool = True, build: int | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(expert ids, their `[n, ...]` parameters) in ascending order: read `per_chunk` experts at a
        time as stored, built `build` (default: all of the chunk) at a time; the buffers are reused, so
        parameters are valid until the next ones are yielded."""
        build = build or per_chunk
        groups = [ids[i:i + per_chunk] for i in range(0, len(ids), per_chunk)]
        for raw in self._raw_stream(groups, staging, prefetch):
            for at in range(0, len(raw.ids), build):
                part = raw.part(at, at + build)
                n = len(part.ids)
                out = {p.name: buffers.get(p.name, (build, *p.shape), self.dtype, self.device)[:n]
                       for p in self.params}
                self.materialize(part, out)
                yield part.ids, out


@dataclass
class RawChunk:
    """Experts `ids` as stored: per parameter, per expert, per piece (piece, weight or qweight, FP8
    scale_inv or W4A16 scales, W4A16 qzeros), views into the staging buffer."""

    ids: list[int]
    views: dict[str, list[list[tuple[Piece, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]]]

    def part(self, start: int, stop: int) -> RawChunk:
        """Experts [start, stop) of this chunk (views of the same staging bytes)."""
        return RawChunk(self.ids[start:stop], {k: v[start:stop] for k, v in self.views.items()})


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class Staging:
    """Reusable host buffers for raw chunk bytes: two halves (the chunk being built and the one being
    read ahead), each grown only when a larger chunk needs it, pinned on CUDA so host->device copies
    are asynchronous. Allocated once and reused across chunks and layers."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._halves = [_Half(pinned), _Half(pinned)]

    def half(self, i: int) -> _Half:
        return self._halves[i % 2]

    def nbytes(self) -> int:
        return sum(h.nbytes() for h in self._halves)


class _Half:
    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.buf: torch.Tensor | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """At least `nbytes`, page aligned (O_DIRECT reads land in it)."""
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None
            raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=self.pinned)
            self.buf = raw[(-raw.data_ptr()) % PAGE:][:nbytes]
        return self.buf

    def nbytes(self) -> int:
        return 0 if self.buf is None else self.buf.numel()


class Buffers:
    """Compute-dtype chunk buffers on the device, kept by shape and reused for every chunk and layer
    (a smaller last chunk uses the leading slice of the same buffer)."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0] or buf.dtype != dtype:
            self._bufs.pop(name, None)
            buf = torch.empty(shape, dtype=dtype, device=device)
            self._bufs[name] = buf
        return buf[:shape[0]]

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._bufs.values())

    def clear(self) -> None:
        self._bufs.clear()


def dequantize_into(dst: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int]) -> None:
    """dst = weight * scale of its block, in place in dst's dtype (the product is taken in float32,
    so float32 and bf16 results equal `fp8.dequantize`'s). Full blocks are one broadcast multiply over
    a [rows/b, b, cols/b, b] view; partial edge blocks get the same broadcast on their strips."""
    scale = scale_inv.float()
    if dst.device.type == "cpu" and _fast_e4m3(weight, scale):
        work = dst if dst.dtype == torch.float32 else _scratch("f32", weight.shape, torch.float32)
        _e4m3_bits_to(work, weight)
        _mul_blocks(work, scale * _E4M3_OFFSET, block)
        if work is not dst:
            dst.copy_(work)
        return
    dst.copy_(weight)
    _mul_blocks(dst, scale, block)


def _mul_blocks(dst: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    rows, cols = dst.shape
    br, bc = block
    fr, fc = rows - rows % br, cols - cols % bc
    nr, nc = fr // br, fc // bc
    if fr and fc:
        dst[:fr, :fc].view(nr, br, nc, bc).mul_(scale[:nr, None, :nc, None])
    if fc < cols and fr:  # right strip: one partial column block per row block
        dst[:fr, fc:].view(nr, br, cols - fc).mul_(scale[:nr, None, nc:nc + 1])
    if fr < rows:  # bottom strip: one partial row block
        bottom = dst[fr:]
        if fc:
            bottom[:, :fc].view(rows - fr, nc, bc).mul_(scale[nr, None, :nc, None])
        if fc < cols:
            bottom[:, fc:].mul_(scale[nr, nc])


# FP8 e4m3 -> float32 on the CPU. torch converts float8 element by element (~0.3 G elements/s on two
# cores, measured: slower than the disk); integer shifts and a bf16 -> float32 widening are vectorised
# (~1.7 G elements/s). The byte's sign goes to bit 15 of a 16-bit word and its 4 exponent + 3 mantissa
# bits to bits 10..4, which is the bf16 whose exponent field is the fp8 exponent: exactly
# value * 2^-120 (normals and subnormals alike, the latter as float32 denormals). Multiplying by
# scale * 2^120 gives the same real product as value * scale, hence the same float32 rounding:
# bit-identical (tests check all 256 codes). Not used where that could differ: NaN codes (0x7f/0xff,
# which must stay NaN), scales >= 2^7 (scale * 2^120 would overflow), or denormals flushed to zero.
_E4M3_OFFSET = 2.0 ** 120
_E4M3_MASK = -30736  # 0x87F0 as int16: the sign bit and bits 10..4
_scratch_bufs: dict[str, torch.Tensor] = {}
_denormals_kept: bool | None = None


def _scratch(key: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A reused CPU buffer (one per purpose; the compute thread is the only caller)."""
    n = _numel(shape)
    buf = _scratch_bufs.get(key)
    if buf is None or buf.numel() < n or buf.dtype != dtype:
        buf = _scratch_bufs[key] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _fast_e4m3(weight: torch.Tensor, scale: torch.Tensor) -> bool:
    global _denormals_kept
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        return False
    if _denormals_kept is None:
        _denormals_kept = bool((torch.tensor([2.0 ** -140]) * 2.0).item() != 0.0)
    if not _denormals_kept or not bool((scale.abs() < 2.0 ** 7).all()):
        return False
    return not _has_nan_codes(weight)


_LOW7, _ONES, _HIGH = 0x7F7F7F7F7F7F7F7F, 0x0101010101010101, -0x7F7F7F7F7F7F7F80  # per-byte masks


def _has_nan_codes(weight: torch.Tensor) -> bool:
    """Whether any byte is a NaN code (low 7 bits all set), eight bytes per int64 word: a byte's
    (b & 0x7f) + 1 carries into its bit 7 only when b & 0x7f == 0x7f, and never into the next byte.
    ~14 G bytes/s against ~2.5 for a byte-wise compare (torch's uint8 kernels are not vectorised)."""
    flat = weight.view(torch.uint8).reshape(-1)
    if flat.numel() % 8 or flat.storage_offset() % 8:
        return bool((flat & 0x7F).eq(0x7F).any())
    words = _scratch("nan", torch.Size([flat.numel() // 8]), torch.int64)
    torch.bitwise_and(flat.view(torch.int64), _LOW7, out=words)
    return bool(words.add_(_ONES).bitwise_and_(_HIGH).any())


def _e4m3_bits_to(dst: torch.Tensor, weight: torch.Tensor) -> None:
    """dst (float32) = weight (float8_e4m3fn, no NaN codes) * 2^-120, exactly."""
    bits = _scratch("i16", weight.shape, torch.int16)
    bits.copy_(weight.view(torch.int8))  # sign-extended: a negative byte sets bits 15..8
    bits.bitwise_left_shift_(4).bitwise_and_(_E4M3_MASK)
    dst.copy_(bits.view(torch.bfloat16))


# ---------------------------------------------------------------------------------------------- compute
def expert_forward(experts: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
                   transposed: bool = False) -> torch.Tensor:
    """E(x) for one expert given its parameters (`gate_up_proj` [2I, H], `down_proj` [H, I], or
    transposed [in, out] for gpt-oss, optional `*_bias`), with the experts module's own gating."""
    transposed = transposed or getattr(experts, "is_transposed", False)
    w = params["gate_up_proj"]
    h = x @ w if transposed else F.linear(x, w)
    if "gate_up_proj_bias" in params:
        h = h + params["gate_up_proj_bias"]
    if hasattr(experts, "_apply_gate"):
        h = experts._apply_gate(h)
    else:
        gate, up = h.chunk(2, dim=-1)
        h = experts.act_fn(gate) * up
    w2 = params["down_proj"]
    y = h @ w2 if transposed else F.linear(h, w2)
    if "down_proj_bias" in params:
        y = y + params["down_proj_bias"]
    return y


@dataclass
class BatchRouting:
    """One batch's MoE input and routing, sorted by expert; `out` accumulates Σ w·E_j(x)."""

    x: torch.Tensor  # [N, H]
    valid: torch.Tensor  # bool [N]: tokens the statistics count
    token_of: torch.Tensor  # token of each (token, slot) pair, sorted by expert
    weight_of: torch.Tensor
    bounds: list[int]  # pairs of expert j are [bounds[j], bounds[j + 1])
    out: torch.Tensor
    notes: dict = field(default_factory=dict)  # listener -> its per-batch state

    def routed(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.bounds[j], self.bounds[j + 1]
        return self.token_of[a:b], self.weight_of[a:b]


class ExpertListener:
    """What a pass sees of the routed experts: `begin` once per batch (at the forward, where the router
    ran), then `expert` for every expert in ascending order with its output on its routed tokens
    (`y` None when it has none) and `run` to evaluate it on other rows."""

    def begin(self, batch: BatchRouting) -> None:  # pragma: no cover - interface
        pass

    def expert(self, batch: BatchRouting, j: int, tokens: torch.Tensor, weights: torch.Tensor,
               y: torch.Tensor | None, run: Callable[[torch.Tensor], torch.Tensor]) -> None:  # pragma: no cover
        pass


class RoutedExperts:
    """Replaces `block.experts.forward` for one layer; see the module docstring for the modes."""

    def __init__(self, block: nn.Module, num_experts: int, transposed: bool, layer: int,
                 listeners: Sequence[ExpertListener] = (), where: object = None) -> None:
        self.block = block
        self.experts = block.experts
        self.num_experts = num_experts
        self.transposed = transposed
        self.layer = layer
        self.listeners = list(listeners)
        self.where = where
        self.valid: torch.Tensor | None = None  # set by the executor before each forward
        self.mode = "resident"
        self.weights: dict[str, torch.Tensor] | None = None  # resident: [E, ...] parameters
        self.captured: list[BatchRouting] = []
        self._replay = 0
        self._orig = block.experts.forward
        runner = self

        def forward(module, hidden_states, top_k_index=None, top_k_weights=None):
            return runner._forward(hidden_states, top_k_index, top_k_weights)

        import types

        block.experts.forward = types.MethodType(forward, block.experts)

    def detach(self) -> None:
        self.block.experts.forward = self._orig
        self.captured.clear()
        self.weights = None

    # ---------------------------------------------------------------- modes
    def capture(self) -> None:
        self.mode, self.captured = "capture", []

    def replay(self) -> None:
        self.mode, self._replay = "replay", 0

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.mode == "replay":
            batch = self.captured[self._replay]
            self._replay += 1
            return batch.out
        if self.mode == "skip":  # a run that observes the rest of the layer only
            return torch.zeros_like(x)
        valid = self.valid if self.valid is not None else torch.ones(x.shape[0], dtype=torch.bool)
        if not torch.isfinite(x).all():
            raise SurgeryError(f"NaN/Inf in the hidden states after layer {self.layer} (before its MoE block: "
                               "attention or a norm produced it)", self.where)
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        bounds = [0]
        for n in counts[:self.num_experts]:
            bounds.append(bounds[-1] + n)
        batch = BatchRouting(x, valid.to(x.device), torch.div(order, top_k_index.shape[1], rounding_mode="floor"),
                             top_k_weights.reshape(-1)[order], bounds, torch.zeros_like(x))
        for listener in self.listeners:
            listener.begin(batch)
        if self.mode == "resident":
            self.compute(range(self.num_experts), self.weights, [batch], 0)
            return batch.out
        self.captured.append(batch)
        return torch.zeros_like(x)

    def compute(self, ids: Sequence[int], weights: dict[str, torch.Tensor], batches: Sequence[BatchRouting],
                first: int) -> None:
        """Experts `ids` (ascending; `weights[k][j - first]` are expert j's) over `batches`, batch by
        batch as the one-chunk path does, so per-expert statistics accumulate in the same order."""
        timings = getattr(self, "timings", None)
        t0 = time.perf_counter()
        for batch in batches:
            for j in ids:
                params = {k: v[j - first] for k, v in weights.items()}
                tokens, w = batch.routed(j)
                y = None
                if tokens.numel():
                    y = expert_forward(self.experts, params, batch.x[tokens], self.transposed)
                    if not torch.isfinite(y).all():
                        raise SurgeryError(f"NaN/Inf in the hidden states after layer {self.layer}: produced by "
                                           f"expert {j}", self.where)
                if self.listeners:
                    def run(rows: torch.Tensor, params=params) -> torch.Tensor:
                        return expert_forward(self.experts, params, rows, self.transposed)

                    for listener in self.listeners:
                        listener.expert(batch, j, tokens, w, y, run)
                if y is not None:
                    batch.out.index_add_(0, tokens, (y * w[:, None]).to(batch.out.dtype))
        if timings is not None:
            timings["compute"] += time.perf_counter() - t0
