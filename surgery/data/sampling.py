"""Draw, tokenise, truncate and (optionally) pack documents into calibration rows.

Documents are drawn from a seeded shuffle of each source, so the same seed gives the same tokens; the
shuffle depends only on the data's identity (never on the sample count), so asking for more samples
extends the earlier draw instead of replacing it.

Two layouts:
  * one document per row (default): a document longer than max_length is cut there; rows are later
    right-padded to the longest one.
  * packed (`pack=True`, the reference REAP layout): documents are laid one after another in rows of
    exactly max_length tokens, each followed by one masked gap position (pad id, attention 0); the
    document that overflows a row is cut at its end, and what is cut is dropped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from surgery.data.tokenizer import first_line
from surgery.errors import SurgeryError

Render = Callable[[dict[str, Any]], tuple[str, bool]]  # row -> (text, add_special_tokens)


@dataclass
class CategoryStats:
    """What one spec contributed: documents used, real tokens, how many were cut or left out."""

    name: str
    spec: str
    documents: int
    tokens: int
    truncated: int
    skipped: int
    requested: int
    rows: int = 0  # rows of the CalibrationSet that hold this spec (consecutive, in spec order)


@dataclass
class Example:
    """A drawn document as rendered and as tokenised (after truncation), for previews."""

    row: int
    text: str
    ids: list[int]
    truncated: bool


@dataclass
class Category:
    """The rows one spec contributes, with its statistics and content hash."""

    stats: CategoryStats
    rows: list[np.ndarray]  # int64 token ids, one array per row (packed: max_length each)
    masks: list[np.ndarray]  # uint8, same shapes
    digest: str
    examples: list[Example] = field(default_factory=list)


def shuffled(n: int, seed: int, key: str) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, key): stable across runs, machines and numpy versions."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little"))).permutation(n)


def draw(rows: Sequence[dict[str, Any]], render: Render, tokenizer: Any, *, name: str, spec: str, key: str,
         requested: int, max_length: int, seed: int, pad_id: int, pack: bool, min_tokens: int,
         keep_examples: int = 0) -> Category:
    """Sample one source into a Category (see the module docstring for the two layouts)."""
    stats = CategoryStats(name=name, spec=spec, documents=0, tokens=0, truncated=0, skipped=0, requested=requested)
    errors: list[BaseException] = []
    docs = _documents(rows, render, tokenizer, shuffled(len(rows), seed, key), min_tokens, stats, errors)
    place = _pack if pack else _one_per_row
    cat = place(docs, stats, requested=requested, max_length=max_length, pad_id=pad_id, keep=keep_examples)
    if stats.documents == 0 and errors:
        raise SurgeryError(f"no row could be rendered ({first_line(errors[0])})", spec)
    return cat


def _documents(rows: Sequence[dict[str, Any]], render: Render, tokenizer: Any, order: np.ndarray,
               min_tokens: int, stats: CategoryStats, errors: list[BaseException]) -> Iterator[Example]:
    """Rendered, tokenised documents in shuffled order; unrenderable or too short ones are skipped."""
    for i in order:
        try:
            text, special = render(rows[int(i)])
        except SurgeryError:
            raise
        except Exception as exc:  # noqa: BLE001 - a malformed row (bad JSON, missing key, template error)
            errors.append(exc)
            stats.skipped += 1
            continue
        ids = tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"] if text else []
        if len(ids) < max(1, min_tokens):
            stats.skipped += 1
            continue
        yield Example(row=int(i), text=text, ids=list(ids), truncated=False)


def _one_per_row(docs: Iterator[Example], stats: CategoryStats, *, requested: int, max_length: int,
                 pad_id: int, keep: int) -> Category:
    rows, masks, examples = [], [], []
    h = hashlib.sha256(b"surgery-calibration-v1|rows")
    for doc in docs:
        if len(doc.ids) > max_length:
            doc.ids, doc.truncated = doc.ids[:max_length], True
            stats.truncated += 1
        ids = np.asarray(doc.ids, dtype=np.int64)
        rows.append(ids)
        masks.append(np.ones(len(ids), dtype=np.uint8))
        h.update(len(ids).to_bytes(8, "little") + ids.tobytes())
        stats.documents += 1
        stats.tokens += len(ids)
        if len(examples) < keep:
            examples.append(doc)
        if len(rows) >= requested:
            break
    stats.rows = len(rows)
    return Category(stats, rows, masks, h.hexdigest(), examples)


def _pack(docs: Iterator[Example], stats: CategoryStats, *, requested: int, max_length: int,
          pad_id: int, keep: int) -> Category:
    rows, masks, examples = [], [], []
    row, mask, pos = _blank(max_length, pad_id)
    for doc in docs:
        take = min(len(doc.ids), max_length - pos)
        if take < len(doc.ids):
            doc.ids, doc.truncated = doc.ids[:take], True
            stats.truncated += 1
        row[pos:pos + take] = doc.ids
        mask[pos:pos + take] = 1
        pos += take + 1  # one masked gap position between documents
        stats.documents += 1
        stats.tokens += take
        if len(examples) < keep:
            examples.append(doc)
        if pos >= max_length:
            rows.append(row)
            masks.append(mask)
            if len(rows) >= requested:
                break
            row, mask, pos = _blank(max_length, pad_id)
    if pos > 0 and len(rows) < requested:  # the data ran out: keep the partly filled row
        rows.append(row)
        masks.append(mask)
    stats.rows = len(rows)
    h = hashlib.sha256(f"surgery-calibration-v1|packed|{max_length}".encode())
    for r, m in zip(rows, masks, strict=True):
        h.update(r.tobytes() + m.tobytes())
    return Category(stats, rows, masks, h.hexdigest(), examples)


def _blank(length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    return np.full(length, pad_id, dtype=np.int64), np.zeros(length, dtype=np.uint8), 0


def assemble(categories: list[Category], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """All rows, spec by spec, right-padded to the longest: (input_ids int64 [S, L], mask uint8 [S, L])."""
    rows = [r for c in categories for r in c.rows]
    masks = [m for c in categories for m in c.masks]
    width = max((len(r) for r in rows), default=0)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.uint8)
    for i, (r, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, :len(r)] = r
        attention[i, :len(m)] = m
    return input_ids, attention
