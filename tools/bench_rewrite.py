"""Benchmark the streaming rewrite against `cp -r` on a multi-GB MiniMax-M2-layout checkpoint.

    .venv/bin/python tools/bench_rewrite.py [--dir /tmp/surgery-bench] [--reps 3] [--doc docs/benchmarks-rewrite.md]

1. Builds (or reuses, in --dir) a synthetic bf16 checkpoint in the hub's MiniMax-M2 layout: 12 layers,
   64 experts, hidden 1024, expert intermediate 512, about 2.6 GB in two shards of about 1.3 GB. It is
   written by a streaming generator (the repository's own `SafetensorsWriter`, random bytes), because
   `surgery.synth.make_checkpoint` builds the whole model in memory. The generator's tensor names and
   shapes are checked against `make_checkpoint` at tiny size first, so the layout is the real one.
2. Writes a random plan at ratio 0.5 (and one at ratio 0.0, a full copy through the rewrite path).
3. Reads every input file once (page cache warm-up), then times, alternating, `cp -r MODEL DEST`,
   `surgery rewrite` (a subprocess, interpreter start-up included) with both copy paths
   (`copy_file_range` and `pread`/`write`), the full copy with and without SHA-256, and
   `surgery inspect MODEL` (the fixed cost any command pays), `--reps` times each; reports medians.
   Peak memory comes from `wait4` (ru_maxrss) and from sampling `/proc/PID/status` (VmHWM, RssAnon).
4. Prints the figures and writes them to --doc. Generated data stays in --dir (outside git).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = dict(hidden_size=1024, intermediate_size=512, num_hidden_layers=12, num_local_experts=64,
             num_experts_per_tok=8, num_attention_heads=16, num_key_value_heads=4, head_dim=64, rotary_dim=64,
             vocab_size=32000, max_position_embeddings=4096)
SHARD_BYTES = 1_400_000_000
POOL_BYTES = 64 * 1024 * 1024
GOAL_RATIO = 1.25
GOAL_MB = 700
FIXED = "fixed cost (surgery inspect MODEL)"


# ---------------------------------------------------------------------------------------------- generator
def minimax_layout(cfg) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor of a MiniMax-M2 checkpoint on disk, in a plausible file order."""
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out = [("model.embed_tokens.weight", "BF16", (cfg.vocab_size, h))]
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        moe = p + "block_sparse_moe."
        out += [(p + "input_layernorm.weight", "BF16", (h,)), (p + "post_attention_layernorm.weight", "BF16", (h,)),
                (p + "self_attn.q_proj.weight", "BF16", (q, h)), (p + "self_attn.k_proj.weight", "BF16", (kv, h)),
                (p + "self_attn.v_proj.weight", "BF16", (kv, h)), (p + "self_attn.o_proj.weight", "BF16", (h, q)),
                (p + "self_attn.q_norm.weight", "BF16", (q,)), (p + "self_attn.k_norm.weight", "BF16", (kv,)),
                (moe + "gate.weight", "BF16", (e, h)), (moe + "e_score_correction_bias", "F32", (e,))]
        for x in range(e):
            out += [(f"{moe}experts.{x}.w1.weight", "BF16", (i, h)), (f"{moe}experts.{x}.w2.weight", "BF16", (h, i)),
                    (f"{moe}experts.{x}.w3.weight", "BF16", (i, h))]
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (cfg.vocab_size, h))]
    return out


def check_layout(tmp: Path) -> None:
    """The generator's names and shapes equal what transformers writes for the same (tiny) config."""
    from surgery.checkpoint.reader import Checkpoint
    from surgery.synth import make_checkpoint, tiny_config

    ref = make_checkpoint(tmp / "layout-check", "minimax_m2")
    with Checkpoint(ref) as ckpt:
        want = {n: t.shape for n, t in ckpt.tensors.items()}
    got = {n: shape for n, _, shape in minimax_layout(tiny_config("minimax_m2"))}
    if got != want:
        raise SystemExit(f"generator layout differs from make_checkpoint: {sorted(set(got) ^ set(want))[:5]}")
    shutil.rmtree(tmp / "layout-check")


