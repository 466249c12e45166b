"""Checkpoint I/O: safetensors headers, index, tensor reads, streaming writes, fingerprints."""

from surgery.checkpoint.reader import Checkpoint, TensorInfo

__all__ = ["Checkpoint", "TensorInfo"]
