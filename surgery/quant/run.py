"""Write a W4A16 checkpoint to OUT, shard by shard and tensor by tensor; crash-safe and resumable.

The same machinery as `surgery rewrite` (the same streaming writer and the same finish), with one more
kind of tensor: the packed triple of a quantized weight, which comes from a `source` (RTN computes it
from the weight as the writer reaches it; GPTQ reads what the calibration pass stored per layer).
Memory stays one tensor (plus the writer's bounded chunks).

1. OUT must be empty, an unfinished quantization of the same job (`OUT/.surgery-quantize.json`
   records the job's hash: source fingerprint, method, group size, options, calibration data), or a
   finished one (nothing to do). A lock file keeps two processes out of one OUT.
2. Each shard is written as `<name>.partial`, hashed while written, fsynced, renamed, then recorded
   (size, SHA-256) in the manifest; a rerun reuses a recorded shard only if it still hashes the same.
3. The index, the copied files, `surgery.json`, `quantization_config.json` and `quantize_config.json`
   follow; config.json is written last (temporary name, fsync, rename), so an interrupted OUT never
   looks complete. Nothing written depends on time, so a resumed run gives identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.reader import INDEX_NAME, SINGLE_NAME, Checkpoint
from surgery.checkpoint.writer import SafetensorsWriter, fsync_dir
from surgery.errors import SurgeryError
from surgery.faults import checkpoint as crash_point
from surgery.jsonio import read_json, write_json_atomic
from surgery.lock import LOCK_NAME, directory_lock
from surgery.quant.config import quantization_config, quantize_config
from surgery.quant.layout import QShard, QTensor, plan_quant_layout
from surgery.quant.targets import Target, find_targets
from surgery.rewrite.run import _check_paths, _copy_file, _extra_files, _shard_ok, _write_text_durably

MANIFEST = ".surgery-quantize.json"
LOCK = LOCK_NAME  # the directory lock (surgery/lock.py), held while writing; removed when released
PROVENANCE = "surgery.json"
FORMAT = 1
Source = Callable[[Target], dict]  # target -> {"qweight", "qzeros", "scales"} tensors


def tensor_bytes(t) -> memoryview:
    """The raw little-endian bytes of a CPU tensor (any dtype, bf16 included)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(torch.uint8).numpy()).cast("B") if t.numel() else memoryview(b"")


def job_hash(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def make_job(ckpt: Checkpoint, method: str, group_size: int, quantize_dense: bool, extra: dict | None) -> dict:
    """What the output depends on: source fingerprint, method, group size, options, calibration inputs."""
    return {"format": FORMAT, "source": fingerprint(ckpt)["sha256"], "method": method, "group_size": group_size,
            "quantize_dense": quantize_dense, **(extra or {})}


def with_partial_groups(extra: dict | None, partial_groups: str) -> dict | None:
    """The job's options with a non-default partial-group rule recorded (it changes every output byte)."""
    return extra if partial_groups == "keep" else {**(extra or {}), "partial_groups": partial_groups}


def output_complete(ckpt: Checkpoint, out_dir: Path, method: str, group_size: int, quantize_dense: bool,
                    extra: dict | None) -> bool:
    """True when OUT already holds the finished result of this job (so GPTQ need not calibrate)."""
    out_dir = Path(os.path.abspath(out_dir))
    prov = out_dir / PROVENANCE
    if not (prov.is_file() and (out_dir / "config.json").is_file()):
        return False
    jhash = job_hash(make_job(ckpt, method, group_size, quantize_dense, extra))
    return read_json(prov, "provenance").get("quantize_sha256") == jhash


def _state(out_dir: Path, jhash: str) -> tuple[str, dict | None]:
    """("fresh" | "resume" | "complete", manifest), or a refusal for an OUT holding something else."""
    allowed = {LOCK, f".{MANIFEST}.tmp"}
    if not out_dir.exists() or all(p.name in allowed for p in out_dir.iterdir()):
        return "fresh", None
    if (out_dir / MANIFEST).is_file():
        manifest = read_json(out_dir / MANIFEST, "quantize progress manifest")
        if manifest.get("job_sha256") != jhash or manifest.get("format") != FORMAT:
            other = str(manifest.get("job_sha256"))[:12]
            raise SurgeryError(f"holds an unfinished quantization of another job ({other}, this one {jhash[:12]}); "
                               "choose another --out or delete it", out_dir)
        return "resume", manifest
    prov = out_dir / PROVENANCE
    if prov.is_file() and (out_dir / "config.json").is_file():
        if read_json(prov, "provenance").get("quantize_sha256") == jhash:
            return "complete", None
        raise SurgeryError("holds a finished checkpoint of another job; choose another --out or delete it", out_dir)
    raise SurgeryError("--out is not empty and holds no resumable quantization of this job; choose an empty "
                       "or new directory", out_dir)


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

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True),
                   disable=not enabled)
    return bar, bar.add_task("quantize", total=total)


