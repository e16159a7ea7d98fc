"""The error every backbone reader raises, so that commands report it in one line."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A weight file that cannot be read or does not fit the model; says which and why."""