def generate(out: Path) -> Path:
    """Write the benchmark checkpoint shard by shard, never holding more than a 64 MB pool of bytes."""
    import numpy as np

    from surgery.checkpoint.writer import SafetensorsWriter, TensorEntry
    from surgery.synth import tiny_config

    cfg = tiny_config("minimax_m2", **SIZES)
    cfg.architectures = ["MiniMaxM2ForCausalLM"]
    entries = [TensorEntry(n, d, s) for n, d, s in minimax_layout(cfg)]
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        if groups[-1] and size + entry.nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pool = np.random.default_rng(0).bytes(POOL_BYTES)
    view, pos = memoryview(pool), 0
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        with SafetensorsWriter(tmp / name, group, {"format": "pt"}, fsync=False) as w:
            for entry in group:
                left = entry.nbytes
                while left:
                    n = min(left, POOL_BYTES - pos)
                    w.write(entry.name, view[pos:pos + n])
                    left -= n
                    pos = (pos + n + 4096) % POOL_BYTES  # shift, so no two tensors are the same bytes
                weight_map[entry.name] = name
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    cfg.save_pretrained(tmp)
    (tmp / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    tmp.rename(out)
    return out


# ---------------------------------------------------------------------------------------------- measuring
def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    buf = bytearray(16 << 20)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def run(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time, ru_maxrss (wait4) and sampled VmHWM / RssAnon peak of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = {"hwm_kb": 0, "anon_kb": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            for line in status.splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "RssAnon"):
                    kb = int(value.split()[0])
                    field = "hwm_kb" if key == "VmHWM" else "anon_kb"
                    peak[field] = max(peak[field], kb)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return {"wall": wall, "maxrss_kb": usage.ru_maxrss, **peak, "stdout": stdout.decode()}


def sync() -> None:
    subprocess.run(["sync"], check=True)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs = "?"
    try:
        fs = subprocess.run(["df", "-T", "/tmp"], capture_output=True, text=True).stdout.splitlines()[-1].split()[1]
    except (OSError, IndexError):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Linux {platform.release()}, {fs} file system, "
            f"Python {platform.python_version()}")


def prepare(root: Path) -> dict:
    """Build the checkpoint (unless present) and the plans; runs in its own process (see `main`)."""
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.plan import make_plan, save_plan

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        check_layout(root)
        t0 = time.perf_counter()
        generate(model_dir)
        print(f"generated {dir_bytes(model_dir) / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s -> {model_dir}",
              file=sys.stderr)
    with Checkpoint(model_dir) as ckpt:
        model = MoEModel(ckpt)
        info = {"model": str(model_dir), "shards": {n: s.file_size for n, s in ckpt.shards.items()},
                "tensors": len(ckpt.tensors), "total": dir_bytes(model_dir), "plans": {}}
        for r in (0.5, 0.0):
            info["plans"][str(r)] = str(save_plan(make_plan({}, model, "random", r, seed=0), root / f"plan-{r}.json"))
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/surgery-bench"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks-rewrite.md")
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.prepare:
        print(json.dumps(prepare(args.dir)))
        return
    # This process imports nothing heavy (no torch): a child's ru_maxrss counts the parent's resident
    # memory at fork, so preparation runs in a child of its own.
    py = sys.executable
    prep = subprocess.run([py, __file__, "--prepare", "--dir", str(args.dir)], stdout=subprocess.PIPE, check=True)
    info = json.loads(prep.stdout)
    root, model_dir = args.dir, Path(info["model"])
    plans = {float(k): v for k, v in info["plans"].items()}
    total, shards, n_tensors = info["total"], info["shards"], info["tensors"]
    print(f"model: {total / 1e9:.2f} GB, shards {[f'{v / 1e9:.2f} GB' for v in shards.values()]}, {n_tensors} tensors")

    def rewrite(plan: str, dst: Path) -> list[str]:
        return [py, "-m", "surgery", "rewrite", str(model_dir), plan, "--out", str(dst), "--no-progress", "--json"]

    variants = {
        "cp -r": lambda dst: (["cp", "-r", str(model_dir), str(dst)], None),
        "rewrite 0.5": lambda dst: (rewrite(plans[0.5], dst), None),
        "rewrite 0.5 (pread/write)": lambda dst: (rewrite(plans[0.5], dst), {"SURGERY_COPY_MODE": "readwrite"}),
        "rewrite 0.0 (full copy)": lambda dst: (rewrite(plans[0.0], dst), None),
        "rewrite 0.0 (full copy, no SHA-256)": lambda dst: (rewrite(plans[0.0], dst),
                                                            {"SURGERY_BENCH_NO_HASH": "1"}),
        FIXED: lambda dst: ([py, "-m", "surgery", "inspect", str(model_dir), "--json"], None),
    }
    results: dict[str, list[dict]] = {k: [] for k in variants}
    load_before = os.getloadavg()
    warm(model_dir)
    warm(model_dir)
    for rep in range(args.reps):
        for name, make in variants.items():
            dst = root / "out"
            shutil.rmtree(dst, ignore_errors=True)
            sync()
            warm(model_dir)
            cmd, extra = make(dst)
            env = {**os.environ, **(extra or {})}
            r = run(cmd, env)
            r["out_bytes"] = dir_bytes(dst) if dst.exists() else 0
            if name.startswith("rewrite "):
                r["summary"] = json.loads(r["stdout"].strip().splitlines()[-1])
                if rep == 0 and name == "rewrite 0.5":
                    check = run([py, "-m", "surgery", "verify", str(dst)], env)
                    print(check["stdout"].strip())
            t_sync = time.perf_counter()
            sync()
            r["sync"] = time.perf_counter() - t_sync
            results[name].append(r)
            inner = f", in-process {r['summary']['seconds']:.2f} s" if "summary" in r else ""
            print(f"[{rep + 1}/{args.reps}] {name}: {r['wall']:.2f} s{inner}, wrote {r['out_bytes'] / 1e9:.2f} GB, "
                  f"peak RSS {r['maxrss_kb'] / 1024:.0f} MB (VmHWM {r['hwm_kb'] / 1024:.0f} MB), "
                  f"peak anon {r['anon_kb'] / 1024:.0f} MB", flush=True)
    shutil.rmtree(root / "out", ignore_errors=True)
    loads = (load_before, os.getloadavg())
    write_doc(args.doc, results, total, shards, n_tensors, args.reps, loads)


