"""AdamW parameter groups of DINOv2: layer-wise lr decay, patch-embed multiplier, no decay
on biases, norms and LayerScale (SPEC section 4; the tokens and the position embedding
are decayed, as DINOv2's `get_params_groups_with_decay` does).

Each group carries multipliers; `apply_schedule_values` turns the schedule values of an
iteration into per-group lr and weight decay, so the optimizer never stores a schedule.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

EMBEDDINGS = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")
PREFIX_LEAF = "prefix_"


def backbone_layer_id(name: str, depth: int) -> int:
    """0 for embeddings, i + 1 for block i, depth + 1 for what follows the blocks."""
    if name.split(".")[0] in EMBEDDINGS:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def lr_multiplier(name: str, depth: int, layer_decay: float, patch_embed_lr_mult: float) -> float:
    """Blocks near the input learn slower: decay ** (depth + 1 - layer id)."""
    mult = layer_decay ** (depth + 1 - backbone_layer_id(name, depth))
    return mult * patch_embed_lr_mult if name.startswith("patch_embed.") else mult


def shared_twin(name: str) -> str:
    """The shared parameter a specialized one sits beside (`qkv.prefix_bias` ->
    `qkv.bias`); other names are their own twin."""
    module, _, leaf = name.rpartition(".")
    if not leaf.startswith(PREFIX_LEAF):
        return name
    shared = leaf.removeprefix(PREFIX_LEAF)
    return f"{module}.{shared}" if module else shared


def takes_weight_decay(name: str) -> bool:
    """DINOv2's rule, by name: no decay for biases, norms and LayerScale gammas; everything
    else, the [CLS], register and mask tokens and the position embedding included, decays.
    A prefix-path parameter follows its shared twin (a prefix bias is a bias)."""
    twin = shared_twin(name)
    return not (twin.endswith(".bias") or "norm" in twin or "gamma" in twin)


def param_groups(
    modules: Mapping[str, nn.Module], layer_decay: float = 0.9, patch_embed_lr_mult: float = 0.2
) -> list[dict]:
    """Groups for AdamW over named submodules (e.g. backbone, dino_head, ibot_head).

    Layer-wise decay applies to modules with `blocks` (the backbone); heads learn at the
    full rate. Parameters with the same multipliers share a group, which keeps the fused
    optimizer kernels few; backbone and heads never share one, since the backbone may
    follow its own lr warm-up.
    """
    fused: dict[tuple[float, float, bool, bool], dict] = defaultdict(
        lambda: {"params": [], "names": []}
    )
    for prefix, module in modules.items():
        depth = len(module.blocks) if hasattr(module, "blocks") else None
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            lr_mult = (
                lr_multiplier(name, depth, layer_decay, patch_embed_lr_mult)
                if depth is not None
                else 1.0
            )
            wd_mult = 1.0 if takes_weight_decay(name) else 0.0
            is_last_layer = name.startswith("last_layer.")
            group = fused[(lr_mult, wd_mult, is_last_layer, depth is not None)]
            group["params"].append(param)
            group["names"].append(f"{prefix}.{name}")
    return [
        {
            **group,
            "lr_multiplier": lr,
            "wd_multiplier": wd,
            "is_last_layer": last,
            "is_backbone": backbone,
        }
        for (lr, wd, last, backbone), group in fused.items()
    ]


def apply_schedule_values(optimizer: torch.optim.Optimizer, values: Mapping[str, float]) -> None:
    """Set each group's lr and weight decay from the schedule values of this iteration."""
    for group in optimizer.param_groups:
        if group["is_last_layer"]:
            lr = values["last_layer_lr"]
        else:
            lr = values["backbone_lr"] if group["is_backbone"] else values["lr"]
        group["lr"] = lr * group["lr_multiplier"]
        group["weight_decay"] = values["wd"] * group["wd_multiplier"]
