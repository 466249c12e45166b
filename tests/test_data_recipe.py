"""Recipe files: the shipped REAP mix, a local recipe's token budget and determinism, and bad recipes."""

from __future__ import annotations

import numpy as np
import pytest

from surgery.data import build_calibration_set, load_recipe, shipped_recipes
from surgery.errors import SurgeryError
from tests.test_data_helpers import DATA, tiny_tokenizer

LOCAL = DATA / "recipe-local.toml"


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def build(recipe, tok, **overrides):
    settings = {"samples": recipe.samples, "max_length": recipe.max_length, "seed": recipe.seed, "pack": recipe.pack}
    return build_calibration_set(recipe.datasets, tok, **{**settings, **overrides})


def test_shipped_reap_mix():
    assert "reap-code-tools-agentic" in shipped_recipes()
    r = load_recipe("reap-code-tools-agentic")
    assert (r.method, r.ratio, r.seed, r.max_length, r.pack) == ("reap", 0.5, 42, 2048, False)
    assert r.datasets == [
        "theblackcat102/evol-codealpaca-v1:train#samples=700,format=alpaca,name=code",
        "Salesforce/xlam-function-calling-60k:train#samples=330,format=xlam,name=tool-calling",
        "SWE-bench/SWE-smith-trajectories:tool#samples=330,format=swe-smith,name=agentic",
    ]
    counts = [700, 330, 330]
    assert [round(100 * c / sum(counts)) for c in counts] == [51, 24, 24]
    assert load_recipe("reap-code-tools-agentic.toml") == r


def test_local_recipe_token_budget_per_category(tok):
    r = load_recipe(LOCAL)
    assert r.datasets == [f"{DATA / 'evol-codealpaca.jsonl'}#samples=3,name=code",
                          f"{DATA / 'xlam.jsonl'}#samples=2,format=xlam,name=tool-calling",
                          f"{DATA / 'swe-smith.jsonl'}#name=agentic"]
    assert (r.samples, r.max_length, r.seed, r.pack, r.ratio) == (2, 64, 7, True, 0.25)
    cs = build(r, tok)
    budget = {"code": 3, "tool-calling": 2, "agentic": 2}  # rows of max_length tokens each
    assert {c.name: (c.requested, c.rows) for c in cs.categories} == {k: (v, v) for k, v in budget.items()}
    assert cs.input_ids.shape == (sum(budget.values()), r.max_length)
    start = 0
    for c in cs.categories:
        rows = cs.attention_mask[start:start + c.rows]
        assert c.tokens == int(rows.sum()) <= budget[c.name] * r.max_length
        start += c.rows
    unpacked = build(r, tok, pack=False)  # one document per row: the same counts, in documents
    assert [(c.name, c.documents, c.rows) for c in unpacked.categories] == [(k, v, v) for k, v in budget.items()]
    assert unpacked.input_ids.shape[1] <= r.max_length


def test_same_recipe_and_seed_give_the_same_tokens(tok):
    r = load_recipe(LOCAL)
    a, b = build(r, tok), build(r, tok)
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.attention_mask, b.attention_mask)
    assert a.spec_hashes == b.spec_hashes and list(a.spec_hashes) == r.datasets
    assert build(r, tok, seed=8).spec_hashes != a.spec_hashes


def test_recipe_from_another_directory_finds_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(LOCAL).datasets[0].startswith(str(DATA))


@pytest.mark.parametrize(("body", "message"), [
    ("colour = 'red'", "unknown key(s) colour"),
    ("ratio = 1.5", "ratio must be between 0 and 1"),
    ("ratio = 'half'", "ratio must be a float"),
    ("max_length = 0", "max_length must be positive"),
    ("seed = 1.5", "seed must be an int"),
    ("pack = 'yes'", "pack must be a bool"),
    ("datasets = 'x'", "must be a list"),
    ("[[datasets]]\nid = 'a/b'\npath = 'x.jsonl'", "exactly one of spec, id, path"),
    ("[[datasets]]\nid = 'a/b'\nsamples = 0", "samples must be a positive integer"),
    ("[[datasets]]\nid = 'a/b'\nweight = 2", "unknown key(s) weight"),
    ("[[datasets]]\npath = 'missing.jsonl'", "no such file or directory"),
    ("[[datasets]]\nid = 'a/b'\nformat = 'yaml'", "unknown format 'yaml'"),
    ("method = ", "not valid TOML"),
])
def test_bad_recipes_name_the_problem(tmp_path, body, message):
    path = tmp_path / "r.toml"
    path.write_text(body + "\n")
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        load_recipe(path)
    assert "\n" not in str(err.value)


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(SurgeryError, match="shipped recipes: .*reap-code-tools-agentic"):
        load_recipe("no-such-recipe")
