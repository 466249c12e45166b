"""The streaming safetensors writer: same bytes as the reference library, both copy paths, order and
size checks, and no final-named file unless complete."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.checkpoint.reader import read_shard_header
from surgery.checkpoint.writer import (
    COPY_MODE_ENV,
    SafetensorsWriter,
    TensorEntry,
    encode_header,
    file_size_for,
    sha256_file,
)
from surgery.errors import SurgeryError

TENSORS = {
    "b.weight": torch.randn(3, 5),
    "a.bias": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(3, dtype=torch.int64),
    "empty": torch.zeros(0, 4),
    "fp8": torch.randn(4, 6).to(torch.float8_e4m3fn),
    "mask": torch.tensor([True, False, True]),
}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


@pytest.fixture
def reference(tmp_path) -> Path:
    path = tmp_path / "ref.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path


def entries_of(path: Path) -> list[TensorEntry]:
    infos = sorted(read_shard_header(path).tensors.values(), key=lambda i: i.begin)
    return [TensorEntry(i.name, i.dtype, i.shape) for i in infos]


def test_same_bytes_as_the_library(reference, tmp_path):
    """Given the library's tensor order, the header (padding included) and data are byte-identical."""
    entries = entries_of(reference)
    out = tmp_path / "mine.safetensors"
    with SafetensorsWriter(out, entries, {"format": "pt"}) as w:
        for e in entries:
            data = raw(TENSORS[e.name])
            w.write(e.name, data[:3])  # in pieces
            w.write(e.name, data[3:])
    assert out.read_bytes() == reference.read_bytes()
    assert w.size == out.stat().st_size == file_size_for(entries, {"format": "pt"})
    assert w.sha256 == hashlib.sha256(out.read_bytes()).hexdigest() == sha256_file(out)
    header_len = int.from_bytes(out.read_bytes()[:8], "little")
    assert header_len % 8 == 0


@pytest.mark.parametrize("mode", ["auto", "readwrite"])
def test_copy_paths_and_loading(reference, tmp_path, monkeypatch, mode):
    """Copying byte ranges (copy_file_range, or pread/write) gives a file the library reads back, in
    any order we choose, with renamed tensors."""
    monkeypatch.setenv(COPY_MODE_ENV, mode)
    infos = read_shard_header(reference).tensors
    order = ["fp8", "c", "a.bias", "empty", "b.weight", "mask"]
    entries = [TensorEntry(f"new.{n}", infos[n].dtype, infos[n].shape) for n in order]
    out = tmp_path / "copy.safetensors"
    fd = os.open(reference, os.O_RDONLY)
    try:
        with SafetensorsWriter(out, entries) as w:
            for n in order:
                w.copy(f"new.{n}", fd, infos[n].begin, infos[n].nbytes)
    finally:
        os.close(fd)
    assert w.sha256 == sha256_file(out)
    with safe_open(out, "pt") as f:
        assert list(f.keys()) == sorted(f"new.{n}" for n in order)
        for n in order:
            got = f.get_tensor(f"new.{n}")
            assert got.dtype == TENSORS[n].dtype and raw(got) == raw(TENSORS[n])


def test_order_and_size_are_enforced(tmp_path):
    entries = [TensorEntry("x", "F32", (2,)), TensorEntry("y", "F32", (1,))]
    out = tmp_path / "bad.safetensors"
    with pytest.raises(SurgeryError, match="'y' written where 'x' belongs"):
        with SafetensorsWriter(out, entries) as w:
            w.write("y", b"\0" * 4)
    assert not out.exists() and not list(tmp_path.iterdir())  # the partial file is removed too
    with pytest.raises(SurgeryError, match="given 12 bytes, 8 left"):
        with SafetensorsWriter(out, entries) as w:
            w.write("x", b"\0" * 12)
    with pytest.raises(SurgeryError, match="'y' was not written"):
        with SafetensorsWriter(out, entries) as w:
            w.write("x", b"\0" * 8)
    assert not list(tmp_path.iterdir())


def test_partial_name_until_committed(tmp_path):
    entries = [TensorEntry("x", "U8", (4,))]
    out = tmp_path / "s.safetensors"
    w = SafetensorsWriter(out, entries)
    w.open()
    w.write("x", b"abcd")
    w.finish()
    assert not out.exists() and (tmp_path / "s.safetensors.partial").exists()
    w.commit()
    assert out.exists() and not (tmp_path / "s.safetensors.partial").exists()
    assert out.read_bytes().endswith(b"abcd")


def test_header_rejects_duplicates_and_unknown_dtypes():
    with pytest.raises(ValueError, match="duplicate"):
        encode_header([TensorEntry("x", "F32", (1,)), TensorEntry("x", "F32", (1,))])
    with pytest.raises(ValueError, match="unsupported dtype"):
        encode_header([TensorEntry("x", "F4", (1,))])
