"""The files of a model directory besides its safetensors weights, which an output checkpoint carries over.

Tokenizer, chat templates, generation config, remote code, docs ... are copied as they are, so the
output loads like the input. Weight files in any other format are left out (copying them would ship the
unchanged model again), and so are the files surgery writes itself. Every file to copy is checked to be
a regular file before anything is written: copying follows symlinks (a hub cache snapshot's files are
links into ../../blobs), so a dangling link or a loop would fail mid-copy, a FIFO would block and
/dev/zero would never end.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable, Collection
from pathlib import Path

from surgery.checkpoint.reader import INDEX_NAME, Checkpoint
from surgery.checkpoint.writer import PARTIAL_SUFFIX
from surgery.errors import SurgeryError
from surgery.lock import LOCK_NAME

# Files that hold weights in some other format: copying them would ship the unpruned model again.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                   ".npz", ".distcp")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")
# What surgery writes into an output itself (besides the progress manifests, `.surgery-<command>.json`):
# never copied from an input, where an earlier run of surgery left them
CONFIG = "config.json"
PROVENANCE = "surgery.json"
TENSORS_FILE = "surgery.tensors.json"  # the rewrite's tensor manifest (surgery.rewrite.tensor_manifest)
OWN_FILES = frozenset({CONFIG, INDEX_NAME, PROVENANCE, LOCK_NAME, TENSORS_FILE})


def regular_size(path: Path, rel: Path) -> int:
    """The size of an extra file that is (or, through symlinks, leads to) a regular file; anything else
    is refused in one line (see the module docstring)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        target = os.readlink(path) if path.is_symlink() else "?"
        raise SurgeryError(f"extra file {rel.as_posix()!r} is a dangling symlink (to {target!r}); expected a "
                           "regular file: fix or remove it (nothing was written)", path) from None
    except OSError as exc:
        what = "a symlink loop" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror})"
        raise SurgeryError(f"extra file {rel.as_posix()!r} is {what}; expected a regular file: fix or remove it "
                           "(nothing was written)", path) from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a character device" if stat.S_ISCHR(st.st_mode)
                else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "not a regular file")
        via = f" (through a symlink to {os.path.realpath(path)!r})" if path.is_symlink() else ""
        raise SurgeryError(f"extra file {rel.as_posix()!r} is {kind}{via}; only regular files are copied: remove "
                           "it (nothing was written)", path)
    return st.st_size


def extra_files(model_dir: Path, shard_names: Collection[str],
                own: Callable[[str], bool]) -> tuple[list[Path], list[Path]]:
    """Non-weight files to copy and weight files in other formats that are left out, as paths relative to
    the model directory; `own` says which top-level names surgery writes itself (never copied), and the
    checkpoint's shards and any unfinished `.partial` are passed over. Refuses a file to copy that is not
    a regular file."""
    copy, skipped = [], []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(model_dir)
        for name in sorted(files):
            rel = rel_root / name
            if rel.as_posix() in shard_names or (rel_root == Path(".") and own(name)):
                continue
            if name.endswith(PARTIAL_SUFFIX):
                continue
            if name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES):
                skipped.append(rel)
            else:
                regular_size(Path(root) / name, rel)
                copy.append(rel)
    return copy, skipped


def checkpoint_extra_files(ckpt: Checkpoint) -> tuple[list[Path], list[Path]]:
    """`extra_files` of a checkpoint's directory, passing over its shards and surgery's own files. The
    output writer calls it before the first shard; `prune`, before its long calibration, too."""
    return extra_files(ckpt.directory, set(ckpt.shards), _own)


def _own(name: str) -> bool:
    return name in OWN_FILES or (name.startswith(".surgery-") and name.endswith(".json"))


def copy_file(src: Path, dst: Path) -> None:
    """Copy under a temporary name, then rename: a copied file is whole or absent."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
