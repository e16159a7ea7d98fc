"""The Gram teacher of Gram anchoring (dinospec.losses.gram): a frozen snapshot of the EMA
teacher's backbone, taken when the loss starts and retaken every `refresh_every`
iterations, as DINOv3 refreshes its Gram teacher during the refinement phase.

It is a module so that its weights and the iteration of its snapshot are part of the
checkpoint: a resumed run compares against the very snapshot the interrupted one held.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from dinospec.losses.gram import resize_patch_grid


class GramTeacher(nn.Module):
    """Snapshot of a backbone, refreshed on a schedule, that gives patch features as targets.

    It may be given crops larger than the student's (`gram.upscale` > 1: the data pipeline
    renders each global crop again at that size, as DINOv3's gram_teacher_crops_size does);
    its finer feature map is then brought back to the student's grid: features of larger
    inputs are smoother, and the smoothness is what the student is anchored to.
    """

    def __init__(self, backbone: nn.Module, start: int, refresh_every: int) -> None:
        super().__init__()
        if start < 0 or refresh_every < 0:
            raise ValueError(
                f"Gram teacher: start {start} and refresh_every {refresh_every} must be >= 0"
            )
        self.backbone = copy.deepcopy(backbone).requires_grad_(False).eval()
        self.start, self.refresh_every = start, refresh_every
        self.register_buffer("snapshot_iteration", torch.tensor(-1))

    def active(self, iteration: int) -> bool:
        return iteration >= self.start

    def due(self, iteration: int) -> bool:
        """Whether to take a snapshot before this iteration's step: the first active
        iteration, then every `refresh_every` (0: never again)."""
        if not self.active(iteration) or int(self.snapshot_iteration) == iteration:
            return False
        if int(self.snapshot_iteration) < 0:
            return True
        return self.refresh_every > 0 and (iteration - self.start) % self.refresh_every == 0

    @torch.no_grad()
    def refresh(self, teacher_backbone: nn.Module, iteration: int) -> None:
        self.backbone.load_state_dict(teacher_backbone.state_dict())
        self.snapshot_iteration.fill_(iteration)

    @torch.no_grad()
    def patch_tokens(self, crops: Tensor, patch_size: int, grid: tuple[int, int]) -> Tensor:
        """(B, P, D) target features of `crops` (the global crops, or their high-resolution
        renderings) on the student's patch `grid` (rows, columns)."""
        tokens = self.backbone.forward_features(crops)["x_norm_patchtokens"]
        fine = (crops.shape[-2] // patch_size, crops.shape[-1] // patch_size)
        return tokens if fine == grid else resize_patch_grid(tokens, fine, grid)
