"""The evaluators a training run calls (dinospec.train.evaluation), registered in the
entry-point group `dinospec.evaluators`: `knn`, eval-cls's weighted k-NN on the last
block's [CLS], and `seg`, a short linear segmentation probe on cached patch tokens.

They are distributed like the eval jobs: each rank computes the features of its shard of
the images, the k-NN bank stays sharded (eval.knn merges every rank's candidates), and
the probe's features (a few hundred images) are gathered on every rank, which trains the
same head from the same seed: no rank waits on another while it trains (one rank training
alone while the others waited in a broadcast hung two gloo processes). The
teacher may be sharded with FSDP2, so every rank runs the same number of forward passes:
a rank with a shorter shard repeats its last batch and drops the copies' features.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinospec.config import Config
from dinospec.data.datasets import ImageNetFolder
from dinospec.data.synthetic import SyntheticScenes
from dinospec.data.transforms import normalize
from dinospec.distributed import DistInfo, host_group
from dinospec.train.evaluation import EvalOutput
from eval.config import ClsSettings, DatasetSource, SegSettings
from eval.knn import knn_scores
from eval.linear_cls import extract_features
from eval.metrics import topk_accuracy
from eval.run_cls import eval_transform, limit_per_class
from eval.run_seg import CenterCropTransform, segmentation_datasets
from eval.seg_head import FrozenPatchFeatures
from eval.seg_probe import evaluate_head, train_head
from eval.sharding import HOST_TIMEOUT, Ranks
from eval.subsets import spread_indices

SYNTHETIC_TRAIN_SEED, SYNTHETIC_VAL_SEED = 1001, 1002
"""Seeds of the labelled scenes, other than any training run's (its seed is train.seed)."""
SYNTHETIC_IMAGES_PER_CLASS = (64, 32)
"""Scenes per class (train, val) when evaluation.train_per_class / val_per_class are null."""


def ranks_of(info: DistInfo) -> Ranks:
    """The training's process group as eval's Ranks, with its host group for gathers."""
    group = host_group(HOST_TIMEOUT) if info.world_size > 1 else None
    return Ranks(info.rank, info.world_size, info.device, group)


class ImageLabels(Dataset):
    """(image, image label) of the synthetic scenes, whose items also carry a label map."""

    def __init__(self, scenes: SyntheticScenes) -> None:
        self.scenes = scenes

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, _, label = self.scenes[index]
        return image, label


def labelled_sets(config: Config) -> tuple[Dataset, Dataset, int]:
    """(bank images, query images, number of classes) of the k-NN evaluation."""
    e = config.evaluation
    if e.dataset == "synthetic":
        classes = SyntheticScenes().classes
        sets = [
            ImageLabels(
                SyntheticScenes(len(classes) * n, e.image_size, seed, transform=normalize())
            )
            for seed, n in (
                (SYNTHETIC_TRAIN_SEED, e.train_per_class or SYNTHETIC_IMAGES_PER_CLASS[0]),
                (SYNTHETIC_VAL_SEED, e.val_per_class or SYNTHETIC_IMAGES_PER_CLASS[1]),
            )
        ]
        return sets[0], sets[1], len(classes)
    settings = ClsSettings(image_size=e.image_size, resize_size=e.resize_size)
    root = Path(e.path)
    train = ImageNetFolder(root / e.train_split, eval_transform(settings))
    val = ImageNetFolder(root / e.val_split, eval_transform(settings))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(
            f"evaluation.path={e.path}: class folders of the splits differ: {only[:5]}"
        )
    train, val = limit_per_class(train, e.train_per_class), limit_per_class(val, e.val_per_class)
    return train, val, len(train.classes)


