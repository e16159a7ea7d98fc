"""Student, EMA teacher, heads and the DINOv2 objective for one training step."""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.config import Config
from dinospec.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from dinospec.losses.gram import gram_anchoring_loss
from dinospec.models import build_backbone
from dinospec.models.heads import DINOHead
from dinospec.train.gram_teacher import GramTeacher

N_GLOBAL = 2


def build_head(in_dim: int, c: Any) -> DINOHead:
    return DINOHead(
        in_dim, c.head_n_prototypes, c.head_hidden_dim, c.head_bottleneck_dim, c.head_nlayers
    )


class SSLModel(nn.Module):
    """DINO [CLS] loss + iBOT masked-patch loss + KoLeo, student against EMA teacher, and
    with `gram.loss_weight` > 0 Gram anchoring against a snapshot of the teacher.

    The teacher starts as a copy of the student (no stochastic depth, eval mode), is never
    given gradients, and is updated only by `dinospec.train.ema.ema_update`.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        backbone = build_backbone(config.model)
        dim = backbone.embed_dim
        student = {"backbone": backbone, "dino_head": build_head(dim, config.dino)}
        if config.ibot.separate_head:
            student["ibot_head"] = build_head(dim, config.ibot)
        self.student = nn.ModuleDict(student)
        teacher_backbone = build_backbone(replace(config.model, drop_path_rate=0.0))
        self.teacher = nn.ModuleDict(
            {"backbone": teacher_backbone}
            | {k: copy.deepcopy(v) for k, v in student.items() if k != "backbone"}
        )
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.dino_loss = DINOLoss(config.dino.head_n_prototypes)
        ibot_dim = (
            config.ibot.head_n_prototypes
            if config.ibot.separate_head
            else config.dino.head_n_prototypes
        )
        self.ibot_loss = IBOTPatchLoss(ibot_dim)
        self.koleo_loss = KoLeoLoss()
        self.distill_teacher: nn.ModuleDict | None = None  # dinospec.train.distill sets it
        g = config.gram
        self.gram_teacher = (
            GramTeacher(teacher_backbone, g.start_iteration, g.refresh_every)
            if g.loss_weight > 0
            else None
        )

    def train(self, mode: bool = True) -> SSLModel:
        super().train(mode)
        for frozen in (self.teacher, self.gram_teacher, self.distill_teacher):
            if frozen is not None:
                frozen.eval()
        return self

    @property
    def ibot_head_name(self) -> str:
        return "ibot_head" if self.config.ibot.separate_head else "dino_head"

    @torch.no_grad()
    def teacher_targets(
        self, batch: dict[str, Any], teacher_temp: float, gram: bool = False
    ) -> dict[str, Tensor]:
        """Teacher outputs on the global crops, turned into soft targets; with `gram`, the
        Gram teacher's patch features of the same views too (see gram_crops). The targets
        come from the frozen teacher when distilling, otherwise from the EMA teacher."""
        source = self.teacher if self.distill_teacher is None else self.distill_teacher
        out = source.backbone(batch["collated_global_crops"], is_training=True)
        cls = out["x_norm_clstoken"].chunk(N_GLOBAL)
        swapped = torch.cat([cls[1], cls[0]])  # student view i is matched with teacher view j != i
        patches = out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
        cls_logits, patch_logits = self._teacher_heads(source, swapped, patches)
        statistics = {}
        if self.config.train.centering == "softmax":
            cls_targets = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            patch_targets = self.ibot_loss.softmax_center_teacher(patch_logits, teacher_temp)
            statistics["cls_statistics"] = self.dino_loss.statistics(cls_logits)
            statistics["patch_statistics"] = self.ibot_loss.statistics(patch_logits)
        else:
            cls_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            patch_targets = self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp)
        targets = {
            **statistics,
            "cls_targets": cls_targets.chunk(N_GLOBAL),
            "patch_targets": patch_targets,
        }
        if gram:
            patch = self.config.model.patch_size
            height, width = batch["collated_global_crops"].shape[-2:]
            targets["gram_patches"] = self.gram_teacher.patch_tokens(
                self.gram_crops(batch), patch, (height // patch, width // patch)
            )
        return targets

    def gram_crops(self, batch: dict[str, Any]) -> Tensor:
        """What the Gram teacher sees: at `gram.upscale` 1 the global crops, above it the
        batch's renderings of the same views at that factor (`collated_gram_crops`, made by
        the data pipeline from the image, as DINOv3 makes them, not by upsampling)."""
        if self.config.gram.upscale == 1:
            return batch["collated_global_crops"]
        if "collated_gram_crops" not in batch:
            raise KeyError(
                f"gram.upscale={self.config.gram.upscale:g} needs the batch's high-resolution "
                "Gram crops ('collated_gram_crops'), which the training loader "
                "(dinospec.train.data.build_loader) makes from the same config"
            )
        return batch["collated_gram_crops"]

    @staticmethod
    def _teacher_heads(
        source: nn.ModuleDict, cls: Tensor, patches: Tensor
    ) -> tuple[Tensor, Tensor]:
        """With one head for both objectives, [CLS] and masked patches go through it in one
        call, as in DINOv2's teacher pass: one weight normalization of the prototypes and
        one matrix product per layer instead of two."""
        if "ibot_head" in source:
            return source.dino_head(cls), source.ibot_head(patches)
        logits = source.dino_head(torch.cat([cls, patches]))
        return logits.split([cls.shape[0], patches.shape[0]])

    def update_centers(self, targets: dict[str, Tensor]) -> None:
        """Queue this step's center updates; called only once the step is known to be sane,
        so a step skipped for a non-finite loss leaves the centers untouched. Only the
        teacher logits' statistics are kept until then, not the logits (160 MiB at 65,536
        prototypes), as DINOv2 reduces them inside its teacher pass."""
        if self.config.train.centering == "softmax":
            self.dino_loss.queue_update(targets["cls_statistics"])
            self.ibot_loss.queue_update(targets["patch_statistics"])

    def losses(
        self, batch: dict[str, Any], targets: dict[str, Any], train_backbone: bool = True
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Every weighted loss term of the step (their sum is the training loss), and the
        student's global [CLS] tokens for the collapse monitor. With `train_backbone`
        false the student backbone runs without autograd: its parameters get no gradient
        (the optimizer skips them) and the backward pass stops at the heads."""
        n_local = self.config.crops.local_crops_number
        crops, masks = [batch["collated_global_crops"]], [batch["collated_masks"]]
        if n_local:
            crops.append(batch["collated_local_crops"])
            masks.append(None)
        with contextlib.nullcontext() if train_backbone else torch.no_grad():
            outputs = self.student.backbone(crops, masks=masks, is_training=True)
        global_out = outputs[0]
        student_cls = global_out["x_norm_clstoken"]
        patches = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices_list"]]
        local_cls = outputs[1]["x_norm_clstoken"] if n_local else student_cls[:0]
        head_inputs = [local_cls, student_cls]
        if not self.config.ibot.separate_head:
            head_inputs.append(patches)
        head_out = self.student.dino_head(torch.cat(head_inputs)).split(
            [x.shape[0] for x in head_inputs]
        )
        local_logits, global_logits = head_out[0], head_out[1]
        patch_logits = (
            head_out[2] if not self.config.ibot.separate_head else self.student.ibot_head(patches)
        )
        n_terms = N_GLOBAL * (N_GLOBAL - 1) + N_GLOBAL * n_local
        teacher_cls = targets["cls_targets"]
        dino_w, koleo_w = self.config.dino.loss_weight, self.config.dino.koleo_loss_weight
        terms = {
            "dino_global": dino_w
            * self.dino_loss([global_logits], [torch.cat(teacher_cls)])
            * N_GLOBAL
            / n_terms,
            "koleo": koleo_w * sum(self.koleo_loss(c) for c in student_cls.chunk(N_GLOBAL)),
            "ibot": self.config.ibot.loss_weight
            * self.ibot_loss.forward_masked(
                patch_logits,
                targets["patch_targets"],
                batch["collated_masks"],
                masks_weight=batch["masks_weight"],
            ),
        }
        if n_local:
            local_loss = self.dino_loss(list(local_logits.chunk(n_local)), list(teacher_cls))
            terms["dino_local"] = dino_w * local_loss / n_terms
        if "gram_patches" in targets:
            terms["gram"] = self.config.gram.loss_weight * gram_anchoring_loss(
                global_out["x_norm_patchtokens"],
                targets["gram_patches"],
                self.config.gram.clip_negative,
            )
        return terms, student_cls.detach()

    @torch.no_grad()
    def monitor(self, batch_targets: dict[str, Any], student_cls: Tensor) -> dict[str, Tensor]:
        """Collapse indicators: entropy of the teacher's targets over log K (near 0: one
        prototype wins; near 1: targets uniform) and the per-dimension spread of the
        normalized student [CLS] times sqrt(dim) (about 1 when spread, 0 when collapsed)."""
        targets = torch.cat(batch_targets["cls_targets"]).float()
        entropy = -(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()
        unit = F.normalize(student_cls.float(), dim=-1)
        return {
            "teacher_entropy": entropy / math.log(targets.shape[-1]),
            "student_cls_std": unit.std(0).mean() * unit.shape[-1] ** 0.5,
        }
