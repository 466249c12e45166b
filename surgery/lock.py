"""One lock per directory a command writes into (WORK, OUT), so two processes never share one.

A second process on a locked directory is refused at once, in one line naming the holder (pid, host,
command line, start time), before it writes or deletes anything there. Why `flock` on a file inside
the directory: the kernel drops an flock when its holder dies, however it dies (kill -9 included), so
a lock is never left stale and a killed run resumes exactly as before; the file's text is only there
for the refusal message. Why unlink it on release: OUT is a model directory and must not keep a stray
file. Unlinking while still holding the flock, and checking after locking that the path still names
the file that was locked, keeps two processes from each locking a different file of the same name.

Re-entrant within a process: `prune` holds WORK and OUT for the whole job and its stages (calibrate,
plan, rewrite, quantize) take the same locks again; only the outermost release unlinks. Locks are
never waited for (LOCK_NB), so locks taken in any order cannot deadlock. Read-only commands take no
lock. Directories the lock had to create are removed again when it is released and they are still
empty, so a command refused for another reason leaves no trace.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from surgery.errors import SurgeryError
from surgery.faults import lock_taken

LOCK_NAME = ".surgery.lock"


@dataclass
class _Held:
    key: tuple[int, int]
    fd: int
    path: Path
    depth: int = 1
    created: list[Path] = field(default_factory=list)


_HELD: dict[tuple[int, int], _Held] = {}
_GUARD = threading.Lock()


@contextmanager
def directory_lock(directory: str | Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold DIRECTORY's lock (creating the directory if needed) for the duration of the block, or raise
    a one-line `SurgeryError` naming the process that holds it. `enabled=False` (ranks other than 0 of
    a distributed job, whose rank 0 holds it for them) makes it a no-op."""
    if not enabled:
        yield
        return
    held = _acquire(Path(os.path.abspath(directory)))
    try:
        yield
    finally:
        _release(held)


def _acquire(directory: Path) -> _Held:
    for _ in range(100):
        created = _make_dirs(directory)
        with _GUARD:
            try:
                key = _key(directory)
            except FileNotFoundError:  # a releasing process removed the (empty) directory it had created
                continue
            held = _HELD.get(key)
            if held is not None:
                held.depth += 1
                return held
            try:
                held = _take(directory, key)
            except BaseException:
                _remove_created(created)
                raise
            if held is None:
                continue
            held.created = created
            _HELD[key] = held
            return held
    raise SurgeryError(f"could not take the lock {LOCK_NAME}: it kept being replaced", directory)


def _take(directory: Path, key: tuple[int, int]) -> _Held | None:
    """The lock, or None when the file or directory was replaced meanwhile (the caller tries again)."""
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SurgeryError(f"cannot create the lock file {LOCK_NAME} ({exc.strerror}); surgery writes "
                           "into this directory", directory) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _describe(fd)
        os.close(fd)
        raise SurgeryError(f"another surgery process is writing into this directory ({holder}); wait for it "
                           "to finish, or stop it and run again to resume", directory) from None
    if not _same_file(fd, path):  # its holder released (unlinked) it between our open and flock
        os.close(fd)
        return None
    _write_holder(fd)
    lock_taken()  # a test hook (surgery.faults); nothing when unset
    return _Held(key, fd, path)


def _release(held: _Held) -> None:
    with _GUARD:
        held.depth -= 1
        if held.depth:
            return
        del _HELD[held.key]
        try:
            if _same_file(held.fd, held.path):
                os.unlink(held.path)
        except OSError:
            pass
        os.close(held.fd)
        _remove_created(held.created)


def _key(directory: Path) -> tuple[int, int]:
    st = os.stat(directory)
    return st.st_dev, st.st_ino


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _make_dirs(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories this call created (outermost first)."""
    missing = []
    p = directory
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise SurgeryError("exists and is not a directory", p)
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:
            if not d.is_dir():
                raise SurgeryError("exists and is not a directory", d) from None
        except OSError as exc:
            _remove_created(created)
            raise SurgeryError(f"cannot create the directory ({exc.strerror})", d) from None
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _write_holder(fd: int) -> None:
    command = shlex.join(["surgery", *sys.argv[1:]]) if sys.argv else "surgery"
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode() + b"\n", 0)


def _describe(fd: int) -> str:
    """The holder as one line. Its text may be a moment late (written just after the flock): until then the
    file is empty, or still names the previous holder, dead (its lock was taken over after a kill -9)."""
    info = None
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace"))
        except ValueError:
            info = None
        if isinstance(info, dict) and not _dead_here(info):
            break
        time.sleep(0.05)
    if not isinstance(info, dict):
        return "holder unknown"
    command = " ".join(str(info.get("command", "?")).split())
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}: {command}"


def _dead_here(info: dict) -> bool:
    """Whether a holder's text names a process of this host that no longer runs."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False
