"""Ranks that stop answering end the job, named, instead of hanging it.

A rank whose node dies (or whose link goes) sends nothing more: its peers would wait in
their next collective for gloo's or NCCL's timeout (30 and 10 minutes by default), and
the message they then print does not say which rank was lost. So every rank of a
multi-process job beats in the rendezvous store from a thread of its own, on its own
connection, and watches the next rank's beat (a ring: two store operations per rank and
period, however many ranks). A watched rank whose beat has not moved for the peer
timeout, or a store that has not answered for as long (rank 0 hosts it), makes the
watcher print which rank stopped answering, and on which host, and exit: under SLURM,
`--kill-on-bad-exit` then ends the other tasks, and the job resumes from its newest
checkpoint when it is requeued or submitted again.

The beat comes from a thread, so a rank busy in a long step still answers; what is
detected is a process, node or link that is gone, not a slow one.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

TIMEOUT_VARIABLE = "DINOSPEC_PEER_TIMEOUT"
"""Seconds without a beat before a rank counts as gone; 0 turns the watch off."""
SLURM_TIMEOUT_S = 300.0
"""The default under SLURM, where ranks run on several nodes."""
EXIT_CODE = 75
PREFIX = "dinospec-heartbeat/"


def peer_timeout() -> float | None:
    """The configured peer timeout in seconds: the variable's value, else the SLURM
    default in a SLURM task; None (no watch) when it is 0 or outside SLURM, where every
    rank runs on this machine and a dead one closes its connections at once."""
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is not None:
        seconds = float(value)
        return seconds if seconds > 0 else None
    return SLURM_TIMEOUT_S if "SLURM_PROCID" in os.environ else None


class Heartbeat:
    """This rank's beat and its watch of the next rank, in a daemon thread."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: float) -> None:
        self.store = store
        self.rank = rank
        self.peer = (rank + 1) % world_size
        self.timeout = timeout
        self.period = timeout / 10
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dinospec-heartbeat", daemon=True)

    def start(self) -> None:
        self.store.set(f"host/{self.rank}", socket.gethostname())
        self.store.add(f"beat/{self.rank}", 1)
        self.thread.start()

    def stop(self) -> None:
        """At a normal exit: the watcher of this rank stops watching it, and the thread
        ends before the interpreter does (a daemon thread inside a store call at
        shutdown could take the process down)."""
        self.done.set()
        self.thread.join(timeout=self.period + 5)
        if self.thread.is_alive():
            return  # stuck in a call to a store that no longer answers: do not wait again
        with contextlib.suppress(RuntimeError):
            self.store.set(f"done/{self.rank}", "1")

    def _run(self) -> None:
        seen, moved, answered = 0, time.monotonic(), time.monotonic()
        while not self.done.wait(self.period):
            now = time.monotonic()
            try:
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.check(["done/0"]):
                    return  # rank 0 is leaving, and its store with it
                peer_done = self.store.check([f"done/{self.peer}"])
                beat = self.store.add(f"beat/{self.peer}", 0)
            except RuntimeError:
                if now - answered > self.timeout:
                    self._give_up(
                        0,
                        f"the rendezvous store it hosts has not answered for "
                        f"{now - answered:.0f} s",
                    )
                continue
            answered = now
            if beat != seen or peer_done:
                seen, moved = beat, now
            elif now - moved > self.timeout:
                self._give_up(self.peer, f"no heartbeat for {now - moved:.0f} s")

    def _give_up(self, lost: int, why: str) -> None:
        """Name the lost rank and end this process (not only this thread: the main thread
        may be waiting in a collective that will never complete)."""
        print(
            f"dinospec: rank {lost} (host {self._host(lost)}) stopped answering: {why} "
            f"(peer timeout {self.timeout:.0f} s, {TIMEOUT_VARIABLE}); rank {self.rank} "
            "ends the job, which resumes from its newest checkpoint when requeued or "
            "submitted again",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_CODE)

    def _host(self, rank: int) -> str:
        """Rank 0's host is the rendezvous address; the others wrote theirs at start."""
        if rank == 0:
            return os.environ.get("MASTER_ADDR", "unknown")
        try:
            known = self.store.check([f"host/{rank}"])
            return self.store.get(f"host/{rank}").decode() if known else "unknown"
        except RuntimeError:
            return "unknown"


def start_heartbeat(rank: int, world_size: int, timeout: float) -> Heartbeat:
    """Beat and watch through a client connection of its own to the rendezvous store
    (MASTER_ADDR:MASTER_PORT, where every rank joined), stopped at exit."""
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout),
    )
    heartbeat = Heartbeat(dist.PrefixStore(PREFIX, client), rank, world_size, timeout)
    heartbeat.start()
    atexit.register(heartbeat.stop)
    return heartbeat
