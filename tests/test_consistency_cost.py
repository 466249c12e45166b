"""The consistency check reads headers only: on a full-size MiniMax-M2 FP8 layout split into 1,000
shards (96k tensors, 230 GB as sparse files) it costs well under a second (tools/bench_consistency.py)."""

from __future__ import annotations

import json

import pytest

from tools.bench_consistency import measure
from tools.bench_inspect import write_sparse_checkpoint


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big")
    facts = write_sparse_checkpoint(directory, 62, 256, 1005)
    assert facts["shards"] == 1000 and facts["tensors"] > 95_000
    return directory


def test_check_of_a_1000_shard_index_costs_under_a_second(big):
    result = measure(big, repeat=3)
    assert result["shards"] == 1000 and result["problems"] == []
    assert result["check_s"] < 1.0, result


def test_a_wrong_config_on_it_is_reported_just_as_fast(big):
    cfg = json.loads((big / "config.json").read_text())
    cfg["hidden_size"] = 4096  # every tensor disagrees: the list stops at a hundred
    (big / "config.json").write_text(json.dumps(cfg))
    result = measure(big, repeat=2)
    assert len(result["problems"]) == 100 and result["problems"][-1].startswith("... and ")
    assert "hidden_size=4096" in result["problems"][0]
    assert result["check_s"] < 1.0, result
