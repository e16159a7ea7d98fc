"""`evaluate_classification`: k-NN and linear-probe classification (SPEC section 5) as one job.

Features are computed once per image (a forward pass is the expensive part) and every
classifier reads them: k-NN uses the L2-normalised [CLS] of the last block, the linear
grid the configured [CLS] of the last 1 or 4 blocks, optionally with the average patch
token. The linear learning rate is chosen on a held-out part of train, never on val.

With several processes each rank computes the features of its shard of train and val.
Val features are gathered to every rank (they are the k-NN queries); the k-NN bank stays
sharded (eval.knn merges every rank's candidates); rank 0 alone gathers train and fits the
linear grid, so the grid, the held-out split and the results are those of one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from dinospec.config import ConfigError
from dinospec.data.datasets import BadImageTracker, ImageNetFolder
from dinospec.data.transforms import normalize
from eval.config import CLS_KINDS, ClsSettings, DatasetSource, EvalConfig
from eval.knn import knn_scores
from eval.linear_cls import LinearProbeConfig, extract_features, train_linear_probe
from eval.metrics import confusion_matrix, topk_accuracy
from eval.runner import (
    Console,
    json_safe,
    run_record,
    start_job,
    write_results,
)
from eval.seg_data import read_class_names
from eval.sharding import Ranks, joined_ranks

CONFUSION_PLOT = "confusion_matrix.png"
MAX_PLOTTED_CLASSES = 50
NO_IGNORE = -1
Labelled = tuple[torch.Tensor, torch.Tensor]


def eval_transform(s: ClsSettings) -> v2.Transform:
    """Bicubic resize of the short side and centre crop, as in DINOv2's linear eval."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(s.resize_size, InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(s.image_size),
            normalize(),
        ]
    )


def limit_per_class(dataset: ImageNetFolder, limit: int | None) -> ImageNetFolder:
    """At most `limit` evenly spaced images of each class (balanced quick runs)."""
    if limit is None:
        return dataset
    kept = []
    for index in range(len(dataset.classes)):
        own = [sample for sample in dataset.samples if sample[1] == index]
        step = max(len(own) / limit, 1.0)
        kept += [own[int(i * step)] for i in range(min(limit, len(own)))]
    dataset.samples = kept
    dataset.bad = BadImageTracker([path for path, _ in kept], dataset.bad.max_bad_fraction)
    return dataset


def class_folder_sets(
    d: DatasetSource, s: ClsSettings
) -> tuple[ImageNetFolder, ImageNetFolder, list[str]]:
    """(train, val, class names); val must have the same class folders as train, or the
    label indices (sorted folder order) would mean different classes."""
    if d.kind not in CLS_KINDS:
        raise ConfigError(f"dataset.kind={d.kind!r}: eval-cls needs one of {list(CLS_KINDS)}")
    root = Path(d.root)
    train = ImageNetFolder(root / d.train_split, eval_transform(s))
    val = ImageNetFolder(root / d.val_split, eval_transform(s))
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes))
        raise ValueError(f"{root}: train and val class folders differ, e.g. {only[:5]}")
    names = read_class_names(Path(d.class_file)) if d.class_file else train.classes
    if len(names) != len(train.classes):
        raise ConfigError(
            f"dataset.class_file={d.class_file!r}: {len(names)} names for "
            f"{len(train.classes)} class folders"
        )
    return limit_per_class(train, d.train_per_class), limit_per_class(val, d.val_per_class), names


def features_of(
    backbone: torch.nn.Module,
    dataset: Dataset,
    config: EvalConfig,
    console: Console,
    device: torch.device,
) -> Labelled:
    loader = DataLoader(
        dataset,
        batch_size=config.cls.feature_batch_size,
        num_workers=config.dataset.num_workers,
    )
    batches = console.progress(loader, len(loader), "features")
    s = config.cls
    return extract_features(backbone, batches, s.n_last_blocks, s.avgpool, device)


def knn_results(
    bank: Labelled, val: Labelled, num_train: int, num_classes: int, s: ClsSettings
) -> tuple[dict[str, Any], torch.Tensor]:
    """{k: {top1, top5}} and the predictions of the smallest k (for the confusion plot).

    `bank` is this rank's shard of the `num_train` train features; `val` is all of val.
    """
    too_many = [k for k in s.ks if k > num_train]
    if too_many:
        raise ConfigError(f"cls.ks={s.ks}: k={too_many} exceed the {num_train} train images")
    scores = knn_scores(bank[0], bank[1], val[0], num_classes, s.ks, s.temperature)
    results = {}
    for k, k_scores in scores.items():
        acc = topk_accuracy(k_scores, val[1], (1, 5))
        results[str(k)] = {"top1": acc[1], "top5": acc[5]}
    return results, scores[min(s.ks)].argmax(1)


