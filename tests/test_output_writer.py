"""The one output writer (surgery/checkpoint/output.py), seen through `quantize`, which took over the
rewrite's refusals when the two writers became one: an odd extra file or a full disk is refused before
the first shard, a finished output that lost a shard is refused rather than called complete, and no
file surgery writes itself (progress manifests, tensor manifest) is copied from an input.
(tests/test_rewrite*.py and tests/test_quant_crash.py hold the resume and kill tests of both.)"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from surgery.errors import SurgeryError
from surgery.quant.pipeline import quantize


@pytest.fixture
def src(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of a tiny checkpoint, free to be given odd files."""
    return Path(shutil.copytree(tiny_checkpoint("mixtral"), tmp_path / "src"))


def rtn(src: Path, out: Path) -> dict:
    return quantize(src, out, method="rtn", group_size=32, progress=False)


def test_an_odd_extra_file_is_refused_before_any_shard(src, tmp_path):
    os.mkfifo(src / "notes.txt")
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match="'notes.txt' is a FIFO"):
        rtn(src, out)
    assert not out.exists() or not any(out.iterdir())


def test_a_full_disk_is_refused_before_any_shard(src, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_TEST_FREE_BYTES", "1000")
    out = tmp_path / "out"
    with pytest.raises(SurgeryError, match=r"not enough free space: .*\(1000 bytes\) are free; nothing was written"):
        rtn(src, out)
    assert not out.exists() or not any(out.iterdir())


def test_a_finished_output_missing_a_shard_is_refused(src, tmp_path):
    out = tmp_path / "out"
    first = rtn(src, out)
    assert not first["already_complete"] and first["shards_written"] == first["shards"] >= 1
    assert rtn(src, out)["already_complete"]
    shard = next(out.glob("*.safetensors"))
    shard.unlink()
    with pytest.raises(SurgeryError, match=f"finished quantization of this job whose shard {shard.name} is missing"):
        rtn(src, out)


def test_files_surgery_writes_itself_are_never_copied(src, tmp_path):
    for name in (".surgery-rewrite.json", ".surgery-quantize.json", "surgery.tensors.json"):
        (src / name).write_text("{}\n")
    (src / "notes.txt").write_text("kept\n")
    out = tmp_path / "out"
    summary = rtn(src, out)
    names = {p.name for p in out.iterdir()}
    assert not names & {".surgery-rewrite.json", ".surgery-quantize.json", "surgery.tensors.json"}
    assert (out / "notes.txt").read_text() == "kept\n" and "notes.txt" in summary["copied_files"]
