"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

Layout: `<run>/checkpoints/iter_XXXXXXXX/` holds DCP shards plus `COMPLETE.json` (sizes and
sha256 of every file), written last: a directory without it, or whose files no longer
match it, is not a checkpoint. Each is written under a temporary name and renamed, so a job
killed mid-write leaves no half checkpoint behind under a valid name.

Only tensors go into a checkpoint, and nothing in one is ever unpickled beyond DCP's own
metadata classes (dinospec.train.checkpoint_reader). The sha256 manifest guards against
truncation and bit rot, not against an attacker, who can rewrite it together with the
files.

What a run can rely on: it resumes from the newest checkpoint that verifies; it never
starts over silently when checkpoints exist but none verifies; an invalid checkpoint is
moved aside (to `checkpoints/invalid/`) rather than kept in place of a valid one; a state
holding non-finite values is never saved; a full disk is named as such (the last two
in dinospec.train.checkpoint_guards).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata

from dinospec.models.checkpoints import CheckpointError
from dinospec.nested import flatten
from dinospec.run.layout import CHECKPOINT_PREFIX
from dinospec.train.checkpoint_guards import (
    NonFiniteState,
    NoSpaceLeft,
    all_ranks,
    ensure_space,
    is_out_of_space,
    nonfinite_entries,
)
from dinospec.train.checkpoint_reader import (
    CheckpointCorrupt,
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
)

log = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
TMP_PREFIX = f".tmp_{CHECKPOINT_PREFIX}"
INVALID_DIR = "invalid"
DIVERGED_DIR = "diverged"


class CheckpointMismatch(CheckpointError):
    """A valid checkpoint whose tensors do not fit the run's model: the config changed."""


class NoValidCheckpoint(CheckpointError):
    """Checkpoints exist but none verifies; starting over would throw the run away."""


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def file_digest(path: Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (checkpoint shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
        for p in sorted(directory.iterdir())
        if p.name != MARKER
    }


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns at every save and load of a process without a process group that it
    assumes a single process: that is what such a run is, so the warning tells the user
    nothing. Silenced here, around the calls, not for the whole program."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled", category=UserWarning
        )
        yield


def save_checkpoint(root: Path, iteration: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write `state` (nested dicts of tensors / DTensors) as checkpoint `iteration`, after
    checking that it is finite and fits on disk; older ones are pruned only once the new
    one is verified."""
    bad = nonfinite_entries(state)
    if not all_ranks(not bad):
        newest = list_checkpoints(root)
        raise NonFiniteState(
            f"refusing to save iteration {iteration}: non-finite values in "
            f"{bad[:8] or 'another rank'}; the training diverged. Newest checkpoint, written "
            f"before it: {newest[-1] if newest else 'none'}"
        )
    final = root / f"{CHECKPOINT_PREFIX}{iteration:08d}"
    tmp = root / f"{TMP_PREFIX}{iteration:08d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    needed = ensure_space(root, state)
    if _is_main():
        tmp.mkdir()
    _barrier()
    try:
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp))
        _barrier()
        if _is_main():
            manifest = {"iteration": iteration, "files": _manifest(tmp)}
            (tmp / MARKER).write_text(json.dumps(manifest, indent=1))
    except (Exception, CheckpointException) as err:
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        if is_out_of_space(err):
            raise NoSpaceLeft(
                f"no space left on device while writing {final} "
                f"(need ~{needed / 2**20:.1f} MB); the partial "
                "checkpoint was removed, the run resumes from its newest checkpoint"
            ) from err
        raise
    if _is_main():
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        verify_checkpoint(final)
        _prune(root, final, keep_last)
    _barrier()
    return final


def _prune(root: Path, newest: Path, keep_last: int) -> None:
    """Keep `newest` and the checkpoints just older than it whose files still have their
    recorded sizes (a cheap check; `newest` itself was verified in full)."""
    order = checkpoint_iteration(newest)
    older = [p for p in list_checkpoints(root) if checkpoint_iteration(p) < order]
    kept = 1
    for path in reversed(older):
        if kept < keep_last and _sizes_match(path):
            kept += 1
            continue
        if kept < keep_last:
            _move_aside(root, path, "files no longer have their recorded sizes")
        else:
            shutil.rmtree(path, ignore_errors=True)


def _sizes_match(path: Path) -> bool:
    try:
        files = json.loads((path / MARKER).read_text())["files"]
        return all((path / name).stat().st_size == entry["size"] for name, entry in files.items())
    except (OSError, ValueError, KeyError):
        return False


def checkpoint_iteration(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoints, oldest first (validity is checked on load)."""
    return sorted(
        (p for p in _iteration_dirs(root) if (p / MARKER).is_file()),
        key=checkpoint_iteration,
    )


def newest_plausible(root: Path) -> Path | None:
    """The newest checkpoint whose files have their recorded sizes: what a launcher can
    announce without reading every byte (the full check runs when the job starts)."""
    return next((p for p in reversed(list_checkpoints(root)) if _sizes_match(p)), None)


def set_aside_from(root: Path, iteration: int) -> list[Path]:
    """Move the checkpoints at `iteration` and later to `diverged/`, so a rerun resumes
    from the one before; returns where they went."""
    moved = []
    for path in list_checkpoints(root):
        if checkpoint_iteration(path) >= iteration:
            _move_aside(root, path, "holds a diverged state", DIVERGED_DIR)
            moved.append(root / DIVERGED_DIR / path.name)
    return moved


def _iteration_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [
        p
        for p in root.iterdir()
        if p.name.startswith(CHECKPOINT_PREFIX) and p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
    ]


def verify_checkpoint(path: Path) -> int:
    """The iteration of a checkpoint whose files match its manifest; raises otherwise."""
    try:
        manifest = json.loads((path / MARKER).read_text())
        expected = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointCorrupt(f"{path}: unreadable manifest {MARKER}: {err}") from err
    actual = _manifest(path)
    if actual != expected:
        changed = sorted(
            name
            for name in expected.keys() | actual.keys()
            if expected.get(name) != actual.get(name)
        )
        raise CheckpointCorrupt(f"{path}: files missing, truncated or altered: {changed}")
    return int(manifest["iteration"])


def _check_fits(path: Path, metadata: Metadata, state: dict[str, Any]) -> None:
    """Keys and shapes of the checkpoint against the run's state, all differences at once:
    a mismatch means the config changed since the checkpoint, not that it is damaged."""
    stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items()}
    wanted = {k: tuple(v.shape) for k, v in flatten(state) if isinstance(v, torch.Tensor)}
    problems = [
        (title, sorted(keys, key=_model_first)[:10], len(keys))
        for title, keys in (
            ("in the run but not in the checkpoint", wanted.keys() - stored.keys()),
            ("in the checkpoint but not in the run", stored.keys() - wanted.keys()),
            (
                "with other shapes (checkpoint vs run)",
                [
                    f"{k}: {stored[k]} vs {wanted[k]}"
                    for k in wanted.keys() & stored.keys()
                    if stored[k] != wanted[k]
                ],
            ),
        )
        if keys
    ]
    if problems:
        lines = "\n".join(f"  {n} tensors {title}: {', '.join(k)}" for title, k, n in problems)
        raise CheckpointMismatch(
            f"{path} does not fit the model this config builds; the config changed since the "
            f"checkpoint was written (model, heads or optimizer settings):\n{lines}"
        )


