"""DINOv2-compatible Vision Transformer with optional [CLS]/patch layer specialization.

Attribute names, state-dict keys and outputs follow DINOv2, so code written for a DINOv2
backbone (and official checkpoints) run unchanged on this one; the constructor takes a
`ModelConfig`, whose fields are DINOv2's constructor arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dinospec.config import ModelConfig, model_problems
from dinospec.models.layers import Block, PatchEmbed
from dinospec.models.specialize import SpecializationPlan
from dinospec.models.streams import Streams
from dinospec.models.sublayers import SpecializedLayerNorm, SpecializedLinear, make_norm


def drop_path_rates(rate: float, depth: int, uniform: bool) -> list[float]:
    """Per-block stochastic-depth rates, rising linearly from 0 unless uniform. Computed in
    float64 as DINOv2 does: in float32 the last block of a linear 0.1 schedule would get
    0.10000000149, crossing the block's 0.1 threshold into the other drop scheme, and a
    rate off by a float32 rounding can change how many samples the batch subset keeps."""
    if uniform:
        return [rate] * depth
    return np.linspace(0.0, rate, depth, dtype=np.float64).tolist()


class DinoVisionTransformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        """The backbone `config` describes; it is checked first (every impossible value
        named), and kept as `self.config`, which is what files record and loaders check."""
        super().__init__()
        problems = model_problems(config)
        if problems:
            raise ValueError("; ".join(f"{k}={v!r}: {p}" for k, v, p in problems))
        self.config = replace(config)
        self.plan = SpecializationPlan.build(config.specialize, config.depth)

        c = self.config
        self.num_features = self.embed_dim = c.embed_dim
        self.num_tokens = 1
        self.n_blocks = c.depth
        self.num_heads = c.num_heads
        self.patch_size = c.patch_size
        self.num_register_tokens = c.num_register_tokens
        self.interpolate_antialias = c.interpolate_antialias
        self.interpolate_offset = c.interpolate_offset
        self.chunked_blocks = False

        self.patch_embed = PatchEmbed(c.patch_size, c.in_chans, c.embed_dim)
        num_patches = (c.img_size // c.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, c.embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, c.num_register_tokens, c.embed_dim))
            if c.num_register_tokens
            else None
        )
        rates = drop_path_rates(c.drop_path_rate, c.depth, c.drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(
                dim=c.embed_dim,
                num_heads=c.num_heads,
                mlp_ratio=c.mlp_ratio,
                qkv_bias=c.qkv_bias,
                proj_bias=c.proj_bias,
                ffn_bias=c.ffn_bias,
                drop_path=rates[i],
                init_values=c.init_values,
                ffn_layer=c.ffn_layer,
                attn_backend=c.attn_backend,
                specialized=self.plan.per_block[i],
                multi_crop_attention=c.multi_crop_attention,
            )
            for i in range(c.depth)
        )
        self.norm = make_norm(c.embed_dim, self.plan.final_norm)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, c.embed_dim))
        self.init_weights()

    @property
    def is_specialized(self) -> bool:
        return not self.plan.is_vanilla

    def init_weights(self) -> None:
        """DINOv2's initialization; each specialized path gets the same scheme."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            if isinstance(module, SpecializedLinear):
                nn.init.trunc_normal_(module.prefix_weight, std=0.02)
                if module.prefix_bias is not None:
                    nn.init.zeros_(module.prefix_bias)
            if isinstance(module, SpecializedLayerNorm):
                nn.init.ones_(module.prefix_weight)
                nn.init.zeros_(module.prefix_bias)

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding for an h x w image: the patch grid resized bicubically.

        DINOv2 resizes by a scale factor (n + offset) / M rather than to n, a quirk that
        changes the result and is kept for compatibility with its checkpoints.
        """
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        dim = x.shape[-1]
        h0, w0 = h // self.patch_size, w // self.patch_size
        m = int(math.sqrt(n))
        if self.interpolate_offset:
            scale = (
                float(h0 + self.interpolate_offset) / m,
                float(w0 + self.interpolate_offset) / m,
            )
            resize = {"scale_factor": scale}
        else:
            resize = {"size": (h0, w0)}
        grid = pos_embed[:, 1:].reshape(1, m, m, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", antialias=self.interpolate_antialias, **resize)
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position grid resized to {tuple(grid.shape[-2:])}, not {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat([pos_embed[:, :1], grid], dim=1).to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[CLS] + registers + patch tokens; masked patches become `mask_token` (iBOT)."""
        b, _, h, w = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, h, w)
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        return x

    def streams_of(self, x: Tensor) -> Streams:
        """A prepared sequence as the blocks carry it: one stream for a vanilla model,
        prefix and patch streams for a specialized one."""
        n = self.plan.num_prefix_path_tokens(self.num_register_tokens)
        return Streams.of_sequence(x, n if self.is_specialized else 0)

    def register_norm_hook(
        self, name: str, hook: Callable[[Tensor, Tensor], None]
    ) -> RemovableHandle:
        """Call `hook(input, output)` every time the norm `name` ("blocks.3.norm1",
        "blocks.3.norm2", "norm") runs, with whole sequences: (B, N, D) tensors holding
        [CLS], the registers and the patches in that order, whatever streams carry them.
        This is the model's hook point for analysis (dinospec.analysis.tokens)."""
        module = self.get_submodule(name)
        if not isinstance(module, nn.LayerNorm):
            raise ValueError(f"{name} is a {type(module).__name__}, not a norm of the backbone")

        def on_forward(module: nn.Module, args: tuple[Streams], output: Streams) -> None:
            hook(args[0].joined(), output.joined())

        return module.register_forward_hook(on_forward)

    def _outputs(self, x: Streams, masks: Tensor | None) -> dict:
        x_norm = self.norm(x).joined()
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x.joined(),
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict]:
        """Multi-crop: each element is a batch of same-size crops, run at its own size (no
        padding); all sizes share each block call so a sharded block is gathered once per
        step, not once per crop size. `model.multi_crop_attention` says whether the block
        runs the sizes one after the other or packed into one sequence."""
        crops = [
            self.streams_of(self.prepare_tokens_with_masks(x, m))
            for x, m in zip(x_list, masks_list, strict=True)
        ]
        for blk in self.blocks:
            crops = blk(crops, multi_crop=True)
        return [self._outputs(x, m) for x, m in zip(crops, masks_list, strict=True)]

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        if isinstance(x, (list, tuple)):
            masks_list = masks if masks is not None else [None] * len(x)
            return self.forward_features_list(x, masks_list)
        crops = [self.streams_of(self.prepare_tokens_with_masks(x, masks))]
        for blk in self.blocks:
            crops = blk(crops)
        return self._outputs(crops[0], masks)

    def _intermediate(self, x: Tensor, n: int | Sequence[int], norm: bool) -> list[Tensor]:
        crops = [self.streams_of(self.prepare_tokens_with_masks(x))]
        depth = len(self.blocks)
        take = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not take <= set(range(depth)):
            raise ValueError(f"requested blocks {sorted(take)} but the model has {depth}")
        outputs = []
        for i, blk in enumerate(self.blocks):
            crops = blk(crops)
            if i in take:
                outputs.append(self.norm(crops[0]).joined() if norm else crops[0].joined())
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last n blocks (or of the listed blocks), as in DINOv2."""
        outputs = self._intermediate(x, n, norm)
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, h, w = x.shape
            grid = (h // self.patch_size, w // self.patch_size)
            patches = [p.reshape(b, *grid, -1).permute(0, 3, 1, 2).contiguous() for p in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)

    def forward(self, *args, is_training: bool = False, **kwargs) -> Tensor | dict | list[dict]:
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


def build_backbone(config: ModelConfig) -> DinoVisionTransformer:
    """The model a config describes (the inverse of `model.config`)."""
    return DinoVisionTransformer(config)
