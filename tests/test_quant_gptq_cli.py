"""`surgery quantize --method gptq` end to end through the layer engine: killed with SIGKILL inside the
GPTQ walk (after a layer's packed tensors were written but before its boundary was committed, and
after a boundary was committed), then run again, OUT is byte-identical to an uninterrupted run; the
output verifies, decodes differently from RTN, and `--memory-budget` (paging forced small) gives the
same bytes; `prune --quantize w4a16 --quantize-method gptq` writes a verified W4A16 checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, die_at: str | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(extra_env or {})}
    env.pop("SURGERY_DIE_AT", None)
    if die_at:
        env["SURGERY_DIE_AT"] = die_at
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def quantize(src: Path, out: Path, work: Path, *extra: str, die_at: str | None = None,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    data = src.parent / "text" / "code.calib.jsonl"
    return cli("quantize", str(src), "--out", str(out), "--method", "gptq", "--work", str(work), "--dataset",
               str(data), "--samples", "6", "--max-length", "48", "--batch-size", "2", "--no-progress",
               "--group-size", "64", *extra,  # 64: whole groups of the fixture's hidden size 192
               die_at=die_at, extra_env=extra_env)


def same_tree(a: Path, b: Path) -> None:
    """Every file byte for byte, but the card, which names its own directory."""
    names = sorted(p.name for p in a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == names and "README.md" in names
    for name in names:
        if name == "README.md":
            continue
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def killed_twice_then_finished(run, out: Path, work: Path, prefix: str, at_boundary_1=None):
    """`run(out, work, die_at=...)` killed with SIGKILL once boundary 1 is committed (hidden states and layer
    0's packed tensors durable), then again, resumed from boundary 1, once layer 2's packed tensors are
    written but before its boundary; `at_boundary_1(work)` checks WORK after the first kill. Returns the
    final, uninterrupted run."""
    killed = run(out, work, die_at=f"{prefix}.layer0.manifest")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "config.json").exists()
    assert json.loads((work / f"{prefix}.json").read_text())["completed_layers"] == 1
    if at_boundary_1 is not None:
        at_boundary_1(work)
    killed = run(out, work, die_at=f"{prefix}.layer2.stats")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (work / "layer_0002.safetensors").exists() and not (out / "config.json").exists()
    return run(out, work)


def test_killed_gptq_resumes_to_identical_bytes(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    ref = quantize(src, tmp_path / "ref", tmp_path / "ref-work")
    assert ref.returncode == 0, ref.stderr
    state = json.loads((tmp_path / "ref-work" / "gptq.json").read_text())
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    assert state["completed_layers"] == layers

    out = tmp_path / "out"
    done = killed_twice_then_finished(lambda o, w, die_at=None: quantize(src, o, w, die_at=die_at), out,
                                      tmp_path / "work", "gptq")
    assert done.returncode == 0, done.stderr
    same_tree(tmp_path / "ref", out)
    check = cli("verify", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"vllm serve {out}" in (out / "README.md").read_text()  # OUT's own card


def test_gptq_paged_equals_unpaged_and_differs_from_rtn(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    one = quantize(src, tmp_path / "one", tmp_path / "w1")
    assert one.returncode == 0, one.stderr
    paged = quantize(src, tmp_path / "paged", tmp_path / "w2", extra_env={"SURGERY_EXPERTS_PER_CHUNK": "3"})
    assert paged.returncode == 0, paged.stderr
    same_tree(tmp_path / "one", tmp_path / "paged")
    rtn = cli("quantize", str(src), "--out", str(tmp_path / "rtn"), "--no-progress", "--group-size", "64")
    assert rtn.returncode == 0, rtn.stderr
    from safetensors.torch import load_file

    differ = 0
    for shard in sorted((tmp_path / "rtn").glob("*.safetensors")):
        a, b = load_file(shard), load_file(tmp_path / "one" / shard.name)
        differ += sum(not a[k].equal(b[k]) for k in a if k.endswith(".qweight"))
    assert differ > 0


def test_prune_then_gptq(shared_fixtures, tmp_path):
    src = shared_fixtures / "tinymoe-m2"
    data = shared_fixtures / "text" / "code.calib.jsonl"
    out = tmp_path / "out"
    r = cli("prune", str(src), "--out", str(out), "--work", str(tmp_path / "w"), "--ratio", "0.5", "--dataset",
            str(data), "--samples", "6", "--max-length", "48", "--quantize", "w4a16", "--quantize-method", "gptq",
            "--quantize-group-size", "64", "--no-progress")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["packing_format"] == "auto_round:auto_gptq"
    assert cfg["num_local_experts"] == 16
    check = cli("verify", str(out))
    assert check.returncode == 0, check.stdout + check.stderr
    card = (out / "README.md").read_text()  # OUT's own card: W4A16, its commands point at OUT
    assert "W4A16" in card and f"vllm serve {out}" in card and "group 64" in card
    assert "50% of the routed experts removed by REAP" in card and str(tmp_path / "w" / "pruned") not in card
