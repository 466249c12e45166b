"""The checkpoint reader: byte-exact reads of every family and dtype, row slices, headers-only opening,
and one clean line (exit 2, naming the file) for every kind of broken checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from surgery.checkpoint.reader import INDEX_NAME, Checkpoint
from surgery.errors import SurgeryError
from surgery.synth import FAMILIES

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- helpers
def as_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor, so comparisons are bit for bit for every dtype
    (including float8, which `torch.equal` does not support, and NaNs, which never compare equal)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def reference_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint as the safetensors library itself reads it."""
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def assert_round_trip(directory: Path) -> set[str]:
    """Every tensor read by `Checkpoint.read` equals safetensors' bit for bit; returns the dtypes seen."""
    ref = reference_tensors(directory)
    with Checkpoint(directory) as ckpt:
        assert set(ckpt.tensors) == set(ref)
        for name, want in ref.items():
            got = ckpt.read(name)
            assert got.dtype == want.dtype, name
            assert tuple(got.shape) == tuple(want.shape), name
            assert as_bytes(got) == as_bytes(want), name
        return {info.dtype for info in ckpt.tensors.values()}


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header dict, data section) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_safetensors(path: Path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def write_sparse_checkpoint(directory: Path, shards: int = 2, tensors_per_shard: int = 4,
                            shape: tuple[int, int] = (4096, 8192)) -> int:
    """A checkpoint whose data sections are holes (zero bytes on disk, no RAM to build); returns its
    total tensor bytes. Reading any of its data is visible as bytes read, which is the point."""
    directory.mkdir(parents=True, exist_ok=True)
    nbytes = shape[0] * shape[1] * 2
    weight_map: dict[str, str] = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header = {"__metadata__": {"format": "pt"}}
        for t in range(tensors_per_shard):
            name = f"model.layers.{s}.w{t}.weight"
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [t * nbytes, (t + 1) * nbytes]}
            weight_map[name] = shard
        blob = json.dumps(header).encode()
        with open(directory / shard, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + tensors_per_shard * nbytes)
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return shards * tensors_per_shard * nbytes


