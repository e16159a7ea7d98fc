"""The three contenders of vs_dinov2.py and what they are built from.

DINOv2's `SSLMetaArch` step and dinospec's `Trainer.step` (vanilla and specialized) are
wrapped behind one interface (`step`, `forward_backward`, `grads`, `parts`, `held`), so the
agreement checks, the timing and the memory count treat them alike. All three start from
the same DINOv2-initialized weights and step the same batch from DINOv2's collate; how the
weights and the batch are carried over, and checked, is told in vs_dinov2.py's docstring.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dinov2_reference as ref
import torch
from torch import Tensor, nn
from vs_dinov2_memory import held_tensors

from dinospec.config import Config, load_config
from dinospec.losses.ibot import masked_patch_weights
from dinospec.models.convert import fill_prefix_path
from dinospec.train.data import to_device
from dinospec.train.loop import Trainer, schedules_for
from dinospec.train.optim import apply_schedule_values

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
BATCH_KEYS = (
    "collated_global_crops",
    "collated_local_crops",
    "collated_masks",
    "mask_indices_list",
    "masks_weight",
    "upperbound",
    "n_masked_patches",
)
TINY_MODEL = (
    "model.embed_dim=32",
    "model.depth=2",
    "model.num_heads=2",
    "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32",
    "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
)
CONTENDERS = ("reference", "vanilla", "specialized")


@dataclass(frozen=True)
class Setting:
    """Crops and prototypes of one configuration."""

    global_size: int
    local_size: int
    local_crops: int
    prototypes: int


CONFIGURATIONS = {
    "small": Setting(112, 56, 4, 4096),
    "full": Setting(224, 98, 8, 65536),
    "tiny": Setting(56, 28, 2, 256),
}


def dinospec_config(
    args: argparse.Namespace, setting: Setting, batch: int, specialized: bool, dtype: str
) -> Config:
    """DINOv2's ImageNet-1k recipe for the model size, at this configuration, without
    stochastic depth (its random draws could not be matched between the two codes). The
    position embedding is sized for the global crops, as DINOv2 builds its model
    (`build_model_from_cfg` passes `crops.global_crops_size`); dinospec's recipes keep
    `model.img_size` at 224 whatever the crops."""
    size = "s" if args.size == "tiny" else args.size
    recipe = CONFIGS / f"vit{size}14_in1k{'_spec' if specialized else ''}.yaml"
    overrides = [
        "data.dataset=synthetic",
        f"data.synthetic_size={batch}",
        "data.num_workers=0",
        f"crops.global_crops_size={setting.global_size}",
        f"crops.local_crops_size={setting.local_size}",
        f"crops.local_crops_number={setting.local_crops}",
        f"dino.head_n_prototypes={setting.prototypes}",
        f"ibot.head_n_prototypes={setting.prototypes}",
        f"train.batch_size_per_gpu={batch}",
        f"train.compile={args.compile}",
        f"train.precision={dtype}",
        f"train.output_dir={args.run_dir}",
        "model.drop_path_rate=0.0",
        f"model.img_size={setting.global_size}",
        f"model.multi_crop_attention={args.multi_crop_attention}",
    ]
    if args.size == "tiny":
        overrides += TINY_MODEL
    return load_config(recipe, overrides)


def initial_weights(reference: ref.Reference, cfg: Any) -> dict[str, Tensor]:
    """DINOv2's initial student weights, LayerScale raised so every block counts."""
    torch.manual_seed(0)
    model = ref.build_meta_arch(reference, cfg, torch.device("cpu"))
    for name, param in model.student.named_parameters():
        if name.endswith(".gamma"):
            nn.init.uniform_(param.detach(), 0.5, 1.0)
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


