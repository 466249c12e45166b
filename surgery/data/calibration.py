"""Build the calibration set: specs (or the built-in default) -> rendered, tokenised, sampled rows.

Every spec is opened before any is sampled, so a missing dataset fails in seconds rather than after the
others have been tokenised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from surgery.data import default_corpus
from surgery.data.chat import ChatRenderer, render_plain
from surgery.data.formats import resolve_format, row_text, to_conversation
from surgery.data.sampling import Category, CategoryStats, Render, assemble, draw
from surgery.data.spec import (
    DatasetSpec,
    MissingDatasetError,
    download_hint,
    expand_builtin,
    load_rows,
    parse_spec,
)
from surgery.data.tokenizer import pad_id_of
from surgery.errors import SurgeryError


@dataclass
class CalibrationSet:
    """Token rows for calibration, in spec order, with what each spec contributed."""

    input_ids: np.ndarray  # int64 [S, L], right-padded with pad_id
    attention_mask: np.ndarray  # uint8 [S, L], 1 = real token
    categories: list[CategoryStats]
    spec_hashes: dict[str, str]  # spec -> sha256 of its rendered and tokenised content
    default_used: bool
    pad_id: int


@dataclass
class Source:
    """One spec opened: its rows and the format they are in."""

    spec: DatasetSpec
    rows: Sequence[dict[str, Any]]
    fmt: str
    text_field: str = "text"
    builtin: bool = False


def build_calibration_set(specs: list[str], tokenizer: Any, *, samples: int = 64, max_length: int = 512,
                          seed: int = 42, pack: bool = False, min_tokens: int = 16) -> CalibrationSet:
    """Calibration rows from `specs` (SPEC strings; empty: the built-in default corpus). `samples` is per
    spec (documents, or packed rows) unless the spec's own `samples=` says otherwise."""
    sources = open_sources(specs)
    categories = collect(sources, tokenizer, samples=samples, max_length=max_length, seed=seed, pack=pack,
                         min_tokens=min_tokens)
    pad_id = pad_id_of(tokenizer)
    input_ids, attention_mask = assemble(categories, pad_id)
    if input_ids.shape[0] == 0:
        raise SurgeryError(f"no usable calibration documents (all empty or shorter than min_tokens={min_tokens})",
                           ", ".join(c.stats.spec for c in categories))
    return CalibrationSet(input_ids=input_ids, attention_mask=attention_mask,
                          categories=[c.stats for c in categories],
                          spec_hashes={c.stats.spec: c.digest for c in categories},
                          default_used=not specs, pad_id=pad_id)


def open_sources(specs: list[str]) -> list[Source]:
    """Parse and load every spec (empty: the built-in default) and settle its format, before any sampling
    and without a tokenizer; all hub datasets missing offline are named in one error."""
    parsed = [s for text in (specs or ["builtin"]) for s in expand_builtin(parse_spec(text))]
    sources, missing = [], []
    for spec in parsed:
        try:
            sources.append(open_source(spec))
        except MissingDatasetError as exc:
            missing.append(exc)
    if len(missing) == 1:
        raise missing[0]
    if missing:
        fetch = " && ".join(download_hint(m.repo_id) for m in missing)
        raise SurgeryError(f"{len(missing)} datasets are not in the local Hugging Face cache and offline "
                           f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); fetch them where there is network: {fetch}",
                           ", ".join(m.repo_id for m in missing))
    return sources


def open_source(spec: DatasetSpec) -> Source:
    """Load one spec's rows and settle its format; raises SurgeryError naming the spec."""
    if spec.is_builtin:
        part = spec.split or "code"
        return Source(spec, default_corpus.rows(part), default_corpus.part_format(part), builtin=True)
    rows = load_rows(spec)
    fmt = resolve_format(spec.format, list(rows.column_names), spec.field, spec.text)
    return Source(spec, rows, fmt, spec.field or "text")


def collect(sources: list[Source], tokenizer: Any, *, samples: int = 64, max_length: int = 512, seed: int = 42,
            pack: bool = False, min_tokens: int = 16, keep_examples: int = 0) -> list[Category]:
    """Sample every source into a Category, in order (with `keep_examples` rendered documents each, for
    previews). The rows of a CalibrationSet are these categories' rows, concatenated."""
    if samples <= 0 or max_length <= 0:
        raise SurgeryError(f"samples and max_length must be positive (got {samples}, {max_length})")
    chat = ChatRenderer(tokenizer)
    renders = [_renderer(src, chat) for src in sources]  # a missing chat template fails before sampling
    pad_id = pad_id_of(tokenizer)
    return [draw(src.rows, render, tokenizer, name=src.spec.category, spec=src.spec.text,
                 key=src.spec.sampling_key, requested=src.spec.samples or samples, max_length=max_length,
                 seed=seed, pad_id=pad_id, pack=pack, min_tokens=min_tokens, keep_examples=keep_examples)
            for src, render in zip(sources, renders, strict=True)]


def _renderer(src: Source, chat: ChatRenderer) -> Render:
    """row -> (text, add_special_tokens). Chat-rendered text already holds the template's special tokens."""
    fmt, text_field = src.fmt, src.text_field
    if fmt == "text":
        return lambda row: (row_text(row, text_field), True)
    if chat.has_template:
        return lambda row: (chat.render(to_conversation(row, fmt)), False)
    if src.builtin:  # the default corpus must build with any tokenizer: a plain transcript instead
        return lambda row: (render_plain(to_conversation(row, fmt)), True)
    raise SurgeryError(f"{fmt} data needs a chat template and the tokenizer has none (use a model whose "
                       "tokenizer_config.json or chat_template.jinja has one, or format=text,field=COLUMN)",
                       src.spec.text)
