"""Evaluating a W4A16 checkpoint: `surgery eval`'s streaming loss, read from the packed tensors by the
layer engine (attention, shared experts and dense MLPs decoded when a layer is loaded, routed experts
decoded chunk by chunk on the compute device), equals a plain in-memory dequantise-and-forward of the
same bytes (transformers' own loss on the decoded weights), with every expert in one chunk and paged;
`surgery fidelity` on it gives the decoded checkpoint's figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from surgery.checkpoint.reader import Checkpoint
from surgery.eval import EvalInputs, EvalOptions, Evaluator, ModelRef
from surgery.quant.dequant import write_dequantized
from surgery.quant.pipeline import quantize
from tests.oracle import load_model, make_batch

PAGED = {"SURGERY_EXPERTS_PER_CHUNK": "3", "SURGERY_TOKENS_PER_GROUP": "40"}  # 8 experts in chunks of 3, 3, 2


@pytest.fixture(params=["one-chunk", "paged"])
def paging(request, monkeypatch):
    """Run with the budget's own chunking, then with routed experts forced into chunks over groups of
    captured tokens (the capture / stream / replay path)."""
    for key, value in PAGED.items():
        if request.param == "paged":
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    return request.param


@pytest.fixture(scope="module")
def w4a16(shared_fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-eval")
    out = root / "w4a16"
    # "pad": AutoRound's padded partial groups (hidden 192, group 128), which the reader must decode too
    quantize(shared_fixtures / "tinymoe-m2", out, method="rtn", progress=False, partial_groups="pad")
    ids, mask = make_batch(8192, [64, 40, 64, 23], seed=12)
    plain = write_dequantized(out, root / "plain")
    model = load_model(plain)
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    return out, plain, ids, mask, ref


def reference_loss(model_dir, ids, mask) -> float:
    """transformers' loss, the whole model in memory, labels -100 at the pads."""
    model = load_model(model_dir)
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()


def streaming_loss(work, model_dir, ids, mask) -> float:
    n = len(ids)
    inputs = EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"all": (0, n)}, {"all": "h"}, {"n": n})
    opts = EvalOptions(batch_size=2, device="cpu", dtype="float32", progress=False)
    out = Evaluator(work, opts).run([ModelRef(str(model_dir), model_dir)], inputs)
    return out["datasets"]["all"][str(model_dir)]["loss"]


def test_decoded_checkpoint_equals_in_memory(w4a16, tmp_path):
    _, plain, ids, mask, ref = w4a16
    assert abs(streaming_loss(tmp_path / "w", plain, ids, mask) - ref) <= 1e-4 * abs(ref)


def test_eval_reads_w4a16_directly(w4a16, paging, tmp_path):
    out, _, ids, mask, ref = w4a16
    assert abs(streaming_loss(tmp_path / "w", out, ids, mask) - ref) <= 1e-4 * abs(ref)


# ------------------------------------------------------------------------------------- another family
@pytest.fixture(scope="module")
def qwen_w4(tiny_checkpoint, tmp_path_factory):
    """Qwen3-MoE (hidden 160: one full and one partial group of 128 along every hidden input, a
    one-group row of 32 along the experts' down_proj; dense layer 1's MLP quantized too), W4A16 by
    `surgery quantize`, and the plain checkpoint it decodes to."""
    src = tiny_checkpoint("qwen3_moe", hidden_size=160)
    root = tmp_path_factory.mktemp("quant-eval-qwen")
    out = root / "w4a16"
    quantize(src, out, method="rtn", quantize_dense=True, progress=False, partial_groups="pad")
    with Checkpoint(out) as ckpt:  # what the reader must decode: every kind of packed linear is there
        packed = {n.removesuffix(".qweight") for n in ckpt.tensors if n.endswith(".qweight")}
        assert not any(n.endswith(".weight") and n.removesuffix(".weight") in packed for n in ckpt.tensors)
    for stem in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj",
                 "model.layers.0.mlp.experts.7.down_proj", "model.layers.1.mlp.gate_proj",
                 "model.layers.3.mlp.experts.0.up_proj"):
        assert stem in packed, stem
    return src, out, write_dequantized(out, root / "plain")


def test_eval_other_family_equals_dequantise_and_forward(qwen_w4, paging, tmp_path):
    src, out, plain = qwen_w4
    ids, mask = make_batch(256, [17, 5, 11, 17, 2, 9, 13], seed=5)
    ref = reference_loss(plain, ids, mask)
    assert abs(ref - reference_loss(src, ids, mask)) > 1e-3  # 4-bit weights do change the loss
    got = streaming_loss(tmp_path / "w", out, ids, mask)
    assert abs(got - ref) < 1e-5, (got, ref)


def test_fidelity_runs_on_w4a16(qwen_w4, paging, tmp_path):
    """`surgery fidelity` on a calibration of the W4A16 checkpoint (hidden states streamed, not kept)
    gives the figures of the decoded checkpoint's, and the calibration the same saliency."""
    from typer.testing import CliRunner

    from surgery.cli import app
    from surgery.eval.fidelity import run_fidelity
    from tests.test_fidelity import calibrate

    _, out, plain = qwen_w4
    calibrate(out, tmp_path / "q", keep_hidden=False)
    calibrate(plain, tmp_path / "p", keep_hidden=False)
    result = CliRunner().invoke(app, ["fidelity", str(tmp_path / "q"), "--ratios", "0.25,0.5", "--methods",
                                      "reap,frequency", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "q" / "fidelity.json").read_text())
    ref = run_fidelity(tmp_path / "p", ["reap", "frequency"], [0.25, 0.5], device="cpu", progress=False)
    assert got["hidden_source"] == "streamed" and list(got["layers"]) == ["0", "2", "3"]
    for layer, per in ref["layers"].items():
        for method, by_ratio in per.items():
            for ratio, value in by_ratio.items():
                assert value > 0.01
                assert got["layers"][layer][method][ratio] == pytest.approx(value, rel=1e-4), (layer, method, ratio)
    sal_q = json.loads((tmp_path / "q" / "saliency.json").read_text())["layers"]
    sal_p = json.loads((tmp_path / "p" / "saliency.json").read_text())["layers"]
    assert sal_q.keys() == sal_p.keys()
    for layer in sal_p:
        for key, value in sal_p[layer].items():
            if isinstance(value, list) and value and isinstance(value[0], (int, float)):
                np.testing.assert_allclose(sal_q[layer][key], value, rtol=1e-4, atol=1e-6, err_msg=f"{layer} {key}")
