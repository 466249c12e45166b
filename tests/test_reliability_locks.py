"""The directory lock (surgery/lock.py): every writing command refuses a directory another process holds, in
one line naming it, before writing or deleting anything there; read-only commands never block; a lock
left by a killed process is taken over; the lock is re-entrant within a process and mutually exclusive
between processes even while holders come and go (the lock file is unlinked on release)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import pytest

from surgery.errors import SurgeryError
from surgery.lock import LOCK_NAME, directory_lock
from tests.reliability import DATA, REPO, env

HOLD = ("import sys, time\nfrom surgery.lock import directory_lock\n"
        "with directory_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)")


@contextmanager
def held(directory: Path):
    """Another process holding DIRECTORY's lock; yields its pid; killed (-9) at the end."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def state(directory: Path) -> dict:
    """Everything a process could change in a directory: its own mtime, every entry's mtime and size."""
    out = {".": directory.stat().st_mtime_ns}
    for p in sorted(directory.rglob("*")):
        st = p.stat()
        out[p.relative_to(directory).as_posix()] = (st.st_mtime_ns, st.st_size)
    return out


def cli(capsys, *args) -> tuple[int, str]:
    """`surgery ARGS` in this process (cheap: no interpreter start); returns (exit code, stderr)."""
    from surgery.cli import main

    capsys.readouterr()
    with mock.patch.object(sys, "argv", ["surgery", *map(str, args)]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
    return code, capsys.readouterr().err


# ---------------------------------------------------------------- the lock itself
def test_reentrant_in_a_process_and_gone_when_released(tmp_path):
    d = tmp_path / "a" / "b"
    with directory_lock(d):
        assert (d / LOCK_NAME).is_file()
        with directory_lock(tmp_path / "a" / ".." / "a" / "b"), directory_lock(d):
            assert (d / LOCK_NAME).is_file()
        assert (d / LOCK_NAME).is_file()  # only the outermost release unlinks
        (d / "result").write_text("x")
    assert sorted(p.name for p in d.iterdir()) == ["result"]
    with directory_lock(tmp_path / "new" / "deep"):
        pass
    assert not (tmp_path / "new").exists()  # directories it created and left empty are removed
    with directory_lock(tmp_path / "off", enabled=False):
        assert not (tmp_path / "off").exists()


def test_held_elsewhere_is_refused_in_one_line_then_taken_over_after_kill_9(tmp_path):
    d = tmp_path / "work"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(SurgeryError) as info:
        with directory_lock(d):
            pass
    text = str(info.value)
    assert "\n" not in text and str(d) in text and f"(pid {proc.pid} on " in text and " since " in text
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert f'"pid": {proc.pid}' in (d / LOCK_NAME).read_text()  # left behind, naming a dead process
    with directory_lock(d):
        assert f'"pid": {os.getpid()}' in (d / LOCK_NAME).read_text()
    assert not (d / LOCK_NAME).exists()


def test_refused_without_creating_anything(tmp_path):
    d = tmp_path / "work"
    with held(d):
        with pytest.raises(SurgeryError):
            with directory_lock(d / "sub" / ".."):
                pass
        assert sorted(p.name for p in d.iterdir()) == [LOCK_NAME]
    link = tmp_path / "linked"
    link.mkdir()
    (link / LOCK_NAME).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SurgeryError, match="cannot create the lock file"):
        with directory_lock(link):
            pass
    assert not (tmp_path / "elsewhere").exists()


RACER = """
import os, sys, time
from surgery.errors import SurgeryError
from surgery.lock import directory_lock
d, log, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = 0
while done < rounds:
    try:
        with directory_lock(d):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\\n")
            time.sleep(0.002)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\\n")
        done += 1
    except SurgeryError:
        time.sleep(0.001)
"""


def test_mutually_exclusive_while_holders_come_and_go(tmp_path):
    """Six processes take and release one directory's lock 15 times each: the lock file is unlinked and
    created again every time, and no two holders ever overlap."""
    d, log = tmp_path / "shared", tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(d), str(log), "15"], cwd=REPO, env=env())
             for _ in range(6)]
    assert [p.wait(timeout=300) for p in procs] == [0] * 6
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 6 * 15 * 2
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        assert enter.startswith("in ") and leave == "out " + enter[3:], (enter, leave)
    assert not d.exists() or list(d.iterdir()) == []  # no lock file left behind


