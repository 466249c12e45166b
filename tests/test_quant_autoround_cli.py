"""`surgery quantize --method autoround` end to end through the layer engine: killed with SIGKILL after a
committed boundary and after a layer's packed tensors (before its boundary), then run again, OUT is
byte-identical to an uninterrupted run; it verifies, `surgery eval` reads it, it differs from RTN and
its config says it was tuned; `prune --quantize w4a16 --quantize-method autoround` verifies; bad knobs
fail in one line."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_quant_gptq_cli import cli, killed_twice_then_finished, same_tree

# group 64: the fixture's hidden size (192) is not a multiple of 128, and a partial group stays 16-bit
TUNE = ("--samples", "6", "--max-length", "48", "--batch-size", "2", "--iters", "4", "--group-size", "64",
        "--no-progress")


def quantize(src: Path, out: Path, work: Path, *extra: str, die_at: str | None = None):
    data = src.parent / "text" / "code.calib.jsonl"
    return cli("quantize", str(src), "--out", str(out), "--method", "autoround", "--work", str(work), "--dataset",
               str(data), *TUNE, *extra, die_at=die_at)


def test_killed_autoround_resumes_to_identical_bytes(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    ref = quantize(src, tmp_path / "ref", tmp_path / "ref-work")
    assert ref.returncode == 0, ref.stderr
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((tmp_path / "ref-work" / "autoround.json").read_text())["completed_layers"] == layers

    out = tmp_path / "out"

    def float_chain_kept(work: Path) -> None:  # the float chain at the resume boundary
        assert (work / "fp_hidden_0001.safetensors").is_file()

    done = killed_twice_then_finished(lambda o, w, die_at=None: quantize(src, o, w, die_at=die_at), out,
                                      tmp_path / "work", "autoround", float_chain_kept)
    assert done.returncode == 0, done.stderr
    same_tree(tmp_path / "ref", out)

    check = cli("verify", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "auto-round" and qcfg["packing_format"] == "auto_round:auto_gptq"
    assert (qcfg["iters"], qcfg["nsamples"], qcfg["seqlen"], qcfg["batch_size"]) == (4, 6, 48, 2)
    assert qcfg["lr"] == 0.25 and qcfg["quantizer"].endswith("(autoround)")
    assert "model.layers.0.block_sparse_moe.gate" in qcfg["extra_config"]

    rtn = cli("quantize", str(src), "--out", str(tmp_path / "rtn"), "--group-size", "64", "--no-progress")
    assert rtn.returncode == 0, rtn.stderr
    from safetensors.torch import load_file

    differ = same = 0
    for shard in sorted((tmp_path / "rtn").glob("*.safetensors")):
        a, b = load_file(str(shard)), load_file(str(out / shard.name))
        assert sorted(a) == sorted(b)
        for name in a:
            if name.endswith(".qweight"):
                if torch_equal(a[name], b[name]):
                    same += 1
                else:
                    differ += 1
            elif not name.endswith((".scales", ".qzeros")):
                assert torch_equal(a[name], b[name]), name  # routers, norms, embeddings, lm_head untouched
    # 4 coarse steps: a layer whose first (untuned) step had the lowest loss keeps RTN, as AutoRound would
    assert differ > 0 and same + differ == 600

    ev = cli("eval", str(out), "--work", str(tmp_path / "ev"), "--dataset",
             str(shared_fixtures / "text" / "code.eval.jsonl"), "--samples", "4", "--max-length", "64", "--json",
             "--no-progress")
    assert ev.returncode == 0, ev.stderr
    loss = next(iter(json.loads(ev.stdout)["datasets"].values()))[str(out)]["loss"]
    assert 0 < loss < 10


def torch_equal(a, b) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def test_prune_then_autoround_verifies(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    data = shared_fixtures / "text" / "code.calib.jsonl"
    out = tmp_path / "out"
    run = cli("prune", str(src), "--out", str(out), "--ratio", "0.5", "--dataset", str(data), "--samples", "6",
              "--max-length", "48", "--batch-size", "2", "--quantize", "w4a16", "--quantize-method", "autoround",
              "--quantize-group-size", "64", "--iters", "3", "--no-progress")
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "config.json").read_text())["quantization_config"]["iters"] == 3
    check = cli("verify", str(out))
    assert check.returncode == 0, check.stdout + check.stderr


def test_bad_tuning_options_fail_in_one_line(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    for extra in (("--iters", "0"), ("--lr", "-1")):
        run = quantize(src, tmp_path / "o", tmp_path / "w", *extra)
        assert run.returncode == 2, run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "--iters" in run.stderr
        assert not (tmp_path / "o").exists()


def test_a_layer_that_cannot_fit_is_refused_in_one_line(shared_fixtures, tmp_path):
    run = quantize(shared_fixtures / "tinymoe-m2", tmp_path / "o", tmp_path / "w", "--memory-budget", "300MB")
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.strip().splitlines() if not line.startswith("data ")]
    assert len(lines) == 1 and "layer 0: tuning holds the whole layer" in lines[0] and "routed experts" in lines[0]
    assert not (tmp_path / "o" / "config.json").exists()
