"""Distillation from a frozen teacher (issue #24 item 3) on the synthetic scenes."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import first_batch, tiny_config

from dinospec.models.checkpoints import CheckpointError, load_backbone
from dinospec.run.layout import RunDir
from dinospec.train.loop import Trainer, train


@pytest.fixture(scope="module")
def small_teacher(tmp_path_factory):
    """A teacher run of a few iterations: enough for what does not depend on its quality."""
    run = tmp_path_factory.mktemp("distill_small") / "teacher"
    return train(
        tiny_config(run, "model.embed_dim=48", "model.num_heads=4", "train.max_iterations=2")
    )


def read_losses(run_dir) -> list[tuple[int, float]]:
    lines = RunDir(run_dir).metrics.read_text().splitlines()
    return [(r["iteration"], r["loss"]) for r in map(json.loads, lines)]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["run directory", "backbone file"])
def test_resume_is_exact_and_the_export_is_the_students_ema(tmp_path, small_teacher, source):
    """A backbone file's frozen heads are drawn anew at every start: a resume must draw
    the same ones."""
    teacher = (
        small_teacher if source == "run directory" else RunDir(small_teacher).export(".safetensors")
    )
    options = [f"distill.teacher={teacher}", "train.checkpoint_every=3"]
    straight = train(tiny_config(tmp_path / "straight", *options, "train.max_iterations=6"))
    resumed = tmp_path / "resumed"
    train(tiny_config(resumed, *options, "train.max_iterations=3"))
    train(tiny_config(resumed, *options, "train.max_iterations=6"))
    assert read_losses(straight) == read_losses(resumed)
    exported = load_backbone(RunDir(straight).export(".safetensors"))
    assert exported.embed_dim == 32  # the student's width, not the teacher's 48


def test_the_frozen_teacher_gives_the_targets_and_gets_no_update(tmp_path, small_teacher):
    trainer = Trainer(
        tiny_config(tmp_path / "run", f"distill.teacher={small_teacher}", "train.max_iterations=2")
    )
    frozen = trainer.model.distill_teacher
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    source = load_backbone(RunDir(small_teacher).export(".safetensors")).state_dict()
    assert all(torch.equal(frozen.backbone.state_dict()[k], source[k]) for k in source)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainer.run()
    assert all(torch.equal(frozen.state_dict()[k], before[k]) for k in before)
    assert trainer.distill.heads_from is not None


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.patch_size=16", "patch size: teacher 8, student model.patch_size=16"),
        (
            "dino.head_n_prototypes=32",
            r"prototypes \(DINO, iBOT\): teacher \(64, 64\), student \(32, 32\)",
        ),
    ],
)
def test_a_teacher_the_student_cannot_learn_from_is_refused(
    tmp_path, small_teacher, override, message
):
    with pytest.raises(CheckpointError, match=message):
        Trainer(tiny_config(tmp_path / "run", f"distill.teacher={small_teacher}", override))


def test_a_missing_teacher_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"distill.teacher=.*nowhere"):
        Trainer(tiny_config(tmp_path / "run", f"distill.teacher={tmp_path / 'nowhere'}"))


def test_the_targets_are_the_frozen_teachers(tmp_path, small_teacher):
    """DINO targets of a step: the frozen teacher's head on its own [CLS] tokens of the
    swapped global crops, centred, not the student's EMA's."""
    trainer = Trainer(tiny_config(tmp_path / "run", f"distill.teacher={small_teacher}"))
    model, batch = trainer.model, first_batch(trainer)
    targets = model.teacher_targets(batch, teacher_temp=0.05)
    with torch.no_grad():
        cls = model.distill_teacher.backbone(batch["collated_global_crops"])
        swapped = torch.cat(cls.chunk(2)[::-1])
        logits = model.distill_teacher.dino_head(swapped)
        expected = model.dino_loss.softmax_center_teacher(logits, 0.05)
    torch.testing.assert_close(torch.cat(targets["cls_targets"]), expected)
    model.distill_teacher = None
    own = torch.cat(model.teacher_targets(batch, teacher_temp=0.05)["cls_targets"])
    assert not torch.allclose(own, expected)
