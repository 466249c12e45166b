"""The CUDA paths of `surgery`, checked against the CPU and measured at realistic size in one shot (run by
tools/gpu/check.sh).

Why one prepared script: GPU time is scarce and lent by the minute. Everything that needs a GPU to be
believed runs here back to back on a checkpoint with MiniMax-M2's exact layer shapes in the hub FP8
layout (tools/gen_fullwidth.py):

1. correctness: the device tier, pinned staging buffers, FP8 dequantised on the device, experts paged
   in chunks under a small `--memory-budget`, two ranks when there are two GPUs, each compared with a
   CPU float32 run on the same few tokens: frequencies must be equal, every other statistic within 1e-3
   relative;
2. scale (tools/gpu/scale.py): `surgery calibrate` on >= 500k packed tokens in the default dtype, per
   layer what the engine recorded (reads, host->device, dequant, expert compute and its TFLOP/s,
   checkpoint write and wait, wall) and the time before the first layer;
3. GPTQ of the pruned layers (`surgery prune --ratio 0.5 --quantize w4a16 --quantize-method gptq`),
   seconds per layer;
4. one line extrapolating calibrate and GPTQ to MiniMax-M2.1's 62 layers.

`--simulate-on-cpu` rehearses every stage on the CPU at a tiny shape (same tables, same lines), so the
script is known to work before a GPU is lent. Exit status: 0 all equal and every stage ran, 1 a
comparison failed or a run failed, 2 no CUDA.

    tools/gpu/check.sh                       # what `just gpu-check` runs
    .venv/bin/python tools/gpu/check.py [--layers 2 --experts 256 --samples 4 --max-length 64 --budget 4GB]
    .venv/bin/python tools/gpu/check.py --simulate-on-cpu        # the rehearsal (a minute or two here)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tools"), str(Path(__file__).resolve().parent)]

import bench_paging as bp  # noqa: E402  (page-cache dropping, tree memory, record reading)
import scale  # noqa: E402  (the realistic-size stages)

WORK = REPO / ".cache" / "gpu-check"
FREQ_KEYS = ("frequency",)
REL_TOL = 1e-3
CLI = [sys.executable, "-m", "surgery"]  # --surgery CMD replaces it


@dataclass
class Result:
    """One calibrate run on the device (or the CPU reference)."""

    name: str
    args: list[str]
    wall_s: float = 0.0
    rc: int = 0
    peak_anon: int = 0
    gpu_peak_nvml: int = 0  # bytes, the whole device as NVML sees it (CUDA context included)
    breakdown: dict = field(default_factory=dict)
    record: dict = field(default_factory=dict)
    verdict: str = ""
    log: str = ""


# ---------------------------------------------------------------------------------------------- GPU memory
class GpuMemory(threading.Thread):
    """Peak used memory summed over the GPUs, via NVML when importable, else nvidia-smi (coarser)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self.stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._read = lambda: sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles)
            self.period = 0.02
        except Exception:  # noqa: BLE001 - no NVML bindings in this environment: fall back
            self._read = self._smi
            self.period = 0.2

    @staticmethod
    def _smi() -> int:
        if not shutil.which("nvidia-smi"):  # --simulate-on-cpu on a machine without a GPU
            return 0
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True)
        return sum(int(x) for x in out.stdout.split()) * 2**20 if out.returncode == 0 else 0

    def run(self) -> None:
        base = self._read()
        while not self.stop.is_set():
            self.peak = max(self.peak, self._read() - base)
            self.stop.wait(self.period)


