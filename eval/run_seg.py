"""`evaluate_segmentation`: the linear segmentation probe of SPEC section 5 as one job.

Frozen backbone, BatchNorm + 1x1 conv head trained with AdamW (warm-up then cosine),
sliding-window evaluation (optionally multi-scale and flipped) and mIoU over the whole
validation set. The head trains either on augmented crops through the backbone at every
iteration (the published protocol) or, with `seg.cache_features`, on features computed
once from un-augmented centre crops, which is what makes a probe affordable on a CPU;
results.json says which.

With several processes (torchrun / SLURM) every rank evaluates its shard of val and the
confusion matrix is summed over ranks. Cached features are computed by shard and
gathered on rank 0, which trains the head alone; augmented training splits every global
batch over the ranks (eval.seg_augmented). Either way rank 0's head is then every rank's,
and the scores are those of one process.
"""

from __future__ import annotations

from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from dinospec.analysis.plots import save_figure
from dinospec.config import ConfigError
from eval.config import SEG_KINDS, DatasetSource, EvalConfig
from eval.metrics import IGNORE_INDEX, ConfusionMatrix, scores_from_confusion
from eval.runner import (
    Console,
    json_safe,
    run_record,
    start_job,
    write_results,
)
from eval.seg_augmented import train_augmented
from eval.seg_data import SegmentationDataset, ade20k, camvid, folder_pairs
from eval.seg_head import MS_SCALES, LinearSegmenter, predict_probabilities
from eval.seg_probe import extract_features, train_head
from eval.seg_transforms import (
    SegTestTransform,
    normalize,
    pad_to,
    rescaled_size,
    resize_image,
    resize_label,
)
from eval.sharding import Ranks, joined_ranks
from eval.subsets import image_name, spread_indices

