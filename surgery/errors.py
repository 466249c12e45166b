"""The one exception type users see.

Every problem with the user's input (a checkpoint, a plan, a dataset, a work directory) is raised as
`SurgeryError`; the CLI prints it as a single line and exits non-zero, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path


class SurgeryError(Exception):
    """A user-facing error: one line, naming the file and the problem."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)
