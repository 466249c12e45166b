"""The device benchmark's realistic stages (run by tools/gpu/check.py after its correctness runs).

1. `surgery calibrate` at realistic size (>= 500k packed tokens on the MiniMax-M2-shaped checkpoint):
   per layer what the engine recorded in its manifest (`summary.per_layer`): expert reads, host->device
   copies, dequantisation, expert compute and the FLOP/s it achieved, the checkpoint write (in the
   background) and what the walk waited for it, the layer's wall; and the time before the first layer.
2. GPTQ of the pruned layers: `surgery prune --ratio 0.5 --quantize w4a16 --quantize-method gptq`, seconds
   per layer from the GPTQ walk's own record (`summary.json` beside `gptq.json`).
3. One line extrapolating both to MiniMax-M2.1's 62 layers (per-layer seconds x 62 + start-up).

Nothing is guessed: every figure is read from what the runs recorded, or the run's own wall clock.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import bench_paging as bp

TARGET_LAYERS = 62  # MiniMax-M2.1


@dataclass
class Stage:
    name: str
    argv: list[str]
    work: Path
    wall_s: float = 0.0
    rc: int = 0
    peak_anon: int = 0
    summary: dict = field(default_factory=dict)
    log: str = ""


def run_stage(stage: Stage, files: list[Path], timeout: float) -> Stage:
    shutil.rmtree(stage.work, ignore_errors=True)
    stage.work.parent.mkdir(parents=True, exist_ok=True)
    run = bp.measure(bp.Run(stage.name, stage.argv, work=str(stage.work), log=stage.log), files, timeout)
    stage.wall_s, stage.rc, stage.peak_anon = run.wall_s, run.rc, run.peak_anon
    stage.summary = read_summary(stage.work)
    print(f"  {stage.name}: {stage.wall_s:.1f} s, exit {stage.rc}", flush=True)
    return stage


def read_summary(work: Path) -> dict:
    """The engine's summary a run left: calibrate's manifest.json, or a quantizer's summary.json (under WORK)."""
    for path in [work / "manifest.json", *sorted(work.rglob("summary.json"))]:
        if path.is_file():
            data = json.loads(path.read_text())
            data = data.get("summary", data) if isinstance(data, dict) else {}
            if isinstance(data, dict) and data.get("per_layer"):
                return data
    return {}


def calibrate_stage(cli: list[str], model: Path, work: Path, tokens: int, length: int, device: str,
                    files: list[Path], timeout: float) -> Stage:
    rows = math.ceil(tokens / length)
    argv = [*cli, "calibrate", str(model), "--work", str(work), "--dataset", "builtin:code", "--samples", str(rows),
            "--max-length", str(length), "--pack", "--device", device, "--no-progress"]
    return run_stage(Stage(f"calibrate {rows} x {length} tokens", argv, work, log=str(work) + ".log"), files, timeout)


def gptq_stage(cli: list[str], model: Path, root: Path, tokens: int, length: int, device: str,
               files: list[Path], timeout: float) -> Stage:
    rows = math.ceil(tokens / length)
    work = root / "prune-work"
    argv = [*cli, "prune", str(model), "--out", str(root / "prune-out"), "--work", str(work), "--ratio", "0.5",
            "--quantize", "w4a16", "--quantize-method", "gptq", "--dataset", "builtin:code", "--samples", str(rows),
            "--max-length", str(length), "--pack", "--device", device, "--no-progress"]
    return run_stage(Stage(f"prune 50% + W4A16 GPTQ, {rows} x {length} tokens", argv, work, log=str(work) + ".log"),
                     files, timeout)


