"""A model fingerprint from metadata and a sample of the data: config.json, every shard header and
a few KB of tensor bytes from each shard.

Hashing headers (names, dtypes, shapes, offsets) and file sizes identifies a checkpoint's layout
without reading hundreds of GB; the sampled bytes (start, middle and end of each shard's data)
tell apart checkpoints with the same layout but other weights (a fine-tune and its base), whose
saliency or plans must never be mixed up.
"""

from __future__ import annotations

import hashlib
import os

from surgery.checkpoint.reader import Checkpoint


def fingerprint(ckpt: Checkpoint) -> dict:
    """Return `{"sha256": ..., "shards": n, "total_bytes": n, "architecture": ...}` for a checkpoint."""
    h = hashlib.sha256()
    if ckpt.config_path.is_file():
        h.update(b"config\0" + ckpt.config_path.read_bytes())
    for name in sorted(ckpt.shards):
        shard = ckpt.shards[name]
        h.update(f"shard\0{name}\0{shard.file_size}\0".encode())
        h.update(shard.raw_sha256)
        h.update(_data_sample(shard.path, shard.data_start, shard.file_size))
    archs = ckpt.config.get("architectures") or []
    return {
        "sha256": h.hexdigest(),
        "architecture": archs[0] if archs else None,
        "shards": len(ckpt.shards),
        "total_bytes": ckpt.total_bytes,
    }


SAMPLE_BYTES = 16 * 1024


def _data_sample(path, start: int, end: int) -> bytes:
    """SAMPLE_BYTES at the start, the middle and the end of a shard's data section."""
    size = end - start
    if size <= 0:
        return b""
    offsets = sorted({start, start + max(0, size // 2 - SAMPLE_BYTES // 2), max(start, end - SAMPLE_BYTES)})
    fd = os.open(path, os.O_RDONLY)
    try:
        return b"".join(os.pread(fd, min(SAMPLE_BYTES, end - o), o) for o in offsets)
    finally:
        os.close(fd)
