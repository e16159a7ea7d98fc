"""DINOv2's own training step, imported from the unchanged reference code.

The reference (../shared/reference/dinov2, Apache 2.0) is put on `sys.path` and imported;
nothing of it is copied. It was written for FSDP, xFormers and CUDA, so a few pieces that
cannot run on one CPU process (or on a GPU without xFormers) are replaced by stand-ins,
each the smallest thing that lets the unchanged code run the same arithmetic:

- `dinov2.fsdp` (not in the reference folder): `get_fsdp_wrapper` returns the module
  unwrapped, `reshard_fsdp_model` does nothing, `get_fsdp_modules(m)` returns one object
  whose `params` are `m.parameters()` (what `SSLMetaArch.update_teacher` averages), and
  `ShardedGradScaler` is `torch.amp.GradScaler` (unused: the grad scaler is off).
- `xformers.ops.fmha.BlockDiagonalMask`, seen only by `ssl_meta_arch` while it is imported:
  `from_tensor_list` concatenates the student head's (1, n, D) inputs along the tokens and
  `split` cuts the output back. The head works row by row, so this is exact. The stand-in
  is removed from `sys.modules` after the import, so no other code sees a fake xFormers;
  `dinov2.loss` is imported with it too, so iBOT takes its plain PyTorch cross-entropy.
- `XFORMERS_DISABLED=1` (set unless already set): the reference's own switch, so its
  attention is PyTorch's `scaled_dot_product_attention`, as dinospec's `sdpa` backend.
- The student's multi-crop call (`forward_features_list`, xFormers' block-diagonal path)
  runs each crop size on its own through the backbone's `forward_features`, as dinospec
  does; attention never crosses images either way, so the function is the same.
- `.cuda(non_blocking=True)` in `forward_backward`: the batch's tensors are handed over in
  `OnDevice` holders whose `.cuda()` returns the tensor already on the benchmark's device.
- `fsdp_synchronize_streams` (shares FSDP's CUDA streams after the first step) is skipped
  by setting `need_to_synchronize_fsdp_streams = False`.
- `train.py` cannot be imported (it needs fvcore, the data loaders and the distributed
  helpers), so `build_optimizer`, `build_schedulers` and `apply_optim_scheduler` are
  compiled out of its file unchanged (and `apply_scaling_rules_to_cfg` out of
  `dinov2/utils/config.py`, its process count the stand-in's one), and `reference_step`
  is the body of `do_train`'s loop without logging and checkpoints; there FSDP's
  `clip_grad_norm_` method becomes torch's function on each student part, which computes
  the same norm on one process.
- A model width that DINOv2 does not name (the tests' tiny ViT) is registered in
  `dinov2.models.vision_transformer` as `vit_small` is built: `DinoVisionTransformer` with
  `NestedTensorBlock` and `MemEffAttention`.
"""

from __future__ import annotations

import ast
import contextlib
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from dinospec.config import Config

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2"
NAMED_ARCHS = {(384, 12): "vit_small", (768, 12): "vit_base", (1024, 24): "vit_large"}
NAMED_ARCHS[(1536, 40)] = "vit_giant2"


@dataclass
class Reference:
    """The reference's pieces a step needs."""

    SSLMetaArch: type
    collate_data_and_cast: Any
    MaskingGenerator: type
    build_optimizer: Any
    build_schedulers: Any
    apply_optim_scheduler: Any
    apply_scaling_rules_to_cfg: Any
    vision_transformer: ModuleType
    config_dir: Path


