"""Sampling: determinism, truncation, skipping, the two row layouts, pad ids and the built-in default."""

from __future__ import annotations

import numpy as np
import pytest

from surgery.data import build_calibration_set, open_sources, pad_id_of
from surgery.data.calibration import collect
from surgery.data.default_corpus import doc_topics, stdlib_sources, tool_functions
from surgery.errors import SurgeryError
from tests.test_data_helpers import DATA, tiny_tokenizer

TEXT = str(DATA / "text.jsonl")
MIX = [TEXT, str(DATA / "chat.jsonl"), str(DATA / "evol-codealpaca.jsonl"), str(DATA / "xlam.jsonl"),
       str(DATA / "swe-smith.jsonl")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids_of(tok, text: str, special: bool = True) -> list[int]:
    return tok(text, add_special_tokens=special)["input_ids"]


def test_same_seed_same_tokens_other_seed_other_order(tok):
    a = build_calibration_set(MIX, tok, samples=3, max_length=64, seed=7)
    b = build_calibration_set(MIX, tok, samples=3, max_length=64, seed=7)
    c = build_calibration_set(MIX, tok, samples=3, max_length=64, seed=8)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.attention_mask, b.attention_mask)
    assert a.spec_hashes == b.spec_hashes and list(a.spec_hashes) == MIX
    assert not np.array_equal(a.input_ids, c.input_ids)
    assert a.spec_hashes != c.spec_hashes


def test_more_samples_extend_the_same_draw(tok):
    small = build_calibration_set([TEXT], tok, samples=3, max_length=512, seed=1, min_tokens=1)
    large = build_calibration_set([TEXT], tok, samples=6, max_length=512, seed=1, min_tokens=1)
    for i in range(3):
        n = int(small.attention_mask[i].sum())
        assert np.array_equal(small.input_ids[i, :n], large.input_ids[i, :n])


def test_one_document_per_row_right_padded(tok):
    cs = build_calibration_set([TEXT], tok, samples=100, max_length=512, seed=3)
    texts = [r["text"] for r in open_sources([TEXT])[0].rows]
    expected = sorted(ids_of(tok, t) for t in texts if len(ids_of(tok, t)) >= 16)
    got = sorted(cs.input_ids[i, : cs.attention_mask[i].sum()].tolist() for i in range(len(cs.input_ids)))
    assert got == expected  # every long-enough document exactly once, untruncated
    assert cs.input_ids.dtype == np.int64 and cs.attention_mask.dtype == np.uint8
    assert cs.input_ids.shape[1] == max(len(e) for e in expected) <= 512
    assert cs.pad_id == tok.pad_token_id == 3
    for row, mask in zip(cs.input_ids, cs.attention_mask, strict=True):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (row[n:] == cs.pad_id).all()
    (stats,) = cs.categories
    assert stats.name == "text" and stats.spec == TEXT
    assert (stats.requested, stats.documents, stats.skipped, stats.truncated) == (100, 7, 1, 0)  # "ok" skipped
    assert stats.tokens == int(cs.attention_mask.sum())


def test_truncation_and_min_tokens_are_counted(tok):
    cs = build_calibration_set([TEXT], tok, samples=8, max_length=20, min_tokens=30)
    (stats,) = cs.categories
    lengths = [len(ids_of(tok, r["text"])) for r in open_sources([TEXT])[0].rows]
    assert stats.skipped == sum(n < 30 for n in lengths)
    assert stats.documents == sum(n >= 30 for n in lengths) == stats.truncated
    assert cs.input_ids.shape == (stats.documents, 20) and cs.attention_mask.all()


def test_packed_rows_follow_the_reference_layout(tok):
    """Rows of exactly L tokens; documents back to back with one masked pad position between them."""
    length = 128  # the documents are 67..102 tokens: two per row, the second cut at the row's end
    (cat,) = collect(open_sources([TEXT]), tok, samples=2, max_length=length, seed=5, pack=True, keep_examples=20)
    cs = build_calibration_set([TEXT], tok, samples=2, max_length=length, seed=5, pack=True)
    assert cs.input_ids.shape == (2, length) and cat.stats.requested == 2
    assert cat.stats.documents == len(cat.examples) == 4 and cat.stats.truncated == 2
    assert (cs.attention_mask == 0).sum() == 2  # one gap per row, after its first document
    # the documents as placed, in order: each followed by a masked pad position unless it fills the row
    flat = list(zip(cs.input_ids.reshape(-1).tolist(), cs.attention_mask.reshape(-1).tolist(), strict=True))
    pos = 0
    for ex in cat.examples:
        n = len(ex.ids)
        assert flat[pos:pos + n] == [(t, 1) for t in ex.ids]
        pos += n
        if pos % length:  # the gap, unless the document ended exactly at the row's end
            assert flat[pos] == (cs.pad_id, 0)
            pos += 1
        if ex.truncated:
            assert pos % length == 0
        if pos >= len(flat):
            break
    assert pos == len(flat)
    assert cat.stats.tokens == int(cs.attention_mask.sum()) == 2 * length - 2
    assert cat.stats.truncated == sum(ex.truncated for ex in cat.examples)


