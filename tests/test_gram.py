"""Gram anchoring loss: known values, where its gradient goes, and specialized backbones."""

from __future__ import annotations

import copy

import pytest
import torch

from dinospec.losses.gram import gram_anchoring_loss, gram_matrix, resize_patch_grid
from dinospec.train.gram_teacher import GramTeacher
from tests.helpers import PAPER, randomize, tiny_vit


def patches(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows])


def test_hand_computed_values() -> None:
    """Student patches orthogonal (Gram = identity), teacher's parallel (Gram = ones): two
    of the four entries differ by 1, so the mean squared difference is 2 / 4."""
    orthogonal = patches([[2.0, 0.0], [0.0, 3.0]])
    parallel = patches([[1.0, 0.0], [5.0, 0.0]])
    assert gram_anchoring_loss(orthogonal, parallel).item() == 0.5


def test_negative_clipping() -> None:
    """Opposite teacher patches: similarity -1 against the student's 0. Clipped in the
    teacher's matrix it becomes 0 (no loss); clipped in both, an opposite student pair
    against a parallel teacher pair still differs by 1 in two entries."""
    orthogonal = patches([[1.0, 0.0], [0.0, 1.0]])
    opposite = patches([[1.0, 0.0], [-1.0, 0.0]])
    parallel = patches([[1.0, 0.0], [1.0, 0.0]])
    assert gram_anchoring_loss(orthogonal, opposite).item() == 0.5
    assert gram_anchoring_loss(orthogonal, opposite, clip_negative="teacher").item() == 0.0
    assert gram_anchoring_loss(opposite, parallel, clip_negative="teacher").item() == 2.0
    assert gram_anchoring_loss(opposite, parallel, clip_negative="both").item() == 0.5


def test_gram_matrix_is_per_image_cosine_similarity() -> None:
    tokens = torch.randn(3, 5, 7)
    gram = gram_matrix(tokens)
    unit = tokens / tokens.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(gram[1], unit[1] @ unit[1].T)
    torch.testing.assert_close(torch.diagonal(gram, dim1=1, dim2=2), torch.ones(3, 5))


@pytest.mark.parametrize("specialize", [None, PAPER], ids=["vanilla", "specialized"])
def test_same_network_gives_zero_loss_and_zero_gradient(specialize) -> None:
    """The Gram teacher is a snapshot of the student: on the same images both give the same
    patch features, so the loss and every gradient are exactly zero; the patch tokens alone
    are compared ([CLS] and registers left out), specialized model or not."""
    student = randomize(tiny_vit(specialize))
    gram_teacher = copy.deepcopy(student)
    images = torch.randn(2, 3, 32, 32)
    student_patches = student.forward_features(images)["x_norm_patchtokens"]
    assert student_patches.shape == (2, 16, 32)
    loss = gram_anchoring_loss(
        student_patches, gram_teacher.forward_features(images)["x_norm_patchtokens"]
    )
    loss.backward()
    assert loss.item() == 0.0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("specialize", [None, PAPER], ids=["vanilla", "specialized"])
def test_gradient_reaches_only_the_student(specialize) -> None:
    student = randomize(tiny_vit(specialize), seed=0)
    gram_teacher = randomize(tiny_vit(specialize), seed=1)
    images = torch.randn(2, 3, 32, 32)
    loss = gram_anchoring_loss(
        student.forward_features(images)["x_norm_patchtokens"],
        gram_teacher.forward_features(images)["x_norm_patchtokens"],
    )
    loss.backward()
    assert loss.item() > 0
    assert all(p.grad is None for p in gram_teacher.parameters())
    moved = [n for n, p in student.named_parameters() if p.grad is not None and p.grad.any()]
    assert "patch_embed.proj.weight" in moved and "blocks.0.attn.qkv.weight" in moved


