"""Apply a plan to a checkpoint on disk: stream shard by shard, tensor by tensor, into OUT.

Memory stays bounded by one router tensor or one merged expert (the only tensors computed; everything
else is a byte-range copy done by the kernel or in bounded chunks), whatever the checkpoint's size.

The writer is the one every command that writes a checkpoint shares (`surgery.checkpoint.output`: OUT
empty, an unfinished rewrite of the same plan or a finished one, else refused; shards streamed as
`.partial`, fsynced, renamed and recorded with their SHA-256 in `OUT/.surgery-rewrite.json`, reused on a
rerun only if they still hash the same; then the index, the copied files, `surgery.json`, and
config.json last; the same bytes whether interrupted or not). This module says what a rewrite's output
is: the plan's layout (`rewrite.layout`), the kept rows of routers and the merged experts' tensors,
the plan's hash that names the job, the tensor manifest `verify` reads (`rewrite.tensor_manifest`),
the provenance, and config.json with the new expert count.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import surgery
from surgery.arch.model import MoEModel
from surgery.checkpoint.extra_files import CONFIG
from surgery.checkpoint.output import (
    Buffer,
    CheckpointJob,
    OutputKind,
    new_summary,
    output_paths,
    write_checkpoint,
)
from surgery.checkpoint.output import write_text_durably as _write_text_durably
from surgery.checkpoint.reader import Checkpoint
from surgery.plan.files import kept_map, normalized, plan_hash
from surgery.plan.validate import validate_plan
from surgery.rewrite.layout import OutShard, OutTensor, plan_layout
from surgery.rewrite.merge import ExpertMerger
from surgery.rewrite.tensor_manifest import shard_records, write_tensor_manifest

REWRITE = OutputKind(
    name="rewrite", noun="rewrite", of="plan", manifest_key="plan_sha256",
    provenance_key="plan_sha256", total_parameters=True,
    other_unfinished="holds an unfinished rewrite of another plan (plan {other}, this plan {this}); choose another "
                     "--out or delete it",
    other_finished="holds a finished rewrite of another plan (plan {other}, this plan {this}); choose another --out "
                   "or delete it",
    no_space="not enough free space: the rewrite needs {need:.2f} GB more, {free:.2f} GB are free")
MANIFEST = REWRITE.manifest  # .surgery-rewrite.json


def rewrite_checkpoint(model_dir: str | Path, plan: dict, out_dir: str | Path, progress: bool = True) -> dict:
    """Write the pruned checkpoint to `out_dir`; resumable. Returns a summary (bytes written, seconds,
    shards written / reused / dropped, tensors, expert counts, copied and skipped files)."""
    t0 = time.perf_counter()
    model_dir, out_dir = output_paths(model_dir, out_dir)
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        validate_plan(plan, model)
        layout = plan_layout(model, plan)
        job = RewriteJob(model_dir, model, plan, layout)  # refuses unmergeable experts before writing
        summary = new_summary(out_dir, ckpt, layout)
        summary.update(shards_dropped=[s.name for s in layout if not s.tensors],
                       tensors=sum(len(s.tensors) for s in layout),
                       num_experts={"before": model.num_experts, "after": job.n_keep})
        return write_checkpoint(ckpt, out_dir, job, layout, summary, progress=progress, t0=t0)


class RewriteJob(CheckpointJob):
    """A plan applied to a checkpoint, as the shared writer needs it."""

    kind = REWRITE

    def __init__(self, model_dir: Path, model: MoEModel, plan: dict, layout: list[OutShard[OutTensor]]) -> None:
        self.model_dir, self.model, self.plan = model_dir, model, plan
        self.written = [s for s in layout if s.tensors]
        self.merger = ExpertMerger.for_plan(model, plan)
        self.key = plan_hash(plan)
        self.n_keep = len(next(iter(kept_map(plan).values()))) if plan["layers"] else model.num_experts
        self.copied = _copied_tensor(model, self.merger)

    def manifest_fields(self) -> dict:
        return {"source_sha256": self.plan["source"]["sha256"], "model_path": str(self.model_dir.resolve())}

    def produce(self, t: OutTensor) -> Buffer | None:
        """Merged experts' tensors from the merger (plans made with --method merge), router or fused
        tensors' kept rows; everything else is a byte copy."""
        merged = self.merger.bytes_for(t) if self.merger is not None else None
        if merged is not None:
            return merged
        return None if t.rows is None else _router_rows(self.model.ckpt, t)

    def shard_record(self, shard: OutShard[OutTensor]) -> dict:
        """The SHA-256 of the input bytes of the shard's copied tensors, for `verify`."""
        return {"tensors": shard_records(self.model.ckpt, shard, self.copied)}

    def write_files(self, out_dir: Path, manifest: dict) -> None:
        records: dict[str, dict] = {}
        for s in self.written:  # shards recorded by an older version carry no hashes: hash them now
            records.update(manifest["shards"][s.name].get("tensors") or shard_records(self.model.ckpt, s, self.copied))
        write_tensor_manifest(out_dir, records)

    def provenance(self) -> dict:
        return provenance(self.model_dir, self.model, self.plan, self.key, self.n_keep)

    def write_config(self, out_dir: Path) -> None:
        config = new_config(self.model, self.n_keep, bool(self.plan.get("drop_mtp")))
        _write_text_durably(out_dir / CONFIG, json.dumps(config, indent=2) + "\n")


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


def provenance(model_dir: Path, model: MoEModel, plan: dict, phash: str, n_keep: int) -> dict:
    """`OUT/surgery.json`: what was done to which model, by which version (config.json stays clean); the
    writer adds the input's own as "previous"."""
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
    return prov