# ---------------------------------------------------------------------------------------------- runs
def calibrate(model: Path, name: str, extra: list[str], args: argparse.Namespace, files: list[Path]) -> Result:
    work = WORK / f"work-{name}"
    shutil.rmtree(work, ignore_errors=True)
    argv = [*CLI, "calibrate", str(model), "--work", str(work), "--dataset", "builtin:code",
            "--samples", str(args.samples), "--max-length", str(args.max_length), "--batch-size", "1",
            "--no-progress", *extra]
    res = Result(name, extra, log=str(WORK / f"log-{name}.txt"))
    gpu = GpuMemory()
    gpu.start()
    run = bp.measure(bp.Run(name, argv, work=str(work), log=res.log), files, args.timeout)
    gpu.stop.set()
    gpu.join()
    res.wall_s, res.rc, res.peak_anon, res.gpu_peak_nvml = run.wall_s, run.rc, run.peak_anon, gpu.peak
    res.breakdown = run.breakdown
    res.record = read_record(work)
    print(f"  {name}: {res.wall_s:.1f} s, exit {res.rc}, host anon peak {bp.gb(res.peak_anon)}, GPU peak (NVML) "
          f"{bp.gb(res.gpu_peak_nvml)}", flush=True)
    if res.rc:
        print("    " + "\n    ".join(Path(res.log).read_text(errors="replace").splitlines()[-12:]), flush=True)
    return res


def read_record(work: Path) -> dict:
    """Whatever summary the run left (summary.json, else manifest.json's 'summary' or the manifest)."""
    for name in ("summary.json", "manifest.json"):
        p = work / name
        if p.is_file():
            data = json.loads(p.read_text())
            return data.get("summary", data) if isinstance(data, dict) else {}
    return {}


def compare(ref: Path, got: Path) -> tuple[bool, str]:
    """CPU float32 vs CUDA float32: frequencies equal, other statistics within REL_TOL relative."""
    if not ref.is_file() or not got.is_file():
        return False, "no saliency.json"
    import numpy as np

    a, b = json.loads(ref.read_text())["layers"], json.loads(got.read_text())["layers"]
    if a.keys() != b.keys():
        return False, f"layers differ: {sorted(a)} vs {sorted(b)}"
    freq_diff, worst, where = 0, 0.0, ""
    for layer in a:
        for key, x in a[layer].items():
            x, y = np.asarray(x, dtype=np.float64), np.asarray(b[layer].get(key), dtype=np.float64)
            if key in FREQ_KEYS:
                freq_diff += int(np.sum(x != y))
                continue
            floor = 1e-6 * max(float(np.max(np.abs(x))), 1e-30)  # experts with ~0 statistics: absolute
            rel = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), floor))) if x.size else 0.0
            if rel > worst:
                worst, where = rel, f"layer {layer} {key}"
    ok = freq_diff == 0 and worst <= REL_TOL
    text = f"frequencies {'equal' if freq_diff == 0 else f'DIFFER in {freq_diff} entries'}; max rel {worst:.1e}"
    return ok, text + (f" ({where})" if where and worst > REL_TOL else "")


# ---------------------------------------------------------------------------------------------- table
def layer_rows(res: Result) -> dict[str, dict[str, float]]:
    """{layer: {read, transfer, dequant, compute, wall}} from the engine's per-layer record of the run."""
    keys = ("read", "transfer", "dequant", "compute", "wall")
    return {str(rec["layer"]): {k: float(rec[f"{k}_s"]) for k in keys if rec.get(f"{k}_s") is not None}
            for rec in res.record.get("per_layer", []) if isinstance(rec, dict) and "layer" in rec}


def shard_of_layer(model: Path) -> dict[str, Path]:
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    out: dict[str, Path] = {}
    for name, shard in index.items():
        if name.startswith("model.layers."):
            out.setdefault(name.split(".")[2], model / shard)
    return out


