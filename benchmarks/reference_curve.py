"""Does DINOv2's own training step learn where dinospec's recipe stalls? Its k-NN curve.

Issue #20's fallback: when dinospec's CPU recipe misses its bar, run the reference on the
same data, model and budget. DINOv2's `SSLMetaArch` (imported unchanged from
../shared/reference through dinov2_reference.py, with that module's stand-ins) trains on
exactly the batches a dinospec run of CONFIG sees (dinospec's loader: the same images,
crops, masks and order for the same seed), with DINOv2's own initialization, parameter
groups, optimizer, schedulers (`build_schedulers` and the sqrt lr rule, compiled out of
its files) and teacher update. The model is CONFIG's architecture without specialization,
which DINOv2 does not have. Every --every iterations the teacher backbone is loaded into
dinospec's vanilla ViT (same parameter names, strict) and scored with learning_curve.py's
k-NN; iteration 0 is the reference's random init; CamVid linear segmentation at the end.

The run's state (model, optimizer, iteration) is saved after each stage and a rerun
resumes from it and from OUT/curve.json; the loader restarts at that iteration, so the
batches are the ones an uninterrupted run would have seen.

    python benchmarks/reference_curve.py configs/train/imagenette_cpu.yaml --every 200 \
        --out outputs/lc/reference
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import dinov2_reference as ref
import torch
from learning_curve import SHARED, camvid_miou, knn_top1, load_progress, save_progress
from omegaconf import DictConfig, OmegaConf

from dinospec.config import Config, load_config
from dinospec.models import build_backbone
from dinospec.models.checkpoints import save_backbone
from dinospec.train.data import build_image_dataset, build_loader, close_loader, to_device

VANILLA = [
    f"model.specialize.{key}=none"
    for key in ("norm1_blocks", "qkv_blocks", "proj_blocks", "norm2_blocks")
] + ["model.specialize.ffn_in_blocks=none", "model.specialize.ffn_out_blocks=none"]
VANILLA.append("model.specialize.final_norm=false")


def dinospec_config(args: argparse.Namespace) -> Config:
    return load_config(
        args.config,
        [
            f"train.seed={args.seed}",
            f"data.path={args.shared / 'data' / 'imagenette'}",
            *VANILLA,
            *args.overrides,
        ],
    )


def schedule_config(reference: ref.Reference, config: Config) -> DictConfig:
    """The reference's config with dinospec's recipe values for what its schedules read."""
    cfg = ref.reference_config(reference, config)
    o, t = config.optim, config.teacher
    cfg = OmegaConf.merge(
        cfg,
        {
            "train": {
                "OFFICIAL_EPOCH_LENGTH": config.train.epoch_length,
                "seed": config.train.seed,
            },
            "optim": {
                "epochs": o.epochs,
                "warmup_epochs": o.warmup_epochs,
                "base_lr": o.base_lr,
                "min_lr": o.min_lr,
                "weight_decay": o.weight_decay,
                "weight_decay_end": o.weight_decay_end,
                "freeze_last_layer_epochs": o.freeze_last_layer_epochs,
            },
            "teacher": {
                "momentum_teacher": t.momentum_teacher,
                "final_momentum_teacher": t.final_momentum_teacher,
                "teacher_temp": t.teacher_temp,
                "warmup_teacher_temp": t.warmup_teacher_temp,
                "warmup_teacher_temp_epochs": t.warmup_teacher_temp_epochs,
            },
            "dino": {"head_n_prototypes": config.dino.head_n_prototypes},
        },
    )
    return reference.apply_scaling_rules_to_cfg(cfg)


def reference_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """dinospec's batch as DINOv2's collate makes it: `upperbound` only sizes the buffers
    the masked tokens are gathered into (their first `n_masked_patches` rows are used), so
    the count itself is an exact bound."""
    return ref.reference_batch(batch | {"upperbound": int(batch["n_masked_patches"].item())})


def export_teacher(model: torch.nn.Module, config: Config, path: Path) -> Path:
    backbone = build_backbone(config.model)
    backbone.load_state_dict(model.teacher.backbone.state_dict(), strict=True)
    save_backbone(backbone, path)
    return path


def train_stage(
    reference: ref.Reference,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: DictConfig,
    config: Config,
    start: int,
    stop: int,
) -> dict[str, float]:
    schedules = reference.build_schedulers(cfg)
    images = build_image_dataset(config)
    loader = build_loader(config, images, 0, 1, start)
    losses: dict[str, float] = {}
    try:
        for iteration in range(start, stop):
            batch = to_device(next(loader), torch.device("cpu"))
            values = dict(
                zip(
                    ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr"),
                    (s[iteration] for s in schedules),
                    strict=True,
                )
            )
            losses = ref.reference_step(
                reference, model, optimizer, reference_batch(batch), values, cfg.optim.clip_grad
            )
            if (iteration + 1) % config.train.log_every == 0:
                total = sum(ref.weighted_terms(losses, cfg).values())
                print(f"iteration {iteration + 1}: loss {total:.4f}", flush=True)
    finally:
        close_loader(loader)
    return losses


def save_state(path: Path, model: torch.nn.Module, optimizer: Any, iteration: int) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iteration": iteration},
        tmp,
    )
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="dinospec config overrides, key=value")
    parser.add_argument("--every", type=int, default=200, help="iterations between k-NN points")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seg-iterations", type=int, default=1000)
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--root", type=Path, default=ref.DEFAULT_ROOT)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_intermixed_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))

    config = dinospec_config(args)
    reference = ref.load_reference(args.root)
    cfg = schedule_config(reference, config)
    torch.manual_seed(config.train.seed)
    model = ref.build_meta_arch(reference, cfg, torch.device("cpu"))
    model.prepare_for_distributed_training()
    optimizer = reference.build_optimizer(cfg, model.get_params_groups())

    progress_path, state_path = args.out / "curve.json", args.out / "state.pt"
    progress = load_progress(progress_path)
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["iteration"]
    size = config.crops.global_crops_size
    random_path = args.out / "random_init.safetensors"
    if start == 0:
        export_teacher(model, config, random_path)
    if not progress["curve"]:
        top1 = knn_top1(args, random_path, size, args.out / "knn" / "0")
        progress["curve"].append({"iteration": 0, "knn20_top1": top1, "train_seconds": 0.0})
        save_progress(progress_path, progress)

    total = config.optim.epochs * config.train.epoch_length
    final = args.out / "teacher_backbone.safetensors"
    while start < total:
        stop = min(start + args.every, total)
        began = time.perf_counter()
        losses = train_stage(reference, model, optimizer, cfg, config, start, stop)
        progress["train_seconds"] += time.perf_counter() - began
        save_state(state_path, model, optimizer, stop)
        top1 = knn_top1(
            args, export_teacher(model, config, final), size, args.out / "knn" / str(stop)
        )
        progress["curve"].append(
            {
                "iteration": stop,
                "knn20_top1": top1,
                "train_seconds": progress["train_seconds"],
                "loss": sum(ref.weighted_terms(losses, cfg).values()),
            }
        )
        save_progress(progress_path, progress)
        print(f"iteration {stop}: k-NN@20 top-1 {100 * top1:.1f}%", flush=True)
        start = stop

    if "camvid_miou" not in progress:
        progress["camvid_miou"] = {
            "random_init": camvid_miou(args, random_path, size, args.out / "camvid" / "random"),
            "trained": camvid_miou(args, final, size, args.out / "camvid" / "trained"),
        }
        save_progress(progress_path, progress)
    for point in progress["curve"]:
        print(
            f"{point['iteration']:>6} it {point['train_seconds'] / 60:>6.1f} min "
            f"k-NN@20 {100 * point['knn20_top1']:.1f}%"
        )
    miou = progress["camvid_miou"]
    print(
        f"CamVid mIoU: random {100 * miou['random_init']:.1f}%, "
        f"trained {100 * miou['trained']:.1f}%"
    )


if __name__ == "__main__":
    main()