class BlockDiagonalMask:
    """xFormers' block-diagonal mask as SSLMetaArch uses it: only to run the student head
    once on several (1, n_i, D) inputs and split the output back (see the module docstring)."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors: list[Tensor]) -> tuple[BlockDiagonalMask, Tensor]:
        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x: Tensor) -> list[Tensor]:
        return list(x.split(self.sizes, dim=1))


def _get_fsdp_wrapper(model_cfg: Any, modules_to_wrap: Any = ()) -> Any:
    return lambda module: module


def _get_fsdp_modules(module: nn.Module) -> list[SimpleNamespace]:
    return [SimpleNamespace(params=list(module.parameters()))]


def _reshard_fsdp_model(module: nn.Module) -> None:
    return None


def _module(name: str, **attributes: Any) -> ModuleType:
    module = ModuleType(name)
    module.__dict__.update(attributes)
    return module


@contextlib.contextmanager
def _xformers_stand_in() -> Iterator[None]:
    """A fake `xformers.ops.fmha` while the reference imports, then whatever was there."""
    fmha = _module("xformers.ops.fmha", BlockDiagonalMask=BlockDiagonalMask)
    stand_ins = {
        "xformers": _module("xformers", __path__=[]),
        "xformers.ops": _module("xformers.ops", __path__=[], fmha=fmha),
        "xformers.ops.fmha": fmha,
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _functions_from(
    path: Path, names: set[str], namespace: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Top-level functions of a file, compiled unchanged without running the rest of it;
    `namespace` holds the names they read besides torch."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    if {n.name for n in found} != names:
        raise RuntimeError(f"{path} lacks {sorted(names - {n.name for n in found})}")
    namespace = {"torch": torch, **(namespace or {})}
    exec(compile(ast.Module(body=found, type_ignores=[]), str(path), "exec"), namespace)
    return {name: namespace[name] for name in names}


def load_reference(root: Path = DEFAULT_ROOT) -> Reference:
    """Import the reference from `root` (the folder holding `dinov2/`) with its stand-ins."""
    if not (root / "dinov2" / "train" / "ssl_meta_arch.py").is_file():
        raise SystemExit(f"DINOv2 reference code not found in {root}")
    os.environ.setdefault("XFORMERS_DISABLED", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="dinov2")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    sys.modules["dinov2.fsdp"] = _module(
        "dinov2.fsdp",
        get_fsdp_wrapper=_get_fsdp_wrapper,
        ShardedGradScaler=torch.amp.GradScaler,
        get_fsdp_modules=_get_fsdp_modules,
        reshard_fsdp_model=_reshard_fsdp_model,
    )
    with _xformers_stand_in(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="xFormers is")
        import dinov2.loss  # noqa: F401  (first imported here, beside the stand-in)
        from dinov2.data import MaskingGenerator, collate_data_and_cast
        from dinov2.models import vision_transformer
        from dinov2.train.ssl_meta_arch import SSLMetaArch
        from dinov2.utils.utils import CosineScheduler
    logger = logging.getLogger("dinov2")
    train = _functions_from(
        root / "dinov2" / "train" / "train.py",
        {"build_optimizer", "build_schedulers", "apply_optim_scheduler"},
        {"CosineScheduler": CosineScheduler, "logger": logger},
    )
    scaling = _functions_from(
        root / "dinov2" / "utils" / "config.py",
        {"apply_scaling_rules_to_cfg"},
        {"math": math, "logger": logger, "distributed": SimpleNamespace(get_global_size=lambda: 1)},
    )
    return Reference(
        SSLMetaArch=SSLMetaArch,
        collate_data_and_cast=collate_data_and_cast,
        MaskingGenerator=MaskingGenerator,
        build_optimizer=train["build_optimizer"],
        build_schedulers=train["build_schedulers"],
        apply_optim_scheduler=train["apply_optim_scheduler"],
        apply_scaling_rules_to_cfg=scaling["apply_scaling_rules_to_cfg"],
        vision_transformer=vision_transformer,
        config_dir=root / "dinov2" / "configs",
    )


def arch_name(reference: Reference, embed_dim: int, depth: int, num_heads: int) -> str:
    """DINOv2's name for this ViT width and depth; other sizes are registered beside them."""
    named = NAMED_ARCHS.get((embed_dim, depth))
    if named is not None and embed_dim // num_heads == 64:
        return named
    vits = reference.vision_transformer
    name = f"vit_{embed_dim}x{depth}x{num_heads}"
    block = partial(vits.Block, attn_class=vits.MemEffAttention)
    setattr(
        vits,
        name,
        partial(
            vits.DinoVisionTransformer,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            block_fn=block,
        ),
    )
    return name


