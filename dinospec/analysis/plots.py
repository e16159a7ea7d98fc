"""Figures of the token analysis, the PCA picture and training curves.

Every function builds a standalone matplotlib Figure (Agg, no pyplot state), so figures
can be made from worker threads and tests can read back the plotted data; `save_figure`
writes it. Several analyses passed together are laid out side by side, labelled, on
shared axes, so vanilla and specialized backbones compare at a glance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from torch import Tensor

from dinospec.analysis.tokens import STAGE_TITLES, STAGES, BackboneAnalysis, NormStats
from dinospec.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DPI = 100
PANEL_INCHES = 2.0
HEADER_INCHES = 0.6
Labelled = Sequence[tuple[str, BackboneAnalysis]]

PAIR_TITLES = {
    "cls_patch": "[CLS]-patch",
    "patch_patch": "patch-patch",
    "register_patch": "register-patch",
    "cls_register": "[CLS]-register",
    "register_register": "register-register",
}
KIND_TITLES = {"norm1": "norm1 (before attention)", "norm2": "norm2 (before FFN)"}
STAGE_COLOURS = {"input": "tab:blue", "normalized": "tab:green", "output": "tab:orange"}
STAGE_LINES = {"input": "-", "normalized": "--", "output": "-"}
METRIC_TITLES = {
    "loss": "total loss",
    "loss_window_mean": "total loss, mean since the previous log line",
    "loss_dino_global": "DINO loss, global crops",
    "loss_dino_local": "DINO loss, local crops",
    "loss_koleo": "KoLeo loss",
    "loss_ibot": "iBOT loss",
    "loss_gram": "Gram anchoring loss",
    "lr": "learning rate",
    "wd": "weight decay",
    "momentum": "teacher momentum",
    "teacher_temp": "teacher temperature",
    "teacher_entropy": "teacher entropy / log K",
    "student_cls_std": "student [CLS] spread",
    "eval_knn_top1": "k-NN top-1 (teacher [CLS], evaluation set)",
    "eval_seg_miou": "linear segmentation probe mIoU",
}


def save_figure(fig: Figure, path: str | Path) -> Path:
    """PNG at a fixed DPI and no tight cropping, so the pixel size is the figure size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _panels(
    rows: int, cols: int, width: float, height: float, sharey: bool | str = False
) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * width, rows * height), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False, sharey=sharey)


def _pairs(analyses: Labelled) -> list[str]:
    present = {k for _, a in analyses for k in a.norms[0].stages["input"].cosine}
    return [k for k in PAIR_TITLES if k in present]


def _plot_cosines(ax: Axes, norms: list[NormStats], final: NormStats, pair: str) -> None:
    blocks = [n.block for n in norms]
    for stage in STAGES:
        colour = STAGE_COLOURS[stage]
        summaries = [n.stages[stage].cosine_summary(pair) for n in norms]
        mean = np.array([s["mean"] for s in summaries])
        std = np.array([s["std"] for s in summaries])
        ax.plot(
            blocks,
            mean,
            STAGE_LINES[stage],
            marker="o",
            color=colour,
            label=STAGE_TITLES[stage],
            markersize=3,
        )
        ax.fill_between(blocks, mean - std, mean + std, color=colour, alpha=0.2)
        last = final.stages[stage].cosine_summary(pair)
        ax.errorbar([final.block], [last["mean"]], [last["std"]], fmt="s", color=colour)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xticks([*blocks, final.block], [*map(str, blocks), "final"])


def cosine_figure(analyses: Labelled) -> Figure:
    """Mean cosine (± std over images) vs block for each token pair, before and after
    norm1 and norm2; the final norm is the square marker at 'final'."""
    pairs = _pairs(analyses)
    columns = [(label, a, kind) for label, a in analyses for kind in KIND_TITLES]
    fig, axes = _panels(len(pairs), len(columns), 3.6, 2.6, sharey="row")
    for col, (label, analysis, kind) in enumerate(columns):
        final = analysis.of_kind("final")[0]
        for row, pair in enumerate(pairs):
            ax = axes[row, col]
            _plot_cosines(ax, analysis.of_kind(kind), final, pair)
            ax.set_title(f"{label}: {KIND_TITLES[kind]}", fontsize=9)
            ax.set_ylabel(f"{PAIR_TITLES[pair]} cosine")
            ax.set_xlabel("block")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Token cosine similarity around each LayerNorm (mean ± std over images)")
    return fig


def log_ratio_figure(analyses: Labelled, blocks: Sequence[int], kind: str = "norm1") -> Figure:
    """Per-channel log10(mean |[CLS]| / mean |patch|), sorted, for the chosen blocks: a few
    channels far above the dashed threshold is the paper's dimension separation."""
    fig, axes = _panels(len(analyses), len(STAGES), 3.6, 2.8)
    for row, (label, analysis) in enumerate(analyses):
        norms = {n.block: n for n in analysis.of_kind(kind)}
        limit = math.log10(analysis.threshold)
        for col, stage in enumerate(STAGES):
            ax = axes[row, col]
            for block in blocks:
                stats = norms[block].stages[stage]
                share = stats.separation["total"]
                ratio = np.sort(stats.log_ratio)[::-1]
                ax.plot(ratio, label=f"block {block} ({share:.0%} separated)")
            for level in (limit, -limit):
                ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(f"{label}: {kind}, {STAGE_TITLES[stage]}", fontsize=9)
            ax.set_xlabel("channel (sorted by ratio)")
            ax.set_ylabel("log10 |[CLS]| / |patch|")
            ax.legend(fontsize=6)
    fig.suptitle(f"Per-channel magnitude ratio; dashed: {analyses[0][1].threshold:g}x either way")
    return fig


