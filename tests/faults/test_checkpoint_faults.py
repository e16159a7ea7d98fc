"""Faults and attacks at the training checkpoints: crafted files, corrupt checkpoints,
diverged weights, a full disk, interrupted exports. Each test reproduces the fault on a
real tiny run and checks what the run does about it."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from train_helpers import run_cli

from dinospec.train.checkpoint import MARKER, list_checkpoints


class _Payload:
    """Unpickling this creates a marker file: the proof that a checkpoint ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _rewrite_manifest(checkpoint: Path) -> None:
    """What an attacker who can write the checkpoint can also do: make the sha256 manifest
    agree with the altered files."""
    import hashlib

    manifest = json.loads((checkpoint / MARKER).read_text())
    manifest["files"] = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(checkpoint.iterdir())
        if p.name != MARKER
    }
    (checkpoint / MARKER).write_text(json.dumps(manifest))


def _plant_bytes_entry(checkpoint: Path, marker: Path, key: str = "progress.skipped") -> None:
    """Turn one entry of a real checkpoint into a DCP bytes entry that holds a pickle."""
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    (checkpoint / "evil.distcp").write_bytes(buffer.getvalue())
    metadata = pickle.loads((checkpoint / ".metadata").read_bytes())
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != key}
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo(
        "evil.distcp", 0, len(buffer.getvalue())
    )
    (checkpoint / ".metadata").write_bytes(pickle.dumps(metadata))
    _rewrite_manifest(checkpoint)


def test_crafted_bytes_entry_runs_no_code_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = run_cli(run_dir, "train.max_iterations=2")
    assert first.returncode == 0, first.stderr
    marker = tmp_path / "code_ran"
    _plant_bytes_entry(list_checkpoints(run_dir / "checkpoints")[-1], marker)
    resumed = run_cli(run_dir, "train.max_iterations=4")
    assert not marker.exists()
    assert resumed.returncode != 0
    assert "resumed" not in resumed.stdout
    assert "BytesStorageMetadata" in resumed.stderr
    assert "Traceback" not in resumed.stderr
