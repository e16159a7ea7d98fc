"""Nested dicts read as flat (dotted key, leaf) pairs: how DCP names a checkpoint's tensors
and how `dinospec config show` lists a config's keys."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) for every leaf of a nested dict, in insertion order."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