def lockstep_batches(loader: DataLoader, count: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The loader's batches, then its last batch again until `count` were given."""
    given, last = 0, None
    for last in loader:
        given += 1
        yield last
    for _ in range(count - given):
        yield last


def shard_outputs(
    compute: Callable[[Iterator[tuple[Tensor, Tensor]]], tuple[Tensor, Tensor]],
    dataset: Dataset,
    ranks: Ranks,
    batch_size: int,
    num_workers: int,
) -> tuple[Tensor, Tensor]:
    """`compute` over this rank's shard of `dataset` in as many batches as the longest
    shard needs, the repeated batches' rows cut off."""
    shard = ranks.shard(dataset)
    longest = math.ceil(len(dataset) / ranks.world_size)
    loader = DataLoader(shard, batch_size=batch_size, num_workers=num_workers)
    features, labels = compute(lockstep_batches(loader, math.ceil(longest / batch_size)))
    return features[: len(shard)], labels[: len(shard)]


class KnnEvaluator:
    """Weighted k-NN top-1 (and top-5) of the teacher's [CLS] (evaluation.k neighbours)."""

    def __init__(self, config: Config, info: DistInfo) -> None:
        self.settings = config.evaluation
        self.ranks = ranks_of(info)
        self.bank_set, self.query_set, self.num_classes = labelled_sets(config)
        count = self.settings.pca_images
        shown = spread_indices(len(self.query_set), count) if count else []
        self.preview = torch.stack([self.query_set[i][0] for i in shown]) if shown else None

    def _features(self, backbone: nn.Module, dataset: Dataset) -> tuple[Tensor, Tensor]:
        e, device = self.settings, self.ranks.device
        return shard_outputs(
            lambda batches: extract_features(backbone, batches, 1, False, device),
            dataset,
            self.ranks,
            e.batch_size,
            e.num_workers,
        )

    def __call__(self, backbone: nn.Module) -> EvalOutput:
        e = self.settings
        bank = self._features(backbone, self.bank_set)
        queries, labels = self._features(backbone, self.query_set)
        queries = self.ranks.gather(queries, len(self.query_set))
        labels = self.ranks.gather(labels, len(self.query_set))
        scores = knn_scores(bank[0], bank[1], queries, self.num_classes, (e.k,), e.temperature)
        ks = (1, 5) if self.num_classes > 5 else (1,)
        accuracy = topk_accuracy(scores[e.k], labels, ks)
        metrics = {f"eval_knn_top{k}": value for k, value in accuracy.items()}
        return EvalOutput(metrics, self.preview)


def segmentation_sets(config: Config) -> tuple[Dataset, Dataset, int]:
    """(train, val, number of classes) of the probe, every item a centre crop of
    evaluation.seg.crop_size (synthetic scenes are rendered at that size)."""
    s = config.evaluation.seg
    if s.dataset == "synthetic":
        views = [
            SyntheticScenes(n, s.crop_size, seed=seed).segmentation_view()
            for n, seed in (
                (s.max_train_images, SYNTHETIC_TRAIN_SEED),
                (s.max_val_images, SYNTHETIC_VAL_SEED),
            )
        ]
        return views[0], views[1], views[0].num_classes
    source = DatasetSource(
        kind=s.dataset,
        root=s.path,
        train_split=s.train_split,
        val_split=s.val_split,
        max_train_images=s.max_train_images,
        max_val_images=s.max_val_images,
    )
    train, val = segmentation_datasets(source)
    train.transform = val.transform = CenterCropTransform(s.crop_size, s.crop_size)
    return train, val, train.num_classes


class SegProbeEvaluator:
    """mIoU and pixel accuracy of a linear head trained on the teacher's frozen patch
    tokens (evaluation.seg): the cached-feature protocol of eval-seg, shortened, and
    scored on centre crops rather than by sliding windows."""

    def __init__(self, config: Config, info: DistInfo) -> None:
        s = config.evaluation.seg
        self.ranks = ranks_of(info)
        self.train_set, self.val_set, self.num_classes = segmentation_sets(config)
        self.batch_size, self.num_workers = (
            config.evaluation.batch_size,
            config.evaluation.num_workers,
        )
        self.recipe = SegSettings(
            iterations=s.iterations,
            batch_size=s.batch_size,
            lr=s.lr,
            warmup_iterations=s.iterations // 10,
            n_layers=s.n_layers,
        )
        self.seed = config.train.seed

    def _features(self, frozen: FrozenPatchFeatures, dataset: Dataset) -> tuple[Tensor, Tensor]:
        device = self.ranks.device

        def compute(batches: Iterator[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
            pairs = [(frozen(x.to(device)).float().cpu(), y) for x, y in batches]
            return torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])

        local = shard_outputs(compute, dataset, self.ranks, self.batch_size, self.num_workers)
        return self.ranks.gather(local[0], len(dataset)), self.ranks.gather(local[1], len(dataset))

    def __call__(self, backbone: nn.Module) -> EvalOutput:
        frozen = FrozenPatchFeatures(backbone, self.recipe.n_layers)
        train = self._features(frozen, self.train_set)
        val = self._features(frozen, self.val_set)
        with torch.enable_grad():
            head = train_head(*train, self.num_classes, self.recipe, self.seed)
        scores = evaluate_head(head, *val, self.num_classes)
        metrics = {"eval_seg_miou": scores.miou, "eval_seg_pixel_accuracy": scores.pixel_accuracy}
        return EvalOutput(metrics)


def knn_evaluator(config: Config, info: DistInfo) -> KnnEvaluator:
    """Entry point `knn` of dinospec.evaluators."""
    return KnnEvaluator(config, info)


def seg_evaluator(config: Config, info: DistInfo) -> SegProbeEvaluator:
    """Entry point `seg` of dinospec.evaluators."""
    return SegProbeEvaluator(config, info)
