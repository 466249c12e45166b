"""Apply a plan to a checkpoint on disk: stream shard by shard, tensor by tensor, into OUT.

Memory stays bounded by one router tensor (the only tensors computed; everything else is a byte-range
copy done by the kernel or in bounded chunks), whatever the checkpoint's size.

Crash safety and resuming, in the order things happen:

1. OUT must be empty, or hold an unfinished rewrite of the same plan (its progress manifest
   `OUT/.surgery-rewrite.json` records the plan's hash), or a finished one (its `surgery.json`
   records the plan's hash; nothing is done). Anything else is refused, as is OUT == MODEL or an OUT
   inside MODEL. A lock file keeps two processes from writing the same OUT.
2. Each shard is written to `<name>.partial`, fsynced and renamed; then the manifest (written
   atomically) records its size and SHA-256. A rerun re-hashes every recorded shard and skips it only
   if size and hash still match, so a shard lost or damaged after it was recorded is written again.
3. The index, the copied non-weight files and `surgery.json` come next; `config.json` is written
   last (temporary name, fsync, rename), so an interrupted OUT never looks like a complete model.
   Then the manifest and lock are removed.

Everything written depends only on the model and the plan (no timestamps), so an interrupted and
resumed rewrite produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.reader import INDEX_NAME, SINGLE_NAME, Checkpoint
from surgery.checkpoint.writer import PARTIAL_SUFFIX, SafetensorsWriter, fsync_dir, sha256_file
from surgery.errors import SurgeryError
from surgery.humanize import human_bytes
from surgery.jsonio import read_json, write_json_atomic
from surgery.lock import LOCK_NAME, directory_lock
from surgery.plan.files import kept_map, normalized, plan_hash
from surgery.plan.validate import validate_plan
from surgery.rewrite.layout import OutShard, OutTensor, plan_layout
from surgery.rewrite.merge import ExpertMerger
from surgery.rewrite.tensor_manifest import TENSORS_FILE, shard_records, write_tensor_manifest

MANIFEST = ".surgery-rewrite.json"
LOCK = LOCK_NAME  # the directory lock (surgery/lock.py), held while writing; removed when released
PROVENANCE = "surgery.json"
FORMAT = 1
# Files that hold weights in some other format: copying them would ship the unpruned model again.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                   ".npz", ".distcp")
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json", ".pt.index.json")
OWN_FILES = {"config.json", INDEX_NAME, PROVENANCE, MANIFEST, LOCK, TENSORS_FILE}
# Test hook: free bytes to report for OUT's file system instead of the real figure (nothing else reads it)
FREE_SPACE_ENV = "SURGERY_TEST_FREE_BYTES"
# Space for what is written besides shards and extra files (index, config, provenance, manifests)
SMALL_FILES_SLACK = 1 << 20


def _check_paths(model_dir: Path, out_dir: Path) -> None:
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


def _ours_only(out_dir: Path) -> bool:
    """True when OUT holds nothing, or only the lock / a temporary manifest of a run killed at once."""
    allowed = {LOCK, f".{MANIFEST}.tmp"}
    return all(p.name in allowed for p in out_dir.iterdir())


def _progress(enabled: bool, total: int):
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

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=False, disable=not enabled)
    task = progress.add_task("rewrite", total=total)
    return progress, task


def _shard_ok(path: Path, record: dict, expected_size: int) -> bool:
    """A shard recorded as finished is reused only if it is still exactly what was written."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size != record.get("size") or size != expected_size or not record.get("sha256"):
        return False
    return sha256_file(path) == record.get("sha256")


def _router_rows(ckpt: Checkpoint, t: OutTensor) -> bytearray:
    """The kept experts of a router or fused tensor along its expert axis, in the new order, as raw
    bytes of the tensor's own dtype (the tensor viewed as [outer, E, inner] bytes: no dtype round trip)."""
    data = ckpt.read_bytes(t.source)
    shape = t.source.shape
    outer = math.prod(shape[:t.axis])
    row = t.source.nbytes // (outer * shape[t.axis])  # bytes of one expert's slice within one outer index
    block = row * shape[t.axis]
    out = bytearray(outer * row * len(t.rows))
    pos = 0
    for o in range(outer):
        for r in t.rows:
            start = o * block + r * row
            out[pos:pos + row] = data[start:start + row]
            pos += row
    return out


