"""Benchmark: `surgery quantize --method gptq` against `surgery calibrate` on the same checkpoint and tokens.

Why: GPTQ walks the same layers over the same calibration tokens as calibrate, plus its own work (the
Hessians, act(gate)·up under the original weights for down's, the factorisations, the column loop,
packing). The goal of issue 18 is GPTQ <= 1.5x calibrate on the 24-layer x 64-expert benchmark
checkpoint (tools/bench_calibrate.py's builder: hidden 640, expert intermediate 384, bf16) with 32
documents x 256 tokens of code. The machine is shared, so the two commands alternate (cal, gptq, cal,
gptq, ...) and every pair's ratio is reported, in wall time and in CPU time (user + system of the
process, which moves less with other load), with GPTQ's own split of its time (WORK/summary.json:
host-side seconds per stage) beside it. The section goes into docs/benchmarks-gptq.md.

    .venv/bin/python tools/bench_gptq.py                  # build the checkpoint if absent, 2 rounds
    .venv/bin/python tools/bench_gptq.py --rounds 3 --model /tmp/bench24/model
    .venv/bin/python tools/bench_gptq.py --surgery 'env PYTHONPATH=/tmp/old .venv/bin/python -P -m surgery'
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
DOC = REPO / "docs" / "benchmarks-gptq.md"
SURGERY = [str(REPO / ".venv" / "bin" / "surgery")] if (REPO / ".venv" / "bin" / "surgery").exists() \
    else [sys.executable, "-m", "surgery"]
LOAD_AT_START = os.getloadavg()


@dataclass
class Run:
    kind: str  # "calibrate" or "gptq"
    argv: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    rc: int = 0
    summary: str = ""
    timings: dict = field(default_factory=dict)


def build(model: Path) -> None:
    """tools/bench_calibrate.py's checkpoint (and a tokenizer), in a child: this process stays torch-free
    so its children's rusage is theirs alone."""
    code = (
        "import argparse, sys\n"
        "from pathlib import Path\n"
        f"sys.path[:0] = [{str(REPO / 'tools')!r}, {str(REPO)!r}]\n"
        "import bench_calibrate\n"
        f"model = Path({str(model)!r})\n"
        "bench_calibrate.build(model, argparse.Namespace(hidden=640, intermediate=384, layers=24, experts=64))\n"
        "if not (model / 'tokenizer.json').is_file():\n"
        "    from surgery.synth import make_tokenizer\n"
        "    make_tokenizer(model, vocab_size=4096)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def measure(run: Run, log: Path) -> None:
    """Run to completion; wall, user + system CPU and peak RSS of the child (os.wait4)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(run.argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    run.wall_s = time.perf_counter() - t0
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.peak_rss_mb = usage.ru_maxrss / 1024
    run.rc = os.waitstatus_to_exitcode(status)
    lines = [ln.strip() for ln in log.read_text().splitlines() if ln.strip()]
    run.summary = " ".join(lines[-3:])[-400:]


def rounds(args: argparse.Namespace, model: Path) -> list[tuple[Run, Run]]:
    common = ["--dataset", args.dataset, "--samples", str(args.samples), "--max-length", str(args.max_length),
              "--batch-size", str(args.batch_size), "--no-progress"]
    pairs = []
    for r in range(args.rounds):
        work = CACHE / "gptq-bench"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        cal = Run("calibrate", [*SURGERY, "calibrate", str(model), "--work", str(work / "cal"), *common])
        gptq = Run("gptq", [*SURGERY, "quantize", str(model), "--out", str(work / "q"), "--work",
                            str(work / "qw"), "--method", "gptq", *common])
        for run in (cal, gptq) if r % 2 == 0 else (gptq, cal):  # alternate which one goes first
            measure(run, work / f"{run.kind}.log")
            if run.rc:
                raise SystemExit(f"{run.kind} failed ({run.rc}): {run.summary}")
            print(f"  round {r + 1} {run.kind}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU", flush=True)
        gptq.timings = stage_timings(work / "qw" / "summary.json")
        pairs.append((cal, gptq))
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return pairs


def stage_timings(path: Path) -> dict[str, float]:
    """The GPTQ walk's split from WORK/summary.json: the engine's `*_s` timings, then the pass's stages."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    engine = {f"engine: {k.removesuffix('_s')}": v for k, v in data.items()
              if k.endswith("_s") and k not in ("first_layer_after_s",) and isinstance(v, (int, float))}
    return {**engine, **data.get("pass_stages", {})}


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    before = " / ".join(f"{x:.1f}" for x in LOAD_AT_START)
    return (f"{os.cpu_count()} cores ({cpu}); load average (1/5/15 min) {before} before, {load} after (a "
            f"shared machine moves every figure); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")