def _write_shard(ckpt: Checkpoint, shard: QShard, path: Path, source: Source, dequant, on_bytes) -> SafetensorsWriter:
    src_fd = os.open(ckpt.shards[shard.name].path, os.O_RDONLY)
    w = SafetensorsWriter(path, shard.entries, shard.metadata, on_bytes=on_bytes)
    try:
        w.open()
        packed: dict | None = None
        for t in shard.tensors:
            if t.how == "copy":
                w.copy(t.entry.name, src_fd, t.source.begin, t.source.nbytes)
                continue
            if t.how == "dequant":
                data = dequant(t)
            else:
                if t.part == "qweight":
                    packed = source(t.target)
                data = packed[t.part]
                if tuple(data.shape) != t.entry.shape:
                    raise SurgeryError(f"internal error: {t.entry.name} has shape {list(data.shape)}, the layout "
                                       f"says {list(t.entry.shape)}", ckpt.directory)
            w.write(t.entry.name, tensor_bytes(data))
        w.finish()
    except BaseException:
        w.abort()
        raise
    finally:
        os.close(src_fd)
    return w


def _dequantizer(ckpt: Checkpoint, targets):
    """An FP8 weight kept unquantized, dequantised into the output's compute dtype."""
    import torch

    from surgery.checkpoint.fp8 import read_weight

    def run(t: QTensor):
        dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[t.entry.dtype]
        return read_weight(ckpt, t.source.name, targets.fp8_dequant[t.source.name], dtype)

    return run