def stream_shard(ckpt: Checkpoint, shard: OutShard, path: Path, on_bytes=None,
                 merger: ExpertMerger | None = None) -> SafetensorsWriter:
    """Write every byte of one output shard to `path.partial` and hash it; the returned writer still
    has to `commit()` (fsync + rename), which the caller may overlap with the next shard. With a
    `merger` (plans made with --method merge), merged experts' tensors are computed by it."""
    src_fd = os.open(ckpt.shards[shard.name].path, os.O_RDONLY)
    w = SafetensorsWriter(path, shard.entries, shard.metadata, on_bytes=on_bytes)
    try:
        w.open()
        for t in shard.tensors:
            merged = merger.bytes_for(t) if merger is not None else None
            if merged is not None:
                w.write(t.entry.name, merged)
            elif t.rows is None:
                w.copy(t.entry.name, src_fd, t.source.begin, t.source.nbytes)
            else:
                w.write(t.entry.name, _router_rows(ckpt, t))
        w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        os.close(src_fd)
    return w


def write_shard(ckpt: Checkpoint, shard: OutShard, path: Path, on_bytes=None) -> tuple[int, str | None]:
    """Stream one output shard to `path` (complete, durable, renamed); returns (file size, sha256)."""
    w = stream_shard(ckpt, shard, path, on_bytes)
    w.commit()
    assert w.size is not None
    return w.size, w.sha256


def _regular_size(path: Path, rel: Path) -> int:
    """The size of an extra file that is (or, through symlinks, leads to) a regular file; anything else
    is refused in one line. Why: copying follows symlinks (a hub cache snapshot's files are links into
    ../../blobs), so a dangling link or a loop fails mid-copy, a FIFO blocks, /dev/zero never ends."""
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


def _extra_files(model_dir: Path, shard_names: set[str]) -> tuple[list[Path], list[Path]]:
    """Non-weight files to copy (tokenizer, templates, generation config, remote code, docs ...) and
    weight files in other formats that are left out, as paths relative to the model directory. Every
    file to copy is checked to be a regular file (see `_regular_size`) before anything is written."""
    copy, skipped = [], []
    for root, dirs, files in os.walk(model_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_root = Path(root).relative_to(model_dir)
        for name in sorted(files):
            rel = rel_root / name
            rel_s = rel.as_posix()
            if rel_s in shard_names or (rel_root == Path(".") and name in OWN_FILES):
                continue
            if name.endswith(PARTIAL_SUFFIX):
                continue
            if name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEXES):
                skipped.append(rel)
            else:
                _regular_size(Path(root) / name, rel)
                copy.append(rel)
    return copy, skipped