def rchar() -> int:
    """Bytes this process has asked the kernel to read so far (read, pread, readv: every syscall)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_read_equals_safetensors_every_family(tiny_checkpoint, family: str) -> None:
    dtypes = assert_round_trip(tiny_checkpoint(family))
    assert "F32" in dtypes


def test_read_equals_safetensors_bf16(tiny_checkpoint) -> None:
    assert "BF16" in assert_round_trip(tiny_checkpoint("mixtral", dtype=torch.bfloat16))


def test_read_equals_safetensors_fp8(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("minimax_m2", fp8=True)
    assert {"F8_E4M3", "F32"} <= assert_round_trip(directory)
    with Checkpoint(directory) as ckpt:
        assert any(n.endswith("weight_scale_inv") for n in ckpt.tensors)


@pytest.mark.parametrize("name", ["tinymoe-m2", "tinymoe-m2-fp8"])
def test_read_equals_safetensors_shared_fixtures(shared_fixtures, name: str) -> None:
    dtypes = assert_round_trip(shared_fixtures / name)
    assert "BF16" in dtypes
    if name.endswith("fp8"):
        assert "F8_E4M3" in dtypes


@pytest.mark.parametrize("fp8", [False, True])
def test_row_slices(tiny_checkpoint, fp8: bool) -> None:
    directory = tiny_checkpoint("minimax_m2", fp8=fp8)
    ref = reference_tensors(directory)
    names = [n for n, t in ref.items() if t.ndim >= 2 and t.shape[0] >= 5]
    assert names
    with Checkpoint(directory) as ckpt:
        for name in names:
            full = ref[name]
            rows = full.shape[0]
            for a, b in [(0, 1), (1, 4), (rows - 3, rows), (2, rows + 10), (0, rows), (3, 3)]:
                got = ckpt.read(name, (a, b))
                want = full[a:b]
                assert got.dtype == want.dtype
                assert tuple(got.shape) == tuple(want.shape), (name, a, b)
                assert as_bytes(got) == as_bytes(want), (name, a, b)


def test_read_rows(tiny_checkpoint) -> None:
    directory = tiny_checkpoint("qwen3_moe")
    name = "model.embed_tokens.weight"
    full = reference_tensors(directory)[name]
    ids = [200, 3, 3, 0, 255, 17, 18, 19, 128, 64, 200]
    with Checkpoint(directory) as ckpt:
        got = ckpt.read_rows(name, ids, block_rows=7)  # several blocks, some rows in the same block
    assert set(got) == set(ids)
    for r, row in got.items():
        assert as_bytes(row) == as_bytes(full[r]), r


def test_single_file_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.mlp.experts.0.w1.weight": torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.experts.0.w1.weight_scale_inv": torch.rand(1, 1, generator=g),
        "model.norm.weight": torch.randn(8, generator=g).half(),
        "step": torch.tensor([7], dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        assert ckpt.index_path is None
        assert list(ckpt.shards) == ["model.safetensors"]
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, want in tensors.items():
            got = ckpt.read(name)
            assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
            assert as_bytes(got) == as_bytes(want), name
        embed = tensors["model.embed_tokens.weight"]
        assert as_bytes(ckpt.read("model.embed_tokens.weight", (5, 9))) == as_bytes(embed[5:9])


def test_opening_reads_headers_only(tmp_path: Path, tiny_checkpoint) -> None:
    total = write_sparse_checkpoint(tmp_path / "sparse")
    Checkpoint(tiny_checkpoint("mixtral")).close()  # warm up: any lazy import or first-call cost
    before = rchar()
    ckpt = Checkpoint(tmp_path / "sparse")
    opened = rchar() - before
    assert ckpt.total_bytes == total == 512 * 2**20
    assert opened < 64 * 1024, f"opening read {opened} bytes of a {total}-byte checkpoint"
    # the measure sees data reads: reading one tensor shows up as at least its size
    name = next(iter(ckpt.tensors))
    before = rchar()
    ckpt.read(name, (0, 1024))
    assert rchar() - before >= ckpt.info(name).nbytes // 4096 * 1024
    ckpt.close()


# ---------------------------------------------------------------------------------------------- bad input
def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _index(d: Path) -> dict:
    return json.loads((d / INDEX_NAME).read_text())


def _set_index(d: Path, index: dict) -> None:
    (d / INDEX_NAME).write_text(json.dumps(index))


def case_missing_shard(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[1]
    victim.unlink()
    return victim, ("missing",)


def case_truncated_data(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[-1]
    header, data = split_safetensors(victim)
    size = victim.stat().st_size
    os.truncate(victim, size - len(data) // 2)
    return victim, ("past the end",)


def case_truncated_header(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[0]
    (n,) = struct.unpack("<Q", victim.read_bytes()[:8])
    os.truncate(victim, 8 + n // 2)
    return victim, ("truncated",)


def case_tiny_file(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[2]
    victim.write_bytes(b"\x10\x00\x00")
    return victim, ("truncated",)


def case_garbage_header(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[1]
    raw = victim.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    garbage = (b'{"model.layers.0": {"dtype": oops' + b" " * n)[:n]
    victim.write_bytes(raw[:8] + garbage + raw[8 + n:])
    return victim, ("does not parse",)


def case_index_outside(d: Path) -> tuple[Path, tuple[str, ...]]:
    shutil.copyfile(_shards(d)[0], d.parent / "x.safetensors")  # it exists: only the path is wrong
    index = _index(d)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../x.safetensors"
    _set_index(d, index)
    return d / INDEX_NAME, ("outside", "../x.safetensors")


def case_index_absolute(d: Path) -> tuple[Path, tuple[str, ...]]:
    index = _index(d)
    name = next(iter(index["weight_map"]))
    target = str(d.parent / "y.safetensors")
    shutil.copyfile(_shards(d)[0], target)  # it exists: only the path is wrong
    index["weight_map"][name] = target
    _set_index(d, index)
    return d / INDEX_NAME, ("outside", target)


def case_range_past_end(d: Path) -> tuple[Path, tuple[str, ...]]:
    victim = _shards(d)[0]
    header, data = split_safetensors(victim)
    name = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [len(data), len(data) + end - begin]
    join_safetensors(victim, header, data)
    return victim, ("past the end", name)


def case_index_garbage(d: Path) -> tuple[Path, tuple[str, ...]]:
    (d / INDEX_NAME).write_text('{"metadata": {}, "weight_map": {"a": ')
    return d / INDEX_NAME, ("does not parse",)


def case_tensor_absent(d: Path) -> tuple[Path, tuple[str, ...]]:
    index = _index(d)
    shard = _shards(d)[2]
    index["weight_map"]["model.layers.0.not_there.weight"] = shard.name
    _set_index(d, index)
    return shard, ("model.layers.0.not_there.weight",)


def case_unknown_architecture(d: Path) -> tuple[Path, tuple[str, ...]]:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FrobnicatorForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    return d / "config.json", ("FrobnicatorForCausalLM", "supported", "MiniMaxM2ForCausalLM", "MixtralForCausalLM")


def case_no_directory(d: Path) -> tuple[Path, tuple[str, ...]]:
    shutil.rmtree(d)
    return d, ("no such directory",)


def case_not_a_checkpoint(d: Path) -> tuple[Path, tuple[str, ...]]:
    shutil.rmtree(d)
    d.mkdir()
    (d / "README.md").write_text("just notes\n")
    return d, ("not a safetensors checkpoint",)


CASES = {f.__name__.removeprefix("case_"): f for f in [
    case_missing_shard, case_truncated_data, case_truncated_header, case_tiny_file, case_garbage_header,
    case_index_outside, case_index_absolute, case_range_past_end, case_index_garbage, case_tensor_absent,
    case_unknown_architecture, case_no_directory, case_not_a_checkpoint,
]}


def run_inspect(target: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", "inspect", target], capture_output=True, text=True,
                          timeout=120, **kwargs)


@pytest.fixture(scope="module")
def bad_runs(tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, tuple]]:
    """Every corruption applied to its own copy of a tiny checkpoint, all run through the CLI at once."""
    source = tiny_checkpoint("minimax_m2")
    root = tmp_path_factory.mktemp("bad")
    prepared = {}
    for name, corrupt in CASES.items():
        d = root / name / "ckpt"
        shutil.copytree(source, d)
        prepared[name] = (d, *corrupt(d))
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(run_inspect, str(d)) for name, (d, _, _) in prepared.items()}
        return {name: (f.result(), prepared[name][1], prepared[name][2]) for name, f in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_one_line(bad_runs, case: str) -> None:
    proc, offender, words = bad_runs[case]
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stderr.endswith("\n")
    line = lines[0]
    assert line.startswith("surgery: error: ")
    assert "Traceback" not in line
    assert str(offender) in line, line
    for word in words:
        assert word in line, line


def test_fixture_is_intact_after_bad_runs(bad_runs, tiny_checkpoint) -> None:
    """The corruptions touched copies only: the session's checkpoint still reads and inspects."""
    assert_round_trip(tiny_checkpoint("minimax_m2"))


