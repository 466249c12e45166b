"""SPEC strings, loading every kind of source through `datasets`, and hub datasets offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from surgery.data import build_calibration_set, load_recipe, open_sources, parse_spec
from surgery.data.spec import DatasetSpec, expand_builtin, load_rows
from surgery.errors import SurgeryError
from tests.test_data_helpers import DATA, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def test_hub_spec_with_split_config_and_options():
    s = parse_spec("org/name:validation@python#samples=12,format=chat,name=code")
    assert (s.source, s.split, s.config, s.samples, s.format, s.name) == ("org/name", "validation", "python", 12,
                                                                          "chat", "code")
    assert s.text == "org/name:validation@python#samples=12,format=chat,name=code"
    assert parse_spec("org/name@python:train[:100]").split == "train[:100]"  # either order; slicing kept
    assert parse_spec("org/name:train[:10%]@cfg").config == "cfg"
    assert parse_spec("org/name#split=test,config=c").split == "test"
    assert parse_spec("imdb").source == "imdb" and parse_spec("imdb").split is None
    assert parse_spec("org/name#format=evol-codealpaca").format == "alpaca"  # aliases


def test_spec_round_trips_through_to_string():
    for text in ("org/name", "org/name:train@cfg#samples=3,format=xlam,name=tools", "builtin:docs#samples=2",
                 "org/name#split=a:b,config=c@d"):
        spec = parse_spec(text)
        assert parse_spec(spec.to_string()) == DatasetSpec(**{**spec.__dict__, "text": spec.to_string()})


def test_local_paths_are_taken_whole(tmp_path):
    odd = tmp_path / "v1@2024:mix.jsonl"
    odd.write_text((DATA / "text.jsonl").read_text())
    spec = parse_spec(f"{odd}#samples=2")
    assert spec.source == str(odd) and spec.split is None and spec.samples == 2
    assert spec.category == "v1@2024:mix"
    assert len(load_rows(spec)) == 8
    assert parse_spec(parse_spec(f"{odd}:train").to_string()).source == str(odd)  # ':' and '@' in the name


def test_relative_paths_resolve_against_a_base(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = parse_spec("text.jsonl#samples=1", base=DATA)
    assert spec.source == str(DATA / "text.jsonl")


@pytest.mark.parametrize(("text", "message"), [
    ("", "empty dataset spec"),
    ("org/name#colour=red", "unknown option 'colour'"),
    ("org/name#samples=0", "samples must be a positive integer"),
    ("org/name#samples=many", "samples must be a positive integer"),
    ("org/name#format=yaml", "unknown format 'yaml'"),
    ("org/name:a:b", None),  # a split may contain ':' (slicing) -- not an error
    ("./missing.jsonl", "no such file or directory"),
    ("data/nothing/here.parquet", "no such file or directory"),
    ("builtin:poems", "unknown builtin part"),
    ("builtin#format=chat", "takes only samples= and name="),
    (":train", "no dataset before"),
])
def test_bad_specs_name_the_problem(text, message):
    if message is None:
        assert parse_spec(text).split == "a:b"
        return
    with pytest.raises(SurgeryError, match=message):
        parse_spec(text)


def test_builtin_expands_to_its_three_parts():
    parts = expand_builtin(parse_spec("builtin#samples=5,name=gen"))
    assert [p.text for p in parts] == ["builtin:code#samples=5,name=gen-code", "builtin:docs#samples=5,name=gen-docs",
                                       "builtin:tools#samples=5,name=gen-tools"]
    assert [p.category for p in expand_builtin(parse_spec("builtin"))] == ["builtin-code", "builtin-docs",
                                                                          "builtin-tools"]


def test_every_local_file_type_loads_through_datasets(tmp_path):
    source = datasets.load_dataset("json", data_files=str(DATA / "xlam.jsonl"), split="train")
    source.to_parquet(str(tmp_path / "x.parquet"))
    source.to_csv(str(tmp_path / "x.csv"), index=False)
    (tmp_path / "x.json").write_text(json.dumps([dict(r) for r in source]))  # a JSON array, not JSON lines
    source.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": source, "test": source.select([0])}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.jsonl").write_text((DATA / "xlam.jsonl").read_text())
    for spec in ("x.parquet", "x.csv", "x.json", "saved", "dict", "folder", "dict:test"):
        (src,) = open_sources([str(tmp_path / spec) if spec != "dict:test" else f"{tmp_path / 'dict'}:test"])
        assert src.fmt == "xlam", spec
        assert len(src.rows) == (1 if spec == "dict:test" else 4), spec
        assert src.rows[len(src.rows) - 1]["query"] == ("How much is 250 US dollars in euros?" if spec == "dict:test"
                                                        else "Check whether 1001 is prime."), spec
    datasets.DatasetDict({"a": source, "b": source}).save_to_disk(str(tmp_path / "ab"))
    with pytest.raises(SurgeryError, match="choose a split with :SPLIT; the directory has a, b"):
        open_sources([str(tmp_path / "ab")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SurgeryError, match="unsupported file type '.txt'"):
        open_sources([str(tmp_path / "notes.txt")])


def test_missing_hub_dataset_offline_fails_fast_naming_the_download():
    tok = tiny_tokenizer()
    start = time.perf_counter()
    with pytest.raises(SurgeryError) as err:
        build_calibration_set(["acme/surgery-not-cached-calib:train"], tok)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message and message.startswith("acme/surgery-not-cached-calib:train: ")
    assert "huggingface-cli download --repo-type dataset acme/surgery-not-cached-calib" in message


def test_shipped_recipe_offline_names_all_three_downloads_in_under_5s(tmp_path):
    """A fresh process with only HF_DATASETS_OFFLINE=1 set, as a user would run it."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_DATASETS_CACHE=str(tmp_path / "ds"))
    code = ("from surgery.data import build_calibration_set, load_recipe\n"
            "r = load_recipe('reap-code-tools-agentic')\n"
            "build_calibration_set(r.datasets, None, samples=r.samples, max_length=r.max_length, seed=r.seed)\n")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=REPO)
    elapsed = time.perf_counter() - start
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    for name in ("theblackcat102/evol-codealpaca-v1", "Salesforce/xlam-function-calling-60k",
                 "SWE-bench/SWE-smith-trajectories"):
        assert f"huggingface-cli download --repo-type dataset {name}" in last
    assert elapsed < 5, f"took {elapsed:.1f} s"
    assert load_recipe("reap-code-tools-agentic").datasets[0].startswith("theblackcat102/evol-codealpaca-v1:train")


def test_hub_cache_snapshot_is_found_offline(tmp_path):
    """What `huggingface-cli download --repo-type dataset` leaves in the hub cache loads offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--acme--tiny-calib"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "data").mkdir(parents=True)
    (repo / "snapshots" / commit / "data" / "train.jsonl").write_text((DATA / "xlam.jsonl").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_DATASETS_CACHE": str(tmp_path / "datasets")}
    code = ("from surgery.data import open_sources\n"
            "(s,) = open_sources(['acme/tiny-calib#samples=2'])\n"
            "print(s.fmt, len(s.rows), s.spec.category)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["xlam", "4", "tiny-calib"]