def write_doc(doc: Path, results: dict, total: int, shards: dict, n_tensors: int, reps: int,
              loads: tuple[tuple[float, ...], tuple[float, ...]]) -> None:
    med = {k: statistics.median(r["wall"] for r in v) for k, v in results.items()}
    inner = {k: statistics.median(r["summary"]["seconds"] for r in v) for k, v in results.items()
             if k.startswith("rewrite ")}
    rss = {k: max(r["maxrss_kb"] for r in v) / 1024 for k, v in results.items()}
    anon = {k: max(r["anon_kb"] for r in v) / 1024 for k, v in results.items()}
    out_b = {k: v[0]["out_bytes"] for k, v in results.items()}
    cp = med["cp -r"]
    ratio = med["rewrite 0.5"] / cp
    peak = max(v for k, v in rss.items() if k.startswith("rewrite "))
    fixed = med[FIXED]
    marginal = {k: max(med[k] - fixed, 0.0) for k in med if k.startswith("rewrite ")}
    lines = [
        "# Rewrite benchmark",
        "",
        "Produced by `tools/bench_rewrite.py` (run it again to refresh this file).",
        "",
        f"- Machine: {machine()}. Load average (1/5/15 min) before the runs "
        f"{' / '.join(f'{x:.1f}' for x in loads[0])}, after {' / '.join(f'{x:.1f}' for x in loads[1])} "
        "(other work shares the machine; timings vary accordingly, which is why runs alternate).",
        f"- Checkpoint: synthetic MiniMax-M2 layout, bf16, {SIZES['num_hidden_layers']} layers x "
        f"{SIZES['num_local_experts']} experts, hidden {SIZES['hidden_size']}, expert intermediate "
        f"{SIZES['intermediate_size']}; {total / 1e9:.2f} GB in {len(shards)} shards "
        f"({', '.join(f'{v / 1e9:.2f} GB' for v in shards.values())}), {n_tensors} tensors.",
        "- Plan: random, ratio 0.5 (32 of 64 experts kept per layer); ratio 0.0 is a full copy through the "
        "rewrite path (every tensor copied, routers re-sliced).",
        f"- Method: input read once beforehand (page cache warm); each command timed {reps} times, alternating, "
        "output deleted and `sync` run (untimed) between runs; medians shown. Rewrite times are wall-clock of "
        "`python -m surgery rewrite ... --no-progress` including interpreter start-up and imports (torch, "
        "transformers config); 'in-process' is the rewrite itself. The rewrite fsyncs every shard and "
        "config.json; `cp` does not, so the time `sync` then took is shown too.",
        "",
        "| command | wall (median) | in-process | written | sync after | peak RSS | peak anon RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in results:
        sync_med = statistics.median(r["sync"] for r in results[k])
        lines.append(f"| {k} | {med[k]:.2f} s | {f'{inner[k]:.2f} s' if k in inner else '-'} | "
                     f"{out_b[k] / 1e9:.2f} GB | {sync_med:.2f} s | {rss[k]:.0f} MB | {anon[k]:.0f} MB |")
    lines += [
        "",
        f"- Time ratio rewrite 0.5 / `cp -r`, wall-clock: **{ratio:.2f}x** (goal <= {GOAL_RATIO}x: "
        f"{'met' if ratio <= GOAL_RATIO else 'NOT met'}).",
        f"- Of that, {fixed:.2f} s is a fixed cost every command on this model pays: `surgery inspect MODEL` "
        "(Python start-up, importing the CLI's modules, reading the headers and config.json, the fingerprint; "
        "no torch or transformers since the CLI reads config.json itself) takes that long. Beyond it the "
        "rewrite at 0.5 takes "
        f"{marginal['rewrite 0.5']:.2f} s: **{marginal['rewrite 0.5'] / cp:.2f}x** `cp -r` (goal <= "
        f"{GOAL_RATIO}x: {'met' if marginal['rewrite 0.5'] / cp <= GOAL_RATIO else 'NOT met'}). On a checkpoint "
        "of hundreds of GB the fixed seconds vanish and this marginal ratio is what remains.",
        f"- Per byte (ratio 0.0 writes what `cp` writes): {marginal['rewrite 0.0 (full copy)'] / cp:.2f}x `cp -r` "
        f"beyond the fixed cost, {marginal['rewrite 0.0 (full copy, no SHA-256)'] / cp:.2f}x without the SHA-256 "
        "(`SURGERY_BENCH_NO_HASH=1`, measurement only). The copy itself is the kernel's, as in `cp` "
        "(`copy_file_range`); the rewrite adds a SHA-256 of every byte written (on a second thread, for the "
        "resume manifest; about 1.7 GB/s on one core of this CPU, so on two shared cores it competes with the "
        "copy) and an fsync of every shard (overlapped with the next shard; `cp` leaves that to a later `sync`).",
        f"- In-process time (`rewrite_checkpoint` alone): {inner['rewrite 0.5']:.2f} s at 0.5, "
        f"{inner['rewrite 0.0 (full copy)']:.2f} s "
        "for the full copy.",
        f"- Peak memory of the rewrite process (ru_maxrss, interpreter and imports included): **{peak:.0f} MB** "
        f"(goal <= {GOAL_MB} MB: {'met' if peak <= GOAL_MB else 'NOT met'}); it does not grow with shard size "
        "(copies are kernel-side or 32 MB chunks; only router tensors are read into memory).",
        "",
        "All runs:",
        "",
    ]
    for k, v in results.items():
        lines.append(f"- {k}: " + ", ".join(f"{r['wall']:.2f} s" for r in v))
    # One line per run, kept across runs: the machine is shared, and `cp` alone has varied 4x between runs.
    history = previous_history(doc)
    history.append(
        f"- {time.strftime('%Y-%m-%d %H:%M')}: load {loads[0][0]:.1f} -> {loads[1][0]:.1f}; cp -r {cp:.2f} s; "
        f"rewrite 0.5 {med['rewrite 0.5']:.2f} s wall ({ratio:.2f}x), fixed cost {fixed:.2f} s, beyond it "
        f"{marginal['rewrite 0.5'] / cp:.2f}x; full copy beyond the fixed cost "
        f"{marginal['rewrite 0.0 (full copy)'] / cp:.2f}x ({marginal['rewrite 0.0 (full copy, no SHA-256)'] / cp:.2f}x "
        f"without SHA-256); peak RSS {peak:.0f} MB.")
    lines += ["", READING, "", HISTORY, "", *history]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


HISTORY = "## Runs so far (medians; newest last)"
READING = (
    'Reading these numbers: this is a shared 2-core VM, and how fast it writes into the page cache '
    'changes between runs (`cp -r` of the same 2.6 GB has taken from about 1 s to about 4 s; see the runs'
    ' below), while within a run the commands alternate and see the same conditions. When `cp` is fast, '
    'the fixed start-up (Python, torch, transformers: about 3 s in the early runs) dominates a job this small and the '
    'wall-clock ratio was far above the goal in the runs before 12:20; since then the CLI imports command '
    'modules lazily and reads config.json without transformers (and so without torch), which took the '
    'fixed part from ~3 s to ~0.5 s. Beyond the fixed cost the rewrite copies with the same kernel call '
    'as `cp`, plus the SHA-256 and fsyncs; the SHA-256 could only get cheaper by recording a cheaper '
    'checksum in the manifest.'
)


def previous_history(doc: Path) -> list[str]:
    if not doc.is_file():
        return []
    text = doc.read_text()
    if HISTORY not in text:
        return []
    return [line for line in text.split(HISTORY, 1)[1].splitlines() if line.startswith("- ")]


if __name__ == "__main__":
    main()