def check_extra_files(model_dir: Path, ckpt: Checkpoint) -> None:
    """A rewrite's extra-file refusals, for `prune` to make before its long calibration."""
    _extra_files(Path(model_dir), set(ckpt.shards))


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or its nearest existing parent)."""
    fake = os.environ.get(FREE_SPACE_ENV)
    if fake:
        return int(fake)
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def _check_free_space(out_dir: Path, need: int) -> None:
    """Refuse before the first shard when the output (its size is known from the plan) cannot fit."""
    free = free_bytes(out_dir)
    if need > free:
        raise SurgeryError(f"not enough free space: the output needs {human_bytes(need)} ({need} bytes) and "
                           f"{human_bytes(free)} ({free} bytes) are free; nothing was written", out_dir)


def _copied_tensor(model: MoEModel, merger: ExpertMerger | None):
    """Which output tensors are byte copies of their input (hashed for `verify`): not router rows or
    fused slices, and not the experts of a layer where the plan merges experts."""
    merged_layers = set(merger.groups) if merger is not None else set()

    def copied(t: OutTensor) -> bool:
        if t.rows is not None:
            return False
        if merged_layers:
            role = model.classify(t.source.name)
            return not (role.kind in ("expert", "fused") and role.layer in merged_layers)
        return True

    return copied


def _commit_and_hash(w: SafetensorsWriter, ckpt: Checkpoint, shard: OutShard, copied) -> dict[str, dict]:
    """Make a streamed shard durable, then hash its tensors' input bytes (still in the page cache)."""
    w.commit()
    return shard_records(ckpt, shard, copied)


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _write_text_durably(path: Path, text: str) -> None:
    """Temporary name, fsync, rename, fsync the directory: the file appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def new_config(model: MoEModel, n_keep: int, drop_mtp: bool = False) -> dict:
    """config.json with the expert count set to n_keep; every other key exactly as it was.

    Besides the family's key, any other expert-count key of the family that the file also carries with
    the old value is updated too, so no alias is left disagreeing with the checkpoint."""
    cfg = json.loads(model.ckpt.config_path.read_text())
    old = cfg.get(model.experts_key, model.num_experts)
    cfg[model.experts_key] = n_keep
    for key in model.spec.num_experts_keys:
        if key != model.experts_key and key in cfg and cfg[key] == old:
            cfg[key] = n_keep
    if drop_mtp and model.spec.mtp_key:
        cfg[model.spec.mtp_key] = 0
    return cfg


def _index(ckpt: Checkpoint, shards: list[OutShard]) -> dict:
    weight_map = {t.entry.name: s.name for s in shards for t in s.tensors}
    metadata = dict(ckpt.index_metadata)
    metadata["total_size"] = sum(s.data_bytes for s in shards)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(t.entry.nbytes // t.source.itemsize for s in shards for t in s.tensors)
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def provenance(model_dir: Path, model: MoEModel, plan: dict, phash: str, n_keep: int) -> dict:
    """`OUT/surgery.json`: what was done to which model, by which version (config.json stays clean)."""
    prov = {
        "tool": "surgery",
        "version": surgery.__version__,
        "operation": "expert merging" if plan.get("method") == "merge" else "expert pruning",
        "method": plan.get("method"),
        "ratio": plan.get("ratio"),
    }
    if "seed" in plan:
        prov["seed"] = plan["seed"]
    prov.update({
        "plan_sha256": phash,
        "source": {**plan["source"], "path": str(model_dir.resolve())},
        "num_experts": {"key": model.experts_key, "before": model.num_experts, "after": n_keep},
        "moe_layers": model.moe_layers,
        "plan": normalized(plan),
    })
    previous = model.ckpt.directory / PROVENANCE
    if previous.is_file():
        try:
            prov["previous"] = json.loads(previous.read_text())
        except ValueError:
            pass
    return prov


def _state(out_dir: Path, phash: str) -> tuple[str, dict | None]:
    """("fresh" | "resume" | "complete", manifest) or a refusal for an OUT that is someone else's."""
    if not out_dir.exists() or _ours_only(out_dir):
        return "fresh", None
    manifest_path = out_dir / MANIFEST
    if manifest_path.is_file():
        manifest = read_json(manifest_path, "rewrite progress manifest")
        if manifest.get("plan_sha256") != phash or manifest.get("format") != FORMAT:
            raise SurgeryError(
                f"holds an unfinished rewrite of another plan (plan {str(manifest.get('plan_sha256'))[:12]}, "
                f"this plan {phash[:12]}); choose another --out or delete it", out_dir)
        return "resume", manifest
    prov_path = out_dir / PROVENANCE
    if prov_path.is_file() and (out_dir / "config.json").is_file():
        prov = read_json(prov_path, "provenance")
        if prov.get("plan_sha256") == phash:
            return "complete", None
        raise SurgeryError(f"holds a finished rewrite of another plan (plan {str(prov.get('plan_sha256'))[:12]}, "
                           f"this plan {phash[:12]}); choose another --out or delete it", out_dir)
    raise SurgeryError("--out is not empty and holds no resumable rewrite of this plan; choose an empty "
                       "or new directory", out_dir)


