"""`dinospec analyze`, `dinospec pca` and `dinospec plot-metrics`.

Inputs are resolved the same way for every command: a backbone is a weight file (DINOv2
hub, timm, Hugging Face or dinospec), a Hugging Face model directory or a training run
directory (its exported teacher), and images are a folder or the built-in
synthetic scenes, resized and centre-cropped to a multiple of the patch size.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode, v2

from dinospec.analysis.pca import patch_features, pca_rgb
from dinospec.analysis.plots import (
    cosine_figure,
    heatmap_figure,
    log_ratio_figure,
    metrics_figure,
    pca_grid_figure,
    save_figure,
    separation_figure,
)
from dinospec.analysis.tokens import DEFAULT_RATIO_THRESHOLD, BackboneAnalysis, analyze_backbone
from dinospec.data.datasets import ImageTree
from dinospec.data.synthetic import SyntheticScenes
from dinospec.data.transforms import normalize, to_uint8_image
from dinospec.models.vit import DinoVisionTransformer
from dinospec.run.exports import load_frozen_backbone
from dinospec.run.layout import RunDir, is_export
from dinospec.train.phases import phase_chain

SYNTHETIC = "synthetic"


def prepare_image(image: Image.Image | Tensor, size: int) -> Tensor:
    """Shorter side to `size` (bicubic), centre crop, ImageNet normalization."""
    image = to_uint8_image(image)
    image = v2.functional.resize(image, size, InterpolationMode.BICUBIC, antialias=True)
    return normalize()(v2.functional.center_crop(image, size)).as_subclass(Tensor)


def load_images(source: str, n: int, size: int) -> Tensor:
    """The first n images of a folder (sorted, so runs see the same images) or n synthetic
    scenes, as a (n, 3, size, size) batch."""
    if source == SYNTHETIC:
        scenes = SyntheticScenes(size=n, image_size=size)
        return torch.stack([prepare_image(scenes[i][0], size) for i in range(n)])
    tree = ImageTree(source)
    count = min(n, len(tree))
    return torch.stack([prepare_image(tree[i][0], size) for i in range(count)])


def fit_size(model: DinoVisionTransformer, size: int) -> int:
    """Largest multiple of the patch size not above `size` (the patch embedding needs one)."""
    fitted = size // model.patch_size * model.patch_size
    if fitted < model.patch_size:
        raise ValueError(f"--size {size} is smaller than the patch size {model.patch_size}")
    return fitted


def batches(images: Tensor, batch_size: int, device: str) -> Iterator[Tensor]:
    for chunk in images.split(batch_size):
        yield chunk.to(device)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_blocks(depth: int) -> list[int]:
    """First, one third, two thirds and last: early, middle and late behaviour."""
    return sorted({0, depth // 3, 2 * depth // 3, depth - 1})


def run_labels(paths: Sequence[str], labels: Sequence[str] | None) -> list[str]:
    """Given labels, else the run or file name; full paths when names collide."""
    if labels:
        if len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} inputs")
        return list(labels)
    names = [_short_name(Path(p)) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _short_name(path: Path) -> str:
    if path.is_file() and is_export(path):
        return path.resolve().parent.name
    return path.name or str(path)


def _add_model_options(parser: argparse.ArgumentParser, n: int) -> None:
    parser.add_argument(
        "--images", required=True, help=f"image folder, or '{SYNTHETIC}' for built-in scenes"
    )
    parser.add_argument("--n", type=int, default=n, help="number of images")
    parser.add_argument(
        "--size", type=int, default=224, help="image side, rounded down to the patch size"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="attention heads, for files that do not record them (default: those of the "
        "released DINOv2 size the weights match, if any)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def _analyze(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    models = [
        load_frozen_backbone(p, device, num_heads=args.num_heads)[0] for p in args.checkpoints
    ]
    labels = run_labels(args.checkpoints, args.labels)
    depth = min(len(m.blocks) for m in models)
    blocks = args.blocks if args.blocks is not None else default_blocks(depth)
    if max(blocks) >= depth or min(blocks) < 0:
        raise ValueError(f"--blocks {blocks} outside the blocks 0-{depth - 1} of every model")
    analyses = []
    for model in models:
        size = fit_size(model, args.size)
        images = load_images(args.images, args.n, size)
        heatmap_block = len(model.blocks) - 1 if args.heatmap_block is None else args.heatmap_block
        analysis = analyze_backbone(
            model,
            batches(images, args.batch_size, device),
            args.threshold,
            f"blocks.{heatmap_block}.norm1",
        )
        analyses.append(analysis)
    written = write_analysis(Path(args.out), list(zip(labels, analyses, strict=True)), args, blocks)
    print("\n".join(str(p) for p in written))


def write_analysis(
    out: Path,
    labelled: list[tuple[str, BackboneAnalysis]],
    args: argparse.Namespace,
    blocks: Sequence[int],
) -> list[Path]:
    """analysis.json and the four figures; returns the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "images": args.images,
        "requested_size": args.size,
        "blocks_plotted": list(blocks),
        "checkpoints": [
            {"label": label, "path": str(path), **analysis.to_json()}
            for (label, analysis), path in zip(labelled, args.checkpoints, strict=True)
        ],
    }
    json_path = out / "analysis.json"
    json_path.write_text(json.dumps(record))
    figures = {
        "cosine_vs_block.png": cosine_figure(labelled),
        "log_ratio.png": log_ratio_figure(labelled, blocks),
        "separation_vs_block.png": separation_figure(labelled),
        "heatmap.png": heatmap_figure(labelled),
    }
    return [json_path, *(save_figure(fig, out / name) for name, fig in figures.items())]


