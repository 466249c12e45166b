"""A plan as a file: its normalized form (what the rewrite applies and what identifies it), its hash,
its JSON for people, atomic save and load, and the name `prune` gives it in WORK."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.jsonio import read_json


def kept_map(plan: dict) -> dict[int, dict[int, int]]:
    """layer -> {original expert id: new id}; new ids follow the original order."""
    return {int(layer): {old: new for new, old in enumerate(sorted(entry["keep"]))}
            for layer, entry in plan["layers"].items()}


def normalized(plan: dict) -> dict:
    """The plan with keep/drop lists sorted and layers in numeric order (what the rewrite applies)."""
    out = {k: v for k, v in plan.items() if k != "layers"}
    out["layers"] = {str(int(k)): _normalized_entry(v)
                     for k, v in sorted(plan["layers"].items(), key=lambda kv: int(kv[0]))}
    return out


def _normalized_entry(entry: dict) -> dict:
    """keep/drop sorted; merge groups (which change the written bytes) and protection kept, sorted, and
    only when present, so plans without them hash as they always did."""
    out: dict = {"keep": sorted(entry["keep"]), "drop": sorted(entry.get("drop", []))}
    if entry.get("protected"):
        out["protected"] = {str(k): entry["protected"][k] for k in sorted(entry["protected"], key=int)}
    if entry.get("merge") is not None:
        out["merge"] = {str(k): sorted(entry["merge"][k]) for k in sorted(entry["merge"], key=int)}
        out["merge_weights"] = entry.get("merge_weights")
    return out


def plan_hash(plan: dict) -> str:
    """SHA-256 of the normalized plan as canonical JSON: identifies a rewrite for resuming."""
    canon = json.dumps(normalized(plan), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canon.encode()).hexdigest()


def plan_json(plan: dict) -> str:
    """The plan as JSON for people: indented objects, but each keep/drop list on one line."""
    text = json.dumps(plan, indent=2)
    return re.sub(r"\[\s*((?:-?\d+,\s*)*-?\d+)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text) + "\n"


def save_plan(plan: dict, path: str | Path) -> Path:
    """Write atomically (temporary name, fsync, rename): a plan file is either old or new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(plan_json(plan))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_plan(path: str | Path) -> dict:
    plan = read_json(path, "plan")
    if not isinstance(plan, dict):
        raise SurgeryError("plan: not a JSON object", path)
    return plan


def plan_file_name(method: str, ratio: float | None, drop_mtp: bool = False, *, keep: int | None = None,
                   multiple_of: int | None = None, protect: str | None = None,
                   merge_saliency: str = "reap") -> str:
    """`prune`'s plan file in WORK, named by everything that chooses the experts, so a rerun with other
    choices makes a new plan instead of reusing one (names of plain ratio plans are what they were)."""
    parts = [f"plan-{method}", f"{ratio:g}" if keep is None else f"keep{keep}"]
    if multiple_of is not None:
        parts.append(f"m{multiple_of}")
    if protect:
        parts.append(f"protect-{protect}")
    if method == "merge" and merge_saliency != "reap":
        parts.append(merge_saliency)
    if drop_mtp:
        parts.append("drop-mtp")
    return "-".join(parts) + ".json"
