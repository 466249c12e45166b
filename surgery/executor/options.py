"""What a calibration run is given: its options and its tokens. Kept free of torch so that the CLI
can parse arguments and fail on bad input without importing it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from surgery.errors import SurgeryError

DEFAULT_ROWS = 8  # rows per batch when the batch size is automatic and the device is the CPU


def parse_batch_size(text: str | int | None) -> int | None:
    """`--batch-size`: a row count, or `auto` (None: sized by the memory budget on CUDA, `DEFAULT_ROWS`
    rows on the CPU)."""
    if text is None or str(text).strip().lower() == "auto":
        return None
    try:
        rows = int(str(text).strip())
    except ValueError:
        raise SurgeryError(f"--batch-size must be a number of rows or auto, got {text!r}") from None
    if rows < 1:
        raise SurgeryError(f"batch size must be at least 1, got {rows}")
    return rows


@dataclass
class CalibrateOptions:
    batch_size: int | None = None  # rows per batch; None = automatic (see `parse_batch_size`)
    batch_tokens: int | None = None  # token budget per batch instead of a fixed row count
    device: str = "auto"
    dtype: str = "auto"
    routing: str = "model"
    keep_hidden: bool = False
    progress: bool = True
    prefetch: bool = True
    cache_budget: int | None = None  # bytes of host memory for hidden states; None = auto, 0 = disk only
    checkpoint_every: int | None = None  # layers between zarr checkpoints of the memory tier; None = auto
    memory_budget: int | None = None  # bytes the process may hold; None = derived from available memory

    def __post_init__(self) -> None:
        if self.routing not in ("model", "reference"):
            raise SurgeryError(f"unknown routing {self.routing!r} (use model or reference)")
        if self.batch_size is not None and self.batch_size < 1:
            raise SurgeryError(f"batch size must be at least 1, got {self.batch_size}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise SurgeryError(f"--checkpoint-every must be at least 1, got {self.checkpoint_every}")

    def identity(self) -> dict:
        """Options that change the result (and so must match on resume): the batching decides the
        summation order (an automatic one is resolved once and kept in the manifest's `batches`).
        Prefetching, the cache tier and checkpointing do not change a bit."""
        return {"batch_size": "auto" if self.batch_size is None else self.batch_size,
                "batch_tokens": self.batch_tokens, "dtype": self.dtype, "routing": self.routing}


@dataclass
class CalibrationInputs:
    """What a calibration run is made of: tokens plus what identifies them for the manifest."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    datasets: dict[str, str]  # spec -> content hash
    settings: dict  # samples, max_length, seed, pack ...
    categories: list[dict] | None = None  # per-dataset documents/tokens (reported, not identity)