def write_quantized(model_dir: str | Path, out_dir: str | Path, source: Source, *, method: str, group_size: int,
                    quantize_dense: bool = False, job_extra: dict | None = None, gptq_config: dict | None = None,
                    progress: bool = True, partial_groups: str = "keep") -> dict:
    """Write the W4A16 checkpoint of MODEL to OUT with quantized tensors from `source`; resumable.
    Returns a summary (bytes, shards written/reused, tensors quantized, seconds). `partial_groups`:
    `surgery.quant.targets.find_targets`'s ("pad" is AutoRound's, which no vLLM kernel loads)."""
    t0 = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(os.path.abspath(out_dir))
    _check_paths(model_dir, out_dir)
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, quantize_dense, group_size, partial_groups)
        layout = plan_quant_layout(model, targets, group_size)
        job = make_job(ckpt, method, group_size, quantize_dense, with_partial_groups(job_extra, partial_groups))
        jhash = job_hash(job)
        written = [s for s in layout if s.tensors]
        summary = {"out": str(out_dir), "method": method, "group_size": group_size, "shards": len(written),
                   "shards_written": 0, "shards_reused": 0, "quantized_tensors": len(targets.targets),
                   "kept_linears": len(targets.kept_linears), "bytes_written": 0,
                   "input_bytes": sum(sh.file_size for sh in ckpt.shards.values()),
                   "output_bytes": sum(s.file_size for s in written), "already_complete": False}
        state, manifest = _state(out_dir, jhash)
        if state == "complete":
            summary.update(already_complete=True, seconds=time.perf_counter() - t0)
            return summary
        out_dir.mkdir(parents=True, exist_ok=True)
        with directory_lock(out_dir):
            state, manifest = _state(out_dir, jhash)
            if state == "complete":
                summary.update(already_complete=True, seconds=time.perf_counter() - t0)
                return summary
            if manifest is None:
                manifest = {"format": FORMAT, "tool_version": surgery.__version__, "job_sha256": jhash, "job": job,
                            "shards": {}}
                write_json_atomic(out_dir / MANIFEST, manifest)
            _write_all(ckpt, written, out_dir, manifest, summary, source, _dequantizer(ckpt, targets), progress)
            if ckpt.index_path is not None:
                write_json_atomic(out_dir / INDEX_NAME, _index(ckpt, written), indent=2)
            elif [s.name for s in written] != [SINGLE_NAME]:
                raise SurgeryError("internal error: single-file checkpoint produced other shards", out_dir)
            copy, skipped = _extra_files(model_dir, set(ckpt.shards))
            for rel in copy:  # README.md: the input's card describes the input; the command writes OUT's own
                if rel.as_posix() not in ("quantization_config.json", "quantize_config.json", "README.md"):
                    _copy_file(model_dir / rel, out_dir / rel)
            summary["skipped_files"] = [p.as_posix() for p in skipped]
            qcfg = quantization_config(model, targets, group_size, method, gptq_config)
            write_json_atomic(out_dir / "quantization_config.json", qcfg, indent=2)
            write_json_atomic(out_dir / "quantize_config.json", quantize_config(qcfg), indent=2)
            write_json_atomic(out_dir / PROVENANCE, _provenance(model_dir, model, job, jhash, summary), indent=2)
            config = json.loads(ckpt.config_path.read_text())
            config["quantization_config"] = qcfg
            crash_point("quantize.config")
            _write_text_durably(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
            (out_dir / MANIFEST).unlink(missing_ok=True)
            fsync_dir(out_dir)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def _index(ckpt: Checkpoint, shards: list[QShard]) -> dict:
    weight_map = {t.entry.name: s.name for s in shards for t in s.tensors}
    metadata = {k: v for k, v in ckpt.index_metadata.items() if k != "total_parameters"}
    metadata["total_size"] = sum(s.data_bytes for s in shards)
    return {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}


def _provenance(model_dir: Path, model: MoEModel, job: dict, jhash: str, summary: dict) -> dict:
    prov = {"tool": "surgery", "version": surgery.__version__, "operation": "W4A16 quantization",
            "quantize_sha256": jhash, "job": job, "source": {"path": str(model_dir.resolve())},
            "quantized_tensors": summary["quantized_tensors"]}
    previous = model.ckpt.directory / PROVENANCE
    if previous.is_file():
        try:
            prov["previous"] = json.loads(previous.read_text())
        except ValueError:
            pass
    return prov


def _write_all(ckpt: Checkpoint, shards: list[QShard], out_dir: Path, manifest: dict, summary: dict, source: Source,
               dequant, progress: bool) -> None:
    done = manifest.setdefault("shards", {})
    todo, reuse = 0, set()
    for s in shards:
        rec = done.get(s.name)
        if rec is not None and _shard_ok(out_dir / s.name, rec, s.file_size):
            reuse.add(s.name)
        else:
            done.pop(s.name, None)
            todo += s.file_size
    free = shutil.disk_usage(out_dir).free
    if todo > free:
        raise SurgeryError(f"not enough free space: {todo / 1e9:.2f} GB more needed, {free / 1e9:.2f} GB free",
                           out_dir)
    bar, task = _progress(progress, sum(s.data_bytes for s in shards))
    with bar:
        for s in shards:
            if s.name in reuse:
                summary["shards_reused"] += 1
                bar.advance(task, s.data_bytes)
                continue
            bar.update(task, description=s.name)
            w = _write_shard(ckpt, s, out_dir / s.name, source, dequant, lambda n: bar.advance(task, n))
            w.commit()
            done[s.name] = {"size": w.size, "sha256": w.sha256}
            write_json_atomic(out_dir / MANIFEST, manifest)
            summary["shards_written"] += 1
            summary["bytes_written"] += w.size
            crash_point(f"quantize.{s.name}")
        bar.update(task, description="quantize")


def rtn_source(ckpt: Checkpoint, group_size: int) -> Source:
    """Quantized tensors computed from the weight as the writer reaches it (AutoRound's RTN)."""
    from surgery.checkpoint.fp8 import read_weight
    from surgery.quant.pack import pack
    from surgery.quant.rtn import rtn_quantize

    def run(t: Target) -> dict:
        return pack(*rtn_quantize(read_weight(ckpt, t.name, t.scale), group_size))

    return run