# ---------------------------------------------------------------- every writing command
@pytest.fixture(scope="module")
def finished(reliability_model, tmp_path_factory):
    """A random plan and the finished rewrite it makes (written in this process: no CLI start)."""
    from surgery.arch.model import MoEModel
    from surgery.checkpoint.reader import Checkpoint
    from surgery.plan import make_plan, save_plan
    from surgery.rewrite import rewrite_checkpoint

    root = tmp_path_factory.mktemp("locks")
    with Checkpoint(reliability_model) as ckpt:
        plan = make_plan({}, MoEModel(ckpt), "random", 0.5, seed=1)
    save_plan(plan, root / "plan.json")
    rewrite_checkpoint(reliability_model, plan, root / "pruned", progress=False)
    return root / "plan.json", root / "pruned"


def writing_commands(model: Path, plan: Path, r: Path) -> dict[str, tuple[list, Path]]:
    """Each writing command, and the directory the test holds while it runs."""
    return {
        "calibrate": (["calibrate", model, *DATA, "--work", r / "work"], r / "work"),
        "plan": (["plan", r / "work", "--method", "random", "--ratio", "0.5", "--model", model], r / "work"),
        "plan --out": (["plan", r / "work", "--method", "random", "--ratio", "0.5", "--model", model, "--out",
                        r / "plans" / "p.json"], r / "plans"),
        "rewrite": (["rewrite", model, plan, "--out", r / "out"], r / "out"),
        "prune OUT": (["prune", model, "--out", r / "out", *DATA], r / "out"),
        "prune WORK": (["prune", model, "--out", r / "out", *DATA], r / "out.work"),
        "prune merge": (["prune", model, "--out", r / "out", *DATA, "--method", "merge"], r / "out.work"),
        "quantize": (["quantize", model, "--out", r / "out", "--group-size", "32"], r / "out"),
        "quantize gptq WORK": (["quantize", model, "--out", r / "out", "--method", "gptq", "--group-size", "32",
                                *DATA], r / "out.quant-work"),
        "eval": (["eval", model, "--work", r / "work", "--dataset", DATA[1]], r / "work"),
        "fidelity": (["fidelity", r / "work"], r / "work"),
        "report": (["report", r / "work"], r / "work"),
        "demo": (["demo", "--out", r / "demo"], r / "demo"),
    }


@pytest.mark.parametrize("name", list(writing_commands(Path(), Path(), Path())))
def test_every_writing_command_refuses_a_held_directory(capsys, reliability_model, finished, tmp_path, name):
    args, target = writing_commands(reliability_model, finished[0], tmp_path)[name]
    target.mkdir(parents=True, exist_ok=True)
    (target / "earlier-result.json").write_text("{}")
    with held(target) as pid:
        before = state(target)
        quiet = [] if name in ("plan", "plan --out", "report") else ["--no-progress"]
        code, err = cli(capsys, *args, *quiet)
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("surgery: error:"), err
        assert f"another surgery process is writing into this directory (pid {pid} on " in lines[0], lines[0]
        assert state(target) == before, "the refused command changed the held directory"
    others = [p for p in tmp_path.iterdir() if p != target]
    assert others == [], f"the refused command left {others}"


def test_read_only_commands_never_block(capsys, reliability_model, finished, tmp_path):
    plan, pruned = finished
    work = tmp_path / "work"
    with held(pruned), held(reliability_model), held(work):
        assert cli(capsys, "verify", pruned)[0] == 0
        assert cli(capsys, "inspect", reliability_model)[0] == 0
        assert cli(capsys, "data", "preview", REPO / "tests" / "data" / "chat.jsonl", "--model", reliability_model,
                   "--samples", "2")[0] == 0
        code, err = cli(capsys, "plan", work, "--method", "random", "--ratio", "0.5", "--model", reliability_model,
                        "--dry-run")
        assert code == 0, err
        assert not (work / "plan.json").exists()


def test_refusal_names_the_new_holder_not_the_dead_one_it_took_over_from(tmp_path):
    """After a kill -9 the lock file still names the dead holder until its successor, holding the flock,
    writes its own name: a process refused in that moment waits for the successor's name."""
    import fcntl
    import json
    import socket
    import threading

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "surgery old",
                                "since": "then"}) + "\n")
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the successor holds the lock, its name not yet written

    def successor_writes_its_name() -> None:  # as surgery.lock._write_holder does
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "surgery new",
                                   "since": "now"}) + "\n").encode(), 0)

    timer = threading.Timer(0.2, successor_writes_its_name)
    timer.start()
    try:
        with pytest.raises(SurgeryError) as refused, directory_lock(tmp_path):
            pass
    finally:
        timer.join()
        os.close(fd)
    assert f"pid {os.getpid()} on " in str(refused.value) and "surgery new" in str(refused.value)
