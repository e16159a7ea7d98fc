"""Gram anchoring (DINOv3, Siméoni et al. 2025, arXiv 2508.10104, section 4).

Long runs let patch features lose their locality while the [CLS] objective keeps
improving. Gram anchoring does not constrain the features themselves, only how patches of
one image relate to each other: the student's patch-to-patch cosine similarities are pulled
towards those of a Gram teacher, an earlier snapshot of the EMA teacher whose dense
features were still clean. Because only the similarity structure is anchored, the features
can keep moving as long as they move together.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

NegativeClip = Literal["none", "teacher", "both"]


def gram_matrix(patch_tokens: Tensor) -> Tensor:
    """(B, P, D) patch features -> (B, P, P) cosine similarities within each image. In
    float32: similarities of nearby unit vectors lose their differences in half precision,
    and those differences are what the loss is about."""
    unit = F.normalize(patch_tokens.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def gram_anchoring_loss(
    student_patches: Tensor, gram_teacher_patches: Tensor, clip_negative: NegativeClip = "none"
) -> Tensor:
    """Squared Frobenius distance between the student's and the Gram teacher's Gram
    matrices, divided by P^2 and averaged over images (the mean squared difference of the
    entries, as DINOv3 computes it), so the weight means the same at every resolution.

    `clip_negative` sets negative similarities to zero before comparing, in the Gram
    teacher's matrix only or in both (DINOv3's `remove_only_teacher_neg` / `remove_neg`):
    dissimilar patches then only have to stay dissimilar, not equally so. The Gram teacher
    is a target: no gradient reaches it.
    """
    if student_patches.shape[:2] != gram_teacher_patches.shape[:2]:
        raise ValueError(
            f"Gram anchoring needs the same images and patch grid: student "
            f"{tuple(student_patches.shape)} vs Gram teacher {tuple(gram_teacher_patches.shape)}"
        )
    with torch.autocast(device_type=student_patches.device.type, enabled=False):
        student = gram_matrix(student_patches)
        with torch.no_grad():
            target = gram_matrix(gram_teacher_patches)
        if clip_negative in ("teacher", "both"):
            target = target.clamp(min=0)
        if clip_negative == "both":
            student = student.clamp(min=0)
        return (student - target).square().mean()


def resize_patch_grid(patch_tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, h*w, D) features of an h x w patch grid resampled to `size` (bicubic, without
    antialiasing, as DINOv3 brings its high-resolution Gram teacher's map down to the
    student's grid): the teacher sees finer detail, the comparison stays patch for patch."""
    batch, tokens, dim = patch_tokens.shape
    if tokens != grid[0] * grid[1]:
        raise ValueError(f"{tokens} patch tokens do not form a {grid[0]} x {grid[1]} grid")
    feature_map = patch_tokens.transpose(1, 2).reshape(batch, dim, *grid)
    resized = F.interpolate(feature_map.float(), size=size, mode="bicubic", align_corners=False)
    return resized.flatten(2).transpose(1, 2).to(patch_tokens.dtype)
