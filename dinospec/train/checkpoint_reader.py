"""Reading a DCP checkpoint so that nothing in it can run code.

Nothing in a checkpoint is ever unpickled beyond DCP's own metadata classes: the metadata
file is read with an unpickler that admits those alone (not DCP's "bytes" entries, which
hold arbitrary pickles), and tensors are loaded through a planner that refuses bytes
entries.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from dinospec.models.checkpoints import CheckpointError


class CheckpointCorrupt(CheckpointError):
    """A checkpoint directory that is incomplete, altered, crafted or unreadable."""


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


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if is_dtype or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointCorrupt(
            f"checkpoint metadata refers to {module}.{name}; refusing it (a dinospec "
            "checkpoint holds tensors only)"
        )


class SafeFileSystemReader(FileSystemReader):
    """DCP reader whose metadata load cannot execute code and admits tensor entries only."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointCorrupt(f"{path}: not DCP metadata ({type(metadata).__name__})")
        not_tensors = [
            key
            for key, entry in metadata.state_dict_metadata.items()
            if not isinstance(entry, TensorStorageMetadata)
        ]
        if not_tensors:
            raise CheckpointCorrupt(f"{path}: entries that are not tensors: {not_tensors[:8]}")
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    """The default planner unpickles bytes entries with `weights_only=False`; this one
    refuses them, so no metadata trick can reach an unpickler."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointCorrupt(
            f"entry {read_item.dest_index.fqn!r} holds pickled bytes; refusing to unpickle it"
        )
