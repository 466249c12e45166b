"""The packed tensors of one GPTQ layer, written to `WORK/layer_NNNN.safetensors` by a background thread.

The quantization of a chunk of experts runs on the compute device; its packed bytes (`qweight`,
`scales`; `qzeros` is a constant) are copied to the host and handed to this writer, which streams
them into the layer file in header order while the next chunk is computed. The queue is bounded (a
producer that gets ahead waits: at most `DEPTH` chunks of packed bytes are held), a write error is
raised to the producer at its next `put` or at `close`, and `close` returns only once the file is
complete, fsynced and renamed into place, because the engine commits the layer's boundary right after.

On CUDA the host copies are asynchronous (pinned memory): each item carries an event that the
writer thread waits for before it reads the bytes, so the compute thread never waits for them.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch

from surgery.checkpoint.writer import SafetensorsWriter, TensorEntry

DEPTH = 2  # chunks of packed bytes queued ahead of the writer


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of `t` for the writer: asynchronous (pinned) from a CUDA device, `t` itself on a CPU."""
    if t.device.type == "cpu":
        return t
    return t.to("cpu", non_blocking=True)


def host_ready(device: torch.device) -> object | None:
    """An event recorded after the host copies queued so far on `device` (None on a CPU)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class LayerWriter:
    """`SafetensorsWriter` for one layer file, fed through a bounded queue by the compute thread."""

    def __init__(self, path: Path, entries: list[TensorEntry]) -> None:
        self._writer = SafetensorsWriter(path, entries, fsync=True)
        self._queue: queue.Queue = queue.Queue(maxsize=DEPTH)
        self._error: BaseException | None = None
        self._aborted = False
        self._writer.open()
        self._thread = threading.Thread(target=self._run, name="surgery-gptq-writer", daemon=True)
        self._thread.start()

    def put(self, tensors: list[tuple[str, torch.Tensor]], ready: object | None = None) -> None:
        """Queue named host tensors (in header order) whose bytes are valid once `ready` (an event) is."""
        self._raise()
        self._queue.put((tensors, ready))

    def close(self) -> None:
        """Wait for every queued tensor, then finish, fsync and rename the file; re-raise a write error."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            self._writer.abort()
            raise self._error
        self._writer.close()

    def abort(self) -> None:
        """Stop the thread and drop the partial file (errors and interruptions)."""
        self._aborted = True
        self._drain()
        self._queue.put(None)
        self._thread.join()
        self._writer.abort()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _run(self) -> None:
        from surgery.quant.run import tensor_bytes

        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._aborted:
                continue  # keep consuming so the producer never blocks; the error is raised there
            tensors, ready = item
            try:
                if ready is not None:
                    ready.synchronize()
                for name, t in tensors:
                    self._writer.write(name, tensor_bytes(t))
            except BaseException as exc:  # noqa: BLE001 - re-raised on the compute thread
                self._error = exc