def rewrite_checkpoint(model_dir: str | Path, plan: dict, out_dir: str | Path, progress: bool = True) -> dict:
    """Write the pruned checkpoint to `out_dir`; resumable. Returns a summary (bytes written, seconds,
    shards written / reused / dropped, tensors, expert counts, copied and skipped files)."""
    t0 = time.perf_counter()
    # absolute and normalized ("a/missing/../out" is "a/out"), so the state checks see the real OUT
    model_dir, out_dir = Path(model_dir), Path(os.path.abspath(out_dir))
    _check_paths(model_dir, out_dir)
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        validate_plan(plan, model)
        layout = plan_layout(model, plan)
        merger = ExpertMerger.for_plan(model, plan)  # refuses unmergeable experts before writing
        phash = plan_hash(plan)
        n_keep = len(next(iter(kept_map(plan).values()))) if plan["layers"] else model.num_experts
        written = [s for s in layout if s.tensors]
        summary = {
            "out": str(out_dir),
            "shards": len(written),
            "shards_written": 0,
            "shards_reused": 0,
            "shards_dropped": [s.name for s in layout if not s.tensors],
            "tensors": sum(len(s.tensors) for s in layout),
            "bytes_written": 0,
            "output_bytes": sum(s.file_size for s in written),
            "input_bytes": sum(sh.file_size for sh in ckpt.shards.values()),
            "num_experts": {"before": model.num_experts, "after": n_keep},
            "copied_files": [],
            "skipped_files": [],
            "already_complete": False,
        }
        state, manifest = _state(out_dir, phash)  # refusals happen here, before anything is written
        if state == "complete":
            return _already_complete(out_dir, written, summary, t0)
        copy, skipped = _extra_files(model_dir, set(ckpt.shards))  # odd files refused before any shard
        if state == "fresh":  # (a resumed run checks what is left to write in _write_shards)
            extra = sum((model_dir / rel).stat().st_size for rel in copy)
            _check_free_space(out_dir, summary["output_bytes"] + extra + SMALL_FILES_SLACK)
        out_dir.mkdir(parents=True, exist_ok=True)
        with directory_lock(out_dir):
            # again under the lock: another process may have finished (or started) this OUT meanwhile
            state, manifest = _state(out_dir, phash)
            if state == "complete":
                return _already_complete(out_dir, written, summary, t0)
            if manifest is None:
                manifest = {"format": FORMAT, "tool_version": surgery.__version__, "plan_sha256": phash,
                            "source_sha256": plan["source"]["sha256"], "model_path": str(model_dir.resolve()),
                            "shards": {}}
                write_json_atomic(out_dir / MANIFEST, manifest)
            elif progress and manifest.get("shards"):
                from rich.console import Console

                Console(stderr=True).print(f"resuming: verifying {len(manifest['shards'])} finished shard(s)")
            copied = _copied_tensor(model, merger)
            _write_shards(ckpt, written, out_dir, manifest, summary, progress, merger, copied)
            if ckpt.index_path is not None:
                write_json_atomic(out_dir / INDEX_NAME, _index(ckpt, written), indent=2)
            elif [s.name for s in written] != [SINGLE_NAME]:
                raise SurgeryError("internal error: single-file checkpoint produced other shards", out_dir)
            records: dict[str, dict] = {}
            for s in written:  # shards recorded by an older version carry no hashes: hash them now
                records.update(manifest["shards"][s.name].get("tensors") or shard_records(ckpt, s, copied))
            write_tensor_manifest(out_dir, records)
            for rel in copy:
                _copy_file(model_dir / rel, out_dir / rel)
            summary["copied_files"] = [p.as_posix() for p in copy]
            summary["skipped_files"] = [p.as_posix() for p in skipped]
            write_json_atomic(out_dir / PROVENANCE, provenance(model_dir, model, plan, phash, n_keep), indent=2)
            config = new_config(model, n_keep, bool(plan.get("drop_mtp")))
            _write_text_durably(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
            (out_dir / MANIFEST).unlink(missing_ok=True)
            fsync_dir(out_dir)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _already_complete(out_dir: Path, written: list[OutShard], summary: dict, t0: float) -> dict:
    """A finished rewrite of this plan: check that its shards are still there, and do nothing."""
    for s in written:
        p = out_dir / s.name
        if not p.is_file() or p.stat().st_size != s.file_size:
            raise SurgeryError(f"a finished rewrite of this plan whose shard {s.name} is missing or has the wrong "
                               "size; delete OUT and run again", out_dir)
    summary["already_complete"] = True
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _write_shards(ckpt: Checkpoint, shards: list[OutShard], out_dir: Path, manifest: dict, summary: dict,
                  progress: bool, merger: ExpertMerger | None = None, copied=None) -> None:
    """Write every shard not already finished (and still intact), recording each in the manifest (with
    the SHA-256 of the input bytes of its `copied` tensors, for `verify`)."""
    copied = copied or (lambda t: t.rows is None)
    done = manifest.setdefault("shards", {})
    todo_bytes = 0
    reuse: set[str] = set()
    for s in shards:
        rec = done.get(s.name)
        if rec is not None and _shard_ok(out_dir / s.name, rec, s.file_size):
            reuse.add(s.name)
        else:
            done.pop(s.name, None)
            todo_bytes += s.file_size
    free = free_bytes(out_dir)
    if todo_bytes > free:
        raise SurgeryError(f"not enough free space: the rewrite needs {todo_bytes / 1e9:.2f} GB more, "
                           f"{free / 1e9:.2f} GB are free", out_dir)
    bar, task = _progress(progress, sum(s.data_bytes for s in shards))
    # Shard k is fsynced and renamed on a second thread while shard k+1 is written (fsync runs at disk
    # speed, so overlapping it matters); it enters the manifest only once its rename is done.
    pending: list[tuple[Future, OutShard, SafetensorsWriter]] = []

    def settle() -> None:
        fut, s, w = pending.pop()
        done[s.name] = {"size": w.size, "sha256": w.sha256, "tensors": fut.result()}
        write_json_atomic(out_dir / MANIFEST, manifest)
        summary["shards_written"] += 1
        summary["bytes_written"] += w.size

    with bar, ThreadPoolExecutor(1, thread_name_prefix="surgery-commit") as finisher:
        for s in shards:
            if s.name in reuse:
                summary["shards_reused"] += 1
                bar.advance(task, s.data_bytes)
                continue
            bar.update(task, description=s.name)
            w = stream_shard(ckpt, s, out_dir / s.name, on_bytes=lambda n: bar.advance(task, n), merger=merger)
            fut = finisher.submit(_commit_and_hash, w, ckpt, s, copied)
            if pending:
                settle()
            pending.append((fut, s, w))
        if pending:
            settle()
        bar.update(task, description="rewrite")
