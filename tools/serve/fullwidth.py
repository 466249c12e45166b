"""Header-only checkpoints with MiniMax-M2.1's exact per-layer shapes, pruned to half its experts: bf16,
FP8 (as the hub ships it) and the W4A16 that `surgery quantize` writes from the bf16 one.

Why header-only: the serving rules (`surgery.arch.serving`) read config.json and the safetensors headers
and nothing else, so a 2-layer checkpoint with real widths whose data sections are holes (`truncate`:
no bytes on disk, built in a second) checks what a 230 GB download would. The shapes and names are
`tools/gen_fullwidth.py`'s (the hub's layout); the W4A16 one is planned by surgery's own W4A16 writer
(`find_targets`, `plan_quant_layout`, `quantization_config`), so its names, kept linears and
extra_config are what `surgery quantize` writes at that width.

    .venv/bin/python tools/serve/fullwidth.py OUT_DIR    # writes OUT_DIR/{bf16,fp8,w4a16}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for extra in (REPO, REPO / "tools"):
    if str(extra) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(extra))

from gen_fullwidth import PRESETS, Shape, head_tensors, hub_config, layer_tensors  # noqa: E402

from surgery.checkpoint.writer import TensorEntry, encode_header  # noqa: E402

LAYERS = 2  # the rules are per layer: two layers say what sixty-two would
KEPT_EXPERTS = 128  # REAP at 0.5 of 256


def write_headers(directory: Path, shards: dict[str, list[TensorEntry]], config: dict) -> Path:
    """Safetensors files holding only their headers (data sections are holes), an index and config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for shard, entries in shards.items():
        header = encode_header(entries, {"format": "pt"})
        with open(directory / shard, "wb") as f:
            f.write(header)
            f.truncate(len(header) + sum(e.nbytes for e in entries))
        weight_map.update({e.name: shard for e in entries})
    total = sum(e.nbytes for entries in shards.values() for e in entries)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def pruned(directory: Path, fp8: bool) -> Path:
    """MiniMax-M2.1 with 128 of its 256 experts per layer, in bf16 or the hub's FP8 layout."""
    s = Shape(**{**PRESETS["minimax-m2"], "layers": LAYERS, "experts": KEPT_EXPERTS, "vocab": 8192})
    shards = {"model-00000.safetensors": [t.entry for t in head_tensors(s)]}
    for layer in range(LAYERS):
        shards[f"model-{layer + 1:05d}.safetensors"] = [t.entry for t in layer_tensors(layer, s, fp8)]
    return write_headers(directory, shards, hub_config(s, fp8, {"bos": 1, "eos": 2, "pad": 0}))


def w4a16(src: Path, directory: Path, group_size: int = 128) -> Path:
    """The W4A16 checkpoint `surgery quantize` writes from `src`, headers only (its own layout planner)."""
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.quant.config import quantization_config
    from surgery.quant.layout import plan_quant_layout
    from surgery.quant.targets import find_targets

    with Checkpoint(src) as ckpt:
        model = MoEModel(ckpt)
        targets = find_targets(model, group_size=group_size)
        layout = plan_quant_layout(model, targets, group_size)
        config = json.loads(ckpt.config_path.read_text())
        config["quantization_config"] = quantization_config(model, targets, group_size, "rtn")
    return write_headers(directory, {s.name: s.entries for s in layout if s.tensors}, config)


def build_all(out: Path) -> dict[str, Path]:
    out = Path(out)
    bf16 = pruned(out / "bf16", fp8=False)
    return {"bf16": bf16, "fp8": pruned(out / "fp8", fp8=True), "w4a16": w4a16(bf16, out / "w4a16")}


if __name__ == "__main__":
    for precision, path in build_all(Path(sys.argv[1])).items():
        print(precision, path)