def linear_results(
    train: Labelled, val: Labelled, num_classes: int, config: EvalConfig
) -> tuple[dict[str, Any], torch.Tensor]:
    s = config.cls
    probe = LinearProbeConfig(
        lrs=tuple(s.lrs),
        epochs=s.epochs,
        batch_size=s.batch_size,
        optimizer=s.optimizer,
        holdout_fraction=s.holdout_fraction,
        seed=config.seed,
    )
    result = train_linear_probe(train[0], train[1], val[0], val[1], num_classes, probe)
    with torch.no_grad():
        predictions = result.classifier(val[0]).argmax(1)
    return {
        "best_lr": result.best_lr,
        "top1": result.val_accuracy[1],
        "top5": result.val_accuracy[5],
        "holdout_top1": {str(lr): acc for lr, acc in result.holdout_top1.items()},
    }, predictions


def plot_confusion(matrix: torch.Tensor, names: list[str], title: str, path: Path) -> None:
    """Rows normalised to recall, so classes of different sizes read on one scale."""
    rows = matrix.double()
    recall = rows / rows.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.35 * len(names))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    shown = ax.imshow(recall.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(shown, ax=ax, fraction=0.046, label="share of the true class (recall)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gathered(ranks: Ranks, shard: Labelled, total: int) -> Labelled:
    return ranks.gather(shard[0], total), ranks.gather(shard[1], total)


def gathered_on_main(ranks: Ranks, shard: Labelled, total: int) -> Labelled | None:
    features = ranks.gather_to_main(shard[0], total)
    labels = ranks.gather_to_main(shard[1], total)
    return None if features is None or labels is None else (features, labels)


def last_block_cls(features: torch.Tensor, s: ClsSettings, embed_dim: int) -> torch.Tensor:
    """The last block's [CLS] out of the linear probe's concatenated features."""
    return features[:, (s.n_last_blocks - 1) * embed_dim : s.n_last_blocks * embed_dim]


def evaluate_classification(config: EvalConfig) -> dict[str, Any]:
    """k-NN and/or linear probe on frozen features; writes results.json (and a confusion
    matrix PNG for at most 50 classes) into `config.output_dir`, returns the results.

    One process or several (torchrun / SLURM): every rank returns rank 0's results, and
    only rank 0 prints and writes files.
    """
    ranks = joined_ranks(config.device)
    return ranks.from_main(classify(config, ranks))


def classify(config: EvalConfig, ranks: Ranks) -> dict[str, Any] | None:
    """This rank's part of the job: the results on rank 0, None on the others."""
    s = config.cls
    console, output_dir, backbone, checkpoint = start_job(
        "eval-cls", config, ranks, "cls.n_last_blocks", s.n_last_blocks
    )
    train_set, val_set, names = class_folder_sets(config.dataset, s)
    console.phase(
        f"data: {len(train_set)} train / {len(val_set)} val images, {len(names)} classes, "
        f"{ranks.world_size} process(es)"
    )
    train = features_of(backbone, ranks.shard(train_set), config, console, ranks.device)
    val_shard = features_of(backbone, ranks.shard(val_set), config, console, ranks.device)
    val = gathered(ranks, val_shard, len(val_set))
    dim = val[0].shape[1]
    console.phase(f"features: {dim} dims ({s.n_last_blocks} block(s), avgpool={s.avgpool})")
    results: dict[str, Any] = {"task": "classification", "class_names": names}
    predictions = {}
    if s.knn:
        bank = (last_block_cls(train[0], s, backbone.embed_dim), train[1])
        queries = (last_block_cls(val[0], s, backbone.embed_dim), val[1])
        knn, predictions["k-NN"] = knn_results(bank, queries, len(train_set), len(names), s)
        results["knn"] = knn
        best = max(knn.values(), key=lambda r: r["top1"])["top1"]
        console.phase(f"k-NN (T={s.temperature}) best top-1 {100 * best:.2f}")
    if s.linear:
        full_train = gathered_on_main(ranks, train, len(train_set))
        if full_train is not None:
            linear, predictions["linear"] = linear_results(full_train, val, len(names), config)
            results["linear"] = linear
            console.phase(f"linear top-1 {100 * linear['top1']:.2f} (lr {linear['best_lr']:g})")
    if not ranks.is_main:
        return None
    results |= {
        "feature_dim": dim,
        "num_train_images": len(train_set),
        "num_val_images": len(val_set),
        "num_processes": ranks.world_size,
        **run_record(config, checkpoint),
    }
    if len(names) <= MAX_PLOTTED_CLASSES:
        results["confusion_matrix"] = confusion_of(predictions, val[1], names, output_dir)
    path = write_results(output_dir, results)
    console.phase(f"results -> {path}")
    return json_safe(results)


def confusion_of(
    predictions: dict[str, torch.Tensor], labels: torch.Tensor, names: list[str], output_dir: Path
) -> dict[str, Any]:
    """The confusion matrix of the linear probe (else k-NN), also drawn as a PNG."""
    which = "linear" if "linear" in predictions else "k-NN"
    matrix = confusion_matrix(predictions[which], labels, len(names), NO_IGNORE)
    plot_confusion(
        matrix, names, f"{which} confusion (row-normalised)", output_dir / CONFUSION_PLOT
    )
    return {"classifier": which, "counts": matrix.tolist()}
