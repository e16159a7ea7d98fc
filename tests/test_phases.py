"""Training in phases: a high-resolution phase continuing a finished run (issue #24 item 2)."""

from __future__ import annotations

import pytest
import torch
from train_helpers import read_metrics, tiny_config

from dinospec.analysis.cli import run_metrics
from dinospec.analysis.plots import metrics_figure, save_figure
from dinospec.config import ConfigError
from dinospec.models.checkpoints import CheckpointError, load_backbone
from dinospec.train.loop import Trainer, train

PHASE_1 = ["train.max_iterations=4"]
HIGH_RES = [
    "model.img_size=48",
    "crops.global_crops_size=48",
    "crops.local_crops_size=24",
    "train.batch_size_per_gpu=2",
    "optim.epochs=2",
    "optim.warmup_epochs=0",
]


@pytest.fixture(scope="module")
def first_phase(tmp_path_factory):
    return train(tiny_config(tmp_path_factory.mktemp("phases") / "phase1", *PHASE_1))


def phase_two(run_dir, first_phase, *overrides):
    return tiny_config(run_dir, *HIGH_RES, f"train.previous_phase={first_phase}", *overrides)


def test_the_phase_starts_with_the_parents_function_at_its_resolution(tmp_path, first_phase):
    """A phase-1 backbone evaluated at 48 px and the phase-2 model as it starts (positions
    resized once to the 6 x 6 grid) compute the same features, bit for bit."""
    trainer = Trainer(phase_two(tmp_path / "phase2", first_phase))
    parent = load_backbone(first_phase / "teacher_backbone.safetensors").eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = parent.forward_features(images)["x_norm_patchtokens"]
        for backbone in (trainer.model.student.backbone, trainer.model.teacher.backbone):
            assert backbone.pos_embed.shape == (1, 1 + 36, 32)
            got = backbone.eval().forward_features(images)["x_norm_patchtokens"]
            assert got.shape == (2, 36, 32) and torch.equal(got, expected)
    assert trainer.phase.number == 2 and trainer.phase.offset == 4
    assert trainer.phase.resized == (32, 48)


def test_two_phases_resume_and_plot(tmp_path, first_phase):
    """Phase 2 stopped in its middle resumes exactly; its records carry the phase, and
    plot-metrics puts both phases on one axis with the switch at iteration 4."""
    straight = train(phase_two(tmp_path / "straight", first_phase))
    resumed = tmp_path / "resumed"
    train(phase_two(resumed, first_phase, "train.max_iterations=5"))
    train(phase_two(resumed, first_phase))
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [(m["iteration"], m["loss"]) for m in a] == [(m["iteration"], m["loss"]) for m in b]
    assert {(m["phase"], m["phase_offset"]) for m in a} == {(2, 4)}

    records, starts = run_metrics(straight)
    assert [r["iteration"] for r in records] == list(range(1, 5)) + list(range(5, 13))
    assert starts == [4]
    figure = metrics_figure({"two phases": records}, {"two phases": starts})
    assert "new training phase" in figure._suptitle.get_text()
    assert save_figure(figure, tmp_path / "curves.png").stat().st_size > 0


def test_a_phase_before_its_parent_ends_is_refused(tmp_path):
    parent = train(tiny_config(tmp_path / "parent", "train.max_iterations=2"))
    (parent / "config.yaml").write_text(
        (parent / "config.yaml").read_text().replace("max_iterations: 2", "max_iterations: 6")
    )
    with pytest.raises(
        CheckpointError, match=r"previous_phase=.*parent: that run is at iteration 2 of 6"
    ):
        Trainer(phase_two(tmp_path / "child", parent))


def test_one_start_only(tmp_path, first_phase):
    with pytest.raises(ConfigError, match="from a previous phase, not both"):
        Trainer(
            phase_two(tmp_path / "child", first_phase, f"train.pretrained_weights={first_phase}")
        )


def test_a_directory_that_is_no_run_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a dinospec run directory"):
        Trainer(phase_two(tmp_path / "child", tmp_path / "empty"))
