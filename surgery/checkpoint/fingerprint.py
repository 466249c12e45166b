"""A model fingerprint from metadata alone: config.json, the index and every shard header.

Hashing headers (names, dtypes, shapes, offsets) and file sizes identifies a checkpoint without
reading hundreds of GB of tensor data; it changes whenever any tensor's layout or the config does.
"""

from __future__ import annotations

import hashlib

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
    archs = ckpt.config.get("architectures") or []
    return {
        "sha256": h.hexdigest(),
        "architecture": archs[0] if archs else None,
        "shards": len(ckpt.shards),
        "total_bytes": ckpt.total_bytes,
    }
