"""The architecture a DINOv2-layout state dict implies, and its comparison with a config.

Tensor shapes fix most of a ViT (width, depth, patch size, FFN kind and size, registers,
biases, LayerScale, specialized sublayers) but not its number of attention heads, and a
wrong head count still loads and runs, computing another function. So the head count is
taken from what the file records (a dinospec config, a Hugging Face config.json), from
the caller, or from the four released DINOv2 sizes (a warning says so); otherwise loading
stops and says which key to set.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from torch import Tensor

from dinospec.config import BLOCK_SUBLAYERS, ModelConfig, SpecializeConfig, resolve_blocks
from dinospec.models.errors import CheckpointError
from dinospec.models.specialize import SpecializationPlan

log = logging.getLogger(__name__)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
UNKNOWN_HEADS = 0
"""`num_heads` of an architecture read from shapes alone: heads leave no trace there."""

RELEASED_SIZES: dict[tuple[int, int], tuple[int, str]] = {
    (384, 12): (6, "ViT-S/14"),
    (768, 12): (12, "ViT-B/14"),
    (1024, 24): (16, "ViT-L/14"),
    (1536, 40): (24, "ViT-g/14"),
}
"""(embed_dim, depth) of DINOv2's released backbones -> (num_heads, name)."""

SHAPE_FIELDS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "qkv_bias",
    "proj_bias",
    "ffn_bias",
    "num_register_tokens",
)
"""ModelConfig fields that the tensors of a file fix on their own."""


@dataclass(frozen=True)
class FileArchitecture:
    """What a weight file says about its model: the config its shapes imply (with the
    conventions of the library that wrote it, such as how positions are interpolated),
    the head count if the file records one, and the whole config if it stores one."""

    shapes: ModelConfig
    num_heads: int | None = None
    stored: ModelConfig | None = None

    @property
    def config(self) -> ModelConfig:
        """The stored config, else the shapes with the recorded head count (or
        UNKNOWN_HEADS)."""
        if self.stored is not None:
            return self.stored
        return replace(self.shapes, num_heads=self.num_heads or UNKNOWN_HEADS)

    @property
    def knows_heads(self) -> bool:
        return self.stored is not None or self.num_heads is not None


def ffn_hidden(config: ModelConfig) -> int:
    """Hidden width of the FFN a config builds (SwiGLU rounds 2/3 of it up to 8)."""
    hidden = int(config.embed_dim * config.mlp_ratio)
    if config.ffn_layer == "mlp":
        return hidden
    return (int(hidden * 2 / 3) + 7) // 8 * 8


def swiglu_mlp_ratio(embed_dim: int, hidden: int, source: str) -> float:
    """An `mlp_ratio` for which dinospec's (and DINOv2's) SwiGLU has `hidden` units: 4.0
    when it fits (every DINOv2 size), else 3/2 of hidden over width."""
    for ratio in (4.0, 1.5 * hidden / embed_dim, (1.5 * hidden + 1) / embed_dim):
        config = ModelConfig(embed_dim=embed_dim, mlp_ratio=ratio, ffn_layer="swiglufused")
        if ffn_hidden(config) == hidden:
            return ratio
    raise CheckpointError(
        f"{source}: a SwiGLU FFN of {hidden} hidden units on width {embed_dim} matches no "
        "mlp_ratio (dinospec rounds 2/3 of width x mlp_ratio up to a multiple of 8, as DINOv2)"
    )


