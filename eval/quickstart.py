"""The quickstart job: pretrain a tiny specialized ViT on the synthetic scenes, then show
that it learned something: a linear segmentation probe on its frozen features against the
same probe on the same backbone at initialization.

    python -m eval.quickstart [configs/quickstart.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from dinospec.analysis.cli import read_metrics
from dinospec.config import Config, load_config
from dinospec.data.synthetic import SyntheticScenes
from dinospec.data.transforms import normalize
from dinospec.models import build_backbone
from dinospec.models.checkpoints import load_backbone
from dinospec.run.layout import RunDir
from dinospec.train.loop import train
from eval.config import SegSettings
from eval.knn import knn_accuracy
from eval.seg_probe import linear_probe_segmentation

PROBE_TRAIN_SEED, PROBE_VAL_SEED = 1001, 1002


def probe_both(config: Config, run_dir: Path, probe: SegSettings, n_train: int, n_val: int) -> dict:
    """mIoU of the probe on the trained teacher backbone and on the initial weights
    (rebuilt from the training seed, so exactly the student the run started from).
    The probe images come from other seeds than the pretraining images."""
    size = config.data.synthetic_image_size
    train_set = SyntheticScenes(n_train, size, seed=PROBE_TRAIN_SEED).segmentation_view()
    val_set = SyntheticScenes(n_val, size, seed=PROBE_VAL_SEED).segmentation_view()
    torch.manual_seed(config.train.seed)
    backbones = {
        "random_init": build_backbone(config.model),
        "trained": load_backbone(RunDir(run_dir).export(".safetensors")),
    }
    device = torch.device("cpu")
    return {
        name: asdict(
            linear_probe_segmentation(
                backbone.eval(), train_set, val_set, train_set.num_classes, probe, device
            )
        )
        | {"knn20_top1": knn_top1(backbone, config, n_train, n_val)}
        for name, backbone in backbones.items()
    }


@torch.no_grad()
def knn_top1(backbone: torch.nn.Module, config: Config, n_train: int, n_val: int) -> float:
    """20-NN top-1 on the scenes' image-level labels from the [CLS] token: a second,
    global view of what the backbone learned, beside the dense probe."""
    size = config.data.synthetic_image_size

    def features(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        scenes = SyntheticScenes(n, size, seed=seed, transform=normalize())
        images = torch.stack([scenes[i][0] for i in range(n)])
        labels = torch.tensor([scenes[i][2] for i in range(n)])
        return torch.cat([backbone(chunk) for chunk in images.split(64)]), labels

    train_f, train_l = features(n_train, PROBE_TRAIN_SEED)
    val_f, val_l = features(n_val, PROBE_VAL_SEED)
    return knn_accuracy(train_f, train_l, val_f, val_l, num_classes=8, ks=(20,))[20][1]


def plot_training_curves(run_dir: Path) -> Path:
    """Losses, collapse monitor and, when the run evaluated itself, the k-NN curve."""
    records = read_metrics(RunDir(run_dir).metrics)
    trained = [r for r in records if "loss" in r]
    evaluated = [r for r in records if "eval_knn_top1" in r]
    steps = [r["iteration"] for r in trained]
    fig, axes = plt.subplots(1, 3 if evaluated else 2, figsize=(16 if evaluated else 11, 4))
    losses, monitor = axes[0], axes[1]
    for key in sorted(k for k in trained[0] if k.startswith("loss")):
        losses.plot(steps, [r[key] for r in trained], label=key.removeprefix("loss_") or "total")
    losses.set(title="Training losses", xlabel="iteration", ylabel="loss (no unit)")
    losses.legend()
    for key in ("teacher_entropy", "student_cls_std"):
        monitor.plot(steps, [r[key] for r in trained], label=key)
    monitor.set(
        title="Collapse monitor", xlabel="iteration", ylabel="entropy / log K, [CLS] std (no unit)"
    )
    monitor.legend()
    if evaluated:
        knn = axes[2]
        x = [r["iteration"] for r in evaluated]
        knn.plot(x, [100 * r["eval_knn_top1"] for r in evaluated], marker="o")
        knn.set(
            title="k-NN top-1 of the teacher during training",
            xlabel="iteration",
            ylabel="top-1 accuracy (%)",
        )
    fig.tight_layout()
    path = run_dir / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_quickstart(
    config: Config, probe: SegSettings, n_train: int, n_val: int
) -> tuple[Path, dict]:
    """Pretrain, then probe the trained and the initial backbone; writes
    `probe_results.json` and the training curves into the run directory."""
    run_dir = train(config)
    scores = probe_both(config, run_dir, probe, n_train, n_val)
    results = {"probe": asdict(probe), "scores": scores}
    (run_dir / "probe_results.json").write_text(json.dumps(results, indent=1))
    plot_training_curves(run_dir)
    return run_dir, scores


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--probe-iterations", type=int, default=1500)
    parser.add_argument("--probe-lr", type=float, default=0.01)
    parser.add_argument(
        "--probe-layers", type=int, default=4, help="last blocks whose patch tokens are used"
    )
    parser.add_argument("--probe-train-images", type=int, default=512)
    parser.add_argument("--probe-val-images", type=int, default=256)
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    probe = SegSettings(
        iterations=args.probe_iterations,
        batch_size=16,
        lr=args.probe_lr,
        warmup_iterations=args.probe_iterations // 10,
        n_layers=args.probe_layers,
    )
    run_dir, scores = run_quickstart(config, probe, args.probe_train_images, args.probe_val_images)
    print(
        "\nlinear segmentation probe on held-out synthetic scenes "
        f"(9 classes incl. background, patch tokens of the last {probe.n_layers} blocks)"
    )
    for name, s in scores.items():
        print(
            f"  {name:<12} mIoU {100 * s['miou']:5.1f}   pixel acc {100 * s['pixel_accuracy']:5.1f}"
            f"   (20-NN top-1 on image labels, [CLS]: {100 * s['knn20_top1']:5.1f})"
        )
    layout = RunDir(run_dir)
    curve = [r for r in read_metrics(layout.metrics) if "eval_knn_top1" in r]
    if curve:
        points = ", ".join(f"{r['iteration']}: {100 * r['eval_knn_top1']:.1f}" for r in curve)
        print(f"\n20-NN top-1 of the teacher during training (iteration: %): {points}")
    print(f"\ncheckpoints:     {layout.checkpoints}")
    print(f"teacher export:  {layout.export('.safetensors')} (and .pth)")
    print(f"metrics:         {layout.metrics}")
    print(f"plots:           {run_dir / 'training_curves.png'}")
    if layout.tensorboard.is_dir():
        print(f"tensorboard:     tensorboard --logdir {layout.tensorboard}")
    print(f"probe results:   {run_dir / 'probe_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
