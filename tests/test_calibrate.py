"""The streaming executor against the in-memory oracle, for every family, bf16 and FP8 fixtures.

Frequencies must be exactly equal, the other statistics within 1e-4 relative (float32), and the
hidden states the executor writes for layer l must equal the full model's hidden_states[l + 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from surgery.executor.cache import HiddenCache
from surgery.saliency.calibrate import CalibrateOptions, CalibrationInputs, Calibrator
from surgery.synth import FAMILIES
from tests.oracle import make_batch, oracle_saliency

LENGTHS = [17, 5, 11, 17, 2, 9, 13]  # unequal, right-padded, batch size 3 leaves a ragged last batch


def run_streaming(model_dir: Path, work: Path, ids: torch.Tensor, mask: torch.Tensor, routing: str = "model",
                  batch_size: int = 3, keep_hidden: bool = True) -> dict:
    opts = CalibrateOptions(batch_size=batch_size, dtype="float32", device="cpu", routing=routing,
                            keep_hidden=keep_hidden, progress=False)
    inputs = CalibrationInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"test": "0"}, {"n": len(ids)})
    return Calibrator(model_dir, work, opts).run(inputs)


def assert_stats_equal(streamed: dict, oracle: dict) -> None:
    assert sorted(int(k) for k in streamed["layers"]) == sorted(oracle)
    for layer, ref in oracle.items():
        got = streamed["layers"][str(layer)]
        np.testing.assert_array_equal(np.array(got["frequency"]), ref["frequency"])
        assert ref["frequency"].sum() > 0
        for key in ("weighted_frequency", "ean", "reap", "max_activation"):
            np.testing.assert_allclose(np.array(got[key]), ref[key], rtol=1e-4, atol=1e-6, err_msg=f"{layer} {key}")


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_oracle(family, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(family)
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids, mask = make_batch(vocab, LENGTHS, seed=1)
    streamed = run_streaming(model_dir, tmp_path / "w", ids, mask)
    oracle, hidden = oracle_saliency(model_dir, ids, mask)
    assert_stats_equal(streamed, oracle)
    assert streamed["num_tokens"] == int(mask.sum())
    cache = HiddenCache(tmp_path / "w" / "cache.zarr")
    real = mask.bool()
    n_layers = len(hidden) - 1
    for layer in range(n_layers):  # hidden_states[-1] is after the final norm in transformers
        mine = HiddenCache.read_rows(cache.hidden(layer), 0, len(ids))
        torch.testing.assert_close(mine[real], hidden[layer][real].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["minimax_m2", "glm4_moe", "qwen3_moe"])
def test_reference_routing_equals_oracle(family, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(family)
    ids, mask = make_batch(256, LENGTHS, seed=2)
    streamed = run_streaming(model_dir, tmp_path / "w", ids, mask, routing="reference")
    oracle, _ = oracle_saliency(model_dir, ids, mask, routing="reference")
    assert_stats_equal(streamed, oracle)
    model_routing = run_streaming(model_dir, tmp_path / "w2", ids, mask, routing="model")
    if family != "qwen3_moe":  # sigmoid / biased routers choose differently from the raw-logit rule
        assert any(streamed["layers"][k]["frequency"] != model_routing["layers"][k]["frequency"]
                   for k in streamed["layers"])


def test_fp8_tiny_equals_dequantised_oracle(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("minimax_m2", fp8=True)
    ids, mask = make_batch(256, LENGTHS, seed=3)
    streamed = run_streaming(model_dir, tmp_path / "w", ids, mask)
    oracle, _ = oracle_saliency(model_dir, ids, mask)
    assert_stats_equal(streamed, oracle)


@pytest.mark.parametrize("name", ["tinymoe-m2", "tinymoe-m2-fp8"])
def test_shared_fixture_equals_oracle(name, shared_fixtures, tmp_path):
    model_dir = shared_fixtures / name
    ids, mask = make_batch(8192, [64, 40, 64, 23], seed=4)
    streamed = run_streaming(model_dir, tmp_path / "w", ids, mask, batch_size=2)
    oracle, hidden = oracle_saliency(model_dir, ids, mask)
    assert_stats_equal(streamed, oracle)
    cache = HiddenCache(tmp_path / "w" / "cache.zarr")
    mine = HiddenCache.read_rows(cache.hidden(3), 0, len(ids))
    torch.testing.assert_close(mine[mask.bool()], hidden[3][mask.bool()].float(), rtol=1e-4, atol=1e-4)


def test_only_two_layers_of_hidden_states_kept(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("qwen3_moe")
    ids, mask = make_batch(256, LENGTHS, seed=5)
    run_streaming(model_dir, tmp_path / "w", ids, mask, keep_hidden=False)
    cache = HiddenCache(tmp_path / "w" / "cache.zarr")
    # a finished calibration keeps no hidden states (its statistics need none; --keep-hidden keeps them all)
    assert cache.hidden_layers() == []
    got_ids, got_mask = cache.tokens()
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_array_equal(got_mask, mask.numpy())


def test_other_inputs_refused(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("minimax_m2")
    ids, mask = make_batch(256, LENGTHS, seed=6)
    run_streaming(model_dir, tmp_path / "w", ids, mask)
    with pytest.raises(SurgeryError, match="batch_size"):
        run_streaming(model_dir, tmp_path / "w", ids, mask, batch_size=2)
    with pytest.raises(SurgeryError, match="model"):
        run_streaming(tiny_checkpoint("mixtral"), tmp_path / "w", ids, mask)


def test_nan_names_the_layer(tiny_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoint("mixtral")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    name = "model.layers.1.self_attn.o_proj.weight"
    for shard in bad.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = torch.full_like(tensors[name], float("nan"))
            save_file(tensors, shard, metadata={"format": "pt"})
    ids, mask = make_batch(256, LENGTHS, seed=7)
    with pytest.raises(SurgeryError, match="after layer 1"):
        run_streaming(bad, tmp_path / "w", ids, mask)


def test_ranks_opening_a_new_cache_at_once_share_it(tmp_path):
    """Ranks of one job open WORK/cache.zarr together; the one that loses the group's creation opens the
    winner's (before the fix about 25 of 30 rounds of 8 openers raised zarr's ContainsGroupError)."""
    import threading

    for trial in range(10):
        path, errors, caches = tmp_path / f"c{trial}.zarr", [], []

        def open_cache(path=path, errors=errors, caches=caches):
            try:
                caches.append(HiddenCache(path))
            except Exception as e:  # noqa: BLE001 - any failure is the bug
                errors.append(repr(e))

        threads = [threading.Thread(target=open_cache) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[0]
        caches[0].write_tokens(np.zeros((2, 3), dtype=np.int64), np.ones((2, 3), dtype=np.uint8), 2)
        assert all(c.path == path for c in caches) and HiddenCache(path).has_tokens()
