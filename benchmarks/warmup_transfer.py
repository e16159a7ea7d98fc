"""Does the head warm-up keep a pretrained backbone's features when pretraining continues?

Issue #22's benchmark. A backbone pretrained on Imagenette (--source: a dinospec export or
run whose k-NN is clearly above its random init, e.g. learning_curve.py's run of
CONFIG) continues self-supervised pretraining on CamVid's street scenes, another domain,
through `train.pretrained_weights`, with new random heads, twice on the same schedule:

- `warmup`: heads and centres train alone first (`optim.head_warmup_epochs`), then the
  backbone's lr ramps up (`optim.backbone_warmup_epochs`);
- `no_warmup`: both 0, what DINOv2's users do when they continue from released weights.

Both keep CONFIG's lr warm-up and last-layer freeze. After each stage the teacher is
scored with learning_curve.py's Imagenette k-NN (k = 20, all of val) and CamVid linear
segmentation at the training resolution; iteration 0 is the source itself, and the
architecture at random init is scored once as the floor. Progress goes to OUT/curve.json
after every point and a rerun resumes from it (training resumes bit-exactly from the
stage's checkpoint).

    python benchmarks/warmup_transfer.py configs/train/imagenette_cpu.yaml \
        --source outputs/lc/c2/run --out outputs/warmup_transfer
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from learning_curve import SHARED, camvid_miou, knn_top1, load_progress, random_init, save_progress

from dinospec.config import Config, load_config
from dinospec.train.loop import train

ARMS = {
    "warmup": ["optim.head_warmup_epochs={head}", "optim.backbone_warmup_epochs={ramp}"],
    "no_warmup": ["optim.head_warmup_epochs=0", "optim.backbone_warmup_epochs=0"],
}


def arm_config(args: argparse.Namespace, arm: str, stop: int | None) -> Config:
    overrides = [
        "data.dataset=folder",
        f"data.path={args.shared / 'data' / 'camvid' / 'train'}",
        f"train.pretrained_weights={source_backbone(args.source)}",
        f"train.output_dir={args.out / arm}",
        f"train.seed={args.seed}",
        f"train.epoch_length={args.epoch_length}",
        f"train.checkpoint_every={args.epoch_length}",
        f"optim.epochs={args.epochs}",
        *(o.format(head=args.head_warmup, ramp=args.backbone_warmup) for o in ARMS[arm]),
        *args.overrides,
    ]
    if stop is not None:
        overrides.append(f"train.max_iterations={stop}")
    return load_config(args.config, overrides)


def score(args: argparse.Namespace, backbone: Path, size: int, out: Path) -> dict[str, float]:
    return {
        "knn20_top1": knn_top1(args, backbone, size, out / "knn"),
        "camvid_miou": camvid_miou(args, backbone, size, out / "camvid"),
    }


def source_backbone(source: Path) -> Path:
    """The teacher file of a run directory, or the file given: never the run itself, whose
    heads would come along and leave nothing for the warm-up to do."""
    return source / "teacher_backbone.safetensors" if source.is_dir() else source


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the recipe (architecture, crops, lr)")
    parser.add_argument("overrides", nargs="*", help="config overrides for both arms, key=value")
    parser.add_argument("--source", type=Path, required=True, help="pretrained run or backbone")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--epoch-length", type=int, default=50)
    parser.add_argument("--head-warmup", type=int, default=3, help="epochs of heads alone")
    parser.add_argument("--backbone-warmup", type=int, default=2, help="epochs of lr ramp")
    parser.add_argument("--points", default="50,100,200,300,400", help="iterations scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-iterations", type=int, default=1000)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_intermixed_args()


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    progress_path = args.out / "curve.json"
    progress = load_progress(progress_path)
    config = arm_config(args, "warmup", None)
    size = config.crops.global_crops_size
    total = args.epochs * args.epoch_length
    points = sorted({min(int(p), total) for p in args.points.split(",")} | {total})

    if "random_init" not in progress:
        floor = random_init(config, args.seed, args.out / "random_init.safetensors")
        progress["random_init"] = score(args, floor, size, args.out / "scores" / "random")
        save_progress(progress_path, progress)
    if "source" not in progress:
        progress["source"] = score(
            args, source_backbone(args.source), size, args.out / "scores" / "source"
        )
        save_progress(progress_path, progress)
    for arm in ARMS:
        curve = progress.setdefault(arm, [])
        done = {point["iteration"] for point in curve}
        for stop in points:
            if stop in done:
                continue
            began = time.perf_counter()
            train(arm_config(args, arm, stop))
            export = args.out / arm / "teacher_backbone.safetensors"
            seconds = time.perf_counter() - began
            point = {"iteration": stop, "train_seconds": seconds}
            point |= score(args, export, size, args.out / "scores" / arm / str(stop))
            curve.append(point)
            save_progress(progress_path, progress)
            print(f"{arm} {stop}: {point}", flush=True)
    print_table(progress, points)


def print_table(progress: dict, points: list[int]) -> None:
    source, floor = progress["source"], progress["random_init"]
    print(
        f"\n{'iteration':>10}  {'k-NN warm-up':>13}{'no warm-up':>12}"
        f"  {'mIoU warm-up':>13}{'no':>8}"
    )
    rows = [(0, source, source)] + [
        (it, *(next(p for p in progress[arm] if p["iteration"] == it) for arm in ARMS))
        for it in points
    ]
    for it, a, b in rows:
        print(
            f"{it:>10}  {100 * a['knn20_top1']:>12.1f}%{100 * b['knn20_top1']:>11.1f}%"
            f"  {100 * a['camvid_miou']:>12.1f}%{100 * b['camvid_miou']:>7.1f}%"
        )
    print(
        f"random init: k-NN {100 * floor['knn20_top1']:.1f}%, "
        f"CamVid mIoU {100 * floor['camvid_miou']:.1f}%"
    )


if __name__ == "__main__":
    main()