def table(results: list[Result], cold: dict[str, float], cold_total: float) -> list[str]:
    def s(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    lines = ["| run | layer | read s | host→device s | dequant s | compute s | GPU peak | wall s | cold read s "
             "| wall / cold | saliency vs CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows = layer_rows(r)
        gpu_total = r.record.get("peak_gpu_mb")
        gpu_total = gpu_total * 2**20 if isinstance(gpu_total, (int, float)) else r.gpu_peak_nvml
        for layer, row in sorted(rows.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30):
            c = cold.get(layer)
            wall = row.get("wall")
            lines.append(f"| {r.name} | {layer} | {s(row.get('read'))} | {s(row.get('transfer'))} | "
                         f"{s(row.get('dequant'))} | {s(row.get('compute'))} | {bp.gb(row.get('gpu_peak'))} | "
                         f"{s(wall)} | {s(c)} | {s(wall / c) if wall and c else '-'} | |")
        b = r.breakdown
        status = "" if r.rc == 0 else f" (exit {r.rc})"
        lines.append(f"| {r.name}{status} | all | {s(b.get('read'))} | {s(b.get('transfer'))} | {s(b.get('dequant'))} "
                     f"| {s(b.get('compute'))} | {bp.gb(gpu_total)} | {r.wall_s:.2f} | {cold_total:.2f} | "
                     f"{r.wall_s / cold_total:.2f} | {r.verdict} |")
    return lines


# ---------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--samples", type=int, default=4,
                   help="documents of builtin:code (tokens = samples x length; batch size 1, so 2 ranks both get rows)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--budget", default="4GB",
                   help="--memory-budget that forces chunked experts (a float32 layer of 256 experts is 14.5 GB) "
                        "and still holds the host's floor (interpreter, CUDA libraries, hidden states)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all torch sees)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before one run is killed")
    p.add_argument("--deadline", type=float, default=200,
                   help="seconds (from this script's start) after which no further correctness run is started")
    p.add_argument("--work", type=Path, default=WORK, help="where checkpoints and work directories go")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoint and work directories")
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    p.add_argument("--gen-args", default="", help="extra tools/gen_fullwidth.py arguments (e.g. a smaller shape)")
    p.add_argument("--simulate-on-cpu", action="store_true",
                   help="rehearse the whole script without a GPU: every 'cuda' run runs on the CPU instead, at a tiny "
                        "shape (unless --gen-args / --experts say otherwise) and with few tokens")
    p.add_argument("--scale-tokens", type=int, default=None, help="calibration tokens of the scale stage "
                   "(default 524288; simulated: 2048)")
    p.add_argument("--gptq-tokens", type=int, default=None, help="calibration tokens of the GPTQ stage "
                   "(default 65536; simulated: 1024)")
    p.add_argument("--length", type=int, default=None, help="packed row length of both (default 2048; simulated 128)")
    p.add_argument("--stages", default="correctness,scale,gptq", help="which stages to run (comma separated)")
    p.add_argument("--correctness-runs", default=None,
                   help="only these correctness runs (comma separated names, e.g. cuda-f32,cpu-f32)")
    p.add_argument("--budget-s", type=float, default=470, help="seconds the whole script may take (the GPTQ stage "
                   "gets what is left)")
    p.add_argument("--surgery", default=None, help="command that runs the CLI under test (default: python -m surgery)")
    args = p.parse_args()
    sim = args.simulate_on_cpu
    if sim:  # a rehearsal needs no cold page cache: leave the rest of the machine's alone
        os.environ.setdefault("BENCH_DROP_CACHES", "0")
    if sim and not args.gen_args:  # a tiny shape (16 experts unless asked: pruning half keeps top-k 8)
        args.gen_args = "--hidden 256 --intermediate 128 --heads 4 --kv-heads 2 --head-dim 64"
        args.experts = 16 if args.experts == 256 else args.experts
    args.scale_tokens = args.scale_tokens or (2048 if sim else 524288)
    args.gptq_tokens = args.gptq_tokens or (1024 if sim else 65536)
    args.length = args.length or (128 if sim else 2048)
    args.stages = {x.strip() for x in args.stages.split(",") if x.strip()}
    return args


def devices(args: argparse.Namespace) -> tuple[int, str] | int:
    """(GPUs to use, their names), or an exit status. Asked in a child: this process measures its
    children and stays light (no torch, no CUDA context)."""
    probe = subprocess.run([sys.executable, "-c", "import json, torch; c = torch.cuda.is_available(); print(json.dumps("
                            "[torch.__version__, torch.version.cuda, [torch.cuda.get_device_name(i) for i in "
                            "range(torch.cuda.device_count())] if c else []]))"], capture_output=True, text=True)
    if probe.returncode:
        print("gpu-check: torch cannot be imported: " + (probe.stderr.strip().splitlines() or ["?"])[-1])
        return 1
    torch_version, cuda_version, found = json.loads(probe.stdout)
    if args.simulate_on_cpu:
        gpus, names = args.gpus or 1, "none (--simulate-on-cpu: 'cuda' runs are CPU runs)"
    elif not found:
        print(f"gpu-check: torch {torch_version} sees no CUDA device; nothing to check")
        return 2
    else:
        gpus = min(args.gpus or len(found), len(found))
        names = ", ".join(found[:gpus])
    print(f"gpu-check: {gpus} GPU(s): {names}; torch {torch_version} (CUDA {cuda_version})", flush=True)
    return gpus, names


def checkpoint(args: argparse.Namespace) -> tuple[Path, list[Path], int]:
    """The MiniMax-M2-shaped FP8 checkpoint (generated once per shape), its shards and their bytes."""
    WORK.mkdir(parents=True, exist_ok=True)
    shape = "-" + hashlib.sha256(args.gen_args.encode()).hexdigest()[:8] if args.gen_args else ""
    model = WORK / f"m2-{args.layers}x{args.experts}-fp8{shape}"
    t0 = time.perf_counter()
    jobs = str(min(args.layers + 1, os.cpu_count() or 1))
    bp.generate(model, args.layers, args.experts, "fp8", ["--jobs", jobs, "--quiet", *shlex.split(args.gen_args)])
    files = bp.shards_of(model)
    size = sum(f.stat().st_size for f in files)
    print(f"  checkpoint {model}: {bp.gb(size)} in {len(files)} shards ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model, files, size


def correctness(args: argparse.Namespace, model: Path, files: list[Path], gpus: int, t_start: float
                ) -> tuple[list[Result], list[str], list[str]]:
    """The device runs against the CPU float32 reference: (results, table lines, names that failed)."""
    cold: dict[str, float] = {}  # cold read of the same bytes: per layer (one shard each) and all shards
    method = ""
    for layer, shard in shard_of_layer(model).items():
        method = bp.drop_cache([shard])
        t = time.perf_counter()
        subprocess.run(["cat", str(shard)], stdout=subprocess.DEVNULL, check=True)
        cold[layer] = time.perf_counter() - t
    cat = bp.cold_cat(files, args.timeout)
    print(f"  cold read: {cat.wall_s:.1f} s all shards ({method})", flush=True)
    has_budget = bp.supports_budget()
    # the CUDA float32 run first (the point of the check), then its CPU reference, then the rest
    plan: list[tuple[str, list[str]]] = [
        ("cuda-f32", ["--device", "cuda", "--dtype", "float32"]),
        ("cpu-f32", ["--device", "cpu", "--dtype", "float32"]),
    ]
    if has_budget:
        plan.append((f"cuda-f32-budget-{args.budget}", ["--device", "cuda", "--dtype", "float32",
                                                       "--memory-budget", args.budget]))
    plan.append(("cuda-bf16", ["--device", "cuda"]))
    if gpus >= 2:
        plan.append(("cuda-f32-2ranks", ["--device", "cuda", "--dtype", "float32", "--nproc", "2"]))
    if args.simulate_on_cpu:
        plan = [(name, ["cpu" if a == "cuda" else a for a in extra]) for name, extra in plan]
    if args.correctness_runs:
        keep = set(args.correctness_runs.split(","))
        plan = [(name, extra) for name, extra in plan if name in keep]
    results: list[Result] = []
    skipped: list[str] = []
    for name, extra in plan:
        # stay inside the time box: a run is started only if the longest run so far would still fit
        longest = max((r.wall_s for r in results), default=0.0)
        if time.perf_counter() - t_start + longest > args.deadline:
            skipped.append(name)
            continue
        results.append(calibrate(model, name, extra, args, files))
    ref = WORK / "work-cpu-f32" / "saliency.json"
    failed = [r.name for r in results if r.rc]
    for r in results:
        if r.name == "cpu-f32":
            r.verdict = "(reference)"
            continue
        if "bf16" in r.name:
            r.verdict = "(bf16: not compared)"
            continue
        ok, text = compare(ref, WORK / f"work-{r.name}" / "saliency.json")
        r.verdict = text
        if not ok and r.name not in failed:
            failed.append(r.name)
    lines = ["" if has_budget else "(no --memory-budget here: the chunked-experts run was skipped)",
             *table(results, cold, cat.wall_s), "",
             f"cold read: {method}; GPU peak: the run's own record (peak_gpu_mb) where it has one, else NVML's "
             f"used-memory rise during the run",
             f"skipped to stay within {args.deadline:.0f} s: {', '.join(skipped)}" if skipped else ""]
    return results, lines, failed


def realistic(args: argparse.Namespace, model: Path, files: list[Path], t_start: float) -> tuple[list[str], list[str]]:
    """Calibrate at scale, GPTQ of the pruned layers, the 62-layer extrapolation: (lines, names that failed)."""
    device = "cpu" if args.simulate_on_cpu else "cuda"
    lines: list[str] = []
    failed: list[str] = []
    cal = gptq = None
    if "scale" in args.stages:
        cal = scale.calibrate_stage(CLI, model, WORK / "work-scale", args.scale_tokens, args.length, device, files,
                                    args.timeout)
        lines += ["", f"## calibrate at scale ({args.layers} layers x {args.experts} experts)", "",
                  *scale.calibrate_table(cal)]
        failed += [cal.name] if cal.rc else []
    if "gptq" in args.stages:
        left = args.budget_s - (time.perf_counter() - t_start)
        gptq = scale.gptq_stage(CLI, model, WORK / "gptq", args.gptq_tokens, args.length, device, files,
                                max(60.0, left))
        lines += ["", *scale.gptq_lines(gptq)]
        failed += [gptq.name] if gptq.rc else []
    if cal is not None:
        lines += ["", scale.extrapolation(cal, gptq)]
    return lines, failed


def main() -> int:
    global WORK
    args = parse_args()
    t_start = time.perf_counter()
    WORK = args.work
    if args.surgery:
        CLI[:] = shlex.split(args.surgery)
    bp.SURGERY[:] = CLI
    found = devices(args)
    if isinstance(found, int):
        return found
    gpus, names = found
    model, files, size = checkpoint(args)
    results, failed = [], []
    lines = [f"gpu-check: {args.layers} layers x {args.experts} experts (MiniMax-M2 shapes, FP8), {bp.gb(size)}; "
             f"{args.samples} x {args.max_length} tokens of builtin:code; {names}"]
    if "correctness" in args.stages:
        results, more, failed = correctness(args, model, files, gpus, t_start)
        lines += more
    more, bad = realistic(args, model, files, t_start)
    lines += [*more, "", f"total {time.perf_counter() - t_start:.0f} s in this script",
              "PASS" if not failed + bad else "FAIL: " + ", ".join(failed + bad)]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        args.out.write_text(text + "\n")
    (WORK / "results.json").write_text(json.dumps([r.__dict__ for r in results], indent=2, default=str))
    if not args.keep:
        shutil.rmtree(model, ignore_errors=True)
        for name in [f"work-{r.name}" for r in results] + ["work-scale", "gptq"]:
            shutil.rmtree(WORK / name, ignore_errors=True)
    print("commands: " + "; ".join(shlex.join(["surgery", "calibrate", "...", *r.args]) for r in results))
    return 0 if not failed + bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