def collated_batch(
    reference: ref.Reference, config: Config, batch: int, device: torch.device
) -> dict[str, Any]:
    """One batch from DINOv2's collate and masking, in dinospec's layout, on `device`."""
    generator = torch.Generator().manual_seed(0)
    random.seed(0)
    c, grid = config.crops, config.crops.global_crops_size // config.model.patch_size

    def crops(size: int, n: int) -> list[Tensor]:
        return [torch.randn(3, size, size, generator=generator) for _ in range(n)]

    samples = [
        (
            {
                "global_crops": crops(c.global_crops_size, 2),
                "local_crops": crops(c.local_crops_size, c.local_crops_number),
            },
            (),
        )
        for _ in range(batch)
    ]
    collated = reference.collate_data_and_cast(
        samples,
        mask_ratio_tuple=tuple(config.ibot.mask_ratio_min_max),
        mask_probability=config.ibot.mask_sample_probability,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=reference.MaskingGenerator(
            input_size=(grid, grid), max_num_patches=0.5 * grid * grid
        ),
    )
    return to_device(dinospec_layout(collated), device)


def dinospec_layout(collated: dict[str, Any]) -> dict[str, Any]:
    """DINOv2's batch as dinospec's collate makes it: the same keys, crop-major crops and
    per-patch mask weights; checked rather than assumed."""
    if set(collated) != set(BATCH_KEYS):
        raise SystemExit(f"DINOv2's batch keys {sorted(collated)} are not {sorted(BATCH_KEYS)}")
    if not torch.equal(collated["masks_weight"], masked_patch_weights(collated["collated_masks"])):
        raise SystemExit("DINOv2's masks_weight differs from dinospec's for the same masks")
    return dict(collated)


def mapped_weights(weights: dict[str, Tensor], student: nn.ModuleDict) -> dict[str, Tensor]:
    """DINOv2's student state dict under dinospec's keys (the same names), every key and
    shape checked; a specialized model's prefix parameters are copies of the shared ones."""
    target = student.state_dict()
    shared = {k for k in target if ".prefix_" not in k}
    if shared != weights.keys():
        raise SystemExit(
            f"key mapping incomplete: only dinospec {sorted(shared - weights.keys())}, "
            f"only DINOv2 {sorted(weights.keys() - shared)}"
        )
    wrong = [k for k in shared if target[k].shape != weights[k].shape]
    if wrong:
        raise SystemExit(
            f"shapes differ: {[(k, target[k].shape, weights[k].shape) for k in wrong]}"
        )
    backbone = {
        k.removeprefix("backbone."): v for k, v in weights.items() if k.startswith("backbone.")
    }
    filled = fill_prefix_path(backbone, student.backbone)
    heads = {k: v for k, v in weights.items() if not k.startswith("backbone.")}
    return heads | {f"backbone.{k}": v for k, v in filled.items()}


def shared_name(name: str) -> str:
    """The DINOv2 parameter a dinospec parameter was copied from."""
    return name.replace(".prefix_", ".")


class ReferenceContender:
    """DINOv2's SSLMetaArch, its optimizer and the batch behind `.cuda()` holders."""

    def __init__(
        self,
        reference: ref.Reference,
        cfg: Any,
        weights: dict[str, Tensor],
        batch: dict[str, Any],
        values: dict[str, float],
        dtype: str,
    ) -> None:
        """bf16 runs `forward_backward` under autocast, standing in for the fp16 mixed
        precision that DINOv2 gets from FSDP."""
        self.reference, self.cfg, self.values = reference, cfg, values
        device = batch["collated_global_crops"].device
        self.model = ref.build_meta_arch(reference, cfg, device)
        self.model.student.load_state_dict(weights, strict=True)
        self.model.teacher.load_state_dict(weights, strict=True)
        self.optimizer = reference.build_optimizer(cfg, self.model.get_params_groups())
        self.batch = ref.reference_batch(batch)
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16")

    def step(self) -> dict[str, float]:
        with self.autocast:
            losses = ref.reference_step(
                self.reference,
                self.model,
                self.optimizer,
                self.batch,
                self.values,
                self.cfg.optim.clip_grad,
            )
        return ref.weighted_terms(losses, self.cfg)

    def forward_backward(self) -> dict[str, float]:
        losses = self.model.forward_backward(self.batch, teacher_temp=self.values["teacher_temp"])
        return ref.weighted_terms({k: v.item() for k, v in losses.items()}, self.cfg)

    def grads(self) -> dict[str, Tensor]:
        return {n: p.grad for n, p in self.model.student.named_parameters()}

    def parts(self) -> dict[str, nn.Module]:
        return {"student": self.model.student, "teacher": self.model.teacher}

    def held(self) -> list[Tensor]:
        return held_tensors(self.model, self.optimizer, self.batch_tensors())

    def batch_tensors(self) -> list[Tensor]:
        return [v.tensor for v in self.batch.values() if isinstance(v, ref.OnDevice)]


