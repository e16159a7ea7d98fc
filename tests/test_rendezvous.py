"""Rendezvous from SLURM's variables, and the peer watch that ends a job whose rank went
silent (dinospec.distributed, dinospec.heartbeat), on this machine: the two-node versions
run against the test cluster in test_multinode_cluster.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dinospec import distributed
from dinospec.heartbeat import EXIT_CODE, peer_timeout
from launch.local import free_port

SLURM_TASK = {
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "gpu[003-005,010],cpu1",
    "SLURM_JOB_NUM_NODES": "5",
    "SLURM_NTASKS": "40",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
}

RANK_SCRIPT = """
import os, signal, sys, time
import torch, torch.distributed as dist
from dinospec.distributed import init_distributed
init_distributed("cpu")
if dist.get_rank() == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # silent from here on: no beat, no closed socket
dist.all_reduce(torch.ones(1))
"""


def test_rendezvous_comes_from_the_expanded_node_list(monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    env = distributed._env_from_slurm()
    assert env == {
        "RANK": "9",
        "WORLD_SIZE": "40",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }


def test_an_exported_master_address_and_port_win(monkeypatch):
    for name, value in {**SLURM_TASK, "MASTER_ADDR": "ib-gpu003", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    env = distributed._env_from_slurm()
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("ib-gpu003", "29500")


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, None),
        ({"SLURM_PROCID": "0"}, 300.0),
        ({"SLURM_PROCID": "0", "DINOSPEC_PEER_TIMEOUT": "0"}, None),
        ({"DINOSPEC_PEER_TIMEOUT": "12.5"}, 12.5),
    ],
)
def test_peer_timeout_is_on_under_slurm_or_when_set(monkeypatch, variables, expected):
    for name in ("SLURM_PROCID", "DINOSPEC_PEER_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert peer_timeout() == expected


def _start_rank(rank: int, port: int, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"rank{rank}.err"
    env = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_RANK": str(rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DINOSPEC_PEER_TIMEOUT": "3",
    }
    script = textwrap.dedent(RANK_SCRIPT)
    with log.open("w") as err:
        process = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=err)
    return process, log


def test_a_silent_rank_is_named_and_its_peer_exits_instead_of_hanging(tmp_path):
    """Rank 1 stops (SIGSTOP: its connections stay open and say nothing) before an
    all-reduce; rank 0 would wait there for gloo's 30 minutes, and instead exits with the
    rank named."""
    port = free_port()
    ranks = [_start_rank(rank, port, tmp_path) for rank in (0, 1)]
    try:
        status = ranks[0][0].wait(timeout=120)
    finally:
        for process, _ in ranks:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    message = ranks[0][1].read_text()
    assert status == EXIT_CODE, message
    assert "rank 1 (host " in message and "stopped answering: no heartbeat for" in message
