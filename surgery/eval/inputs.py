"""Evaluation tokens: each `--dataset` SPEC tokenised once, with the first model's tokenizer, by the same
sampler calibration uses (`surgery.data.build_calibration_set`), and kept apart so every dataset gets
its own figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from surgery.errors import SurgeryError
from surgery.eval.loss import EvalInputs


def eval_inputs(model_dir: Path, specs: list[str], *, samples: int, max_length: int, seed: int,
                pack: bool = False, report=None) -> EvalInputs:
    """Rows of every spec (in the order given, duplicates once), right-padded to one width.

    `report(spec, CalibrationSet)` is called per spec (e.g. to print document and token counts)."""
    from surgery.data import build_calibration_set, load_tokenizer, pad_id_of

    tokenizer = load_tokenizer(model_dir)
    pad_id = pad_id_of(tokenizer)
    parts = []
    for spec in dict.fromkeys(specs or ["builtin"]):
        calib = build_calibration_set([spec], tokenizer, samples=samples, max_length=max_length, seed=seed,
                                      pack=pack)
        if int(calib.attention_mask.sum()) == 0:
            raise SurgeryError("the dataset produced no tokens", spec)
        if report is not None:
            report(spec, calib)
        parts.append((spec, calib))
    width = max(c.input_ids.shape[1] for _, c in parts)
    total = sum(c.input_ids.shape[0] for _, c in parts)
    input_ids = np.full((total, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((total, width), dtype=np.uint8)
    rows, hashes, start = {}, {}, 0
    for spec, c in parts:
        n, w = c.input_ids.shape
        input_ids[start:start + n, :w] = c.input_ids
        attention_mask[start:start + n, :w] = c.attention_mask
        rows[spec] = (start, start + n)
        hashes[spec] = ":".join(c.spec_hashes[k] for k in sorted(c.spec_hashes))
        start += n
    settings = {"samples": samples, "max_length": max_length, "seed": seed, "pack": pack}
    return EvalInputs(input_ids, attention_mask, rows, hashes, settings)
