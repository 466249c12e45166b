"""Write one safetensors file as a stream: header first, then each tensor's bytes as they arrive.

Why not `safetensors.save_file`: it takes a dict of whole tensors, i.e. the whole shard in memory,
which is exactly what a tool for checkpoints larger than memory cannot do. The format is simple
enough to write directly: an 8-byte little-endian header length, a JSON header (names, dtypes,
shapes, data offsets; padded with spaces to a multiple of 8 as the library does), then the raw
tensor bytes back to back in header order. Every offset is known before the first byte is written,
so the header goes out first and the tensors follow, one at a time.

Bytes come from two places: `write` (a small computed tensor, e.g. the surviving rows of a router)
and `copy` (an untouched byte range of a source file). `copy` uses `os.copy_file_range`, which
moves the bytes inside the kernel (or shares extents on reflink file systems) without a user-space
buffer; where the kernel or file system refuses it, it falls back to `pread`/`write` in bounded
chunks. Peak memory is therefore one computed tensor or one chunk, never a shard.

The file is written under a temporary name (`<name>.partial`) and renamed only when complete and
fsynced, so a killed process never leaves a final-named file that is incomplete. A SHA-256 of the
bytes is computed on a second thread while writing (hashing is about as fast as the copy, and
hashlib releases the GIL), so the caller can record it for later verification at almost no cost.

Test hooks: `SURGERY_TEST_SLOW_WRITE=<seconds>` makes the writer sleep that long after each tensor,
so a crash-safety test can kill the process in the middle of a shard (nothing else reads it); each
finished tensor is also a crash point (`write.<tensor name>`, see `surgery.faults`).
`SURGERY_COPY_MODE=readwrite` forces the `pread`/`write` path (for benchmarks and tests), and
`SURGERY_BENCH_NO_HASH=1` skips the SHA-256 (sha256 is then None, and a resumed rewrite never reuses
such a shard) so a benchmark can show what hashing costs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint.reader import DTYPES
from surgery.errors import SurgeryError
from surgery.faults import checkpoint as crash_point

PARTIAL_SUFFIX = ".partial"
CHUNK_BYTES = 32 * 1024 * 1024  # bounds memory on the pread/write path and the progress granularity
HASH_CHUNK_BYTES = 8 * 1024 * 1024
SLOW_ENV = "SURGERY_TEST_SLOW_WRITE"
COPY_MODE_ENV = "SURGERY_COPY_MODE"  # "auto" (default) or "readwrite"
NO_HASH_ENV = "SURGERY_BENCH_NO_HASH"  # "1": no SHA-256 (benchmarks only; such shards are never reused)
# errnos with which copy_file_range says "not here" (old kernel, cross-device, unsupported fs)
_NO_COPY_FILE_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP,
                       errno.EPERM, errno.EBADF}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file to write: name, safetensors dtype code and shape (its size follows)."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def encode_header(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> bytes:
    """The exact bytes that precede the tensor data: 8-byte length + JSON header padded to 8.

    Tensors are laid out in the order given, back to back; `__metadata__` comes first, as the
    reference implementation writes it. The result depends only on its arguments, so a resumed
    rewrite produces byte-identical files.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    seen: set[str] = set()
    for e in entries:
        if e.dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {e.dtype!r} for tensor {e.name!r}")
        if e.name in seen or e.name == "__metadata__":
            raise ValueError(f"duplicate tensor name {e.name!r}")
        seen.add(e.name)
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def file_size_for(entries: Sequence[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """Size of the file `SafetensorsWriter` will produce for these tensors (header included)."""
    return len(encode_header(entries, metadata)) + sum(e.nbytes for e in entries)


def sha256_file(path: str | Path, chunk: int = HASH_CHUNK_BYTES) -> str:
    """SHA-256 of a file read in bounded chunks (used to verify finished shards on resume)."""
    h = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class _Hasher:
    """SHA-256 of everything written, computed on a worker thread in write order.

    Jobs are either bytes (already in memory) or a byte range of the output file that the kernel has
    just written (read back from the page cache). A bounded queue keeps at most a few chunks alive.
    """

    def __init__(self, read_fd: int) -> None:
        self._h = hashlib.sha256()
        self._fd = read_fd
        self._q: queue.Queue = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="safetensors-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buf)
        while True:
            job = self._q.get()
            if job is None:
                return
            if self._error is not None:
                continue
            try:
                if isinstance(job, tuple):
                    offset, length = job
                    while length > 0:
                        n = os.preadv(self._fd, [view[: min(length, len(buf))]], offset)
                        if n <= 0:
                            raise OSError(errno.EIO, "short read hashing the written file")
                        self._h.update(view[:n])
                        offset += n
                        length -= n
                else:
                    self._h.update(job)
            except BaseException as exc:  # noqa: BLE001 - re-raised on the writer's thread
                self._error = exc

    def add_bytes(self, data: bytes | bytearray | memoryview) -> None:
        self._q.put(data)

    def add_range(self, offset: int, length: int) -> None:
        self._q.put((offset, length))

    def finish(self) -> str:
        self._q.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._h.hexdigest()

    def abandon(self) -> None:
        self._q.put(None)
        self._thread.join()


class _NullHasher:
    """Stands in for `_Hasher` under SURGERY_BENCH_NO_HASH=1, to measure what hashing costs."""

    def add_bytes(self, data) -> None:
        pass

    def add_range(self, offset: int, length: int) -> None:
        pass

    def finish(self) -> None:
        return None

    def abandon(self) -> None:
        pass


class SafetensorsWriter:
    """Stream one safetensors file to `path` (via `path.partial`), tensor by tensor, in header order.

    Usage::

        with SafetensorsWriter(path, entries, metadata) as w:
            for e in entries:
                w.copy(e.name, src_fd, offset)      # or w.write(e.name, data), in pieces if wanted
        w.size, w.sha256                            # set by finish(); close() = finish() + commit()

    The writer checks that every tensor receives exactly its declared bytes in the declared order;
    leaving the `with` block early (an exception) removes the partial file and leaves no final file.
    """

    def __init__(
        self,
        path: str | Path,
        entries: Sequence[TensorEntry],
        metadata: dict[str, str] | None = None,
        *,
        on_bytes: Callable[[int], None] | None = None,
        fsync: bool = True,
    ) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.entries = list(entries)
        self.header = encode_header(self.entries, metadata)
        self.expected_size = len(self.header) + sum(e.nbytes for e in self.entries)
        self.size: int | None = None
        self.sha256: str | None = None
        self._on_bytes = on_bytes
        self._fsync = fsync
        self._slow = float(os.environ.get(SLOW_ENV) or 0)
        self._use_cfr = os.environ.get(COPY_MODE_ENV, "auto") != "readwrite" and hasattr(os, "copy_file_range")
        self._i = 0  # index of the tensor being written
        self._left = self.entries[0].nbytes if self.entries else 0
        self._pos = 0
        self._fd: int | None = None
        self._hasher: _Hasher | _NullHasher | None = None
        self._finished = False

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> SafetensorsWriter:
        self.open()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._hasher = _NullHasher() if os.environ.get(NO_HASH_ENV) == "1" else _Hasher(self._fd)
        self._emit(self.header)
        self._skip_empty()

    def close(self) -> None:
        """`finish` then `commit`: the file is complete, durable and under its final name."""
        self.finish()
        self.commit()

    def finish(self) -> None:
        """Check that every byte was written and wait for the hash; sets size and sha256.

        Split from `commit` so a caller can start the next file while this one is being fsynced."""
        if self._i < len(self.entries):
            name = self.entries[self._i].name
            self.abort()
            raise SurgeryError(f"internal error: tensor {name!r} was not written", self.path)
        assert self._fd is not None and self._hasher is not None
        try:
            digest = self._hasher.finish()
            self._hasher = None
            if self._pos != self.expected_size:
                raise SurgeryError(f"internal error: wrote {self._pos} bytes, expected {self.expected_size}",
                                   self.path)
        except BaseException:
            self.abort()
            raise
        self.size, self.sha256 = self._pos, digest
        self._finished = True

    def commit(self) -> None:
        """fsync, then rename `.partial` to the final name (and fsync the directory): only now does a
        file with the final name exist, and it is whole. Safe to run on another thread."""
        assert self._finished and self._fd is not None, "finish() first"
        try:
            if self._fsync:
                os.fsync(self._fd)
        except BaseException:
            self.abort()
            raise
        os.close(self._fd)
        self._fd = None
        os.replace(self.partial, self.path)
        if self._fsync:
            fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop the partial file (used on errors; a killed process leaves it for the next run)."""
        if self._hasher is not None:
            self._hasher.abandon()
            self._hasher = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.partial.unlink(missing_ok=True)

    # ---------------------------------------------------------------- data
    def write(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Append bytes of tensor `name` (the whole tensor or the next piece of it)."""
        view = memoryview(data).cast("B")
        if not len(view):
            return  # nothing to write (zero-size tensors are stepped over automatically)
        self._check(name, len(view))
        self._emit(view)
        self._advance(len(view))

    def copy(self, name: str, src_fd: int, offset: int, length: int | None = None) -> None:
        """Append `length` bytes (default: all of tensor `name`) read from `src_fd` at `offset`."""
        length = self._left if length is None else length
        if not length:
            return
        self._check(name, length)
        done = 0
        while done < length:
            step = min(CHUNK_BYTES, length - done)
            n = self._copy_chunk(src_fd, offset + done, step)
            done += n
            self._advance(n)

    # ---------------------------------------------------------------- internals
    def _check(self, name: str, length: int) -> None:
        if self._i >= len(self.entries):
            raise SurgeryError(f"internal error: tensor {name!r} written after the last one", self.path)
        expected = self.entries[self._i].name
        if name != expected:
            raise SurgeryError(f"internal error: tensor {name!r} written where {expected!r} belongs", self.path)
        if length > self._left:
            raise SurgeryError(f"internal error: tensor {name!r} given {length} bytes, {self._left} left",
                               self.path)

    def _emit(self, view: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None and self._hasher is not None
        view = memoryview(view)
        # the hasher keeps a reference, so it must not be a buffer the caller will reuse
        self._hasher.add_bytes(view if isinstance(view.obj, bytes) else bytes(view))
        done = 0
        while done < len(view):
            done += os.write(self._fd, view[done:])
        self._pos += len(view)

    def _copy_chunk(self, src_fd: int, offset: int, length: int) -> int:
        assert self._fd is not None and self._hasher is not None
        if self._use_cfr:
            try:
                n = os.copy_file_range(src_fd, self._fd, length, offset)
            except OSError as exc:
                if exc.errno not in _NO_COPY_FILE_RANGE:
                    raise
                self._use_cfr = False
            else:
                if n <= 0:
                    raise SurgeryError("unexpected end of the source file while copying", self.path)
                self._hasher.add_range(self._pos, n)
                self._pos += n
                return n
        data = os.pread(src_fd, length, offset)
        if not data:
            raise SurgeryError("unexpected end of the source file while copying", self.path)
        self._emit(data)
        return len(data)

    def _advance(self, n: int) -> None:
        if self._on_bytes is not None and n:
            self._on_bytes(n)
        self._left -= n
        if self._left == 0:
            crash_point(f"write.{self.entries[self._i].name}")
            if self._slow:
                time.sleep(self._slow)
            self._i += 1
            self._left = self.entries[self._i].nbytes if self._i < len(self.entries) else 0
            self._skip_empty()

    def _skip_empty(self) -> None:
        """Zero-byte tensors (a dimension of 0) have nothing to write; step over them."""
        while self._i < len(self.entries) and self.entries[self._i].nbytes == 0:
            self._i += 1
            self._left = self.entries[self._i].nbytes if self._i < len(self.entries) else 0


def fsync_dir(directory: str | Path) -> None:
    """Make a rename durable: fsync the directory that holds the renamed entry (POSIX only)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
