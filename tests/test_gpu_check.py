"""The prepared device benchmark (tools/gpu/check.py) rehearsed on the CPU: `--simulate-on-cpu` runs every
stage at a tiny shape — a correctness comparison, calibrate at "scale" with the per-layer table the
engine recorded, GPTQ of the pruned layers, the 62-layer extrapolation — so the script is known to work
before a GPU is lent for it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_simulated_device_benchmark(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BENCH_DROP_CACHES": "0"}
    out = subprocess.run([sys.executable, str(REPO / "tools" / "gpu" / "check.py"), "--simulate-on-cpu",
                          "--work", str(tmp_path), "--correctness-runs", "cuda-f32,cpu-f32",
                          "--scale-tokens", "512", "--gptq-tokens", "512", "--length", "64", "--timeout", "600"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    text = out.stdout
    assert out.returncode == 0, (text + out.stderr)[-4000:]
    assert re.search(r"\| cuda-f32 \| all \|.*frequencies equal; max rel", text), text[-3000:]
    table = text[text.index("## calibrate at scale"):]
    assert "| layer | read s | host→device s | dequant s | expert compute s | expert TFLOP/s |" in table
    for layer in (0, 1):  # one row per layer, every cell a figure the engine recorded
        row = re.search(rf"^\| {layer} \|(.*)\|$", table, re.M)
        assert row and all(re.fullmatch(r" (\d+\.\d\d|-) ", c) for c in row.group(1).split("|")), table
    assert re.search(r"first layer after \d+\.\d s", table)
    assert re.search(r"GPTQ \(W4A16, group 128\) of 2 pruned layers: layer 0 \d+\.\d s, layer 1 \d+\.\d s; "
                     r"\d+\.\d s per layer", text), text[-2000:]
    assert re.search(r"extrapolated to MiniMax-M2\.1 \(62 layers\): calibrate ≈ \d+\.\d min .*; "
                     r"GPTQ ≈ \d+\.\d min", text)
    assert "\nPASS\n" in text
    assert not [p for p in tmp_path.glob("work-*") if p.is_dir()] and not (tmp_path / "gptq").exists()  # cleaned up


def test_transformers_version_is_checked_against_pyproject(monkeypatch, capsys):
    """The benchmark refuses, in one line, a transformers that pyproject.toml does not allow."""
    sys.path.insert(0, str(REPO / "tools" / "gpu"))
    try:
        import transformers_check
    finally:
        sys.path.remove(str(REPO / "tools" / "gpu"))
    assert transformers_check.requirement().startswith("transformers")
    assert transformers_check.main() == 0 and "satisfies" in capsys.readouterr().out
    monkeypatch.setattr(transformers_check, "requirement", lambda: "transformers>=99.0")
    assert transformers_check.main() == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "is NOT allowed by pyproject.toml's 'transformers>=99.0'" in out[0]