def reference_config(reference: Reference, config: Config) -> DictConfig:
    """DINOv2's default config with every setting the step reads taken from dinospec's.

    Blocks are not chunked (chunks only group blocks for FSDP; unchunked, the state dict
    keys are DINOv2's plain `blocks.N.` ones), the grad scaler is off (no fp16 here) and
    the centering is DINOv2's softmax centering or Sinkhorn-Knopp as dinospec's config says.
    """
    m, d, i, c, o = config.model, config.dino, config.ibot, config.crops, config.optim
    if m.ffn_layer != "mlp" or m.num_register_tokens or m.mlp_ratio != 4.0:
        raise SystemExit("the peer benchmark covers ViTs with an MLP, no registers, ratio 4")
    head = {
        "head_n_prototypes": d.head_n_prototypes,
        "head_bottleneck_dim": d.head_bottleneck_dim,
        "head_nlayers": d.head_nlayers,
        "head_hidden_dim": d.head_hidden_dim,
    }
    overrides = {
        "compute_precision": {"grad_scaler": False},
        "dino": {"loss_weight": d.loss_weight, "koleo_loss_weight": d.koleo_loss_weight, **head},
        "ibot": {
            "loss_weight": i.loss_weight,
            "mask_sample_probability": i.mask_sample_probability,
            "mask_ratio_min_max": list(i.mask_ratio_min_max),
            "separate_head": i.separate_head,
        },
        "train": {
            "batch_size_per_gpu": config.train.batch_size_per_gpu,
            "centering": "centering" if config.train.centering == "softmax" else "sinkhorn_knopp",
        },
        "student": {
            "arch": None,
            "patch_size": m.patch_size,
            "drop_path_rate": m.drop_path_rate,
            "drop_path_uniform": m.drop_path_uniform,
            "layerscale": m.init_values,
            "block_chunks": 0,
            "qkv_bias": m.qkv_bias,
            "proj_bias": m.proj_bias,
            "ffn_bias": m.ffn_bias,
            "ffn_layer": m.ffn_layer,
            "num_register_tokens": m.num_register_tokens,
            "interpolate_antialias": m.interpolate_antialias,
            "interpolate_offset": m.interpolate_offset,
        },
        "optim": {
            "clip_grad": o.clip_grad,
            "layerwise_decay": o.layerwise_decay,
            "patch_embed_lr_mult": o.patch_embed_lr_mult,
            "adamw_beta1": o.adamw_beta1,
            "adamw_beta2": o.adamw_beta2,
        },
        "crops": {
            "local_crops_number": c.local_crops_number,
            "global_crops_size": c.global_crops_size,
            "local_crops_size": c.local_crops_size,
        },
    }
    overrides["student"]["arch"] = arch_name(reference, m.embed_dim, m.depth, m.num_heads)
    if i.separate_head:
        overrides["ibot"].update(
            head_n_prototypes=i.head_n_prototypes,
            head_bottleneck_dim=i.head_bottleneck_dim,
            head_nlayers=i.head_nlayers,
            head_hidden_dim=i.head_hidden_dim,
        )
    default = OmegaConf.load(reference.config_dir / "ssl_default_config.yaml")
    return OmegaConf.merge(default, overrides)


class OnDevice:
    """A batch tensor already on the benchmark's device; `.cuda()` hands it over as is."""

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor

    def cuda(self, non_blocking: bool = False) -> Tensor:
        return self.tensor


def per_crop_list_path(backbone: nn.Module) -> None:
    """Replace the xFormers multi-crop path of one backbone by one pass per crop size."""

    def forward_features_list(x_list: list[Tensor], masks_list: list[Tensor | None]) -> list:
        return [backbone.forward_features(x, m) for x, m in zip(x_list, masks_list, strict=True)]

    backbone.forward_features_list = forward_features_list


def build_meta_arch(reference: Reference, cfg: DictConfig, device: torch.device) -> nn.Module:
    """SSLMetaArch on `device` in training mode, with the per-instance stand-ins."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weight_norm` is deprecated")
        model = reference.SSLMetaArch(cfg).to(device)
    model.train()
    model.need_to_synchronize_fsdp_streams = False
    per_crop_list_path(model.student.backbone)
    return model


def reference_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The collated batch as `forward_backward` reads it (tensors behind `.cuda()`)."""
    return {k: OnDevice(v) if isinstance(v, Tensor) else v for k, v in batch.items()}


def reference_step(
    reference: Reference,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    values: dict[str, float],
    clip_grad: float,
) -> dict[str, float]:
    """One iteration of DINOv2's `do_train` loop (no logging, no checkpoint); returns the
    loss dict as that loop reads it (`.item()`, which also waits for the device)."""
    reference.apply_optim_scheduler(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(batch, teacher_temp=values["teacher_temp"])
    if clip_grad:
        for part in model.student.values():
            torch.nn.utils.clip_grad_norm_(part.parameters(), clip_grad)
    optimizer.step()
    model.update_teacher(values["momentum"])
    return {k: v.item() for k, v in loss_dict.items()}


def weighted_terms(loss_dict: dict[str, float], cfg: DictConfig) -> dict[str, float]:
    """The four terms DINOv2 adds into its training loss, under dinospec's term names.

    Its loss dict is for display: the KoLeo entry is halved and the iBOT entry halved
    again relative to what is backpropagated, and the DINO entries lack the loss weight.
    """
    return {
        "dino_local": cfg.dino.loss_weight * loss_dict["dino_local_crops_loss"],
        "dino_global": cfg.dino.loss_weight * loss_dict["dino_global_crops_loss"],
        "koleo": 2 * loss_dict["koleo_loss"],
        "ibot": cfg.ibot.loss_weight * 2 * loss_dict["ibot_loss"],
    }
