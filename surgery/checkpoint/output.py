"""The one streaming, crash-safe, resumable writer of output checkpoints (rewrite, merge, quantize).

A command says what its output is (a `CheckpointJob`: the layout of shards from `checkpoint.layout`,
how each computed tensor's bytes are made, the hash that names the job, its provenance and config);
everything else happens here, in this order:

1. OUT must be empty, or hold an unfinished output of the same job (its progress manifest, e.g.
   `OUT/.surgery-rewrite.json`, records the job's hash), or a finished one (`surgery.json` records the
   hash; nothing is done but checking its shards are there). Anything else is refused, as is OUT ==
   MODEL or an OUT inside MODEL (`check_paths`). The directory lock (`surgery.lock`) keeps two processes
   out of one OUT; the state is read again under it. Odd extra files and a lack of space are refused
   before the first shard.
2. Each shard is streamed to `<name>.partial` (hashed while written), fsynced and renamed on a second
   thread while the next shard is written (fsync runs at disk speed, so overlapping it matters); then
   the manifest (written atomically) records its size and SHA-256, and what the job adds (the rewrite:
   its input tensors' hashes). A rerun re-hashes every recorded shard and reuses it only if size and
   hash still match, so a shard lost or damaged after it was recorded is written again.
3. The index, the job's own files, the copied extra files and `surgery.json` come next; `config.json`
   is written last (temporary name, fsync, rename), so an interrupted OUT never looks like a complete
   model. Then the manifest is removed (the lock goes when it is released).

Everything written depends only on the input and the job (no timestamps), so an interrupted and
resumed run produces the same bytes as an uninterrupted one. Crash points (`surgery.faults`): every
tensor (`write.<name>`), every recorded shard (`<kind>.<shard>`) and just before config.json
(`<kind>.config`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import surgery
from surgery.checkpoint.extra_files import CONFIG, PROVENANCE, checkpoint_extra_files, copy_file
from surgery.checkpoint.layout import OutShard
from surgery.checkpoint.reader import INDEX_NAME, SINGLE_NAME, Checkpoint
from surgery.checkpoint.writer import SafetensorsWriter, fsync_dir, sha256_file
from surgery.errors import SurgeryError
from surgery.faults import checkpoint as crash_point
from surgery.humanize import human_bytes
from surgery.jsonio import read_json, write_json_atomic
from surgery.lock import LOCK_NAME, directory_lock

FORMAT = 1  # of the progress manifests
# Test hook: free bytes to report for OUT's file system instead of the real figure (nothing else reads it)
FREE_SPACE_ENV = "SURGERY_TEST_FREE_BYTES"
# Space for what is written besides shards and extra files (index, config, provenance, manifests)
SMALL_FILES_SLACK = 1 << 20


@dataclass(frozen=True)
class OutputKind:
    """What a command's output is called: its progress manifest and where it records the job's hash, the
    words of its refusals, the label of its progress bar and crash points."""

    name: str  # "rewrite", "quantize": the progress manifest `.surgery-<name>.json`, the progress bar, crash points
    noun: str  # "rewrite", "quantization": "holds no resumable <noun> of this <of>"
    of: str  # what the hash names: "plan", "job"
    manifest_key: str  # the hash's key in the manifest
    provenance_key: str  # the hash's key in surgery.json
    other_unfinished: str  # refusal of OUT holding an unfinished output of another job ({other}, {this}: hashes)
    other_finished: str  # the same for a finished one
    no_space: str  # refusal of a resumed run that cannot fit ({need}, {free}: GB)
    total_parameters: bool  # recount the index's total_parameters (True) or drop it (a packed format)

    @property
    def manifest(self) -> str:
        """The progress manifest's file name in OUT."""
        return f".surgery-{self.name}.json"


Buffer = bytes | bytearray | memoryview