def test_packing_reports_fewer_rows_than_asked(tok):
    cs = build_calibration_set([TEXT], tok, samples=50, max_length=64, pack=True)
    (stats,) = cs.categories
    assert cs.input_ids.shape[1] == 64 and 1 <= cs.input_ids.shape[0] < 50
    assert stats.documents == 7 and stats.skipped == 1 and stats.requested == 50


def test_rows_are_in_spec_order_with_per_spec_counts(tok):
    specs = [f"{DATA / 'evol-codealpaca.jsonl'}#samples=2", f"{TEXT}#samples=3,name=prose"]
    cs = build_calibration_set(specs, tok, samples=1, max_length=128)
    assert [(c.name, c.documents, c.requested) for c in cs.categories] == [("evol-codealpaca", 2, 2), ("prose", 3, 3)]
    chat_rows = cs.input_ids[:2]
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert (chat_rows[:, 0] == im_start).all() and (cs.input_ids[2:, 0] != im_start).all()


def test_pad_id_falls_back_to_eos_then_zero():
    assert pad_id_of(tiny_tokenizer(pad=False)) == 0  # <|endoftext|> is id 0 here
    no_pad = tiny_tokenizer(pad=False)
    no_pad.eos_token = "<|im_end|>"
    assert pad_id_of(no_pad) == no_pad.convert_tokens_to_ids("<|im_end|>") == 2
    assert pad_id_of(tiny_tokenizer(pad=False, eos=False)) == 0
    cs = build_calibration_set([TEXT], no_pad, samples=8, max_length=512)
    assert cs.pad_id == 2 and (cs.input_ids[cs.attention_mask == 0] == 2).all()


def test_default_corpus_builds_offline(tok):
    assert len(stdlib_sources()) > 100 and len(doc_topics()) > 20 and len(tool_functions()) > 100
    cs = build_calibration_set([], tok, samples=4, max_length=96)
    assert cs.default_used
    assert [c.name for c in cs.categories] == ["builtin-code", "builtin-docs", "builtin-tools"]
    assert list(cs.spec_hashes) == ["builtin:code", "builtin:docs", "builtin:tools"]
    assert all(c.documents == 4 for c in cs.categories) and cs.input_ids.shape == (12, 96)
    again = build_calibration_set([], tok, samples=4, max_length=96)
    assert np.array_equal(cs.input_ids, again.input_ids)
    (tools,) = collect(open_sources(["builtin:tools"]), tok, samples=2, max_length=4096, keep_examples=2)
    text = tools.examples[0].text
    assert text.startswith("<|im_start|>system\n") and "<tools>\n" in text and "<tool_call>\n" in text


def test_default_corpus_without_a_chat_template_is_a_plain_transcript():
    bare = tiny_tokenizer(None)
    (tools,) = collect(open_sources(["builtin:tools#samples=1"]), bare, max_length=4096, keep_examples=1)
    text = tools.examples[0].text
    assert text.startswith("system: You are a Python assistant.") and "\n\nuser: Please call the " in text
    assert '\n\nassistant: <tool_call>\n{"name": ' in text and "You can call these tools (JSON schemas)" in text
    assert not build_calibration_set(["builtin"], bare, samples=1, max_length=32).default_used


def test_nothing_usable_is_an_error(tok):
    with pytest.raises(SurgeryError, match="no usable calibration documents"):
        build_calibration_set([TEXT], tok, min_tokens=10_000)
    with pytest.raises(SurgeryError, match="must be positive"):
        build_calibration_set([TEXT], tok, samples=0)


def test_unrenderable_rows_are_skipped_or_reported(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "[not json"}\n{"messages": "{\\"role\\": 1}"}\n')
    with pytest.raises(SurgeryError, match=r"bad\.jsonl.*no row could be rendered"):
        build_calibration_set([str(bad)], tok)
