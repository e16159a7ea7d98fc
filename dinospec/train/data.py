"""The training data stream: images -> multi-crop views -> batches with iBOT masks.

Every random draw is a function of the seed and of a position in the global sample stream
(augmentations) or of the iteration (masks), never of worker or process state. A resumed
run therefore sees exactly the batches an uninterrupted run would have seen, and a run on
two processes sees the same global batches as a run on one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from dinospec.config import Config, ConfigError, data_path_problems, gram_crops_size
from dinospec.data.collate import rank_mask_counts, stack_crops
from dinospec.data.datasets import ImageList, ImageNetFolder, ImageTree, load_rgb_tensor
from dinospec.data.masking import MaskingGenerator
from dinospec.data.samplers import InfiniteDistributedSampler
from dinospec.data.synthetic import SyntheticScenes
from dinospec.data.transforms import MultiCropAugmentation, standardize_uint8
from dinospec.losses.ibot import masked_patch_weights
from dinospec.train.signals import ignore_stop_signals

# The Gram teacher's high-resolution crops are in a batch only when the config asks for them
# (dinospec.config.gram_crops_size).
CROP_KEYS = ("collated_global_crops", "collated_local_crops", "collated_gram_crops")


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integers, well mixed (neighbouring keys give unrelated seeds)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def build_image_dataset(config: Config) -> Dataset:
    """The unlabelled image source named by `data`. A missing or imageless dataset is a
    ConfigError naming `data.path`, raised here, before any model is built: every way of
    training (`dinospec train`, launch.local, a SLURM job) builds its data through this
    function, whereas a config loads where its data is not (see data_path_problems). Files
    are decoded to uint8 tensors, the input the augmentation works on, so no PIL image is
    built on the way."""
    data = config.data
    if data.dataset == "synthetic":
        return SyntheticScenes(
            data.synthetic_size, data.synthetic_image_size, seed=config.train.seed
        )
    problems = data_path_problems(data)
    if problems:
        raise ConfigError("; ".join(problems))
    path = Path(data.path)
    options = {"max_bad_fraction": data.max_bad_fraction, "loader": load_rgb_tensor}
    try:
        if data.dataset == "imagenet":
            return ImageNetFolder(path / "train", **options)
        if data.dataset == "folder":
            return ImageTree(path, **options)
        return ImageList(path, **options)
    except FileNotFoundError as err:
        raise ConfigError(f"data.path={data.path}: {err}") from err


class PositionSampler(Sampler[tuple[int, int]]):
    """DataLoader keys (global position, dataset index) of this rank's share of the stream."""

    def __init__(self, stream: InfiniteDistributedSampler) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.stream.with_positions()


class AugmentedImages(Dataset):
    """Multi-crop views of the image at a dataset index, seeded by the stream position."""

    def __init__(self, images: Dataset, augmentation: MultiCropAugmentation, seed: int) -> None:
        self.images = images
        self.augmentation = augmentation
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, dict[str, Any]]:
        position, index = key
        image = self.images[index][0]
        torch.manual_seed(derived_seed(self.seed, position))
        return position, self.augmentation(image)


