"""Does pretraining turn real photographs into features? The teacher's k-NN over iterations.

Trains a config in stages (`train.max_iterations` raised stage by stage; a resumed run is
bit-exact, so the stages are one run) and after each stage scores the exported teacher
backbone with k-NN (k = 20) on all of Imagenette val against all of Imagenette train, at
the training resolution. Iteration 0 is the architecture at its random init (student and
teacher start equal), the baseline the claim is measured against. At the end the random
init and the final teacher are probed with CamVid linear segmentation.

Progress is written to OUT/curve.json after each stage; a rerun resumes from it, so a
session that ends mid-run loses at most one stage. Training wall time is summed over the
stages only (evaluation excluded), which is the figure the recipe's budget is about.

    python benchmarks/learning_curve.py configs/train/imagenette_cpu.yaml --every 300 \
        --out outputs/learning_curve/seed0 --seed 0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from dinospec.config import Config, load_config
from dinospec.models import build_backbone
from dinospec.models.checkpoints import save_backbone
from dinospec.train.loop import train
from eval.config import load_eval_config
from eval.run_cls import evaluate_classification
from eval.run_seg import evaluate_segmentation

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def training_config(args: argparse.Namespace, stop: int | None) -> Config:
    overrides = [
        f"train.output_dir={args.out / 'run'}",
        f"train.seed={args.seed}",
        f"data.path={args.shared / 'data' / 'imagenette'}",
        f"train.checkpoint_every={args.every}",
        *args.overrides,
    ]
    if stop is not None:
        overrides.append(f"train.max_iterations={stop}")
    return load_config(args.config, overrides)


def knn_top1(args: argparse.Namespace, backbone: Path, image_size: int, out: Path) -> float:
    resize = round(image_size * 256 / 224)
    results = evaluate_classification(
        load_eval_config(
            REPO / "configs" / "eval" / "imagenette_knn_linear.yaml",
            [
                f"backbone.path={backbone}",
                f"dataset.root={args.shared / 'data' / 'imagenette'}",
                "dataset.train_per_class=null",
                "dataset.val_per_class=null",
                "dataset.num_workers=1",
                f"cls.image_size={image_size}",
                f"cls.resize_size={resize}",
                "cls.feature_batch_size=256",
                "cls.ks=[20]",
                "cls.linear=false",
                f"output_dir={out}",
            ],
        )
    )
    return results["knn"]["20"]["top1"]


def camvid_miou(args: argparse.Namespace, backbone: Path, image_size: int, out: Path) -> float:
    results = evaluate_segmentation(
        load_eval_config(
            REPO / "configs" / "eval" / "camvid_linear.yaml",
            [
                f"backbone.path={backbone}",
                f"dataset.root={args.shared / 'data' / 'camvid'}",
                "dataset.num_workers=1",
                f"seg.iterations={args.seg_iterations}",
                f"seg.warmup_iterations={max(args.seg_iterations // 10, 1)}",
                f"seg.crop_size={image_size}",
                f"seg.base_size={image_size}",
                f"seg.stride={image_size * 2 // 3}",
                f"output_dir={out}",
            ],
        )
    )
    return results["metrics"]["miou"]


def random_init(config: Config, seed: int, path: Path) -> Path:
    """The backbone exactly as the run starts it: same seed, same architecture."""
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_backbone(build_backbone(config.model), path)
    return path


def load_progress(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"curve": [], "train_seconds": 0.0}


def save_progress(path: Path, progress: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(progress, indent=1))
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    parser.add_argument("--every", type=int, default=300, help="iterations between k-NN points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-iterations", type=int, default=1000)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    progress_path = args.out / "curve.json"
    progress = load_progress(progress_path)
    full = training_config(args, None)
    total = full.optim.epochs * full.train.epoch_length
    size = full.crops.global_crops_size
    random_path = random_init(full, args.seed, args.out / "random_init.safetensors")

    done = {point["iteration"] for point in progress["curve"]}
    if 0 not in done:
        top1 = knn_top1(args, random_path, size, args.out / "knn" / "0")
        progress["curve"].append({"iteration": 0, "knn20_top1": top1, "train_seconds": 0.0})
        save_progress(progress_path, progress)
    for stop in range(args.every, total + args.every, args.every):
        stop = min(stop, total)
        if stop in done:
            continue
        start = time.perf_counter()
        train(training_config(args, stop))
        progress["train_seconds"] += time.perf_counter() - start
        export = args.out / "run" / "teacher_backbone.safetensors"
        top1 = knn_top1(args, export, size, args.out / "knn" / str(stop))
        progress["curve"].append(
            {"iteration": stop, "knn20_top1": top1, "train_seconds": progress["train_seconds"]}
        )
        save_progress(progress_path, progress)
        print(f"iteration {stop}: k-NN@20 top-1 {100 * top1:.1f}%", flush=True)

    if "camvid_miou" not in progress:
        final = args.out / "run" / "teacher_backbone.safetensors"
        progress["camvid_miou"] = {
            "random_init": camvid_miou(args, random_path, size, args.out / "camvid" / "random"),
            "trained": camvid_miou(args, final, size, args.out / "camvid" / "trained"),
        }
        save_progress(progress_path, progress)
    curve = progress["curve"]
    print(f"\n{'iteration':>10}{'train min':>11}{'k-NN@20 top-1':>15}")
    for point in curve:
        print(
            f"{point['iteration']:>10}{point['train_seconds'] / 60:>11.1f}"
            f"{100 * point['knn20_top1']:>14.1f}%"
        )
    miou = progress["camvid_miou"]
    print(
        f"CamVid linear mIoU: random init {100 * miou['random_init']:.1f}%, "
        f"trained {100 * miou['trained']:.1f}%"
    )


if __name__ == "__main__":
    main()
