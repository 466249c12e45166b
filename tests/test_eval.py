"""Streaming evaluation against transformers' own causal-LM loss, side by side, resumable, refusing what
it cannot compare."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from surgery.errors import SurgeryError
from surgery.eval import EvalInputs, EvalOptions, Evaluator, Head, ModelRef
from surgery.executor.cache import HiddenCache
from tests.conftest import REPO
from tests.oracle import load_model, make_batch

LENGTHS = [17, 5, 11, 17, 2, 9, 13]  # ragged, right-padded; batch size 3 leaves a short last batch
ROWS = {"first": (0, 4), "second": (4, 7)}


def vocab_of(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def inputs_for(ids: torch.Tensor, mask: torch.Tensor, rows: dict = ROWS) -> EvalInputs:
    return EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), rows, {k: f"h-{k}" for k in rows}, {"n": len(ids)})


def evaluate(work: Path, models: list[Path], inputs: EvalInputs, batch_size: int = 3, **kw) -> dict:
    opts = EvalOptions(batch_size=batch_size, device="cpu", dtype="float32", progress=False, **kw)
    return Evaluator(work, opts).run([ModelRef(str(m), m) for m in models], inputs)


def reference_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """transformers' loss with labels = -100 at the pads, and how many tokens it averages over."""
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    return loss, int((labels[:, 1:] != -100).sum())


@pytest.mark.parametrize("family", ["minimax_m2", "qwen2_moe", "qwen3_moe", "glm4_moe", "deepseek_v3"])
def test_loss_equals_transformers(family, tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint(family)
    ids, mask = make_batch(vocab_of(model_dir), LENGTHS, seed=11)
    out = evaluate(tmp_path / "w", [model_dir], inputs_for(ids, mask), block_rows=100)  # 256 = 100+100+56
    model = load_model(model_dir)
    for spec, (a, b) in ROWS.items():
        ref, n = reference_loss(model, ids[a:b], mask[a:b])
        got = out["datasets"][spec][str(model_dir)]
        assert got["tokens"] == n
        assert abs(got["loss"] - ref) < 1e-5, (spec, got["loss"], ref)
        assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_shared_fixture_equals_transformers(shared_fixtures, tmp_path):
    model_dir = shared_fixtures / "tinymoe-m2"
    ids, mask = make_batch(8192, [64, 40, 64, 23], seed=12)
    rows = {"all": (0, 4)}
    out = evaluate(tmp_path / "w", [model_dir], inputs_for(ids, mask, rows), batch_size=2, block_rows=3000)
    ref, n = reference_loss(load_model(model_dir), ids, mask)
    got = out["datasets"]["all"][str(model_dir)]
    assert got["tokens"] == n == 187
    assert abs(got["loss"] - ref) < 1e-5


def test_head_blocks_equal_full_logits(tiny_checkpoint):
    """Vocabulary blocks that do not divide the vocabulary, re-read every call (not resident), give
    the loss of the full logits."""
    from surgery.arch.layer import LayerFactory
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint

    model_dir = tiny_checkpoint("mixtral")
    ckpt = Checkpoint(model_dir)
    factory = LayerFactory(MoEModel(ckpt), torch.float32, torch.device("cpu"))
    head = Head(factory, block_rows=37, resident_bytes=0)
    assert not head.resident and head.block_rows == 37
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 64, generator=g)
    targets = torch.randint(0, 256, (50,), generator=g)
    targets[:3] = torch.tensor([0, 255, 36])  # first row, last row, a block edge
    got = head.token_losses(hidden, targets)
    norm_w = ckpt.read("model.norm.weight")
    h = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + factory.config.rms_norm_eps) * norm_w
    ref = torch.nn.functional.cross_entropy(h @ ckpt.read("lm_head.weight").T, targets, reduction="none")
    torch.testing.assert_close(got, ref.double(), rtol=1e-5, atol=1e-5)
    with pytest.raises(SurgeryError, match="outside the vocabulary"):
        head.token_losses(hidden[:1], torch.tensor([256]))