class CheckpointJob:
    """What the shared writer cannot know about one command's output; subclasses set `kind`, `key` and
    `not_copied` and define the hooks."""

    kind: ClassVar[OutputKind]
    key: str  # the hash of everything the output depends on
    not_copied: tuple[str, ...] = ()  # extra files of the input the command writes its own version of

    def manifest_fields(self) -> dict[str, Any]:
        """What the progress manifest records about the job besides its hash."""
        return {}

    def produce(self, t: Any) -> Buffer | None:
        """The bytes of output tensor `t`, or None when it is a byte copy of `t.source` (kernel-copied)."""
        return None

    def shard_record(self, shard: OutShard) -> dict[str, Any]:
        """More to record with a finished shard; runs on the commit thread once the shard is durable."""
        return {}

    def write_files(self, out_dir: Path, manifest: dict) -> None:
        """The command's own files, after the index and before the copied ones and surgery.json."""

    def provenance(self) -> dict[str, Any]:
        """`surgery.json` (the input's own, if any, is added as "previous")."""
        raise NotImplementedError

    def write_config(self, out_dir: Path) -> None:
        """config.json, with `write_text_durably`; written last: its presence makes OUT a model."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ paths, space
def output_paths(model_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """MODEL, and OUT absolute and normalized ("a/missing/../out" is "a/out", so the state checks see the
    real OUT), once `check_paths` accepts them."""
    model_dir, out_dir = Path(model_dir), Path(os.path.abspath(out_dir))
    check_paths(model_dir, out_dir)
    return model_dir, out_dir


def check_paths(model_dir: Path, out_dir: Path) -> None:
    """OUT is never the model directory, inside it or around it (the input is never written to)."""
    src, dst = model_dir.resolve(), out_dir.resolve()
    if dst == src:
        raise SurgeryError("--out is the model directory; the input is never written to", out_dir)
    if dst.is_relative_to(src):
        raise SurgeryError("--out is inside the model directory; the input is never written to", out_dir)
    if src.is_relative_to(dst):
        raise SurgeryError("the model directory is inside --out; choose an OUT that does not contain it",
                           out_dir)
    if dst.exists() and not dst.is_dir():
        raise SurgeryError("--out exists and is not a directory", out_dir)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    fake = os.environ.get(FREE_SPACE_ENV)
    if fake:
        return int(fake)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(out_dir: Path, need: int) -> None:
    """Refuse before the first shard when the output (its size is known from the layout) cannot fit."""
    free = free_bytes(out_dir)
    if need > free:
        raise SurgeryError(f"not enough free space: the output needs {human_bytes(need)} ({need} bytes) and "
                           f"{human_bytes(free)} ({free} bytes) are free; nothing was written", out_dir)


def write_text_durably(path: Path, text: str) -> None:
    """Temporary name, fsync, rename, fsync the directory: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


# ------------------------------------------------------------------------------------------------ state
def output_state(out_dir: Path, kind: OutputKind, key: str) -> tuple[str, dict | None]:
    """("fresh" | "resume" | "complete", manifest), or a refusal for an OUT that holds something else."""
    ours = {LOCK_NAME, f".{kind.manifest}.tmp"}  # the lock, or a temporary manifest of a run killed at once
    if not out_dir.exists() or all(p.name in ours for p in out_dir.iterdir()):
        return "fresh", None
    manifest_path = out_dir / kind.manifest
    if manifest_path.is_file():
        manifest = read_json(manifest_path, f"{kind.name} progress manifest")
        if manifest.get(kind.manifest_key) != key or manifest.get("format") != FORMAT:
            other = str(manifest.get(kind.manifest_key))[:12]
            raise SurgeryError(kind.other_unfinished.format(other=other, this=key[:12]), out_dir)
        return "resume", manifest
    if (out_dir / PROVENANCE).is_file() and (out_dir / CONFIG).is_file():
        recorded = read_json(out_dir / PROVENANCE, "provenance").get(kind.provenance_key)
        if recorded == key:
            return "complete", None
        raise SurgeryError(kind.other_finished.format(other=str(recorded)[:12], this=key[:12]), out_dir)
    raise SurgeryError(f"--out is not empty and holds no resumable {kind.noun} of this {kind.of}; choose an empty "
                       "or new directory", out_dir)


def is_complete(out_dir: str | Path, kind: OutputKind, key: str) -> bool:
    """True when OUT already holds the finished output of this job (read only; refuses nothing)."""
    out_dir = Path(os.path.abspath(out_dir))
    prov = out_dir / PROVENANCE
    if not (prov.is_file() and (out_dir / CONFIG).is_file()):
        return False
    return read_json(prov, "provenance").get(kind.provenance_key) == key


