"""`OUT/surgery.tensors.json`: which input tensor each output tensor came from, with the SHA-256 of the
input bytes of every tensor the rewrite copies, so `verify` can confirm the output holds them intact.

Why hash the input rather than trust the shard hashes: the shard SHA-256 the writer records proves
that a shard is still what was written, not that what was written is the input's bytes. The input
ranges are hashed on their own thread right after each shard is streamed (the bytes are then usually
in the page cache), and the records travel in the progress manifest so a resumed rewrite does not
hash finished shards again. Tensors computed rather than copied (router rows, merged experts) are
listed without a hash: `verify` checks that they are present, and their shapes by the consistency rules.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

from surgery.checkpoint.extra_files import TENSORS_FILE
from surgery.checkpoint.reader import Checkpoint, TensorInfo
from surgery.errors import SurgeryError
from surgery.jsonio import read_json, write_json_atomic
from surgery.rewrite.layout import OutShard, OutTensor

FORMAT = 1
CHUNK = 8 * 1024 * 1024


def hash_range(fd: int, begin: int, length: int, path: Path | str) -> str:
    """SHA-256 of `length` bytes at `begin` of an open file, read in bounded chunks."""
    h = hashlib.sha256()
    pos, end = begin, begin + length
    while pos < end:
        data = os.pread(fd, min(CHUNK, end - pos), pos)
        if not data:
            raise SurgeryError(f"unexpected end of file at byte {pos} while hashing", path)
        h.update(data)
        pos += len(data)
    return h.hexdigest()


def shard_records(ckpt: Checkpoint, shard: OutShard, copied: Callable[[OutTensor], bool]) -> dict[str, dict]:
    """{output name: {"source": input name, "sha256": hash of the input bytes or None}} for one shard."""
    path = ckpt.shards[shard.name].path
    fd = os.open(path, os.O_RDONLY)
    try:
        return {t.entry.name: {"source": t.source.name,
                               "sha256": hash_range(fd, t.source.begin, t.source.nbytes, path) if copied(t) else None}
                for t in shard.tensors}
    finally:
        os.close(fd)


def write_tensor_manifest(out_dir: Path, records: dict[str, dict]) -> None:
    write_json_atomic(out_dir / TENSORS_FILE, {"format": FORMAT, "algorithm": "sha256",
                                               "tensors": dict(sorted(records.items()))}, indent=1)


def tensor_manifest_problems(ckpt: Checkpoint) -> tuple[list[str], int] | None:
    """Problems of an output against its manifest, and how many tensors' bytes were compared; None when
    the directory has no manifest (not a rewrite's output)."""
    path = ckpt.directory / TENSORS_FILE
    if not path.is_file():
        return None
    manifest = read_json(path, "tensor manifest")
    records = manifest.get("tensors")
    if manifest.get("format") != FORMAT or not isinstance(records, dict):
        return [f"{TENSORS_FILE} is not a format-{FORMAT} tensor manifest"], 0
    problems: list[str] = []
    for name in sorted(set(ckpt.tensors) - set(records)):
        problems.append(f"tensor {name!r} is in the output but not in {TENSORS_FILE} (the rewrite wrote no such "
                        "tensor)")
    compared = 0
    fds: dict[str, int] = {}
    try:
        for name, rec in records.items():
            info: TensorInfo | None = ckpt.tensors.get(name)
            if info is None:
                problems.append(f"tensor {name!r} (from input tensor {rec.get('source')!r}, kept by the plan) is "
                                "missing from the output")
                continue
            want = rec.get("sha256")
            if not want:
                continue
            shard = ckpt.shards[info.shard]
            if info.shard not in fds:
                fds[info.shard] = os.open(shard.path, os.O_RDONLY)
            got = hash_range(fds[info.shard], info.begin, info.nbytes, shard.path)
            compared += 1
            if got != want:
                problems.append(f"tensor {name!r} in {info.shard} differs from input tensor {rec.get('source')!r} "
                                f"(sha256 {got[:12]}, expected {want[:12]}): a copied tensor's bytes changed")
    finally:
        for fd in fds.values():
            os.close(fd)
    return problems, compared