def test_pruned_models_side_by_side(tiny_checkpoint, tmp_path):
    """A model and two pruned versions with identical shapes (same expert count, so the same config and
    shard headers): each gets its own figures, equal to transformers loading that checkpoint."""
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.plan import make_plan
    from surgery.rewrite import rewrite_checkpoint

    base = tiny_checkpoint("minimax_m2")
    pruned = []
    with Checkpoint(base) as ckpt:
        model = MoEModel(ckpt)
        for seed in (1, 2):
            out = tmp_path / f"pruned{seed}"
            rewrite_checkpoint(base, make_plan({}, model, "random", 0.5, seed=seed), out, progress=False)
            pruned.append(out)
    ids, mask = make_batch(vocab_of(base), LENGTHS, seed=13)
    out = evaluate(tmp_path / "w", [base, *pruned], inputs_for(ids, mask))
    losses = []
    for m in (base, *pruned):
        ref, _ = reference_loss(load_model(m), ids[:4], mask[:4])
        got = out["datasets"]["first"][str(m)]["loss"]
        assert abs(got - ref) < 1e-5
        losses.append(got)
    assert len({round(x, 6) for x in losses}) == 3
    assert list(out["models"]) == [str(m) for m in (base, *pruned)]


def test_vocab_mismatch_refused(tiny_checkpoint, tmp_path):
    ids, mask = make_batch(200, LENGTHS, seed=14)
    other = tiny_checkpoint("minimax_m2", vocab_size=320)
    with pytest.raises(SurgeryError, match="vocabulary size 320 differs"):
        evaluate(tmp_path / "w", [tiny_checkpoint("minimax_m2"), other], inputs_for(ids, mask))
    assert not (tmp_path / "w" / "eval").exists()  # refused before any work
    with pytest.raises(SurgeryError, match="more than once"):
        evaluate(tmp_path / "w", [other, other], inputs_for(ids, mask))


