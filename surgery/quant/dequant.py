"""A W4A16 checkpoint written back as a plain one (every packed linear dequantised, float32 by default,
which holds scale × level exactly), shard by shard: what any reader that does not know the packing
can load, and the reference the tests hold a W4A16-aware reader to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from surgery.checkpoint.reader import INDEX_NAME, Checkpoint
from surgery.checkpoint.w4a16 import QWEIGHT, QZEROS, SCALES, dequantize_w4a16, group_size_of


def write_dequantized(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with Checkpoint(src) as ckpt:
        group = group_size_of(ckpt.config)
        weight_map = {}
        for shard in sorted(ckpt.shards):
            out = {}
            for info in ckpt.shard_tensors(shard):
                name = info.name
                if name.endswith("." + QWEIGHT):
                    base = name.removesuffix("." + QWEIGHT)
                    out[base + ".weight"] = dequantize_w4a16(ckpt.read(name), ckpt.read(f"{base}.{QZEROS}"),
                                                             ckpt.read(f"{base}.{SCALES}"), group, dtype)
                elif name.endswith(("." + QZEROS, "." + SCALES)) and f"{name.rsplit('.', 1)[0]}.{QWEIGHT}" in ckpt:
                    continue
                else:
                    out[name] = ckpt.read(name).clone()
            save_file(out, dst / shard, metadata={"format": "pt"})
            weight_map.update({k: shard for k in out})
        if ckpt.index_path is not None:
            (dst / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                     indent=2))
        config = dict(ckpt.config)
        config.pop("quantization_config", None)
        (dst / "config.json").write_text(json.dumps(config, indent=2))
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in (
                INDEX_NAME, "config.json", "quantization_config.json", "quantize_config.json"):
            shutil.copyfile(p, dst / p.name)
    return dst
