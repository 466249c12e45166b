"""Atomic JSON files: every manifest, statistics file and plan is written to a temporary name,
fsynced and renamed, so a killed run leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from surgery.errors import SurgeryError


def write_json_atomic(path: str | Path, obj: object, indent: int | None = 1) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy_atomic(path: str | Path, array) -> None:
    """An .npy file written under a temporary name, fsynced and renamed (never seen half-written)."""
    import numpy as np

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: str | Path, what: str = "file") -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SurgeryError(f"{what} not found", path) from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise SurgeryError(f"{what} does not parse: {exc}", path) from None