IOU_PLOT = "per_class_iou.png"
PREDICTIONS_PLOT = "predictions.png"
HEAD_FILE = "linear_head.pt"
PALETTE_SEED = 0
IGNORED_NAME = "ignored (not scored)"
Example = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(image, ground truth, prediction) of one val image."""
Indexed = list[tuple[int, Example]]
Named = list[tuple[str, Example]]
"""Examples titled by their image file (folder/stem)."""


def evenly_spaced(dataset: SegmentationDataset, limit: int | None) -> SegmentationDataset:
    """At most `limit` pairs spread over the whole (sorted) set: the first n images of a
    video dataset like CamVid would all come from one sequence."""
    dataset.pairs = [dataset.pairs[i] for i in spread_indices(len(dataset.pairs), limit)]
    return dataset


def segmentation_datasets(d: DatasetSource) -> tuple[SegmentationDataset, SegmentationDataset]:
    """(train, val) without transforms; the job sets the transform of each phase."""
    if d.kind == "ade20k":
        train, val = ade20k(d.root, d.train_split), ade20k(d.root, d.val_split)
    elif d.kind == "camvid":
        train, val = camvid(d.root, d.train_split), camvid(d.root, d.val_split)
    elif d.kind == "folder_pairs":
        encoding = {
            "first_class_value": d.first_class_value,
            "ignore_values": tuple(d.ignore_values),
        }
        train = folder_pairs(d.train_images, d.train_labels, d.class_file, **encoding)
        val = folder_pairs(d.val_images, d.val_labels, d.class_file, **encoding)
    else:
        raise ConfigError(f"dataset.kind={d.kind!r}: eval-seg needs one of {list(SEG_KINDS)}")
    return evenly_spaced(train, d.max_train_images), evenly_spaced(val, d.max_val_images)


class CenterCropTransform:
    """The deterministic training view of cached features: test-time rescale, centre crop,
    padding to the crop size, so every image yields features of one shape."""

    def __init__(self, base_size: int, crop_size: int) -> None:
        self.base_size = base_size
        self.crop_size = crop_size

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        size = rescaled_size(*label.shape, self.base_size, self.base_size * 4)
        image, label = resize_image(image, size), resize_label(label, size)
        top = max(size[0] - self.crop_size, 0) // 2
        left = max(size[1] - self.crop_size, 0) // 2
        window = (slice(top, top + self.crop_size), slice(left, left + self.crop_size))
        image, label = image[:, window[0], window[1]], label[window]
        return pad_to(normalize(image), label, self.crop_size)


def train_on_cached_features(
    segmenter: LinearSegmenter,
    train_set: SegmentationDataset,
    config: EvalConfig,
    console: Console,
    ranks: Ranks,
) -> dict[str, Any]:
    """Features of this rank's shard, gathered on rank 0, which alone trains the head: the
    head is then exactly the one a single process trains."""
    s = config.seg
    patch = segmenter.features.patch_size
    if s.crop_size % patch:
        raise ConfigError(
            f"seg.crop_size={s.crop_size}: with seg.cache_features it must be a multiple of "
            f"the patch size {patch}, so cached features and labels stay aligned"
        )
    train_set.transform = CenterCropTransform(s.base_size, s.crop_size)
    console.phase(f"caching features of {len(train_set)} centre crops ({s.crop_size} px)")
    backbone = segmenter.features.backbone
    device = next(backbone.parameters()).device
    shard = ranks.shard(train_set)
    features, labels = extract_features(backbone, shard, s.n_layers, device, s.batch_size)
    features = ranks.gather_to_main(features, len(train_set))
    labels = ranks.gather_to_main(labels, len(train_set))
    if features is not None and labels is not None:
        console.phase(f"training the head on cached features for {s.iterations} iterations")
        head = train_head(features, labels, segmenter.num_classes, s, config.seed)
        segmenter.head.load_state_dict(head.state_dict())
    return {"mode": "cached_features", "augmentation": "none (centre crop)"}


@torch.no_grad()
def evaluate(
    segmenter: LinearSegmenter,
    val_set: SegmentationDataset,
    config: EvalConfig,
    console: Console,
    ranks: Ranks,
) -> tuple[torch.Tensor, Indexed | None]:
    """Confusion matrix over the whole val set (this rank scores its shard), and on rank 0
    (index, (image, label, pred)) of `seg.num_visualized` val images spread over the set,
    whichever rank scored them."""
    s = config.seg
    device = next(segmenter.head.parameters()).device
    scales = MS_SCALES if s.multiscale else (1.0,)
    transform = SegTestTransform(s.base_size)
    confusion = ConfusionMatrix(segmenter.num_classes)
    shown = set(spread_indices(len(val_set), s.num_visualized))
    examples: Indexed = []
    segmenter.eval()
    val_set.transform = None
    views = f"{len(scales)} scale(s){' + flip' if s.flip else ''}"
    console.phase(
        f"evaluating {len(val_set)} images: sliding window {s.crop_size}/{s.stride}, {views}"
    )
    mine = ranks.indices(len(val_set))
    for index in console.progress(mine, len(mine), "evaluate"):
        raw, label = val_set[index]
        image, label = transform(raw, label)
        probs = predict_probabilities(
            segmenter, image[None].to(device), label.shape, s.crop_size, s.stride, scales, s.flip
        )
        pred = probs.argmax(1)[0].cpu()
        confusion.update(pred, label)
        if index in shown:
            examples.append((index, (raw, label, pred)))
    gathered = ranks.objects_to_main(examples)
    return confusion.total(), None if gathered is None else sorted(gathered, key=lambda e: e[0])


def palette(num_classes: int) -> torch.Tensor:
    """Fixed random colours per class (uint8), black last for ignored pixels."""
    colours = torch.randint(
        40, 256, (num_classes, 3), generator=torch.Generator().manual_seed(PALETTE_SEED)
    )
    return torch.cat([colours, torch.zeros(1, 3, dtype=colours.dtype)]).to(torch.uint8)


def colourize(label: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    ignored = len(colours) - 1
    return colours[torch.where(label == IGNORE_INDEX, ignored, label)]


def class_iou_figure(names: list[str], iou: list[float]) -> Figure:
    """NaN (class absent from labels and predictions) is drawn as an empty, marked slot."""
    fig = Figure(figsize=(max(6.0, 0.3 * len(names)), 4), layout="constrained")
    ax = fig.subplots()
    values = [0.0 if v != v else 100 * v for v in iou]
    ax.bar(range(len(names)), values, color="tab:blue")
    for i, v in enumerate(iou):
        if v != v:
            ax.text(i, 1, "n/a", ha="center", rotation=90, fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set(xlabel="class", ylabel="IoU (%)", ylim=(0, 100), title="Per-class IoU on val")
    return fig


def legend_handles(examples: Named, class_names: list[str], colours: torch.Tensor) -> list[Patch]:
    """One swatch per class that appears in the shown labels or predictions (a legend of
    all 150 ADE20K classes would dwarf the images), and one for ignored pixels if any."""
    values = torch.cat(
        [torch.cat([label.flatten(), pred.flatten()]) for _, (_, label, pred) in examples]
    )
    present = sorted(set(values.unique().tolist()) - {IGNORE_INDEX})
    handles = [Patch(color=(colours[c] / 255).tolist(), label=class_names[c]) for c in present]
    if (values == IGNORE_INDEX).any():
        handles.append(Patch(color=(colours[-1] / 255).tolist(), label=IGNORED_NAME))
    return handles


def predictions_figure(examples: Named, class_names: list[str]) -> Figure:
    """Image, ground truth and prediction of each example, one row per val image, with the
    colour legend of the classes shown."""
    colours = palette(len(class_names))
    fig = Figure(figsize=(9, 2.6 * len(examples) + 1.2), layout="constrained")
    axes = fig.subplots(len(examples), 3, squeeze=False)
    for row, (name, (image, label, pred)) in zip(axes, examples, strict=True):
        panels = (image.permute(1, 2, 0), colourize(label, colours), colourize(pred, colours))
        for ax, panel, title in zip(
            row, panels, ("image", "ground truth", "prediction"), strict=True
        ):
            ax.imshow(panel.numpy())
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.axis("off")
    handles = legend_handles(examples, class_names, colours)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)), fontsize=8)
    fig.suptitle(f"Linear probe predictions on {len(examples)} val images spread over the split")
    return fig


def evaluate_segmentation(config: EvalConfig) -> dict[str, Any]:
    """Train and score a linear probe; writes results.json, the per-class IoU chart, a grid
    of predictions and the head into `config.output_dir`, and returns the results.

    One process or several (torchrun / SLURM): every rank returns rank 0's results, and
    only rank 0 prints and writes files.
    """
    ranks = joined_ranks(config.device)
    return ranks.from_main(segment(config, ranks))


def segment(config: EvalConfig, ranks: Ranks) -> dict[str, Any] | None:
    """This rank's part of the job: the results on rank 0, None on the others."""
    console, output_dir, backbone, checkpoint = start_job(
        "eval-seg", config, ranks, "seg.n_layers", config.seg.n_layers
    )
    train_set, val_set = segmentation_datasets(config.dataset)
    num_classes = train_set.num_classes
    console.phase(
        f"data: {len(train_set)} train / {len(val_set)} val images, {num_classes} classes, "
        f"{ranks.world_size} process(es)"
    )
    segmenter = LinearSegmenter(backbone, num_classes, config.seg.n_layers).to(ranks.device)
    train = train_on_cached_features if config.seg.cache_features else train_augmented
    training = train(segmenter, train_set, config, console, ranks)
    ranks.share_main_state(segmenter.head)
    matrix, examples = evaluate(segmenter, val_set, config, console, ranks)
    if not ranks.is_main:
        return None
    scores = scores_from_confusion(matrix)
    names = train_set.class_names
    results = {
        "task": "segmentation",
        "metrics": {
            "miou": scores.miou,
            "pixel_accuracy": scores.pixel_accuracy,
            "mean_accuracy": scores.mean_accuracy,
        },
        "per_class": [
            {"name": name, "iou": iou, "accuracy": acc}
            for name, iou, acc in zip(names, scores.iou, scores.class_accuracy, strict=True)
        ],
        "confusion_matrix": matrix.tolist(),
        "training": training,
        "num_train_images": len(train_set),
        "num_val_images": len(val_set),
        "num_processes": ranks.world_size,
        **run_record(config, checkpoint),
    }
    torch.save(segmenter.head.state_dict(), output_dir / HEAD_FILE)
    save_figure(class_iou_figure(names, scores.iou), output_dir / IOU_PLOT)
    if examples:
        named = [(image_name(val_set.pairs[i][0]), example) for i, example in examples]
        save_figure(predictions_figure(named, names), output_dir / PREDICTIONS_PLOT)
    path = write_results(output_dir, results)
    console.phase(
        f"mIoU {100 * scores.miou:.2f}  pixel acc {100 * scores.pixel_accuracy:.2f}  -> {path}"
    )
    return json_safe(results)
