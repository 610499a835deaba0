"""One run per run directory: `<run.dir>/.lock`, an OS file lock (fcntl.flock) on a descriptor kept open for the life
of the process, so the OS releases it when the process ends however it ends (SIGKILL included); the file holds the
holder's pid, host and start time for the message. A run in a directory another run holds, or in a directory inside
one (a pipeline's stage directory), is a RunDirInUse error (exit 2) naming the holder's pid.

Re-entrant within a process: the pipeline holds its run.dir while its sub-stages take the directories inside it.
Under torchrun global rank 0 takes the lock and broadcasts the verdict, so every rank refuses together. flock is
per host on some network filesystems (NFS): two hosts sharing a run.dir there are not kept apart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from nova_rt.distributed import broadcast_object
from nova_rt.errors import UserError

LOCK_NAME = ".lock"
_held: dict[Path, int] = {}
"""Resolved run directory -> the descriptor that holds its lock in this process (open until the process ends)."""


class RunDirInUse(UserError):
    """Another process holds the run directory (or a run directory it lies inside)."""


def hold(run_dir: str | Path, is_main: bool | None = None) -> None:
    """Take run_dir's lock for the rest of this process (creating run_dir), or raise RunDirInUse naming the holder.
    Collective under torchrun: rank 0 (is_main; default: RANK is 0) locks, every rank learns the verdict."""
    if is_main is None:
        is_main = os.environ.get("RANK", "0") == "0"
    verdict = broadcast_object(_acquire(Path(run_dir)) if is_main else None)
    if verdict:
        raise RunDirInUse(verdict)


def held(run_dir: str | Path) -> bool:
    """Whether this process holds run_dir's lock."""
    return Path(run_dir).resolve() in _held


def release(run_dir: str | Path) -> None:
    """Give up this process's lock of run_dir (a no-op when it holds none); the process's end does the same."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock


def _acquire(run_dir: Path) -> str | None:
    """None once this process holds run_dir's lock, else why it cannot (the message)."""
    directory = run_dir.resolve()
    if directory in _held:
        return None
    for parent in directory.parents:
        holder = None if parent in _held else _probe(parent / LOCK_NAME)
        if holder:
            return (f"run.dir {run_dir} lies inside {parent}, the run directory of a running run ({holder}); wait "
                    "for it to end or choose a run.dir outside it")
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        return (f"run.dir {run_dir} is in use by another run ({holder}); wait for it to end (or stop it), or "
                "choose another run.dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n", 0)
    _held[directory] = fd
    return None


def _probe(lock: Path) -> str | None:
    """The holder of `lock` when another process holds it, else None (the lock is not kept)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:  # no lock file (or unreadable): no run holds that directory
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)
    return None


def _holder(fd: int) -> str:
    """`pid N on host H since T` from a lock file's contents ("pid unknown" while the holder is still writing it)."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {info['host']} since {info['since']}"
    return "pid unknown: its lock file is being written"
