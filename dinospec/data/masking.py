"""Block-wise masks for iBOT's masked image modelling, as DINOv2's MaskingGenerator.

Masking contiguous rectangles rather than scattered patches keeps the task from being
solved by interpolating visible neighbours. All randomness comes from a numpy Generator
passed to each call, so a mask depends only on that generator's state: no global RNG.
"""

from __future__ import annotations

import math

import numpy as np

BLOCK_ATTEMPTS = 10


class MaskingGenerator:
    """Draws boolean (height, width) masks with about the requested number of patches.

    Rectangles with a log-uniform aspect ratio in [min_aspect, max_aspect] are added until
    the target is reached or `BLOCK_ATTEMPTS` tries in a row add nothing; the count never
    exceeds the target, and a single rectangle adds at most `max_num_patches` new patches.
    As in DINOv2, a rectangle's area is drawn between `min_num_patches` and what is left of
    the target, so once less than `min_num_patches` is left the last rectangles are smaller
    than that and fill the remainder: DINOv2 hits the requested count in most masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        max_num_patches: float | None = None,
        min_num_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = (
            (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        )
        self.num_patches = self.height * self.width
        self.max_num_patches = (
            0.5 * self.num_patches if max_num_patches is None else max_num_patches
        )
        self.min_num_patches = min_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator(input_size=({self.height}, {self.width}), "
            f"patches={self.min_num_patches}..{self.max_num_patches}, "
            f"log_aspect={self.log_aspect_ratio})"
        )

    def __call__(self, num_masking_patches: int, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def block_shape(self, max_area: float, rng: np.random.Generator) -> tuple[int, int]:
        """(height, width) of one candidate rectangle, drawn as DINOv2 draws it: the area
        uniformly between `min_num_patches` and `max_area`, whichever is larger (so a
        remainder under the minimum gets a smaller block), then rounded per side, which can
        leave the area outside that interval, down to a side of 0 (an empty block)."""
        area = self.min_num_patches + (max_area - self.min_num_patches) * rng.random()
        aspect = math.exp(rng.uniform(*self.log_aspect_ratio))
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def _add_block(self, mask: np.ndarray, budget: float, rng: np.random.Generator) -> int:
        """Mask one rectangle in place and return how many patches it newly covered (0 when
        every attempt failed). Overlap with earlier blocks is allowed; only the new patches
        count against the budget. No size is rejected but a side reaching the grid's, as in
        DINOv2: refusing blocks under `min_num_patches` would leave remainders unfilled."""
        for _ in range(BLOCK_ATTEMPTS):
            h, w = self.block_shape(budget, rng)
            if h >= self.height or w >= self.width:
                continue
            top = int(rng.integers(0, self.height - h + 1))
            left = int(rng.integers(0, self.width - w + 1))
            window = mask[top : top + h, left : left + w]
            added = h * w - int(window.sum())
            if 0 < added <= budget:
                window[...] = True
                return added
        return 0
