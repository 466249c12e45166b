"""NaN in the weights (issue 14, item 4): calibration stops naming the layer (and the expert, where the
executor can tell), keeps what is resumable, and never writes a saliency.json holding NaN."""

from __future__ import annotations

import json
import math

import torch

from surgery.checkpoint.reader import Checkpoint
from tests.test_consistency import assert_refused, calibrate_args, copy_fixture, snapshot, surgery

LAYER, EXPERT = 2, 7


def poke(directory, name: str, values: torch.Tensor, offset_elements: int = 0) -> None:
    """Overwrite elements of a stored tensor in place (same dtype), leaving every header as it was."""
    with Checkpoint(directory) as ckpt:
        info = ckpt.info(name)
        path = ckpt.shards[info.shard].path
    data = values.to(info.torch_dtype).contiguous().view(torch.uint8).numpy().tobytes()
    with open(path, "r+b") as f:
        f.seek(info.begin + offset_elements * info.itemsize)
        f.write(data)


def test_nan_in_an_expert_stops_calibration_naming_the_layer(shared_fixtures, tmp_path):
    src = copy_fixture(shared_fixtures / "tinymoe-m2", tmp_path / "m")
    moe = f"model.layers.{LAYER}.block_sparse_moe."
    # every token chooses the poisoned expert (the correction bias counts for the choice only) ...
    poke(src, moe + "e_score_correction_bias", torch.tensor([100.0]), offset_elements=EXPERT)
    # ... whose down projection holds one NaN
    poke(src, moe + f"experts.{EXPERT}.w2.weight", torch.tensor([math.nan]), offset_elements=5)
    before = snapshot(src)
    work = tmp_path / "work"
    line = assert_refused(surgery(*calibrate_args(src, work)), f"layer {LAYER}", "NaN")
    if "expert" in line:  # the executor names the expert where one produced the NaN
        assert str(EXPERT) in line
    assert snapshot(src) == before
    saliency = work / "saliency.json"
    if saliency.exists():
        text = saliency.read_text()
        assert "NaN" not in text and "Infinity" not in text
        json.loads(text)
