"""`evaluate_depth`: DINOv2's linear depth probe (NYU Depth v2 "lin. 1" / "lin. 4") as one
job.

Frozen backbone; [patch, CLS] features of the last block or of four blocks spread over the
depth; a 1x1 conv over 256 depth bins (eval.depth_head), trained on augmented crops
through the backbone (eval.depth_probe); whole val images predicted with a horizontal
flip and scored per image by RMSE, abs-rel and delta < 1.25, then averaged
(eval.depth_metrics). The NYU layout gets NYU's crops: the border crop of training views
and the Eigen crop of the scored region (so its frames must be 480 x 640); the folder
layout gets neither.

With several processes (torchrun / SLURM) rank 0 trains the head while the others wait,
then every rank scores its shard of val and the per-image scores are gathered on rank 0,
so the results are those of one process.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from dinospec.analysis.plots import save_figure
from dinospec.config import ConfigError
from eval.config import DEPTH_KINDS, DatasetSource, EvalConfig
from eval.depth_data import DepthDataset, depth_folders, nyu
from eval.depth_head import LinearDepther, predict_depth
from eval.depth_metrics import DepthScores, image_scores, mean_scores, valid_mask
from eval.depth_probe import train_depth_head
from eval.runner import (
    Console,
    json_safe,
    run_record,
    start_job,
    write_results,
)
from eval.seg_transforms import normalize
from eval.sharding import Ranks, joined_ranks
from eval.subsets import image_name, spread_indices

PREDICTIONS_PLOT = "depth_predictions.png"
HEAD_FILE = "linear_depth_head.pt"
DEPTH_COLOURS = "viridis"
UNSCORED_COLOUR = "0.6"
DepthExample = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, DepthScores | None]
"""(image, ground truth, prediction, scored-pixel mask, scores) of one val image."""
Indexed = list[tuple[int, DepthExample]]
Named = list[tuple[str, DepthExample]]


def spread_subset(dataset: DepthDataset, limit: int | None) -> DepthDataset:
    dataset.pairs = [dataset.pairs[i] for i in spread_indices(len(dataset.pairs), limit)]
    return dataset


def depth_datasets(d: DatasetSource) -> tuple[DepthDataset, DepthDataset]:
    """(train, val) without transforms; the job sets the transform of each phase."""
    if d.kind == "nyu":
        train = nyu(d.root, d.train_split, d.depth_scale)
        val = nyu(d.root, d.val_split, d.depth_scale)
    elif d.kind == "depth_folders":
        train = depth_folders(d.train_images, d.train_labels, d.depth_scale)
        val = depth_folders(d.val_images, d.val_labels, d.depth_scale)
    else:
        raise ConfigError(f"dataset.kind={d.kind!r}: eval-depth needs one of {list(DEPTH_KINDS)}")
    return spread_subset(train, d.max_train_images), spread_subset(val, d.max_val_images)


@torch.no_grad()
def evaluate(
    depther: LinearDepther,
    val_set: DepthDataset,
    config: EvalConfig,
    console: Console,
    ranks: Ranks,
) -> tuple[list[tuple[int, DepthScores | None]] | None, Indexed | None]:
    """Per-image scores of the whole val set (this rank scores its shard) and the examples
    to draw, spread over the set; both in dataset order on rank 0, None elsewhere."""
    d = config.depth
    device = next(depther.head.parameters()).device
    eigen_crop = config.dataset.kind == "nyu"
    shown = set(spread_indices(len(val_set), d.num_visualized))
    val_set.transform = None
    depther.eval()
    crop = "Eigen crop" if eigen_crop else "whole image"
    console.phase(f"evaluating {len(val_set)} images ({crop}{', flip' if d.flip else ''})")
    scores: list[tuple[int, DepthScores | None]] = []
    examples: Indexed = []
    mine = ranks.indices(len(val_set))
    for index in console.progress(mine, len(mine), "evaluate"):
        raw, target = val_set[index]
        pred = predict_depth(depther, normalize(raw)[None].to(device), d.flip)[0].cpu()
        mask = valid_mask(target, d.min_depth, d.max_depth, eigen_crop)
        score = image_scores(pred, target, mask)
        scores.append((index, score))
        if index in shown:
            examples.append((index, (raw, target, pred, mask, score)))
    gathered_scores = ranks.objects_to_main(scores)
    gathered_examples = ranks.objects_to_main(examples)
    if gathered_scores is None or gathered_examples is None:
        return None, None
    first = itemgetter(0)
    return sorted(gathered_scores, key=first), sorted(gathered_examples, key=first)


def predictions_figure(examples: Named) -> Figure:
    """Image, ground truth and prediction of each example on one colour scale in metres;
    pixels that are not scored (no measurement, out of range or outside the crop) grey."""
    top = max(
        max(float(t[m].max()) if m.any() else 0.0, float(p.max()))
        for _, (_, t, p, m, _) in examples
    )
    colours = matplotlib.colormaps[DEPTH_COLOURS].with_extremes(bad=UNSCORED_COLOUR)
    fig = Figure(figsize=(11, 2.8 * len(examples) + 0.8), layout="constrained")
    axes = fig.subplots(len(examples), 3, squeeze=False)
    shown = None
    for row, (name, (image, target, pred, mask, score)) in zip(axes, examples, strict=True):
        row[0].imshow(image.permute(1, 2, 0).numpy())
        row[0].set_title(name, fontsize=9)
        truth = np.ma.masked_where(~mask.numpy(), target.numpy())
        row[1].imshow(truth, cmap=colours, vmin=0, vmax=top)
        row[1].set_title("ground truth (grey: not scored)", fontsize=9)
        shown = row[2].imshow(pred.numpy(), cmap=colours, vmin=0, vmax=top)
        error = "no scored pixel" if score is None else f"RMSE {score.rmse:.3f} m"
        row[2].set_title(f"prediction ({error})", fontsize=9)
        for ax in row:
            ax.axis("off")
    fig.colorbar(shown, ax=axes[:, 1:], label="depth (m)", shrink=0.9)
    fig.suptitle(f"Linear depth probe on {len(examples)} val images spread over the split")
    return fig


def evaluate_depth(config: EvalConfig) -> dict[str, Any]:
    """Train and score a linear depth probe; writes results.json, a figure of predictions
    and the head into `config.output_dir`, and returns the results.

    One process or several (torchrun / SLURM): every rank returns rank 0's results, and
    only rank 0 prints and writes files.
    """
    ranks = joined_ranks(config.device)
    return ranks.from_main(estimate_depth(config, ranks))


def estimate_depth(config: EvalConfig, ranks: Ranks) -> dict[str, Any] | None:
    """This rank's part of the job: the results on rank 0, None on the others."""
    d = config.depth
    console, output_dir, backbone, checkpoint = start_job(
        "eval-depth", config, ranks, "depth.n_layers", d.n_layers
    )
    train_set, val_set = depth_datasets(config.dataset)
    console.phase(
        f"data: {len(train_set)} train / {len(val_set)} val images, {ranks.world_size} process(es)"
    )
    depther = LinearDepther(backbone, d.n_layers, d.n_bins, d.min_depth, d.max_depth)
    depther = depther.to(ranks.device)
    training = None
    if ranks.is_main:
        nyu_crops = config.dataset.kind == "nyu"
        training = train_depth_head(depther, train_set, config, console, border_crop=nyu_crops)
    ranks.share_main_state(depther.head)
    per_image, examples = evaluate(depther, val_set, config, console, ranks)
    if per_image is None:
        return None
    scores = mean_scores(score for _, score in per_image)
    results = {
        "task": "depth",
        "metrics": {"rmse": scores.rmse, "abs_rel": scores.abs_rel, "delta1": scores.delta1},
        "units": {"rmse": "m", "abs_rel": "fraction", "delta1": "fraction of pixels"},
        "protocol": {
            "scored_region": "Eigen crop" if config.dataset.kind == "nyu" else "whole image",
            "valid_depth_m": [d.min_depth, d.max_depth],
            "flip": d.flip,
            "average": "per image, then over images",
        },
        "per_image": [
            {"image": str(val_set.pairs[i][0]), **(vars(s) if s is not None else {})}
            for i, s in per_image
        ],
        "training": training,
        "num_train_images": len(train_set),
        "num_val_images": len(val_set),
        "num_scored_images": sum(s is not None for _, s in per_image),
        "num_processes": ranks.world_size,
        **run_record(config, checkpoint),
    }
    torch.save(depther.head.state_dict(), output_dir / HEAD_FILE)
    if examples:
        named = [(image_name(val_set.pairs[i][0]), example) for i, example in examples]
        save_figure(predictions_figure(named), output_dir / PREDICTIONS_PLOT)
    path = write_results(output_dir, results)
    console.phase(
        f"RMSE {scores.rmse:.4f} m  abs-rel {scores.abs_rel:.4f}  "
        f"delta1 {100 * scores.delta1:.2f}%  -> {path}"
    )
    return json_safe(results)
