"""Where a MoE layer's routed experts live on disk, and how a chunk of them is read and built.

The unit of residency is a chunk of experts whose size the memory budget decides (`surgery.executor.
plan_memory`), not a decoder layer: a DeepSeek-V3 layer (34 GB in bf16) runs in a few GB. Attention,
norms, the router and shared experts stay resident (`LayerFactory.load`); the routed experts'
parameters stay on the meta device and `ExpertStore` supplies them chunk by chunk:

- `read(ids, staging)` reads the chunk's bytes *as stored* (FP8 weights and their float32 scales, W4A16
  `qweight`/`qzeros`/`scales`, or bf16) into a reusable host staging buffer (pinned on CUDA, allocated
  once per shape and reused for every chunk of every layer), in a background thread one chunk ahead of
  the compute;
- `materialize(raw)` moves those bytes to the compute device (on CUDA one asynchronous copy of the
  chunk's whole byte range, not one per tensor) and dequantises them there, in the compute dtype, into
  reused `[n, ...]` buffers laid out as transformers 5 fuses them (`gate_up_proj [n, 2I, H]`,
  `down_proj [n, H, I]`, gpt-oss biases): FP8 blocks are a broadcast multiply over a block view
  (`surgery.executor.dequantize`), W4A16 groups a broadcast subtract-and-multiply over a [out, groups,
  group_size] view, neither with `repeat_interleave` copies. Nothing here waits for the device: copies
  and kernels are timed with CUDA events (`surgery.executor.timing`), and a staging half is refilled
  only after the device has finished copying it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from surgery.checkpoint.fp8 import SCALE_SUFFIX, block_size
from surgery.checkpoint.reader import PAGE
from surgery.checkpoint.w4a16 import QWEIGHT, QZEROS, SCALES, dequantize_w4a16_into, group_size_of, weight_shape
from surgery.errors import SurgeryError
from surgery.executor.dequantize import _numel, dequantize_into
from surgery.executor.timing import DeviceClock

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

    def __init__(self, factory, layer: int, clock: DeviceClock | None = None) -> None:
        self.factory = factory
        self.model = factory.model
        self.ckpt = self.model.ckpt
        self.layer = layer
        self.dtype = factory.dtype
        self.device = factory.device
        self.params = self._layout()
        self.num_experts = len(self.params[0].pieces)
        self.timings = factory.timings
        self.clock = clock or DeviceClock(self.device, self.timings)

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
        where: dict[tuple, Slot] = {}
        offset = 0
        for shard, begin, end, members in spans:
            start = offset + self.ckpt.read_range(shard, begin, end - begin, buf[offset:])
            for _shard, t_begin, length, key, dtype, shape in members:
                where[key] = Slot(start + t_begin - begin, length, dtype, tuple(shape))
            offset = -(-(start + end - begin) // PAGE) * PAGE
        slots = {p.name: [[(piece, where[(p.name, i, k, "w")], where.get((p.name, i, k, "s")),
                            where.get((p.name, i, k, "z")))
                           for k, piece in enumerate(p.pieces[e])] for i, e in enumerate(ids)]
                 for p in self.params}
        self.timings["read"] += time.perf_counter() - t0
        return RawChunk(list(ids), slots, staging)

    # ---------------------------------------------------------------- build (compute thread)
    def materialize(self, raw: RawChunk, out: dict[str, torch.Tensor], first: int = 0,
                    buffers: Buffers | None = None) -> None:
        """Build the chunk's parameters into rows [first, first + n) of `out` (`[*, ...]` buffers on the
        compute device in the compute dtype): bytes moved to the device as stored (on CUDA one
        asynchronous copy of the chunk's byte range into a reused device buffer), FP8 dequantised there
        (a broadcast over 2-D blocks), W4A16 decoded there (a broadcast over groups)."""
        cfg = self.ckpt.config
        lo, hi = raw.byte_range()
        lo -= lo % PAGE  # offsets keep their alignment on the device
        with self.clock.span("transfer"):
            if self.device.type == "cpu":
                base, shift = raw.staging.buf, 0
            else:
                base = (buffers or Buffers()).get("staging", (hi - lo,), torch.uint8, self.device)
                base.copy_(raw.staging.buf[lo:hi], non_blocking=True)
                raw.staging.copied_to_device(self.device)
                shift = lo
        with self.clock.span("dequant"):
            for p in self.params:
                dst = out[p.name]
                for i, parts in enumerate(raw.slots[p.name]):
                    for piece, w_at, s_at, z_at in parts:
                        w, s, z = (at.view(base, shift) if at is not None else None for at in (w_at, s_at, z_at))
                        rows = w.shape[1] if piece.packed else w.shape[0]
                        target = dst[first + i] if piece.rows else dst[first + i, piece.row:piece.row + rows]
                        if piece.packed:
                            dequantize_w4a16_into(target, w, z, s, group_size_of(cfg))
                        elif s is None:
                            target.copy_(w.reshape(target.shape))
                        else:
                            dequantize_into(target, w, s, block_size(cfg, tuple(w.shape), tuple(s.shape)))

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
            self.materialize(raw, out, raw.ids[0], buffers)
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
                self.materialize(part, out, 0, buffers)
                yield part.ids, out


@dataclass(frozen=True)
class Slot:
    """Where one stored tensor lies in a staging buffer: byte offset, length, dtype and shape."""

    at: int
    length: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def view(self, base: torch.Tensor, shift: int = 0) -> torch.Tensor:
        """The tensor as a view of `base` (which holds the staging bytes from offset `shift` on); a copy
        when its offset is not aligned for its dtype (odd offsets in the file)."""
        raw = base[self.at - shift:self.at - shift + self.length]
        if (self.at - shift) % torch.empty((), dtype=self.dtype).element_size():
            raw = raw.clone()
        return raw.view(self.dtype).reshape(self.shape)


@dataclass
class RawChunk:
    """Experts `ids` as stored: per parameter, per expert, per piece (piece, and the slots of its weight
    or qweight, its FP8 scale_inv or W4A16 scales, its W4A16 qzeros) in `staging`'s buffer."""

    ids: list[int]
    slots: dict[str, list[list[tuple[Piece, Slot, Slot | None, Slot | None]]]]
    staging: _Half

    def part(self, start: int, stop: int) -> RawChunk:
        """Experts [start, stop) of this chunk (the same staging bytes)."""
        return RawChunk(self.ids[start:stop], {k: v[start:stop] for k, v in self.slots.items()}, self.staging)

    def byte_range(self) -> tuple[int, int]:
        """The staging bytes [lo, hi) that this chunk's tensors occupy."""
        slots = [s for per in self.slots.values() for parts in per for piece in parts for s in piece[1:] if s]
        return min(s.at for s in slots), max(s.at + s.length for s in slots)


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
        self._copied: torch.cuda.Event | None = None

    def take(self, nbytes: int) -> torch.Tensor:
        """At least `nbytes`, page aligned (O_DIRECT reads land in it), once the device has finished
        copying what the half held before (its copy is asynchronous)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
        if self.buf is None or self.buf.numel() < nbytes:
            self.buf = None
            raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=self.pinned)
            self.buf = raw[(-raw.data_ptr()) % PAGE:][:nbytes]
        return self.buf

    def copied_to_device(self, device: torch.device) -> None:
        """Mark the asynchronous copy just queued from this half on `device`'s stream (the reader waits
        for it before refilling the half)."""
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(device))

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