def _s(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def calibrate_table(stage: Stage) -> list[str]:
    """Per layer: the routed experts' time split, achieved TFLOP/s, checkpoint, wall."""
    s = stage.summary
    lines = ["| layer | read s | host→device s | dequant s | expert compute s | expert TFLOP/s | checkpoint write s "
             "(background) | checkpoint wait s | layer wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in s.get("per_layer", []):
        cells = [_s(rec.get(k)) for k in ("read_s", "transfer_s", "dequant_s", "compute_s", "expert_tflops_per_s",
                                          "checkpoint_write_s", "checkpoint_wait_s", "wall_s")]
        lines.append(f"| {rec['layer']} | " + " | ".join(cells) + " |")
    layers = sum(r.get("wall_s", 0.0) for r in s.get("per_layer", []))
    lines.append(f"| all | {_s(s.get('read_s'))} | {_s(s.get('transfer_s'))} | {_s(s.get('dequant_s'))} | "
                 f"{_s(s.get('compute_s'))} | | {_s(s.get('checkpoint_write_s'))} | {_s(s.get('checkpoint_wait_s'))} "
                 f"| {layers:.2f} |")
    gpu = f", GPU peak {s['peak_gpu_mb'] / 1024:.1f} GiB" if s.get("peak_gpu_mb") else ""
    batching = s.get("batches") or {}
    batches = f"; batches of <= {batching['batch_tokens']} tokens" if batching.get("batch_tokens") else \
        (f"; batches of {batching['batch_size']} rows" if batching.get("batch_size") else "")
    lines += ["", f"{s.get('tokens', '?')} tokens on {s.get('device', '?')} ({s.get('dtype', '?')}){batches}; "
              f"process wall {stage.wall_s:.1f} s: first layer after {startup(stage):.1f} s (imports, CUDA, data, "
              f"checks), {layers:.1f} s in layers; tier {s.get('tier')}{gpu}; host peak {bp.gb(stage.peak_anon)}"]
    return lines


def startup(stage: Stage) -> float:
    """Seconds from the process's start to its first layer (imports, CUDA, data, checks), as the engine
    recorded it; else the process wall minus the engine's own run."""
    at = stage.summary.get("first_layer_after_s")
    return float(at) if at is not None else max(0.0, stage.wall_s - float(stage.summary.get("seconds", 0.0)))


def gptq_lines(stage: Stage) -> list[str]:
    s = stage.summary
    walls = [r.get("wall_s", 0.0) for r in s.get("per_layer", [])]
    if stage.rc or not walls:
        return [f"GPTQ: no per-layer record (exit {stage.rc}; see {stage.log})"]
    return [f"GPTQ (W4A16, group 128) of {len(walls)} pruned layers: "
            + ", ".join(f"layer {r['layer']} {r.get('wall_s', 0.0):.1f} s" for r in s["per_layer"])
            + f"; {sum(walls) / len(walls):.1f} s per layer; whole prune command {stage.wall_s:.1f} s"]


def extrapolation(cal: Stage, gptq: Stage | None) -> str:
    per = [r.get("wall_s", 0.0) for r in cal.summary.get("per_layer", [])]
    if not per:
        return "extrapolation: no per-layer record from the calibrate run"
    cal_total = startup(cal) + TARGET_LAYERS * sum(per) / len(per)
    text = (f"extrapolated to MiniMax-M2.1 ({TARGET_LAYERS} layers): calibrate ≈ {cal_total / 60:.1f} min at "
            f"{cal.summary.get('tokens', '?')} tokens ({startup(cal):.0f} s start-up + {TARGET_LAYERS} x "
            f"{sum(per) / len(per):.2f} s)")
    walls = [r.get("wall_s", 0.0) for r in (gptq.summary.get("per_layer", []) if gptq else [])]
    if walls:
        g = TARGET_LAYERS * sum(walls) / len(walls)
        text += (f"; GPTQ ≈ {g / 60:.1f} min ({TARGET_LAYERS} x {sum(walls) / len(walls):.2f} s); both ≈ "
                 f"{(cal_total + g) / 60:.1f} min (the rewrite's copy of the kept weights not included)")
    return text
