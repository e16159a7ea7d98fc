"""Faults and attacks at the training checkpoints: crafted files, corrupt checkpoints,
diverged weights, a full disk, interrupted exports. Each test reproduces the fault on a
real tiny run and checks what the run does about it."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from train_helpers import read_metrics, run_cli, tiny_config

from dinospec.models.checkpoints import CheckpointError
from dinospec.run.exports import backbone_file
from dinospec.run.layout import RunDir
from dinospec.train.checkpoint import (
    MARKER,
    CheckpointMismatch,
    NoValidCheckpoint,
    list_checkpoints,
)
from dinospec.train.checkpoint_guards import NonFiniteState, NoSpaceLeft
from dinospec.train.loop import NonFiniteLossError, Trainer, train


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


def _corrupt(checkpoint: Path) -> None:
    shard = next(checkpoint.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])


def test_no_valid_checkpoint_stops_instead_of_starting_over(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=4"))
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    for path in checkpoints:
        _corrupt(path)
    metrics = (run_dir / "metrics.jsonl").read_text()
    with pytest.raises(NoValidCheckpoint) as raised:
        train(tiny_config(run_dir, "train.max_iterations=6"))
    for path in checkpoints:
        assert path.name in str(raised.value)
    assert "discard_invalid_checkpoints" in str(raised.value)
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert list_checkpoints(run_dir / "checkpoints") == checkpoints


def test_starting_over_on_purpose_keeps_new_checkpoints(tmp_path):
    """The old pruning kept the highest iteration numbers, corrupt ones included, so a run
    that started over deleted each new checkpoint as soon as it was written."""
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=6", "train.keep_last=1"))
    (newest,) = list_checkpoints(run_dir / "checkpoints")
    _corrupt(newest)
    train(
        tiny_config(
            run_dir,
            "train.max_iterations=2",
            "train.keep_last=1",
            "train.discard_invalid_checkpoints=true",
        )
    )
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["iter_00000002"]
    assert (run_dir / "checkpoints" / "invalid" / newest.name).is_dir()
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2]


def test_invalid_newer_checkpoint_is_set_aside_not_kept_over_a_valid_one(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=4", "train.keep_last=2"))
    _corrupt(list_checkpoints(run_dir / "checkpoints")[-1])
    train(tiny_config(run_dir, "train.max_iterations=3", "train.keep_last=2"))
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["iter_00000002", "iter_00000003"]
    assert (run_dir / "checkpoints" / "invalid" / "iter_00000004").is_dir()
    assert [r["iteration"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_checkpoint_without_marker_is_reported_not_skipped_silently(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=2"))
    (newest,) = list_checkpoints(run_dir / "checkpoints")
    (newest / MARKER).unlink()
    with pytest.raises(NoValidCheckpoint, match=f"{newest.name}: no {MARKER}"):
        train(tiny_config(run_dir, "train.max_iterations=4"))


def test_changed_architecture_names_the_tensors_and_the_config_change(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=2"))
    with pytest.raises(CheckpointMismatch, match="config changed") as raised:
        train(tiny_config(run_dir, "train.max_iterations=4", "model.depth=3"))
    assert "student.backbone.blocks.2" in str(raised.value)
    assert list_checkpoints(run_dir / "checkpoints")[-1].name == "iter_00000002"


def test_diverged_state_is_never_the_last_good_checkpoint(tmp_path):
    """With a huge learning rate the weights become enormous but finite after one update,
    and the next forward pass is NaN: the checkpoint written in between holds the
    diverged state. The error names the one before it, and a rerun resumes from that."""
    overrides = ["optim.base_lr=1e12", "train.checkpoint_every=1", "train.max_nonfinite_skips=1"]
    with pytest.raises(NonFiniteLossError) as raised:
        train(tiny_config(tmp_path / "run", *overrides))
    root = tmp_path / "run" / "checkpoints"
    message = str(raised.value)
    assert f"written before the divergence: {root / 'iter_00000001'}" in message
    assert [p.name for p in list_checkpoints(root)] == ["iter_00000001"]
    assert (root / "diverged" / "iter_00000002").is_dir()


def test_nonfinite_state_is_never_saved(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_iterations=2"))
    trainer.run()
    with torch.no_grad():
        next(trainer.model.teacher.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteState, match=r"teacher\..*iter_00000002"):
        trainer.checkpoint(3)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["iter_00000002"]


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB file system: room for a tiny run's first checkpoint, not for many more."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)])
    if done.returncode != 0:
        pytest.fail("mounting a small tmpfs failed: the disk-full tests need root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_named_before_writing(small_disk):
    trainer = Trainer(tiny_config(small_disk / "run", "train.max_iterations=2"))
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2**16))
    with pytest.raises(NoSpaceLeft, match=r"no space left on device .*need ~[\d.]+ MB"):
        trainer.run()
    assert not list((small_disk / "run" / "checkpoints").iterdir())


def test_full_disk_during_a_write_removes_the_partial_checkpoint(small_disk, monkeypatch):
    """When the estimate is wrong (another writer fills the disk), the write itself fails
    with torch's unhelpful message; it is named, and the partial directory removed so the
    rerun has the space back."""
    monkeypatch.setattr("dinospec.train.checkpoint_guards.SPACE_MARGIN", 0.0)
    trainer = Trainer(tiny_config(small_disk / "run", "train.max_iterations=2"))
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2**16))
    with pytest.raises(NoSpaceLeft, match="no space left on device while writing"):
        trainer.run()
    assert not list((small_disk / "run" / "checkpoints").iterdir())
    (small_disk / "filler").unlink()
    trainer.run()
    assert [p.name for p in list_checkpoints(small_disk / "run" / "checkpoints")] == [
        "iter_00000002"
    ]


def test_interrupted_export_is_refused_by_readers(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=2"))
    assert json.loads(RunDir(run_dir).export_record.read_text())["iteration"] == 2
    assert backbone_file(run_dir) == run_dir / "teacher_backbone.safetensors"
    pth = run_dir / "teacher_backbone.pth"
    pth.write_bytes(pth.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="cut short"):
        backbone_file(pth)


def test_export_older_than_the_checkpoints_is_reported(tmp_path, caplog, monkeypatch):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=2"))
    monkeypatch.setattr(Trainer, "export_teacher", lambda self, iteration: None)
    train(tiny_config(run_dir, "train.max_iterations=4"))
    backbone_file(run_dir)
    assert "teacher of iteration 2 but the run's newest checkpoint is iteration 4" in caplog.text
