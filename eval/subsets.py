"""Which items of a split to take when not all of them (evenly spaced over the whole split),
and how a figure names them.

Datasets are stored in sorted order, and sorted order groups images by scene or video
sequence (CamVid's frames, NYU's `kitchen_0028b/...`), so the first n images would all show
one place. A quick run's subset and a figure's examples are therefore spread out instead.
"""

from __future__ import annotations

from pathlib import Path


def spread_indices(size: int, count: int | None) -> list[int]:
    """`count` positions spread evenly over range(size), the first one 0; all of them when
    `count` is None or not smaller than `size`."""
    if count is None or count >= size:
        return list(range(size))
    step = size / count
    return [int(i * step) for i in range(count)]


def image_name(path: Path) -> str:
    """folder/stem: enough to find the file, since datasets reuse stems across folders
    (NYU's rgb_00045 exists in many scenes)."""
    return f"{path.parent.name}/{path.stem}"