def _model_first(key: str) -> tuple[bool, str]:
    """Weights name a config change more plainly than their optimizer moments do."""
    return key.startswith("optimizer."), key


def load_checkpoint(path: Path, state: dict[str, Any]) -> int:
    """Load a verified checkpoint into `state` in place; returns its iteration."""
    iteration = verify_checkpoint(path)
    reader = SafeFileSystemReader(str(path))
    try:
        metadata = reader.read_metadata()
    except CheckpointCorrupt as err:
        raise CheckpointCorrupt(f"{path}: {err}") from err
    except Exception as err:
        raise CheckpointCorrupt(f"{path}: unreadable metadata: {err}") from err
    _check_fits(path, metadata, state)
    try:
        with single_process_quiet():
            dcp.load(state, storage_reader=reader, planner=TensorOnlyLoadPlanner())
    except (Exception, CheckpointException) as err:
        raise CheckpointCorrupt(f"{path}: cannot be loaded: {err}") from err
    return iteration


def _move_aside(root: Path, path: Path, reason: str, folder: str = INVALID_DIR) -> None:
    """Keep a checkpoint for inspection where neither resume nor pruning sees it."""
    target = root / folder / path.name
    target.parent.mkdir(exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(path, target)
    log.warning("moved invalid checkpoint %s to %s: %s", path, target, reason)


def _remove_partial_writes(root: Path) -> None:
    """A write killed before its rename leaves a temporary directory that only holds space."""
    for tmp in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("removed %s, left by an interrupted checkpoint write", tmp)


def resume_latest(root: Path, state: dict[str, Any], discard_invalid: bool = False) -> int | None:
    """Load the newest valid checkpoint into `state`; returns its iteration, or None when
    the run has no checkpoint yet.

    Invalid checkpoints newer than the one resumed from are moved aside. When there are
    checkpoints but none is valid, this raises `NoValidCheckpoint` listing each with its
    reason, unless `discard_invalid` asks to move them all aside and start over. A
    checkpoint that does not fit the model stops the run at once: older ones would not
    fit either, and falling back would hide a config change.
    """
    if _is_main():
        _remove_partial_writes(root)
    complete = list_checkpoints(root)
    failures = [
        (p, f"no {MARKER}: an interrupted or damaged checkpoint")
        for p in _iteration_dirs(root)
        if p not in complete
    ]
    resumed = None
    for path in reversed(complete):
        try:
            resumed = load_checkpoint(path, state)
            break
        except CheckpointCorrupt as err:
            log.warning("skipping checkpoint: %s", err)
            failures.append((path, str(err)))
    if failures and resumed is None and not discard_invalid:
        listing = "\n".join(f"  {p.name}: {reason}" for p, reason in failures)
        raise NoValidCheckpoint(
            f"{root}: none of the run's checkpoints is valid, so it cannot resume:\n{listing}\n"
            "Nothing was changed. To start this run over from iteration 0 on purpose, rerun "
            f"with train.discard_invalid_checkpoints=true (they are moved to {INVALID_DIR}/)."
        )
    _barrier()
    if _is_main():
        for path, reason in failures:
            _move_aside(root, path, reason.splitlines()[0])
    _barrier()
    if resumed is not None:
        log.info("resumed from iteration %d in %s", resumed, root)
    return resumed
