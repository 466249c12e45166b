"""Check a (pruned) checkpoint against its own config.json and, for a rewrite's output, against its input.

Two parts, both ending in one line naming the rule that failed:

1. The consistency rules every command applies to its input (`surgery.arch.consistency`): index and
   shard headers agree, every tensor's shape and dtype are what config.json implies for its role,
   quantized weights carry their scales, experts are exactly 0..n-1 in every MoE layer with identical
   tensor sets, routers have n rows and biases n entries, no tensor of a dropped expert remains. So an
   output that no loader could use cannot pass, whatever the rewrite did.
2. vLLM's loader rules (`surgery.arch.serving`): which `vllm serve` settings (tensor-parallel degrees
   1/2/4/8, expert parallelism) load it. A W4A16 output that loads at none of them (a linear with a
   partial group, a 16-bit module vLLM would build 4-bit, q/k/v in different forms) fails; a bf16 or FP8
   one only warns (its shapes are the input's: pruning changes the expert count, not a block or a head);
   the settings that work are reported.
3. The rewrite's tensor manifest (`surgery.tensors.json`, `surgery.rewrite.tensor_manifest`): every
   input tensor the plan keeps is present, and every copied one holds exactly the input's bytes. This
   reads the output's data once; directories without a manifest (not a rewrite's output) skip it.

A `total_size` in the index that disagrees with the tensors is reported as a warning only: published
checkpoints often carry a stale one and every loader ignores it (the rewrite writes an exact one).
"""

from __future__ import annotations

from pathlib import Path

from surgery.arch.model import MoEModel
from surgery.arch.serving import serving_report
from surgery.checkpoint.reader import Checkpoint
from surgery.errors import SurgeryError
from surgery.rewrite.tensor_manifest import TENSORS_FILE, tensor_manifest_problems


def _fail(rule: str, message: str, where: Path | str) -> None:
    raise SurgeryError(f"verify failed: {rule}: {message}", where)


def verify_checkpoint(out_dir: str | Path, data: bool = True) -> dict:
    """Raise a one-line `SurgeryError` on the first problem; otherwise return counts. `data=False` skips
    comparing copied tensors' bytes with the rewrite's manifest (headers only)."""
    out_dir = Path(out_dir)
    with Checkpoint(out_dir) as ckpt:
        model = MoEModel(ckpt, check=False)  # the rules are applied here, to name the one that fails
        problems = model.problems()
        if problems:
            first = problems[0]
            more = f" ({len(problems) - 1} more; `surgery inspect` lists them)" if len(problems) > 1 else ""
            _fail(first.rule, first.message + more, first.path or out_dir)
        serving = serving_report(model)
        warnings: list[str] = []
        if not serving.working():
            why = (serving.summary_lines()[0] if serving.name_problems else
                   f"vLLM loads it at no tensor-parallel degree: {serving.settings[0].reasons[0]}")
            if serving.precision == "w4a16":  # what surgery chose to write: a W4A16 no loader reads fails
                _fail("serving", why, out_dir)
            warnings.append(why)  # bf16 / FP8 shapes are the input's own: reported, not failed
        total = ckpt.index_metadata.get("total_size")
        if total is not None and str(total) != str(ckpt.total_bytes):
            # hub checkpoints are often off here and load fine (loaders ignore it): a warning, not a failure
            warnings.append(f"index metadata.total_size is {total} but the tensors hold {ckpt.total_bytes} bytes")
        checked = tensor_manifest_problems(ckpt) if data else None
        if checked is not None and checked[0]:
            bad = checked[0]
            more = f" ({len(bad) - 1} more)" if len(bad) > 1 else ""
            _fail("manifest", bad[0] + more, out_dir / TENSORS_FILE)
        if checked is None:
            warnings.append(f"no {TENSORS_FILE}: copied tensors were not compared with the input (not a rewrite "
                            "output)" if data else "copied tensors' bytes not compared (headers only)")
        moe = model.prunable_layers()
        return {
            "ok": True,
            "path": str(out_dir),
            "architecture": model.spec.architectures[0],
            "num_experts": model.num_experts,
            "experts_key": model.experts_key,
            "moe_layers": len(moe),
            "tensors": len(ckpt.tensors),
            "shards": len(ckpt.shards),
            "total_bytes": ckpt.total_bytes,
            "tensors_compared": checked[1] if checked is not None else 0,
            "warnings": warnings,
            "serving": serving.to_dict(),
            "serving_summary": serving.summary_lines(),
            "serve_flags": [s.flags for s in serving.working()],
        }