def section(args: argparse.Namespace, model: Path, pairs: list[tuple[Run, Run]], argv: list[str]) -> list[str]:
    wall = [g.wall_s / c.wall_s for c, g in pairs]
    cpu = [g.cpu_s / c.cpu_s for c, g in pairs]
    lines = ["## GPTQ against calibrate (24 layers × 64 experts)", "",
             f"Machine: {machine()}.", "",
             f"Checkpoint: `{model}` (tools/bench_calibrate.py's builder: 24 layers × 64 experts, hidden 640, "
             f"expert intermediate 384, bf16, computed in float32 on the CPU). Tokens: `--dataset {args.dataset} "
             f"--samples {args.samples} --max-length {args.max_length} --batch-size {args.batch_size}` for both.",
             "", f"Produced by: `{shlex.join(['.venv/bin/python', 'tools/bench_gptq.py', *argv])}`", "",
             "| round | calibrate wall | GPTQ wall | wall ratio | calibrate CPU | GPTQ CPU | CPU ratio | "
             "GPTQ peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for i, (c, g) in enumerate(pairs):
        lines.append(f"| {i + 1} | {c.wall_s:.1f} s | {g.wall_s:.1f} s | **{wall[i]:.2f}x** | {c.cpu_s:.1f} s | "
                     f"{g.cpu_s:.1f} s | {cpu[i]:.2f}x | {g.peak_rss_mb:.0f} MB |")
    lines += ["", f"Median ratio: wall **{statistics.median(wall):.2f}x**, CPU {statistics.median(cpu):.2f}x "
                  "(goal: <= 1.5x).", ""]
    t = pairs[-1][1].timings
    if t:
        lines += ["GPTQ's own split of its last run (host-side seconds; WORK/summary.json):", "",
                  "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.1f} |" for k, v in t.items()]
        lines.append("")
    lines += ["What each run printed last:", ""]
    lines += [f"- {r.kind}: {r.summary}" for r in pairs[-1]]
    return lines


def write_section(doc: Path, lines: list[str]) -> None:
    begin, end = "<!-- bench_gptq -->", "<!-- /bench_gptq -->"
    text = doc.read_text() if doc.exists() else ("# Benchmark: GPTQ time\n\nProduced by `tools/bench_gptq.py`; "
                                                 "re-run it to refresh the section below.\n")
    block = "\n".join([begin, *lines, end])
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", type=Path, default=CACHE / "calib-24x64" / "model",
                   help="the benchmark checkpoint (built there if absent)")
    p.add_argument("--rounds", type=int, default=2, help="calibrate + GPTQ pairs, alternating which goes first")
    p.add_argument("--dataset", default="builtin:code")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--surgery", default=None, help="command that runs the CLI under test (default .venv/bin/surgery)")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--no-doc", action="store_true", help="print the section only")
    p.add_argument("--keep-work", action="store_true")
    args = p.parse_args(argv)
    if args.surgery:
        SURGERY[:] = shlex.split(args.surgery)
    build(args.model)
    pairs = rounds(args, args.model)
    lines = section(args, args.model, pairs, argv)
    if not args.no_doc:
        write_section(args.doc, lines)
    (CACHE / "bench_gptq.json").write_text(json.dumps([[asdict(c), asdict(g)] for c, g in pairs], indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
