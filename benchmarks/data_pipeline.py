"""Data pipeline throughput: multi-crop images/s per worker, ours against a PIL reference.

Ours is the training path itself (the dataset and augmentation that build_loader uses),
which ends at uint8 crops: the training step standardizes them on the device after the
copy. The reference is DINOv2's augmentation written with torchvision.transforms (v1) on
PIL images, with the SPEC's probabilities, ending at standardized float tensors. Both run
in this process on one thread, as each DataLoader worker does, on the same real JPEGs.
They alternate in rounds, so a neighbour loading the machine slows both alike, and the
ratio reported is the median over rounds. On a shared machine `--clock cpu` counts only
this process's CPU time, which is what a worker with a core to itself would take.

    python benchmarks/data_pipeline.py --images 200 --rounds 5
    python benchmarks/data_pipeline.py --workers 2   # also the DataLoader with 2 workers
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from dinospec.config import Config, CropsConfig, load_config
from dinospec.data.transforms import (
    BLUR_KERNEL_SIZE,
    BLUR_SIGMA,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
)
from dinospec.train.data import (
    AugmentedImages,
    build_augmentation,
    build_image_dataset,
    build_loader,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagenette"
WARMUP_IMAGES = 5
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def reference_blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(BLUR_KERNEL_SIZE, sigma=BLUR_SIGMA)], p=p)


def reference_augmentation(crops: CropsConfig) -> Callable[[Image.Image], list[Tensor]]:
    """DINOv2's DataAugmentationDINO, except that blur is applied with the SPEC's
    probabilities (DINOv2's GaussianBlur passes 1 - p to RandomApply)."""
    bicubic = T.InterpolationMode.BICUBIC
    global_geometry = T.Compose(
        [
            T.RandomResizedCrop(
                crops.global_crops_size, scale=crops.global_crops_scale, interpolation=bicubic
            ),
            T.RandomHorizontalFlip(p=0.5),
        ]
    )
    local_geometry = T.Compose(
        [
            T.RandomResizedCrop(
                crops.local_crops_size, scale=crops.local_crops_scale, interpolation=bicubic
            ),
            T.RandomHorizontalFlip(p=0.5),
        ]
    )
    color = T.Compose(
        [
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ]
    )
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    global_1 = T.Compose([color, reference_blur(1.0), normalize])
    global_2 = T.Compose(
        [color, reference_blur(0.1), T.RandomSolarize(SOLARIZE_THRESHOLD, p=0.2), normalize]
    )
    local = T.Compose([color, reference_blur(0.5), normalize])

    def augment(image: Image.Image) -> list[Tensor]:
        crops_out = [global_1(global_geometry(image)), global_2(global_geometry(image))]
        return crops_out + [local(local_geometry(image)) for _ in range(crops.local_crops_number)]

    return augment


def reference_pipeline(config: Config) -> Callable[[Path], list[Tensor]]:
    augment = reference_augmentation(config.crops)

    def run(path: Path) -> list[Tensor]:
        with Image.open(path) as image:
            return augment(image.convert("RGB"))

    return run


def images_per_second(
    work: Callable[[int], object], count: int, seed: int, clock: Callable[[], float]
) -> float:
    torch.manual_seed(seed)
    start = clock()
    for position in range(count):
        work(position)
    return count / (clock() - start)


def compare(
    config: Config, count: int, rounds: int, clock: Callable[[], float]
) -> list[tuple[float, float]]:
    """(ours, reference) images/s per round, on the same `count` files spread over the
    dataset; the order alternates between rounds so that neither always runs first."""
    images = build_image_dataset(config)
    indices = [i * len(images) // count for i in range(count)]
    paths = [images.samples[i][0] for i in indices]
    ours = AugmentedImages(images, build_augmentation(config), config.train.seed)
    reference = reference_pipeline(config)
    pipelines = {
        "ours": lambda position: ours[(position, indices[position])],
        "reference": lambda position: reference(paths[position]),
    }
    for path in paths:
        path.read_bytes()
    for work in pipelines.values():
        images_per_second(work, min(WARMUP_IMAGES, count), 0, clock)
    results = []
    for round_index in range(rounds):
        order = list(pipelines) if round_index % 2 == 0 else list(reversed(pipelines))
        speed = {
            name: images_per_second(pipelines[name], count, round_index, clock) for name in order
        }
        results.append((speed["ours"], speed["reference"]))
    return results


def loader_images_per_second(config: Config, count: int) -> float:
    """Throughput of the training DataLoader once running: the batches its workers hold
    in flight at the start (prefetch_factor 2 each) are drawn before timing begins."""
    loader = build_loader(config, build_image_dataset(config), rank=0, world_size=1, start_step=0)
    batch = config.train.batch_size_per_gpu
    for _ in range(2 * config.data.num_workers):
        next(loader)
    batches = math.ceil(count / batch)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch / (time.perf_counter() - start)


def print_comparison(results: list[tuple[float, float]]) -> None:
    print(f"{'round':>5}  {'ours img/s':>10}  {'reference img/s':>15}  {'ratio':>6}")
    for index, (ours, reference) in enumerate(results, start=1):
        print(f"{index:>5}  {ours:>10.1f}  {reference:>15.1f}  {ours / reference:>6.2f}")
    ours_median = statistics.median(o for o, _ in results)
    reference_median = statistics.median(r for _, r in results)
    ratio = statistics.median(o / r for o, r in results)
    print(f"{'median':>5}  {ours_median:>10.1f}  {reference_median:>15.1f}  {ratio:>6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="ImageNet-layout root")
    parser.add_argument("--images", type=int, default=200, help="images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--workers", type=int, default=0, help="also time a DataLoader")
    parser.add_argument(
        "--loader-images", type=int, default=1024, help="images the DataLoader is timed on"
    )
    parser.add_argument("--batch", type=int, default=32, help="DataLoader batch size")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = load_config(
        None,
        [
            "data.dataset=imagenet",
            f"data.path={args.data}",
            f"data.num_workers={args.workers}",
            f"train.batch_size_per_gpu={args.batch}",
        ],
    )
    crops = config.crops
    print(
        f"{args.images} images x {args.rounds} rounds, {args.threads} thread(s), "
        f"crops: 2 x {crops.global_crops_size} + {crops.local_crops_number} x "
        f"{crops.local_crops_size}, {args.clock} clock, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )
    print_comparison(compare(config, args.images, args.rounds, CLOCKS[args.clock]))
    if args.workers > 0:
        speed = loader_images_per_second(config, args.loader_images)
        print(
            f"DataLoader, {args.workers} workers, batch {args.batch}: {speed:.1f} img/s "
            f"({speed / args.workers:.1f} per worker)"
        )


if __name__ == "__main__":
    main()