def shard_ok(path: Path, record: dict, expected_size: int) -> bool:
    """A shard recorded as finished is reused only if it is still exactly what was written."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size != record.get("size") or size != expected_size or not record.get("sha256"):
        return False
    return sha256_file(path) == record.get("sha256")


# ---------------------------------------------------------------------------------------------- writing
def new_summary(out_dir: Path, ckpt: Checkpoint, shards: list[OutShard]) -> dict:
    """What every writing command reports; the command adds its own figures."""
    written = [s for s in shards if s.tensors]
    return {"out": str(out_dir), "shards": len(written), "shards_written": 0, "shards_reused": 0,
            "bytes_written": 0, "output_bytes": sum(s.file_size for s in written),
            "input_bytes": sum(sh.file_size for sh in ckpt.shards.values()), "copied_files": [],
            "skipped_files": [], "already_complete": False}


def write_checkpoint(ckpt: Checkpoint, out_dir: Path, job: CheckpointJob, shards: list[OutShard], summary: dict,
                     *, progress: bool, t0: float) -> dict:
    """Write `job`'s output of `ckpt` to OUT (paths from `output_paths`); resumable. Returns `summary`
    (from `new_summary`) with the counts filled in and the seconds since `t0`."""
    kind, written = job.kind, [s for s in shards if s.tensors]
    state, manifest = output_state(out_dir, kind, job.key)  # refusals happen here, before anything is written
    if state == "complete":
        return _already_complete(out_dir, kind, written, summary, t0)
    copy, skipped = checkpoint_extra_files(ckpt)  # odd files are refused here, before any shard
    if state == "fresh":  # (a resumed run checks what is left to write in write_shards)
        extra = sum((ckpt.directory / rel).stat().st_size for rel in copy)
        check_free_space(out_dir, summary["output_bytes"] + extra + SMALL_FILES_SLACK)
    out_dir.mkdir(parents=True, exist_ok=True)
    with directory_lock(out_dir):
        # again under the lock: another process may have finished (or started) this OUT meanwhile
        state, manifest = output_state(out_dir, kind, job.key)
        if state == "complete":
            return _already_complete(out_dir, kind, written, summary, t0)
        if manifest is None:
            manifest = {"format": FORMAT, "tool_version": surgery.__version__, kind.manifest_key: job.key,
                        **job.manifest_fields(), "shards": {}}
            write_json_atomic(out_dir / kind.manifest, manifest)
        elif progress and manifest.get("shards"):
            from rich.console import Console

            Console(stderr=True).print(f"resuming: verifying {len(manifest['shards'])} finished shard(s)")
        write_shards(ckpt, written, out_dir, job, manifest, summary, progress)
        _finish(ckpt, out_dir, job, written, manifest, summary, copy, skipped)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _already_complete(out_dir: Path, kind: OutputKind, written: list[OutShard], summary: dict, t0: float) -> dict:
    """A finished output of this job: check that its shards are still there, and do nothing."""
    for s in written:
        p = out_dir / s.name
        if not p.is_file() or p.stat().st_size != s.file_size:
            raise SurgeryError(f"a finished {kind.noun} of this {kind.of} whose shard {s.name} is missing or has "
                               "the wrong size; delete OUT and run again", out_dir)
    summary["already_complete"] = True
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _finish(ckpt: Checkpoint, out_dir: Path, job: CheckpointJob, written: list[OutShard], manifest: dict,
            summary: dict, copy: list[Path], skipped: list[Path]) -> None:
    """Everything after the shards, config.json last (module docstring, step 3)."""
    if ckpt.index_path is not None:
        write_json_atomic(out_dir / INDEX_NAME, index_for(ckpt, written, job.kind.total_parameters), indent=2)
    elif [s.name for s in written] != [SINGLE_NAME]:
        raise SurgeryError("internal error: single-file checkpoint produced other shards", out_dir)
    job.write_files(out_dir, manifest)
    copied = [rel for rel in copy if rel.as_posix() not in job.not_copied]
    for rel in copied:
        copy_file(ckpt.directory / rel, out_dir / rel)
    summary["copied_files"] = [p.as_posix() for p in copied]
    summary["skipped_files"] = [p.as_posix() for p in skipped]
    prov = job.provenance()
    previous = ckpt.directory / PROVENANCE
    if previous.is_file():
        try:
            prov["previous"] = json.loads(previous.read_text())
        except ValueError:
            pass
    write_json_atomic(out_dir / PROVENANCE, prov, indent=2)
    crash_point(f"{job.kind.name}.config")
    job.write_config(out_dir)
    (out_dir / job.kind.manifest).unlink(missing_ok=True)
    fsync_dir(out_dir)


def index_for(ckpt: Checkpoint, shards: list[OutShard], total_parameters: bool) -> dict:
    """The output's index: the input's metadata with the new total size (and parameter count, or none)."""
    weight_map = {t.entry.name: s.name for s in shards for t in s.tensors}
    metadata = {k: v for k, v in ckpt.index_metadata.items() if total_parameters or k != "total_parameters"}
    metadata["total_size"] = sum(s.data_bytes for s in shards)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(t.entry.nbytes // t.source.itemsize for s in shards for t in s.tensors)
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def write_shards(ckpt: Checkpoint, shards: list[OutShard], out_dir: Path, job: CheckpointJob, manifest: dict,
                 summary: dict, progress: bool) -> None:
    """Write every shard not already finished (and still intact), recording each in the manifest."""
    kind, done = job.kind, manifest.setdefault("shards", {})
    todo_bytes, reuse = 0, set()
    for s in shards:
        rec = done.get(s.name)
        if rec is not None and shard_ok(out_dir / s.name, rec, s.file_size):
            reuse.add(s.name)
        else:
            done.pop(s.name, None)
            todo_bytes += s.file_size
    free = free_bytes(out_dir)
    if todo_bytes > free:
        raise SurgeryError(kind.no_space.format(need=todo_bytes / 1e9, free=free / 1e9), out_dir)
    bar, task = _progress(progress, sum(s.data_bytes for s in shards), kind.name)
    # Shard k is fsynced and renamed on a second thread while shard k+1 is written; it enters the
    # manifest only once its rename is done.
    pending: list[tuple[Future, OutShard, SafetensorsWriter]] = []

    def settle() -> None:
        fut, s, w = pending.pop()
        done[s.name] = {"size": w.size, "sha256": w.sha256, **fut.result()}
        write_json_atomic(out_dir / kind.manifest, manifest)
        summary["shards_written"] += 1
        summary["bytes_written"] += w.size
        crash_point(f"{kind.name}.{s.name}")

    with bar, ThreadPoolExecutor(1, thread_name_prefix="surgery-commit") as finisher:
        for s in shards:
            if s.name in reuse:
                summary["shards_reused"] += 1
                bar.advance(task, s.data_bytes)
                continue
            bar.update(task, description=s.name)
            w = stream_shard(ckpt, s, out_dir / s.name, job.produce, on_bytes=lambda n: bar.advance(task, n))
            fut = finisher.submit(_commit_and_record, w, job, s)
            if pending:
                settle()
            pending.append((fut, s, w))
        if pending:
            settle()
        bar.update(task, description=kind.name)


def _commit_and_record(w: SafetensorsWriter, job: CheckpointJob, shard: OutShard) -> dict[str, Any]:
    """Make a streamed shard durable, then what the job records with it (the rewrite hashes its input
    tensors now, while their bytes are still in the page cache)."""
    w.commit()
    return job.shard_record(shard)


def stream_shard(ckpt: Checkpoint, shard: OutShard, path: Path, produce, on_bytes=None) -> SafetensorsWriter:
    """Write every byte of one output shard to `path.partial` and hash it: `produce(t)`'s bytes, or a
    kernel copy of `t.source` where it gives None. The returned writer still has to `commit()` (fsync +
    rename), which the caller may overlap with the next shard."""
    src_fd = os.open(ckpt.shards[shard.name].path, os.O_RDONLY)
    w = SafetensorsWriter(path, shard.entries, shard.metadata, on_bytes=on_bytes)
    try:
        w.open()
        for t in shard.tensors:
            data = produce(t)
            if data is None:
                w.copy(t.entry.name, src_fd, t.source.begin, t.source.nbytes)
            else:
                w.write(t.entry.name, data)
        w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        os.close(src_fd)
    return w


def _progress(enabled: bool, total: int, label: str):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                   transient=False, disable=not enabled)
    return bar, bar.add_task(label, total=total)
