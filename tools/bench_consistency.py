"""Cost of the consistency check (surgery.arch.consistency) on a full-size, 1,000-shard index.

The check runs before every command, so it must stay cheap on the largest checkpoints: it reads no
tensor data, only the names, dtypes and shapes the reader already holds. The layout is MiniMax-M2's
(62 layers x 256 experts, FP8 with block scales, 96k tensors, 230 GB), written as sparse files by
tools/bench_inspect.py's builder and split into 1,000 shards; opening it (index + 1,000 headers) and
the check itself are timed separately, best of `--repeat`. (The unit test, tests/test_consistency_cost.py,
counts the check's work on the same layout instead: timings belong here, not in tests.)

    .venv/bin/python tools/bench_consistency.py [--layers 62 --experts 256 --shards 1005 --repeat 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(directory: Path, repeat: int) -> dict:
    """Seconds to open the checkpoint and to run the check (best of `repeat`), and what the check found."""
    from surgery.arch.consistency import find_problems
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint

    opens, checks, problems = [], [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        ckpt = Checkpoint(directory)
        t1 = time.perf_counter()
        model = MoEModel(ckpt, check=False)
        t2 = time.perf_counter()
        problems = find_problems(model)
        t3 = time.perf_counter()
        opens.append(t1 - t0)
        checks.append(t3 - t2)
        ckpt.close()
    return {"tensors": len(ckpt.tensors), "shards": len(ckpt.shards), "open_s": min(opens), "check_s": min(checks),
            "problems": [p.message for p in problems]}


def main() -> None:
    from tools.bench_inspect import write_sparse_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=62)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--shards", type=int, default=1005, help="asked of the builder (1005 gives 1,000 shards)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-consistency-"))
    try:
        facts = write_sparse_checkpoint(directory, args.layers, args.experts, args.shards)
        result = {**facts, **measure(directory, args.repeat)}
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if result["problems"]:
        raise SystemExit(f"the valid layout has problems: {result['problems'][:3]}")


if __name__ == "__main__":
    main()
