"""Benchmark: streaming calibration vs the same math on the whole model loaded in memory (CPU).

Builds (once) a synthetic MiniMax-M2-layout checkpoint of >= 2 GB in bf16 (24 layers x 64 experts by
default), then runs, each in its own process so peak memory is that run's alone:
  - streaming: `surgery`'s layer-by-layer Calibrator (float32 compute, zarr cache);
  - in-memory: `AutoModelForCausalLM.from_pretrained` of the whole model (float32, the same compute
    dtype) with the same SaliencyObserver on every MoE block, over the same batches.
It checks that both give the same statistics and prints/writes time, peak RSS and their ratios.

    python tools/bench_calibrate.py --dir /tmp/bench-calib [--layers 24 --experts 64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(path: Path, args) -> None:
    from surgery.synth import make_checkpoint

    if (path / "model.safetensors.index.json").exists():  # written last by save_pretrained
        return
    import torch

    make_checkpoint(path, "minimax_m2", dtype=torch.bfloat16, max_shard_size="1GB", hidden_size=args.hidden,
                    intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=args.hidden // 8, rotary_dim=args.hidden // 8,
                    num_local_experts=args.experts, num_experts_per_tok=8, vocab_size=4096)


def tokens(args):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(4, 4096, size=(args.samples, args.length))
    mask = np.ones_like(ids, dtype=np.uint8)
    return ids, mask


def run_streaming(args) -> dict:
    from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator

    ids, mask = tokens(args)
    work = Path(args.dir) / "work"
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    cal = Calibrator(Path(args.dir) / "model", work,
                     CalibrateOptions(batch_size=args.batch, dtype="float32", device="cpu", progress=False))
    sal = cal.run(CalibrationInputs(ids, mask, {"bench": "0"}, {}))
    return {"seconds": time.perf_counter() - t0, "layers": sal["layers"]}


def run_in_memory(args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from surgery.saliency.observer import SaliencyObserver

    ids, mask = tokens(args)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(Path(args.dir) / "model", dtype=torch.float32).eval()
    observers = {i: SaliencyObserver(layer.mlp, model.config.num_local_experts)
                 for i, layer in enumerate(model.model.layers)}
    with torch.no_grad():
        for s in range(0, len(ids), args.batch):
            m = torch.from_numpy(mask[s:s + args.batch].astype(np.int64))
            for o in observers.values():
                o.valid = m.reshape(-1).bool()
            model.model(input_ids=torch.from_numpy(ids[s:s + args.batch]), attention_mask=m)
    return {"seconds": time.perf_counter() - t0,
            "layers": {str(i): o.stats.result() for i, o in observers.items()}}


def child(mode: str, args) -> dict:
    """Run one mode in a fresh process; return its result plus its own peak RSS."""
    out = Path(args.dir) / f"{mode}.json"
    cmd = [sys.executable, __file__, "--child", mode, *sys.argv[1:]]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(out.read_text())
    # ru_maxrss of children is the max over all waited-for children: run the lighter one first
    result["peak_rss_mb"] = max(after, before) / 1024 if after > before else float("nan")
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/bench-calibrate")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--child", default=None)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks-calibrate.md"))
    args = p.parse_args()
    if args.child:
        result = run_streaming(args) if args.child == "streaming" else run_in_memory(args)
        (Path(args.dir) / f"{args.child}.json").write_text(json.dumps(result))
        return
    model_dir = Path(args.dir) / "model"
    t0 = time.perf_counter()
    build(model_dir, args)
    size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(f"checkpoint {size / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s to build)", flush=True)
    subprocess.run(["cat", *map(str, model_dir.glob("*.safetensors"))], stdout=subprocess.DEVNULL, check=True)
    streaming = child("streaming", args)  # lighter first: RUSAGE_CHILDREN keeps the maximum
    in_memory = child("in_memory", args)
    import numpy as np

    worst = 0.0
    for layer, ref in in_memory["layers"].items():
        got = streaming["layers"][layer]
        assert got["frequency"] == ref["frequency"], f"frequency differs in layer {layer}"
        for key in ("ean", "reap", "weighted_frequency"):
            a, b = np.array(got[key]), np.array(ref[key])
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
    tokens_n = args.samples * args.length
    lines = [
        "# Benchmark: streaming calibration vs in-memory (CPU)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.machine()}, torch {__import__('torch').__version__}; "
        f"one run of `python tools/bench_calibrate.py` ({time.strftime('%Y-%m-%d')}).",
        "",
        f"Checkpoint: synthetic MiniMax-M2 layout, bf16, {args.layers} layers x {args.experts} experts "
        f"(hidden {args.hidden}, expert intermediate {args.intermediate}, top-8), {size / 1e9:.2f} GB in "
        f"{len(list(model_dir.glob('*.safetensors')))} shards, read from page cache. Calibration: "
        f"{args.samples} x {args.length} = {tokens_n} tokens, batch {args.batch}, float32 compute.",
        "",
        "| run | time (s) | tokens/s | peak RSS (MB) |",
        "|---|---|---|---|",
        f"| streaming (`surgery` Calibrator) | {streaming['seconds']:.1f} | {tokens_n / streaming['seconds']:,.0f} | "
        f"{streaming['peak_rss_mb']:.0f} |",
        f"| in-memory (whole model, same observers) | {in_memory['seconds']:.1f} | "
        f"{tokens_n / in_memory['seconds']:,.0f} | {in_memory['peak_rss_mb']:.0f} |",
        "",
        f"- time ratio streaming / in-memory: **{streaming['seconds'] / in_memory['seconds']:.2f}x** (goal <= 1.2x)",
        f"- peak memory ratio: **{streaming['peak_rss_mb'] / in_memory['peak_rss_mb']:.2f}** "
        f"(streaming goal <= 1.2 GB; the whole model in float32 needs >= 2.6 GB)",
        f"- same statistics: frequencies identical, other statistics max relative difference {worst:.1e}",
        "",
        "Both times include loading weights (the in-memory run's `from_pretrained`, the streaming run's per-layer",
        "reads) and the streaming run's zarr writes of every layer's hidden states.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