def test_other_inputs_refused(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("mixtral")
    ids, mask = make_batch(256, LENGTHS, seed=15)
    evaluate(tmp_path / "w", [model_dir], inputs_for(ids, mask))
    ids2, mask2 = make_batch(256, LENGTHS, seed=16)
    changed = inputs_for(ids2, mask2)
    changed.hashes = {"first": "other", "second": "h-second"}
    with pytest.raises(SurgeryError, match="other inputs; differs in datasets"):
        evaluate(tmp_path / "w", [model_dir], changed)
    with pytest.raises(SurgeryError, match="batch_size"):
        evaluate(tmp_path / "w", [model_dir], inputs_for(ids, mask), batch_size=2)


KILLED_RUN = """
import sys, numpy as np, torch
from pathlib import Path
from surgery.eval import EvalInputs, EvalOptions, Evaluator, ModelRef
ids = torch.from_numpy(np.load(sys.argv[3])); mask = torch.from_numpy(np.load(sys.argv[4]))
rows = {"first": (0, 4), "second": (4, 7)}
inputs = EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), rows, {k: f"h-{k}" for k in rows}, {"n": len(ids)})
opts = EvalOptions(batch_size=3, device="cpu", dtype="float32", progress=False)
Evaluator(Path(sys.argv[1]), opts).run([ModelRef(m, Path(m)) for m in sys.argv[2].split(",")], inputs)
"""


@pytest.mark.parametrize("point", ["layer1.batch1", "eval.layer1.manifest"])
def test_resume_after_kill(point, tiny_checkpoint, tmp_path):
    """SIGKILL in the second model's layer 1 (mid-layer, or between the manifest and the cleanup); the
    rerun continues (the first model is not recomputed) and gives bit-identical figures."""
    first, second = tiny_checkpoint("qwen3_moe"), tiny_checkpoint("olmoe")
    ids, mask = make_batch(256, LENGTHS, seed=17)
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "mask.npy", mask.numpy())
    work = tmp_path / "w"
    # the first model finishes, then the kill point is armed for the second one only
    evaluate(work, [first], inputs_for(ids, mask))
    env = {**os.environ, "SURGERY_DIE_AT": point, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(work), f"{first},{second}",
                           str(tmp_path / "ids.npy"), str(tmp_path / "mask.npy")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    manifest = json.loads((work / "eval" / "manifest.json").read_text())
    entries = {e["path"]: e for e in manifest["models"].values()}
    assert entries[str(first.resolve())]["result"] is not None
    killed = entries[str(second.resolve())]
    assert killed["result"] is None and killed["completed_layers"] == (1 if point.startswith("layer") else 2)
    (hidden_dir,) = (work / "eval" / "models").iterdir()
    on_disk = HiddenCache(hidden_dir / "hidden.zarr").hidden_layers()
    assert len(on_disk) <= 2 and set(on_disk) <= {1, 2}
    resumed = evaluate(work, [first, second], inputs_for(ids, mask))
    clean = evaluate(tmp_path / "clean", [first, second], inputs_for(ids, mask))
    assert resumed["datasets"] == clean["datasets"]
    assert not (work / "eval" / "models").exists() or not any((work / "eval" / "models").iterdir())


def test_eval_command_json(shared_fixtures, tmp_path):
    """The command tokenises each dataset with the first model's tokenizer, prints one JSON object,
    writes WORK/eval.json, and its figures are transformers' loss on the tokens it cached."""
    from typer.testing import CliRunner

    from surgery.cli import app

    model_dir = shared_fixtures / "tinymoe-m2"
    code, prose = (str(shared_fixtures / "text" / f"{d}.eval.jsonl") for d in ("code", "prose"))
    work = tmp_path / "w"
    result = CliRunner().invoke(app, ["eval", str(model_dir), "--work", str(work), "--dataset", code, "--dataset",
                                      prose, "--samples", "3", "--max-length", "48", "--device", "cpu",
                                      "--dtype", "float32", "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(printed) == ["datasets"] and list(printed["datasets"]) == [code, prose]
    assert json.loads((work / "eval.json").read_text())["datasets"] == printed["datasets"]
    ids, mask = HiddenCache(work / "eval" / "cache.zarr").tokens()
    assert ids.shape == (6, 48)
    model = load_model(model_dir)
    for spec, (a, b) in ((code, (0, 3)), (prose, (3, 6))):
        ref, n = reference_loss(model, torch.from_numpy(ids[a:b]), torch.from_numpy(mask[a:b].astype(np.int64)))
        got = printed["datasets"][spec][str(model_dir)]
        assert got["tokens"] == n and abs(got["loss"] - ref) < 1e-5


def test_fp8_lm_head(tiny_checkpoint, tmp_path):
    """An FP8 block-scaled lm_head (partial edge blocks) is dequantised block by block; the loss equals
    transformers' on the dequantised checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "fp8-head"
    shutil.copytree(tiny_checkpoint("minimax_m2", fp8=True), model_dir)
    block = json.loads((model_dir / "config.json").read_text())["quantization_config"]["weight_block_size"]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    tensors = load_file(model_dir / shard)
    w = tensors["lm_head.weight"].float()
    rows, cols = w.shape
    b0, b1 = block
    scale = torch.zeros(math.ceil(rows / b0), math.ceil(cols / b1))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            scale[i, j] = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].abs().max() / 448
    full = scale.repeat_interleave(b0, 0)[:rows].repeat_interleave(b1, 1)[:, :cols]
    tensors["lm_head.weight"] = (w / full).to(torch.float8_e4m3fn)
    tensors["lm_head.weight_scale_inv"] = scale
    save_file(tensors, model_dir / shard, metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight_scale_inv"] = shard
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    ids, mask = make_batch(256, LENGTHS, seed=18)
    out = evaluate(tmp_path / "w", [model_dir], inputs_for(ids, mask), block_rows=100)  # -> 96: whole scale rows
    ref, _ = reference_loss(load_model(model_dir), ids[:4], mask[:4])
    assert abs(out["datasets"]["first"][str(model_dir)]["loss"] - ref) < 1e-5