def test_mismatched_grids_are_refused() -> None:
    with pytest.raises(ValueError, match=r"same images and patch grid: student \(2, 16, 8\)"):
        gram_anchoring_loss(torch.randn(2, 16, 8), torch.randn(2, 64, 8))


def test_resize_patch_grid() -> None:
    """A map that is constant along rows stays so under bicubic resampling; halving a 4 x 4
    grid keeps the layout row-major (token index = row * width + column)."""
    rows = torch.arange(4.0).repeat_interleave(4)
    tokens = torch.stack([rows, -rows], dim=-1)[None]
    resized = resize_patch_grid(tokens, (4, 4), (2, 2))
    assert resized.shape == (1, 4, 2)
    top, bottom = resized[0, :2, 0], resized[0, 2:, 0]
    assert torch.equal(top[0], top[1]) and torch.equal(bottom[0], bottom[1])
    assert bottom[0] > top[0]
    with pytest.raises(ValueError, match="15 patch tokens do not form a 4 x 4 grid"):
        resize_patch_grid(torch.randn(1, 15, 2), (4, 4), (2, 2))


def test_gram_teacher_snapshot_schedule() -> None:
    """First snapshot when the loss starts, then every `refresh_every` iterations, never
    twice for one iteration; 0 keeps the first snapshot for good."""
    teacher = GramTeacher(tiny_vit(), start=5, refresh_every=3)
    assert [i for i in range(4) if teacher.due(i)] == []
    assert teacher.due(5)
    teacher.refresh(tiny_vit(), 5)
    assert [i for i in range(5, 15) if teacher.due(i)] == [8, 11, 14]
    once = GramTeacher(tiny_vit(), start=2, refresh_every=0)
    once.refresh(tiny_vit(), 2)
    assert not any(once.due(i) for i in range(2, 50))


def test_gram_teacher_snapshot_is_a_copy_kept_in_the_state_dict() -> None:
    ema_teacher = randomize(tiny_vit(PAPER), seed=0)
    gram_teacher = GramTeacher(randomize(tiny_vit(PAPER), seed=1), start=0, refresh_every=10)
    gram_teacher.refresh(ema_teacher, 20)
    images = torch.randn(2, 3, 32, 32)
    before = gram_teacher.patch_tokens(images, 8, (4, 4))
    with torch.no_grad():
        for p in ema_teacher.parameters():
            p.add_(1.0)
    assert torch.equal(gram_teacher.patch_tokens(images, 8, (4, 4)), before)

    resumed = GramTeacher(randomize(tiny_vit(PAPER), seed=2), start=0, refresh_every=10)
    resumed.load_state_dict(gram_teacher.state_dict())
    assert int(resumed.snapshot_iteration) == 20
    assert torch.equal(resumed.patch_tokens(images, 8, (4, 4)), before)


def test_high_resolution_gram_teacher_gives_the_student_grid() -> None:
    """Given crops at twice the student's 32 px, the snapshot sees an 8 x 8 grid; its
    features come back on the student's 4 x 4 grid (bicubic, as resize_patch_grid), without
    gradient. The crops are used as given: nothing is upsampled inside."""
    backbone = randomize(tiny_vit(), seed=0)
    gram_teacher = GramTeacher(backbone, start=0, refresh_every=0)
    crops = torch.randn(3, 3, 64, 64)
    tokens = gram_teacher.patch_tokens(crops, 8, (4, 4))
    assert tokens.shape == (3, 16, 32) and not tokens.requires_grad
    fine = backbone.forward_features(crops)["x_norm_patchtokens"]
    torch.testing.assert_close(tokens, resize_patch_grid(fine, (8, 8), (4, 4)), rtol=0, atol=0)
    same_size = gram_teacher.patch_tokens(crops[..., ::2, ::2], 8, (4, 4))
    assert not torch.allclose(tokens, same_size)


def test_gram_teacher_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"start -1 and refresh_every 0 must be >= 0"):
        GramTeacher(tiny_vit(), start=-1, refresh_every=0)
