"""Real-data check: pretrain tiny ViTs on real photographs, then probe them.

Pretrains a vanilla and a specialized tiny ViT with the same seed and budget on Imagenette's
train images (no labels used), then evaluates each, and the same backbone at
initialization: linear segmentation on CamVid (train to fit, val to report; test is kept
for final figures) and k-NN and linear classification on Imagenette val. One table.

    python benchmarks/real_probe.py --iterations 300 --out outputs/real_probe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from dinospec.config import load_config
from dinospec.models import build_backbone
from dinospec.models.checkpoints import save_backbone
from dinospec.train.loop import train
from eval.config import load_eval_config
from eval.run_cls import evaluate_classification
from eval.run_seg import evaluate_segmentation

REPO = Path(__file__).resolve().parents[1]
SPECIALIZED = [
    "model.specialize.norm1_blocks=all",
    "model.specialize.norm2_blocks=all",
    "model.specialize.qkv_blocks=0.3333",
]


def pretraining_overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    return [
        "model.img_size=96",
        "model.patch_size=8",
        "model.embed_dim=96",
        "model.depth=6",
        "model.num_heads=3",
        "model.init_values=null",
        "data.dataset=imagenet",
        f"data.path={args.shared / 'data' / 'imagenette'}",
        "data.num_workers=2",
        "crops.global_crops_size=96",
        "crops.local_crops_size=48",
        "crops.local_crops_number=4",
        "crops.blur_sigma=[0.1,0.9]",  # DINOv2's 2.0 px at 224 scaled to 96 px crops
        "dino.head_n_prototypes=4096",
        "dino.head_hidden_dim=512",
        "dino.head_bottleneck_dim=128",
        "ibot.head_n_prototypes=4096",
        "ibot.head_hidden_dim=512",
        "ibot.head_bottleneck_dim=128",
        "teacher.momentum_teacher=0.996",
        "teacher.teacher_temp=0.04",
        "teacher.warmup_teacher_temp=0.04",
        "optim.epochs=10",
        "optim.warmup_epochs=1",
        # prototypes stay at their random init: a short run otherwise collapses to uniform
        # targets (configs/quickstart.yaml explains why)
        "optim.freeze_last_layer_epochs=10",
        f"train.epoch_length={max(args.iterations // 10, 1)}",
        f"train.batch_size_per_gpu={args.batch}",
        f"train.seed={args.seed}",
        f"train.output_dir={run_dir}",
        "train.log_every=25",
        f"train.checkpoint_every={args.iterations}",
    ]


def probe(args: argparse.Namespace, backbone: Path, out: Path) -> dict[str, float]:
    seg = evaluate_segmentation(
        load_eval_config(
            REPO / "configs" / "eval" / "camvid_linear.yaml",
            [
                f"backbone.path={backbone}",
                f"dataset.root={args.shared / 'data' / 'camvid'}",
                f"seg.iterations={args.seg_iterations}",
                f"seg.warmup_iterations={max(args.seg_iterations // 10, 1)}",
                f"output_dir={out / 'camvid'}",
            ],
        )
    )
    cls = evaluate_classification(
        load_eval_config(
            REPO / "configs" / "eval" / "imagenette_knn_linear.yaml",
            [
                f"backbone.path={backbone}",
                f"dataset.root={args.shared / 'data' / 'imagenette'}",
                f"dataset.train_per_class={args.cls_per_class}",
                f"dataset.val_per_class={args.cls_per_class // 2}",
                "cls.ks=[10,20]",
                f"output_dir={out / 'imagenette'}",
            ],
        )
    )
    return {
        "camvid_miou": seg["metrics"]["miou"],
        "imagenette_knn20_top1": cls["knn"]["20"]["top1"],
        "imagenette_linear_top1": cls["linear"]["top1"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-iterations", type=int, default=1000)
    parser.add_argument("--cls-per-class", type=int, default=100)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "real_probe")
    args = parser.parse_args()

    backbones: dict[str, Path] = {}
    for name, extra in (("vanilla", []), ("specialized", SPECIALIZED)):
        run_dir = args.out / name
        train(load_config(None, [*pretraining_overrides(args, run_dir), *extra]))
        backbones[name] = run_dir / "teacher_backbone.safetensors"
    config = load_config(None, [*pretraining_overrides(args, args.out / "random"), *SPECIALIZED])
    torch.manual_seed(args.seed)
    args.out.joinpath("random").mkdir(parents=True, exist_ok=True)
    backbones["random init"] = args.out / "random" / "backbone.safetensors"
    save_backbone(build_backbone(config.model), backbones["random init"])

    rows = {
        name: probe(args, path, args.out / "probes" / name.replace(" ", "_"))
        for name, path in backbones.items()
    }
    (args.out / "real_probe.json").write_text(
        json.dumps(
            {
                "args": vars(args) | {"shared": str(args.shared), "out": str(args.out)},
                "results": rows,
            },
            indent=1,
        )
    )
    print(
        f"\npretraining: {args.iterations} iterations x {args.batch} Imagenette images, "
        f"seed {args.seed}"
    )
    print(f"{'backbone':<14}{'CamVid mIoU':>13}{'k-NN@20 top-1':>15}{'linear top-1':>14}")
    for name, r in rows.items():
        print(
            f"{name:<14}{100 * r['camvid_miou']:>12.1f}%{100 * r['imagenette_knn20_top1']:>14.1f}%"
            f"{100 * r['imagenette_linear_top1']:>13.1f}%"
        )


if __name__ == "__main__":
    main()
