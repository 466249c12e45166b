"""Time AutoRound-style tuning (`surgery quantize --method autoround`) of ONE decoder layer of a checkpoint.

For the prepared device benchmark: the layer engine embeds the calibration tokens and runs layer
`--layer` (its inputs are then the embeddings, which is exact for layer 0 and the right shape and cost
for any other), with the SignRound pass tuning it as the full command would: every routed expert built
on the device, one optimization of `--iters` steps over attention and experts (grouped GEMMs on CUDA
bf16), then the packed layer file written. Prints one JSON line: tuning seconds, wall, peak memory.

    .venv/bin/python tools/bench_autoround.py MODEL --layer 0 --dataset builtin:code --samples 128 \\
        --max-length 2048 --iters 200 --device cuda

Nothing is written outside a temporary work directory (removed at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tune_one_layer(model_dir: Path, layer: int, data, iters: int, batch_size: int, device: str, dtype: str,
                   reference: str = "float") -> dict:
    """Tune layer `layer` of `model_dir` on `data` (a `DataOptions`); returns seconds and memory."""
    import torch

    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.data.inputs import calibration_inputs
    from surgery.executor.cache import HiddenCache
    from surgery.executor.device import resolve_device, resolve_dtype
    from surgery.executor.engine import EngineOptions, Journal, LayerEngine
    from surgery.executor.stream import batch_ranges
    from surgery.quant.autoround_pass import AutoRoundPass
    from surgery.quant.signround import SignRoundOptions
    from surgery.quant.targets import find_targets

    work = Path(tempfile.mkdtemp(prefix="bench-autoround-"))
    t0 = time.perf_counter()
    try:
        with Checkpoint(model_dir) as ckpt:
            model = MoEModel(ckpt)
            dev = resolve_device(device)
            dt = resolve_dtype(dtype, dev, model)
            inputs = calibration_inputs(model_dir, data)
            ids, mask = inputs.input_ids, inputs.attention_mask
            qpass = AutoRoundPass(model, find_targets(model), work, mask, opts=SignRoundOptions(
                iters=iters, batch_size=batch_size), reference=reference, progress=True)
            cache = HiddenCache(work / "cache.zarr")
            batches = batch_ranges(mask, batch_size)
            cache.write_tokens(ids, mask, batch_size)
            engine = LayerEngine(model, dev, dt, cache, EngineOptions(progress=False, cache_budget=1 << 40))
            engine.walk([qpass], ids, mask, batches, None, Journal(), layers=[layer])
            out = {"layer": layer, "tokens": int(mask.sum()), "iters": iters, "device": str(dev),
                   "dtype": str(dt).removeprefix("torch."), **qpass.stats[layer],
                   "wall_s": round(time.perf_counter() - t0, 3),
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
            if dev.type == "cuda":
                out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
            return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    from surgery.data.inputs import DataOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--dataset", action="append", default=[])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--reference", default=None, choices=("float", "quantized"),
                    help="default: float for layer 0; quantized otherwise (no float chain is carried here; the "
                         "cost is the same)")
    args = ap.parse_args()
    reference = args.reference or ("float" if args.layer == 0 else "quantized")
    data = DataOptions(args.dataset, args.samples, args.max_length, 42, True)
    print(json.dumps(tune_one_layer(args.model, args.layer, data, args.iters, args.batch_size, args.device,
                                    args.dtype, reference)))


if __name__ == "__main__":
    main()
