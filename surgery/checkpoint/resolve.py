"""Turn MODEL (a local directory or a hub id) into a local directory, never touching the network
unless the user allows it: a hub id is looked up in the local Hugging Face cache first."""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError


def resolve_model(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SurgeryError("not a directory (give the checkpoint's directory)", path)
    looks_like_repo = model.count("/") == 1 and not model.startswith((".", "/"))
    if not looks_like_repo:
        raise SurgeryError("no such directory", path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.py", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
    try:
        return Path(snapshot_download(model, local_files_only=True, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise SurgeryError(
                "not a local directory and not in the local Hugging Face cache (offline; run "
                f"`huggingface-cli download {model}` where there is network)", model) from None
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise SurgeryError(f"cannot resolve hub id: {exc}", model) from None
    try:
        return Path(snapshot_download(model, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise SurgeryError(f"cannot download: {exc}", model) from None
