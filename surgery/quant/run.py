"""Write a W4A16 checkpoint to OUT, shard by shard and tensor by tensor; crash-safe and resumable.

The writer is the one every command that writes a checkpoint shares (`surgery.checkpoint.output`): OUT
empty, an unfinished quantization of the same job (`OUT/.surgery-quantize.json` records the job's hash:
source fingerprint, method, group size, options, calibration data) or a finished one, else refused;
shards streamed as `.partial`, hashed, fsynced, renamed and recorded, reused on a rerun only if they
still hash the same; then the index, `quantization_config.json` and `quantize_config.json`, the copied
files, `surgery.json`, and config.json last; the same bytes whether interrupted or not. This module says
what a quantized output is: its layout (`quant.layout`), the packed triple of each quantized weight,
which comes from a `source` (RTN computes it from the weight as the writer reaches it; GPTQ reads what
the calibration pass stored per layer), FP8 weights kept 16-bit dequantised, the job's hash, the
quantization configs and the provenance. Memory stays one tensor (plus the writer's bounded chunks).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.extra_files import CONFIG
from surgery.checkpoint.fingerprint import fingerprint
from surgery.checkpoint.output import (
    CheckpointJob,
    OutputKind,
    is_complete,
    new_summary,
    output_paths,
    write_checkpoint,
    write_text_durably,
)
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.jsonio import write_json_atomic
from surgery.quant.config import quantization_config, quantize_config
from surgery.quant.layout import QTensor, plan_quant_layout
from surgery.quant.targets import QuantTargets, Target, find_targets

FORMAT = 1  # of the job description (its hash names the output)
Source = Callable[[Target], dict]  # target -> {"qweight", "qzeros", "scales"} tensors
QUANTIZE = OutputKind(
    name="quantize", noun="quantization", of="job", manifest_key="job_sha256",
    provenance_key="quantize_sha256", total_parameters=False,
    other_unfinished="holds an unfinished quantization of another job ({other}, this one {this}); choose another "
                     "--out or delete it",
    other_finished="holds a finished checkpoint of another job; choose another --out or delete it",
    no_space="not enough free space: {need:.2f} GB more needed, {free:.2f} GB free")
MANIFEST = QUANTIZE.manifest  # .surgery-quantize.json
# the input's own versions of what a quantized output writes itself (README.md: the input's card
# describes the input; the command writes OUT's own)
NOT_COPIED = ("quantization_config.json", "quantize_config.json", "README.md")


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
    return is_complete(out_dir, QUANTIZE, job_hash(make_job(ckpt, method, group_size, quantize_dense, extra)))


def finished_output(ckpt: Checkpoint, out_dir: Path, *, method: str, group_size: int, quantize_dense: bool,
                    extra: dict | None, partial_groups: str, progress: bool) -> dict | None:
    """A calibrated quantizer's early exit: when OUT already holds this job's finished result, the writer's
    summary of it (`already_complete`; nothing is calibrated); None when there is work to do."""
    if not output_complete(ckpt, out_dir, method, group_size, quantize_dense,
                           with_partial_groups(extra, partial_groups)):
        return None
    return write_quantized(ckpt.directory, out_dir, None, method=method, group_size=group_size,
                           quantize_dense=quantize_dense, job_extra=extra, progress=progress,
                           partial_groups=partial_groups)


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
    model_dir, out_dir = output_paths(model_dir, out_dir)
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, quantize_dense, group_size, partial_groups)
        layout = plan_quant_layout(model, targets, group_size)
        job = make_job(ckpt, method, group_size, quantize_dense, with_partial_groups(job_extra, partial_groups))
        qcfg = quantization_config(model, targets, group_size, method, gptq_config)
        summary = new_summary(out_dir, ckpt, layout)
        summary.update(method=method, group_size=group_size, quantized_tensors=len(targets.targets),
                       kept_linears=len(targets.kept_linears))
        return write_checkpoint(ckpt, out_dir, QuantizeJob(model_dir, model, targets, job, qcfg, source), layout,
                                summary, progress=progress, t0=t0)


class QuantizeJob(CheckpointJob):
    """A W4A16 quantization of a checkpoint, as the shared writer needs it."""

    kind = QUANTIZE
    not_copied = NOT_COPIED

    def __init__(self, model_dir: Path, model: MoEModel, targets: QuantTargets, job: dict, qcfg: dict,
                 source: Source) -> None:
        self.model_dir, self.model, self.targets, self.job, self.qcfg = model_dir, model, targets, job, qcfg
        self.key = job_hash(job)
        self.source = source
        self.dequant = _dequantizer(model.ckpt, targets)
        self._packed: dict | None = None  # the current target's triple, from its qweight to its scales

    def manifest_fields(self) -> dict:
        return {"job": self.job}

    def produce(self, t: QTensor):
        if t.how == "copy":
            return None
        if t.how == "dequant":
            return tensor_bytes(self.dequant(t))
        if t.part == "qweight":
            self._packed = self.source(t.target)
        data = self._packed[t.part]
        if tuple(data.shape) != t.entry.shape:
            raise SurgeryError(f"internal error: {t.entry.name} has shape {list(data.shape)}, the layout "
                               f"says {list(t.entry.shape)}", self.model.ckpt.directory)
        return tensor_bytes(data)

    def write_files(self, out_dir: Path, manifest: dict) -> None:
        write_json_atomic(out_dir / "quantization_config.json", self.qcfg, indent=2)
        write_json_atomic(out_dir / "quantize_config.json", quantize_config(self.qcfg), indent=2)

    def provenance(self) -> dict:
        return {"tool": "surgery", "version": surgery.__version__, "operation": "W4A16 quantization",
                "quantize_sha256": self.key, "job": self.job, "source": {"path": str(self.model_dir.resolve())},
                "quantized_tensors": len(self.targets.targets)}

    def write_config(self, out_dir: Path) -> None:
        config = json.loads(self.model.ckpt.config_path.read_text())
        config["quantization_config"] = self.qcfg
        write_text_durably(out_dir / CONFIG, json.dumps(config, indent=2) + "\n")


def rtn_source(ckpt: Checkpoint, group_size: int) -> Source:
    """Quantized tensors computed from the weight as the writer reaches it (AutoRound's RTN)."""
    from surgery.checkpoint.fp8 import read_weight
    from surgery.quant.pack import pack
    from surgery.quant.rtn import rtn_quantize

    def run(t: Target) -> dict:
        return pack(*rtn_quantize(read_weight(ckpt, t.name, t.scale), group_size))

    return run
