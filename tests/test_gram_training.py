"""Gram anchoring in training runs: when the term is on, what the Gram teacher holds, exact
resume across snapshots, and the settings refused at load time."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from train_helpers import first_batch, read_metrics, tiny_config

from dinospec.config import ConfigError
from dinospec.losses.gram import resize_patch_grid
from dinospec.models.checkpoints import load_backbone
from dinospec.train.loop import Trainer, train

GRAM = ["gram.loss_weight=1.0", "gram.start_iteration=2", "gram.refresh_every=3"]


def losses(run_dir) -> list[tuple[int, float, float | None]]:
    return [(m["iteration"], m["loss"], m.get("loss_gram")) for m in read_metrics(run_dir)]


@pytest.mark.parametrize(
    "options", [[], ["gram.upscale=2.0", "gram.clip_negative=teacher"]], ids=["1x", "2x-clip"]
)
def test_the_term_joins_the_loss_from_its_start_iteration(tmp_path, options) -> None:
    run_dir = train(tiny_config(tmp_path / "run", *GRAM, *options, "train.max_iterations=4"))
    gram = {m["iteration"]: m.get("loss_gram") for m in read_metrics(run_dir)}
    assert gram[1] is None and gram[2] is None  # iterations 0 and 1
    assert gram[3] > 0 and gram[4] > 0


def test_the_gram_teacher_is_the_ema_teacher_of_its_start_iteration(tmp_path) -> None:
    run_dir = tmp_path / "run"
    options = ["gram.loss_weight=1.0", "gram.start_iteration=2", "train.checkpoint_every=2"]
    train(tiny_config(run_dir, *options, "train.max_iterations=2"))
    at_start = tmp_path / "teacher_at_2.safetensors"
    shutil.copy(run_dir / "teacher_backbone.safetensors", at_start)
    trainer = Trainer(tiny_config(run_dir, *options, "train.max_iterations=5"))
    trainer.run()
    expected = load_backbone(at_start).state_dict()
    snapshot = trainer.model.gram_teacher.backbone.state_dict()
    teacher = trainer.model.teacher.backbone.state_dict()
    assert int(trainer.model.gram_teacher.snapshot_iteration) == 2
    assert all(torch.equal(snapshot[k], expected[k]) for k in expected)
    assert not all(torch.equal(snapshot[k], teacher[k]) for k in expected)


def test_at_factor_two_the_gram_teacher_sees_the_batchs_gram_crops(tmp_path) -> None:
    """The Gram targets are the snapshot's features of the loader's 64 px renderings of
    the 32 px views (`collated_gram_crops`), brought to the student's 4 x 4 grid, not of
    the global crops upsampled; a batch without them is refused rather than upsampled."""
    trainer = Trainer(tiny_config(tmp_path / "run", *GRAM, "gram.upscale=2.0"))
    model = trainer.model
    model.gram_teacher.refresh(model.teacher.backbone, 2)
    batch = first_batch(trainer)
    targets = model.teacher_targets(batch, 0.04, gram=True)
    backbone = model.gram_teacher.backbone

    def grid_features(images: torch.Tensor) -> torch.Tensor:
        tokens = backbone.forward_features(images)["x_norm_patchtokens"]
        return resize_patch_grid(tokens, (8, 8), (4, 4))

    with torch.no_grad():
        expected = grid_features(batch["collated_gram_crops"])
        upsampled = F.interpolate(batch["collated_global_crops"], scale_factor=2, mode="bicubic")
        from_upsampled = grid_features(upsampled)
    assert torch.equal(targets["gram_patches"], expected)
    assert (targets["gram_patches"] - from_upsampled).abs().max() > 1e-2
    terms, _ = model.losses(batch, targets)
    assert terms["gram"] > 0
    del batch["collated_gram_crops"]
    with pytest.raises(KeyError, match=r"gram\.upscale=2 needs the batch's high-resolution"):
        model.teacher_targets(batch, 0.04, gram=True)


@pytest.mark.slow
@pytest.mark.parametrize("upscale", ["1.0", "2.0"], ids=["1x", "2x"])
@pytest.mark.parametrize("stop", [4, 5], ids=["between-snapshots", "at-a-snapshot"])
def test_resume_is_exact_across_gram_snapshots(tmp_path, stop, upscale) -> None:
    """Snapshots at iterations 2 and 5. Stopped at 4, the resumed run must use the restored
    snapshot of 2; stopped at 5, it must take the snapshot of 5 as the straight run did.
    At factor 2 the resumed loader renders the same Gram crops as well."""
    options = [*GRAM, f"gram.upscale={upscale}"]
    straight = train(tiny_config(tmp_path / "straight", *options, "train.max_iterations=8"))
    resumed = tmp_path / "resumed"
    train(tiny_config(resumed, *options, f"train.max_iterations={stop}"))
    train(tiny_config(resumed, *options, "train.max_iterations=8"))
    assert losses(resumed) == losses(straight)
    assert all(gram is not None for _, _, gram in losses(resumed)[2:])
    a = load_backbone(straight / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(resumed / "teacher_backbone.safetensors").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "gram.start_iteration=0",
            "gram.start_iteration=0: would make the Gram teacher a snapshot",
        ),
        ("gram.clip_negative=negatives", "gram.clip_negative='negatives': must be one of"),
        ("gram.upscale=0.5", "gram.upscale=0.5"),
        ("gram.upscale=1.125", "gram.upscale=1.125: makes Gram teacher crops of 32 x 1.125 = 36"),
        ("gram.refresh_every=-1", "gram.refresh_every=-1"),
    ],
)
def test_settings_refused_at_load(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path / "run", *GRAM, override)
