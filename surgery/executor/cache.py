"""The on-disk hidden-state cache: `WORK/cache.zarr`, a zarr v3 group.

Holds `input_ids` [S, L], `attention_mask` [S, L] (1 = real token) and `hidden_<l>` [S, L, H], the
input of decoder layer l (so `hidden_0` is the embeddings and `hidden_<l+1>` is layer l's output,
which is the next layer's input). Arrays are chunked by batches of samples so one batch is one chunk
read or written. zarr has no bfloat16: bf16 is stored as a uint16 view and the logical dtype is
recorded in the array's attributes.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import torch
import zarr

STORAGE = {torch.bfloat16: ("uint16", "bfloat16"), torch.float32: ("float32", "float32"),
           torch.float16: ("float16", "float16")}
LOGICAL = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class HiddenCache:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.group = zarr.open_group(str(self.path), mode="a", zarr_format=3)
        except zarr.errors.ContainsGroupError:
            # Ranks of one job open the cache at once: mode "a" creates a missing group, and a rank that
            # found none can lose the creation to another. The group it lost to is the one to open.
            self.group = zarr.open_group(str(self.path), mode="r+", zarr_format=3)

    # ---------------------------------------------------------------- tokens
    def write_tokens(self, input_ids: np.ndarray, attention_mask: np.ndarray, chunk: int) -> None:
        for name, arr, dtype in (("input_ids", input_ids, "int64"), ("attention_mask", attention_mask, "uint8")):
            z = self.group.create_array(name, shape=arr.shape, chunks=(chunk, arr.shape[1]), dtype=dtype,
                                        compressors=None, overwrite=True)
            z[...] = arr.astype(dtype)

    def has_tokens(self) -> bool:
        return "input_ids" in self.group and "attention_mask" in self.group

    def tokens(self) -> tuple[np.ndarray, np.ndarray]:
        return self.group["input_ids"][...], self.group["attention_mask"][...]

    # ---------------------------------------------------------------- hidden states
    @staticmethod
    def hidden_name(layer: int) -> str:
        return f"hidden_{layer}"

    def create_hidden(self, layer: int, samples: int, length: int, hidden: int, dtype: torch.dtype,
                      chunk: int) -> zarr.Array:
        storage, logical = STORAGE[dtype]
        z = self.group.create_array(self.hidden_name(layer), shape=(samples, length, hidden),
                                    chunks=(chunk, length, hidden), dtype=storage, compressors=None,
                                    fill_value=0, overwrite=True)
        z.attrs["logical_dtype"] = logical
        return z

    def hidden(self, layer: int) -> zarr.Array:
        return self.group[self.hidden_name(layer)]

    def has_hidden(self, layer: int) -> bool:
        return self.hidden_name(layer) in self.group

    def hidden_layers(self) -> list[int]:
        return sorted(int(k.split("_")[1]) for k in self.group.array_keys() if k.startswith("hidden_"))

    def delete_hidden(self, layer: int) -> None:
        if self.has_hidden(layer):
            del self.group[self.hidden_name(layer)]
            shutil.rmtree(self.path / self.hidden_name(layer), ignore_errors=True)

    @staticmethod
    def write_rows(z: zarr.Array, start: int, values: torch.Tensor) -> None:
        """Write `values` [n, T, H] into rows [start, start+n), zero-padded to the full length L.

        A hidden-state array holds one row per chunk, uncompressed, so a chunk's file is exactly the row's
        little-endian bytes. Where the array is laid out so in a local store (`_chunk_path`), each row is
        written straight to its chunk file (a temporary name, then renamed, as zarr does; the padding is
        the file's zero-filled tail), which measured ~5x faster than zarr 3.1's codec pipeline (0.15 vs 0.73
        GB/s on tmpfs, 2 cores) and keeps checkpoints of large hidden states off the critical path.
        Everything else goes through zarr; reads always do."""
        arr = values.detach().cpu()
        if arr.dtype == torch.bfloat16:
            arr = arr.view(torch.int16)
        data = arr.numpy()
        if data.dtype == np.int16:
            data = data.view(np.uint16)
        if _chunk_path(z, start) is not None and data.dtype == z.dtype and data.shape[1] <= z.shape[1]:
            full = z.shape[1] * z.shape[2] * data.dtype.itemsize
            for i in range(data.shape[0]):
                _write_chunk(_chunk_path(z, start + i), np.ascontiguousarray(data[i]), full)
            return
        if data.shape[1] < z.shape[1]:
            data = np.pad(data, ((0, 0), (0, z.shape[1] - data.shape[1]), (0, 0)))
        z[start:start + data.shape[0]] = data

    @staticmethod
    def read_rows(z: zarr.Array, start: int, stop: int, length: int | None = None) -> torch.Tensor:
        data = z[start:stop] if length is None else z[start:stop, :length]
        logical = LOGICAL[z.attrs.get("logical_dtype", str(z.dtype))]
        if logical == torch.bfloat16:
            return torch.from_numpy(np.ascontiguousarray(data).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.ascontiguousarray(data))

    def disk_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())


def _chunk_path(z: zarr.Array, row: int) -> Path | None:
    """The file of row `row`'s chunk when `z` keeps one row per chunk as plain little-endian bytes in a
    local store (what `create_hidden` makes), else None (then zarr writes it)."""
    from zarr.codecs import BytesCodec
    from zarr.storage import LocalStore

    md = z.metadata
    codecs = getattr(md, "codecs", ())
    if not isinstance(z.store, LocalStore) or len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return None
    if tuple(z.chunks) != (1, *z.shape[1:]) or (codecs[0].endian is not None and codecs[0].endian.value != "little"):
        return None
    return Path(z.store.root) / z.path / md.encode_chunk_key((row, 0, 0))


def _write_chunk(path: Path, row: np.ndarray, nbytes: int) -> None:
    """One chunk file: the row's bytes, zero-filled to `nbytes`, under a temporary name then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    with open(tmp, "wb") as f:
        f.write(memoryview(row).cast("B"))
        if f.tell() < nbytes:
            f.truncate(nbytes)
    os.replace(tmp, path)