class StepCollator:
    """Stacks crops (crop-major) and draws iBOT masks for one rank's batch of a step.

    How many tokens each global crop masks follows DINOv2's collate: mask ratios are
    stratified over the rank's batch (`ibot.mask_stratification=rank`, what DINOv2 runs on
    each GPU), or over the global batch (`global`), which makes a step's masks independent
    of the number of processes. Each crop slot's mask is then drawn from its own seed (the
    step and its place in the global batch), never from worker or process state.
    """

    def __init__(self, config: Config, global_batch: int, grid: int, rank: int) -> None:
        self.seed = config.train.seed
        self.global_batch = global_batch
        self.n_tokens = grid * grid
        self.probability = config.ibot.mask_sample_probability
        self.ratios = tuple(config.ibot.mask_ratio_min_max)
        self.per_rank = config.ibot.mask_stratification == "rank"
        self.rank = rank
        self.generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)

    def slot_counts(self, step: int, rows: list[int]) -> list[int]:
        """Tokens to mask in each global-crop slot of this rank's batch (crop-major), whose
        images sit at `rows` of the global batch."""
        if self.per_rank:
            rng = np.random.default_rng([self.seed, step, 0, self.rank])
            counts = rank_mask_counts(
                2 * len(rows), self.probability, self.ratios, self.n_tokens, rng
            )
            return counts.tolist()
        rng = np.random.default_rng([self.seed, step, 0])
        counts = rank_mask_counts(
            2 * self.global_batch, self.probability, self.ratios, self.n_tokens, rng
        )
        return [int(counts[c * self.global_batch + r]) for c in range(2) for r in rows]

    def _mask(self, step: int, slot: int, count: int) -> np.ndarray:
        return self.generator(count, np.random.default_rng([self.seed, step, 1, slot])).ravel()

    def __call__(self, items: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        positions = [p for p, _ in items]
        step = positions[0] // self.global_batch
        rows = [p - step * self.global_batch for p in positions]
        slots = [c * self.global_batch + r for c in range(2) for r in rows]
        counts = self.slot_counts(step, rows)
        masks = torch.from_numpy(
            np.stack([self._mask(step, s, count) for s, count in zip(slots, counts, strict=True)])
        )
        samples = [(crops, None) for _, crops in items]
        indices = masks.flatten().nonzero().flatten()
        batch = {
            "step": step,
            "collated_global_crops": stack_crops(samples, "global_crops"),
            "collated_local_crops": stack_crops(samples, "local_crops"),
            "collated_masks": masks,
            "mask_indices_list": indices,
            "masks_weight": masked_patch_weights(masks),
        }
        if "gram_teacher_crops" in items[0][1]:
            batch["collated_gram_crops"] = stack_crops(samples, "gram_teacher_crops")
        return batch


def build_augmentation(config: Config, standardize: bool = False) -> MultiCropAugmentation:
    """The multi-crop recipe of `crops`, with the Gram teacher's high-resolution crops when
    `gram` asks for them; the loader's ends at uint8 crops, which to_device standardizes."""
    crops = config.crops
    return MultiCropAugmentation(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        crops.global_crops_size,
        crops.local_crops_size,
        crops.blur_sigma,
        standardize,
        (crops.blur_prob_global1, crops.blur_prob_global2, crops.blur_prob_local),
        gram_crops_size(config),
    )


def build_loader(
    config: Config, images: Dataset, rank: int, world_size: int, start_step: int
) -> Iterator[dict[str, Any]]:
    """Infinite iterator of this rank's batches from `start_step` on. Its workers ignore
    the signals that stop a run: the main process handles them (dinospec.train.signals)."""
    crops = config.crops
    augmentation = build_augmentation(config)
    per_rank = config.train.batch_size_per_gpu
    global_batch = per_rank * world_size
    grid = crops.global_crops_size // config.model.patch_size
    stream = InfiniteDistributedSampler(
        len(images), rank, world_size, config.train.seed, start_index=start_step * global_batch
    )
    workers = config.data.num_workers
    return iter(
        DataLoader(
            AugmentedImages(images, augmentation, config.train.seed),
            batch_size=per_rank,
            sampler=PositionSampler(stream),
            collate_fn=StepCollator(config, global_batch, grid, rank),
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            worker_init_fn=ignore_stop_signals,
        )
    )


def close_loader(loader: Iterator[dict[str, Any]]) -> None:
    """Stop the loader's workers now, however the run leaves its loop. They ignore the stop
    signals, so the SIGTERM that multiprocessing sends its remaining children at exit would
    not end them, and the exit would wait for them forever: a run leaving on an error, whose
    traceback still holds the loader, would hang instead of exiting."""
    shutdown = getattr(loader, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A loader batch on `device`, as the training step takes it: crops that arrive as uint8
    are standardized there, after the copy, which moves a quarter of the bytes that float
    crops would and takes that pass off the loader's workers."""
    moved = {
        k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()
    }
    for key in CROP_KEYS:
        if key in moved and moved[key].dtype == torch.uint8:
            moved[key] = standardize_uint8(moved[key])
    return moved
