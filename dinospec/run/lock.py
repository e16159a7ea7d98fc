"""One writer per run directory: an exclusive lock on `<run>/.lock`, held for the run's life.

Two runs started into one directory would interleave their metrics.jsonl lines and
overwrite each other's config and checkpoints. The lock is an flock(2): the kernel drops it
when its holder exits, however it exits (kill -9 included), so a dead run never blocks the
next one. The file names the holder (host, pid, start time) for the message the next run
prints; only the flock decides.

A launcher that takes the lock for the processes it starts (`launch.local`) stands for the
run: a trainer finding the lock held by its own process or by its parent, on this host,
goes ahead. Across ranks, rank 0 takes the lock and every rank learns the outcome from one
all-reduce, so the others stop too instead of waiting in the next collective.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

import torch
import torch.distributed as dist

from dinospec.distributed import host_group
from dinospec.run.layout import RunDir

log = logging.getLogger(__name__)

_HELD: set[int] = set()
"""Descriptors of the locks this process holds. Forked children (data-loader workers)
close their copies, so the lock goes with the process that took it, not with the last
orphaned worker."""


def _close_inherited() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


class RunDirLocked(RuntimeError):
    """Another live process writes into the run directory; the message names it."""


class RunLock:
    """The lock on one run directory; `release()` (or leaving the `with` block) drops it.
    `fd` is None when a launcher above this process holds it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _holder_record() -> str:
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": since}) + "\n"


def _read_holder(path: Path) -> dict:
    """The holder's record; it may be a moment late (written just after the flock)."""
    for _ in range(20):
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            time.sleep(0.05)
    return {}


def locked_message(run_dir: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f", since {holder['since']}" if "since" in holder else ""
    return (
        f"{run_dir} is in use by another run ({who}{since}); two runs must not write into "
        "one directory: wait for it to end, stop it, or choose another output directory"
    )


def _is_ours(holder: dict) -> bool:
    """Held by this process or by the launcher that started it."""
    return holder.get("host") == socket.gethostname() and holder.get("pid") in (
        os.getpid(),
        os.getppid(),
    )


def lock_run_dir(run_dir: Path) -> RunLock:
    """Take the run directory's lock (creating the directory), or raise RunDirLocked naming
    the holder. A file system without flock support is reported and not locked."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(run_dir).lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        holder = _read_holder(path)
        if _is_ours(holder):
            return RunLock(path, None)
        raise RunDirLocked(locked_message(run_dir, holder)) from None
    except OSError as err:
        os.close(fd)
        log.warning("%s: cannot lock (%s); nothing stops a second run in this directory", path, err)
        return RunLock(path, None)
    os.ftruncate(fd, 0)
    os.write(fd, _holder_record().encode())
    _HELD.add(fd)
    return RunLock(path, fd)


def holder(run_dir: Path) -> dict | None:
    """Who holds the run directory's lock now (None if nobody), without taking it."""
    path = RunDir(run_dir).lock
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


def lock_for_ranks(run_dir: Path) -> RunLock:
    """`lock_run_dir` on rank 0, its outcome shared with every rank: all of them raise
    RunDirLocked when rank 0 could not take the lock. The other ranks' locks hold nothing
    (rank 0's is the run's)."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    lock, refused = None, None
    if not distributed or dist.get_rank() == 0:
        try:
            lock = lock_run_dir(run_dir)
        except RunDirLocked as err:
            refused = err
    if distributed:
        flag = torch.tensor([refused is not None], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host_group())
        if flag.item() and refused is None:
            refused = RunDirLocked(f"{run_dir} is in use by another run (rank 0 found it locked)")
    if refused is not None:
        raise refused
    return lock if lock is not None else RunLock(RunDir(run_dir).lock, None)