class DinospecContender:
    """dinospec's Trainer with DINOv2's weights loaded into student and teacher."""

    def __init__(
        self,
        config: Config,
        weights: dict[str, Tensor],
        batch: dict[str, Any],
        values: dict[str, float],
    ) -> None:
        self.trainer = Trainer(config, batch["collated_global_crops"].device.type)
        model = self.trainer.model
        state = mapped_weights(weights, model.student)
        model.student.load_state_dict(state, strict=True)
        model.teacher.load_state_dict(state, strict=True)
        self.batch, self.values = batch, values

    def step(self) -> dict[str, float]:
        apply_schedule_values(self.trainer.optimizer, self.values)
        result = self.trainer.step(self.batch, self.values)
        if result.nonfinite:
            raise RuntimeError(f"non-finite loss terms {result.nonfinite} in the benchmark step")
        return result.losses

    def forward_backward(self) -> dict[str, float]:
        """The forward and backward passes of `Trainer.step`, without the update."""
        model = self.trainer.model
        targets = model.teacher_targets(self.batch, self.values["teacher_temp"])
        terms, _ = model.losses(self.batch, targets)
        sum(terms.values()).backward()
        return {k: float(v.detach()) for k, v in terms.items()}

    def grads(self) -> dict[str, Tensor]:
        """Gradients per DINOv2 parameter: a prefix copy's gradient adds to its source's."""
        grads: dict[str, Tensor] = {}
        for name, p in self.trainer.model.student.named_parameters():
            key = shared_name(name)
            grads[key] = p.grad if key not in grads else grads[key] + p.grad
        return grads

    def parts(self) -> dict[str, nn.Module]:
        return {"student": self.trainer.model.student, "teacher": self.trainer.model.teacher}

    def held(self) -> list[Tensor]:
        batch = [v for v in self.batch.values() if isinstance(v, Tensor)]
        return held_tensors(self.trainer.model, self.trainer.optimizer, batch)


Contender = ReferenceContender | DinospecContender


class Run:
    """What every contender of one row is built from: the reference, configs, weights,
    batch and schedule values."""

    def __init__(
        self,
        args: argparse.Namespace,
        reference: ref.Reference,
        setting: Setting,
        batch: int,
    ) -> None:
        self.args, self.reference, self.device = args, reference, torch.device(args.device)
        self.setting, self.n_images = setting, batch
        vanilla = dinospec_config(args, setting, batch, False, "fp32")
        self.cfg = ref.reference_config(reference, vanilla)
        self.weights = initial_weights(reference, self.cfg)
        self.batch = collated_batch(reference, vanilla, batch, self.device)
        after_warmup = vanilla.optim.warmup_epochs * vanilla.train.epoch_length
        self.values = schedules_for(vanilla, batch).at(after_warmup)

    def build(self, name: str, dtype: str) -> Contender:
        if name == "reference":
            return ReferenceContender(
                self.reference, self.cfg, self.weights, self.batch, self.values, dtype
            )
        config = dinospec_config(self.args, self.setting, self.n_images, name != "vanilla", dtype)
        return DinospecContender(config, self.weights, self.batch, self.values)

    def build_all(self, dtype: str) -> dict[str, Contender]:
        return {name: self.build(name, dtype) for name in CONTENDERS}
