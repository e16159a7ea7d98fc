"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run>/checkpoints/iter_XXXXXXXX/` holds DCP shards plus `COMPLETE.json` (sizes and
sha256 of every file), written last: a directory without it, or whose files no longer
match it, is not a checkpoint. Each is written under a temporary name and renamed, so a job
killed mid-write leaves no half checkpoint behind under a valid name.

Only tensors go into a checkpoint, and DCP's metadata file (a pickle) is read with an
unpickler that admits DCP's own metadata classes and nothing else: loading a checkpoint
can never run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
PREFIX = "iter_"
_SAFE_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "ChunkStorageMetadata",
            "BytesStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class CheckpointCorrupt(RuntimeError):
    """A checkpoint directory that is incomplete, altered or unreadable."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointCorrupt(f"checkpoint metadata refers to {module}.{name}; refusing it")


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose metadata load cannot execute arbitrary code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointCorrupt(f"{path}: not DCP metadata ({type(metadata).__name__})")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": _file_digest(p)}
        for p in sorted(directory.iterdir())
        if p.name != MARKER
    }


def save_checkpoint(root: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` (nested dicts of tensors / DTensors) as checkpoint `iteration`."""
    final = root / f"{PREFIX}{iteration:08d}"
    tmp = root / f".tmp_{PREFIX}{iteration:08d}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        manifest = {"iteration": iteration, "files": _manifest(tmp)}
        (tmp / MARKER).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints, oldest first (validity is checked on load)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def verify_checkpoint(path: Path) -> int:
    """The iteration of a checkpoint whose files match its manifest; raises otherwise."""
    try:
        manifest = json.loads((path / MARKER).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointCorrupt(f"{path}: unreadable manifest: {err}") from err
    actual = _manifest(path)
    if actual != expected:
        changed = sorted(
            name
            for name in expected.keys() | actual.keys()
            if expected.get(name) != actual.get(name)
        )
        raise CheckpointCorrupt(f"{path}: files missing, truncated or altered: {changed}")
    return int(manifest["iteration"])


def load_checkpoint(path: Path, state: dict[str, Any]) -> int:
    """Load a verified checkpoint into `state` in place; returns its iteration."""
    iteration = verify_checkpoint(path)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(path)))
    except CheckpointCorrupt:
        raise
    except Exception as err:
        raise CheckpointCorrupt(f"{path}: cannot be loaded: {err}") from err
    return iteration


def resume_latest(root: Path, state: dict[str, Any]) -> int | None:
    """Load the newest valid checkpoint; corrupt ones are reported and skipped.

    Returns the iteration it resumed at, or None when there is nothing to resume.
    """
    for path in reversed(list_checkpoints(root)):
        try:
            iteration = load_checkpoint(path, state)
        except CheckpointCorrupt as err:
            log.warning("skipping checkpoint: %s", err)
            continue
        log.info("resumed from %s (iteration %d)", path, iteration)
        return iteration
    return None