def separation_figure(analyses: Labelled) -> Figure:
    """Share of channels whose [CLS]/patch magnitude ratio passes the threshold, vs block."""
    fig, axes = _panels(1, len(analyses), 4.0, 3.0)
    for col, (label, analysis) in enumerate(analyses):
        ax = axes[0, col]
        for kind, style in (("norm1", "-"), ("norm2", "--")):
            norms = analysis.of_kind(kind)
            for stage in STAGES:
                shares = [n.stages[stage].separation["total"] for n in norms]
                ax.plot(
                    [n.block for n in norms],
                    shares,
                    style,
                    color=STAGE_COLOURS[stage],
                    label=f"{kind}: {STAGE_TITLES[stage]}",
                )
        ax.set_title(f"{label}: ratio beyond {analysis.threshold:g}x", fontsize=9)
        ax.set_xticks([n.block for n in analysis.of_kind("norm1")])
        ax.set_xlabel("block")
        ax.set_ylabel("share of channels separated")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=6)
    fig.suptitle("Dimension separation between [CLS] and patch tokens")
    return fig


def heatmap_figure(analyses: Labelled) -> Figure:
    """|activation| per token and channel for one image, on a log colour scale so that a
    few dominant channels stand out; dashed lines close the [CLS] and register rows."""
    fig, axes = _panels(len(analyses), len(STAGES), 3.8, 3.2)
    for row, (label, analysis) in enumerate(analyses):
        registers = analysis.model["num_register_tokens"]
        for col, stage in enumerate(STAGES):
            ax = axes[row, col]
            values = analysis.heatmap[stage]
            top = max(float(values.max()), 1e-12)
            image = ax.imshow(
                np.maximum(values, top * 1e-3),
                aspect="auto",
                cmap="magma",
                interpolation="nearest",
                norm=LogNorm(vmin=top * 1e-3, vmax=top),
            )
            for boundary in sorted({0.5, registers + 0.5}):
                ax.axhline(boundary, color="white", linestyle="--", linewidth=0.8)
            fig.colorbar(image, ax=ax, label="|activation| (log scale)")
            ax.set_title(f"{label}: {analysis.heatmap_site}, {STAGE_TITLES[stage]}", fontsize=8)
            ax.set_xlabel("channel")
            ax.set_ylabel("token (0 = [CLS], then registers, patches)")
    fig.suptitle("Token x channel magnitude, first image")
    return fig


def to_display(images: Tensor) -> Tensor:
    """ImageNet-normalized (B, 3, H, W) back to [0, 1] (B, H, W, 3) for imshow."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.float().cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def pca_grid_figure(images: Tensor, rgb: Tensor, columns: int = 4) -> Figure:
    """Each image beside its PCA map, `columns` pairs per row. Every panel is PANEL_INCHES
    square under a HEADER_INCHES title band, so the PNG is 2 * columns * PANEL_INCHES * DPI
    pixels wide and (rows * PANEL_INCHES + HEADER_INCHES) * DPI high."""
    n = images.shape[0]
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    height = rows * PANEL_INCHES + HEADER_INCHES
    fig = Figure(figsize=(2 * cols * PANEL_INCHES, height))
    top = 1 - HEADER_INCHES / height
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.05, hspace=0.2)
    axes = fig.subplots(rows, 2 * cols, squeeze=False)
    shown = to_display(images)
    for ax in axes.flat:
        ax.set_axis_off()
    for i in range(n):
        left, right = axes[i // cols, 2 * (i % cols)], axes[i // cols, 2 * (i % cols) + 1]
        left.imshow(shown[i].numpy())
        left.set_title(f"image {i}", fontsize=8)
        right.imshow(rgb[i].cpu().numpy(), interpolation="nearest")
        right.set_title("PCA 1-3 as RGB", fontsize=8)
    fig.suptitle("First three principal components of the patch features")
    return fig


def metrics_figure(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    phase_starts: Mapping[str, Sequence[int]] | None = None,
) -> Figure:
    """One panel per known metric present in any run, one line per run; a dashed line
    where a run's next phase starts (`phase_starts`: overall iterations per run)."""
    keys = [k for k in METRIC_TITLES if any(k in r for records in runs.values() for r in records)]
    if not keys:
        raise ValueError(f"none of the known metrics {list(METRIC_TITLES)} is in these runs")
    cols = min(3, len(keys))
    fig, axes = _panels(math.ceil(len(keys) / cols), cols, 4.0, 2.8)
    for ax in axes.flat[len(keys) :]:
        ax.set_axis_off()
    for ax, key in zip(axes.flat, keys, strict=False):
        for label, records in runs.items():
            points = [(r["iteration"], r[key]) for r in records if key in r]
            if points:
                x, y = zip(*points, strict=True)
                marker = "o" if key.startswith("eval_") else None
                line = ax.plot(x, y, label=label, marker=marker, markersize=3)[0]
                for start in (phase_starts or {}).get(label, ()):
                    ax.axvline(start, color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_title(METRIC_TITLES[key], fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
    axes[0, 0].legend(fontsize=7)
    switches = (
        " (dashed: a new training phase starts)"
        if phase_starts and any(phase_starts.values())
        else ""
    )
    fig.suptitle(f"Training curves{switches}")
    return fig