def shapes_architecture(state_dict: Mapping[str, Tensor], source: str) -> ModelConfig:
    """The config a DINOv2-layout state dict implies, `num_heads` left UNKNOWN_HEADS.
    Register models follow torch hub's convention (antialiased, offset 0)."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"{source}: not a DINOv2 backbone state dict: missing {missing}")
    embed_dim = state_dict["cls_token"].shape[-1]
    patch = state_dict["patch_embed.proj.weight"]
    positions = state_dict["pos_embed"].shape[1] - 1
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise CheckpointError(
            f"{source}: pos_embed has {positions} patch positions, not a square grid"
        )
    blocks = [int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))]
    if not blocks:
        raise CheckpointError(f"{source}: no blocks.N.* keys: not a ViT backbone state dict")
    depth = 1 + max(blocks)
    swiglu = "blocks.0.mlp.w12.weight" in state_dict
    if not swiglu and "blocks.0.mlp.fc1.weight" not in state_dict:
        raise CheckpointError(f"{source}: block 0 has neither mlp.fc1 nor mlp.w12 weights")
    if swiglu:
        hidden = state_dict["blocks.0.mlp.w3.weight"].shape[1]
        mlp_ratio = swiglu_mlp_ratio(embed_dim, hidden, source)
    else:
        mlp_ratio = state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    return ModelConfig(
        img_size=grid * patch.shape[-1],
        patch_size=patch.shape[-1],
        in_chans=patch.shape[1],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=UNKNOWN_HEADS,
        mlp_ratio=mlp_ratio,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        proj_bias="blocks.0.attn.proj.bias" in state_dict,
        ffn_bias=f"blocks.0.mlp.{'w3' if swiglu else 'fc2'}.bias" in state_dict,
        ffn_layer="swiglufused" if swiglu else "mlp",
        init_values=1.0 if "blocks.0.ls1.gamma" in state_dict else None,
        num_register_tokens=registers,
        interpolate_antialias=registers > 0,
        interpolate_offset=0.0 if registers else 0.1,
        specialize=_specialization(state_dict, depth, swiglu),
    )


def _specialization(state_dict: Mapping[str, Tensor], depth: int, swiglu: bool) -> SpecializeConfig:
    modules = {
        "norm1": "norm1",
        "qkv": "attn.qkv",
        "proj": "attn.proj",
        "norm2": "norm2",
        "ffn_in": "mlp.w12" if swiglu else "mlp.fc1",
        "ffn_out": "mlp.w3" if swiglu else "mlp.fc2",
    }
    blocks = {
        f"{sub}_blocks": [
            i for i in range(depth) if f"blocks.{i}.{mod}.prefix_weight" in state_dict
        ]
        for sub, mod in modules.items()
    }
    return SpecializeConfig(final_norm="norm.prefix_weight" in state_dict, **blocks)


def with_heads(
    arch: FileArchitecture, num_heads: int | None, source: str, heads_key: str
) -> ModelConfig:
    """The file's full config: heads as recorded, as given, or those of the released
    DINOv2 size the shapes match (with a warning); an error naming `heads_key` otherwise."""
    config = arch.config
    if num_heads is not None:
        if arch.knows_heads and num_heads != config.num_heads:
            raise CheckpointError(
                f"{source}: {heads_key}={num_heads} but the file records "
                f"num_heads={config.num_heads}"
            )
        return replace(config, num_heads=num_heads)
    if arch.knows_heads:
        return config
    released = RELEASED_SIZES.get((config.embed_dim, config.depth))
    if released is None:
        raise CheckpointError(
            f"{source}: the number of attention heads is not recorded in this file (width "
            f"{config.embed_dim}, depth {config.depth}, not a released DINOv2 size) and "
            f"cannot be read from its tensors; set {heads_key}"
        )
    heads, name = released
    log.warning(
        "%s records no head count; it has the shape of DINOv2's %s, so num_heads=%d is "
        "assumed (set %s if it differs)",
        source,
        name,
        heads,
        heads_key,
    )
    return replace(config, num_heads=heads)


def architecture_problems(arch: FileArchitecture, config: ModelConfig) -> list[str]:
    """How `config` differs from what the file fixes, one `model.<key>: file .. vs config
    ..` line each. A config may specialize more sublayers than the file (the prefix paths
    are then filled from the shared weights), not fewer."""
    shapes = arch.shapes
    problems = [
        f"model.{k}: file {getattr(shapes, k)!r} vs config {getattr(config, k)!r}"
        for k in SHAPE_FIELDS
        if getattr(shapes, k) != getattr(config, k)
    ]
    heads = arch.config.num_heads
    if arch.knows_heads and heads != config.num_heads:
        problems.append(f"model.num_heads: file {heads} vs config {config.num_heads}")
    if (shapes.ffn_layer == "mlp") != (config.ffn_layer == "mlp"):
        kinds = f"file {shapes.ffn_layer!r} vs config {config.ffn_layer!r}"
        problems.append(f"model.ffn_layer: {kinds}")
    elif ffn_hidden(shapes) != ffn_hidden(config):
        problems.append(
            f"model.mlp_ratio: file {shapes.mlp_ratio:g} ({ffn_hidden(shapes)} hidden units) "
            f"vs config {config.mlp_ratio:g} ({ffn_hidden(config)})"
        )
    if (shapes.init_values is None) != (config.init_values is None):
        layerscale = "LayerScale" if shapes.init_values is not None else "no LayerScale"
        problems.append(f"model.init_values: file has {layerscale}, config {config.init_values!r}")
    return problems + _dropped_specialization(shapes, config)


def _dropped_specialization(shapes: ModelConfig, config: ModelConfig) -> list[str]:
    """Sublayers the file specializes and the config does not: dropping a prefix path
    would change the function."""
    problems = []
    for name in BLOCK_SUBLAYERS:
        key = f"{name}_blocks"
        ours = set(resolve_blocks(getattr(config.specialize, key), config.depth))
        dropped = sorted(set(getattr(shapes.specialize, key)) - ours)
        if dropped:
            problems.append(
                f"model.specialize.{key}: the file specializes blocks {dropped}, the config not"
            )
    if shapes.specialize.final_norm and not config.specialize.final_norm:
        problems.append("model.specialize.final_norm: the file specializes it, the config not")
    return problems


def refuse_unless_plain_vit(config: ModelConfig, library: str, model: str) -> None:
    """timm's and Hugging Face's DINOv2 ViTs (`model`, in `library`) have one set of weights
    for all tokens and always have biases after the attention and in the FFN; a backbone
    without them has no equivalent there, which an export must say before writing."""
    if not SpecializationPlan.build(config.specialize, config.depth).is_vanilla:
        raise CheckpointError(
            f"a specialized backbone has no {library} equivalent ({model} has one set of "
            "weights for all tokens); export it as safetensors or hub (dinospec reads "
            "both), or export a vanilla model"
        )
    missing = [k for k in ("proj_bias", "ffn_bias") if not getattr(config, k)]
    if missing:
        raise CheckpointError(f"{model} always has biases; this model lacks {missing}")