# ---------------------------------------------------------------------------------------------- more bad input
def _rewrite_first_header(d: Path, change) -> Path:
    victim = _shards(d)[0]
    header, data = split_safetensors(victim)
    change(header)
    join_safetensors(victim, header, data)
    return victim


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _bad_dtype(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = ["F32"]


def _bad_metadata(header: dict) -> None:
    header["__metadata__"] = ["format", "pt"]


def _unknown_dtype(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = "F128"


def _wrong_span(header: dict) -> None:
    header[_first_tensor(header)]["shape"][0] += 1


@pytest.mark.parametrize("change", [_bad_dtype, _bad_metadata, _unknown_dtype, _wrong_span])
def test_malformed_header_entries(tiny_checkpoint, tmp_path: Path, change) -> None:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("mixtral"), d)
    victim = _rewrite_first_header(d, change)
    with pytest.raises(SurgeryError) as err:
        Checkpoint(d)
    assert str(victim) in str(err.value) and "\n" not in str(err.value)


def test_malformed_index_and_config(tiny_checkpoint, tmp_path: Path) -> None:
    src = tiny_checkpoint("mixtral")
    d = tmp_path / "index"
    shutil.copytree(src, d)
    index = _index(d)
    index["weight_map"][next(iter(index["weight_map"]))] = 5
    _set_index(d, index)
    with pytest.raises(SurgeryError, match="index does not parse") as err:
        Checkpoint(d)
    assert str(d / INDEX_NAME) in str(err.value)

    d = tmp_path / "config"
    shutil.copytree(src, d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(SurgeryError, match="config.json does not parse") as err:
        Checkpoint(d)
    assert str(d / "config.json") in str(err.value)


def test_transformers_config_error_is_one_line(tiny_checkpoint, tmp_path: Path) -> None:
    """transformers' validation messages span lines; the CLI prints str(error), which must not."""
    from surgery.arch.model import MoEModel

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("mixtral"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_local_experts"] = "many"
    (d / "config.json").write_text(json.dumps(cfg))
    with Checkpoint(d) as ckpt, pytest.raises(SurgeryError) as err:
        MoEModel(ckpt)
    assert str(d / "config.json") in str(err.value)
    assert "num_local_experts" in str(err.value) and "\n" not in str(err.value)


def test_symlinked_shards_are_read(tiny_checkpoint, tmp_path: Path) -> None:
    """Shards that are symlinks to files elsewhere (the Hugging Face cache's blobs) are legitimate."""
    src = tiny_checkpoint("olmoe")
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("../..") / "blobs" / f.name)
    assert_round_trip(snap)


def test_fingerprint_follows_headers_and_sampled_data(tiny_checkpoint, tmp_path: Path) -> None:
    from surgery.checkpoint.fingerprint import fingerprint

    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("mixtral"), d)
    with Checkpoint(d) as ckpt:
        first = fingerprint(ckpt)
        shard = ckpt.shards[sorted(ckpt.shards)[0]]
        assert shard.raw == shard.path.read_bytes()[8:shard.data_start]  # the exact header bytes
    victim = _shards(d)[0]
    raw = bytearray(victim.read_bytes())
    start = 8 + int.from_bytes(raw[:8], "little")
    assert len(raw) - start > 6 * 16 * 1024  # room for a byte outside the three 16 KB samples
    raw[start + (len(raw) - start) // 4] ^= 0xFF  # not sampled: reading all data would cost too much
    victim.write_bytes(bytes(raw))
    with Checkpoint(d) as ckpt:
        assert fingerprint(ckpt) == first
    raw[-1] ^= 0xFF  # sampled (the end of the data): same layout, other weights -> another model
    victim.write_bytes(bytes(raw))
    with Checkpoint(d) as ckpt:
        assert fingerprint(ckpt)["sha256"] != first["sha256"]
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    header, data = split_safetensors(victim)
    header["__metadata__"] = {"format": "pt", "note": "changed"}
    join_safetensors(victim, header, data)
    with Checkpoint(d) as ckpt:
        second = fingerprint(ckpt)
    assert second["sha256"] != first["sha256"] and second["total_bytes"] == first["total_bytes"]