def _pca(args: argparse.Namespace) -> None:
    device = args.device or default_device()
    model, _ = load_frozen_backbone(args.checkpoint, device, num_heads=args.num_heads)
    images = load_images(args.images, args.n, fit_size(model, args.size))
    features = torch.cat(
        [patch_features(model, b).cpu() for b in batches(images, args.batch_size, device)]
    )
    maps = pca_rgb(features, args.threshold, args.per_image)
    print(save_figure(pca_grid_figure(images, maps.rgb, args.columns), args.out))


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl, one per iteration in order. A live run may have a last
    line half written, which is skipped; a resumed run logs again the iterations after its
    last checkpoint, and the later value of a key wins. The records of one iteration are
    merged: an evaluation writes its own record beside the training one."""
    path = Path(path)
    lines = path.read_text().splitlines()
    by_iteration: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {err}") from err
        by_iteration.setdefault(int(record["iteration"]), {}).update(record)
    return [by_iteration[i] for i in sorted(by_iteration)]


def metrics_file(run: str | Path) -> Path:
    run = Path(run)
    return RunDir(run).metrics if run.is_dir() else run


def run_metrics(run: str | Path) -> tuple[list[dict], list[int]]:
    """A run's metrics on the overall iteration axis of its phase chain (earlier phases
    first, each shifted by the ends of those before it) and the iterations where its
    later phases start; a metrics file, or a run that is no phase, as it is."""
    run = Path(run)
    if not (run.is_dir() and RunDir(run).config.is_file()):
        return read_metrics(metrics_file(run)), []
    records: list[dict] = []
    starts: list[int] = []
    offset = 0
    for directory, end in phase_chain(run):
        if records:
            starts.append(offset)
        shifted = read_metrics(RunDir(directory).metrics)
        records += [{**r, "iteration": r["iteration"] + offset} for r in shifted]
        offset += end
    return records, starts


def _plot_metrics(args: argparse.Namespace) -> None:
    labels = run_labels(args.runs, args.labels)
    read = {label: run_metrics(r) for label, r in zip(labels, args.runs, strict=True)}
    runs = {label: records for label, (records, _) in read.items()}
    starts = {label: phase_starts for label, (_, phase_starts) in read.items()}
    print(save_figure(metrics_figure(runs, starts), args.out))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze`, `pca` and `plot-metrics` to the `dinospec` command."""
    analyze = subparsers.add_parser(
        "analyze",
        help="[CLS]/patch token statistics around every LayerNorm of one or two backbones",
    )
    analyze.add_argument(
        "checkpoints",
        nargs="+",
        help="backbone files or training run directories; several are drawn side by side",
    )
    _add_model_options(analyze, n=256)
    analyze.add_argument("--out", default="analysis", help="output directory")
    analyze.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_RATIO_THRESHOLD,
        help="a channel is separated when [CLS]/patch magnitude passes this ratio either way",
    )
    analyze.add_argument(
        "--blocks", type=int, nargs="+", default=None, help="blocks in the log-ratio figure"
    )
    analyze.add_argument(
        "--heatmap-block", type=int, default=None, help="block whose norm1 is drawn (default last)"
    )
    analyze.add_argument("--labels", nargs="+", default=None, help="one label per checkpoint")
    analyze.set_defaults(func=_analyze)

    pca = subparsers.add_parser("pca", help="first three PCA components of patch features as RGB")
    pca.add_argument("checkpoint", help="backbone file or training run directory")
    _add_model_options(pca, n=8)
    pca.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="keep patches whose scaled first component passes this (0-1); default: all",
    )
    pca.add_argument("--per-image", action="store_true", help="fit each image separately")
    pca.add_argument("--columns", type=int, default=4, help="image pairs per row")
    pca.add_argument("--out", default="pca.png", help="output PNG")
    pca.set_defaults(func=_pca)

    plot = subparsers.add_parser("plot-metrics", help="training curves of one or more runs")
    plot.add_argument("runs", nargs="+", help="run directories (or metrics.jsonl files)")
    plot.add_argument("--labels", nargs="+", default=None, help="one label per run")
    plot.add_argument("--out", default="metrics.png", help="output PNG")
    plot.set_defaults(func=_plot_metrics)
