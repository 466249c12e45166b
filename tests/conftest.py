"""Shared test fixtures: tiny checkpoints of every family (built once per session), the shared
trained fixtures beside the checkout, and an offline environment."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` (trained tiny MiniMax-M2 checkpoints and text); skipped if absent."""
    if not (SHARED / "tinymoe-m2" / "config.json").is_file():
        pytest.skip("../shared/fixtures is not beside the checkout")
    return SHARED


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(family, fp8=False, **overrides)` -> directory, built once per session."""
    from surgery.synth import make_checkpoint, quantize_fp8

    cache: dict[tuple, Path] = {}
    root = tmp_path_factory.mktemp("tiny")

    def build(family: str = "minimax_m2", fp8: bool = False, **overrides) -> Path:
        key = (family, fp8, tuple(sorted(overrides.items())))
        if key not in cache:
            name = "-".join([family, *(f"{k}{v}" for k, v in sorted(overrides.items()))])
            base = (family, False, key[2])
            if base not in cache:
                cache[base] = make_checkpoint(root / name, family, **overrides)
            if fp8:
                cache[key] = quantize_fp8(cache[base], root / f"{name}-fp8", block=24)  # 24 leaves partial edge blocks
        return cache[key]

    return build


@pytest.fixture(scope="session")
def reliability_model(tmp_path_factory) -> Path:
    """The reliability suite's tiny checkpoint with a tokenizer (tests/reliability.py), built once."""
    from tests.reliability import make_model

    return make_model(tmp_path_factory.mktemp("reliability") / "model")
