"""Evaluating a W4A16 checkpoint: `surgery eval`'s streaming loss equals a plain in-memory
dequantise-and-forward of the same bytes (transformers' own loss on the decoded weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.eval import EvalInputs, EvalOptions, Evaluator, ModelRef
from surgery.quant.dequant import write_dequantized
from surgery.quant.pipeline import quantize
from tests.oracle import load_model, make_batch


@pytest.fixture(scope="module")
def w4a16(shared_fixtures, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-eval")
    out = root / "w4a16"
    quantize(shared_fixtures / "tinymoe-m2", out, method="rtn", progress=False)
    ids, mask = make_batch(8192, [64, 40, 64, 23], seed=12)
    plain = write_dequantized(out, root / "plain")
    model = load_model(plain)
    labels = ids.clone()
    labels[mask == 0] = -100
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    return out, plain, ids, mask, ref


def streaming_loss(work, model_dir, ids, mask) -> float:
    inputs = EvalInputs(ids.numpy(), mask.numpy().astype(np.uint8), {"all": (0, 4)}, {"all": "h"}, {"n": 4})
    opts = EvalOptions(batch_size=2, device="cpu", dtype="float32", progress=False)
    out = Evaluator(work, opts).run([ModelRef(str(model_dir), model_dir)], inputs)
    return out["datasets"]["all"][str(model_dir)]["loss"]


def test_decoded_checkpoint_equals_in_memory(w4a16, tmp_path):
    _, plain, ids, mask, ref = w4a16
    assert abs(streaming_loss(tmp_path / "w", plain, ids, mask) - ref) <= 1e-4 * abs(ref)


@pytest.mark.xfail(reason="the layer engine does not read packed W4A16 tensors yet (reader hook in "
                          "surgery/arch/layer.py and surgery/executor/experts.py, see docs/quantize.md)",
                   strict=False)
def test_eval_reads_w4a16_directly(w4a16, tmp_path):
    out, _, ids, mask, ref = w4a16
    assert abs(streaming_loss(tmp_path / "w", out, ids, mask) - ref) <= 1e-4 * abs(ref)
