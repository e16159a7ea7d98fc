"""DINOv2-compatible Vision Transformer with optional [CLS]/patch layer specialization.

Constructor arguments, attribute names, state-dict keys and outputs follow DINOv2, so code
written for a DINOv2 backbone (and official checkpoints) run unchanged on this one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.config import ModelConfig, SpecializeConfig, model_problems
from dinospec.models.layers import Block, PatchEmbed
from dinospec.models.specialize import (
    SpecializationPlan,
    SpecializedLayerNorm,
    SpecializedLinear,
    apply_layer,
    make_norm,
)
from dinospec.models.tokens import PATCH, PREFIX, Route, join


def drop_path_rates(rate: float, depth: int, uniform: bool) -> list[float]:
    """Per-block stochastic-depth rates, rising linearly from 0 unless uniform. Computed in
    float64 as DINOv2 does: in float32 the last block of a linear 0.1 schedule would get
    0.10000000149, crossing the block's 0.1 threshold into the other drop scheme, and a
    rate off by a float32 rounding can change how many samples the batch subset keeps."""
    if uniform:
        return [rate] * depth
    return np.linspace(0.0, rate, depth, dtype=np.float64).tolist()


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        specialize: SpecializeConfig | dict | None = None,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        if block_chunks:
            raise ValueError(
                f"block_chunks={block_chunks}: chunked blocks (FSDP1 wrap groups) are not "
                "supported; dinospec shards every block with FSDP2. Checkpoints saved with "
                "chunks load into an unchunked model (see load_backbone)."
            )
        if isinstance(specialize, dict):
            specialize = SpecializeConfig(**specialize)
        self.config = ModelConfig(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            ffn_bias=ffn_bias,
            ffn_layer=ffn_layer,
            drop_path_rate=drop_path_rate,
            drop_path_uniform=drop_path_uniform,
            init_values=init_values,
            num_register_tokens=num_register_tokens,
            interpolate_antialias=interpolate_antialias,
            interpolate_offset=interpolate_offset,
            attn_backend=attn_backend,
            specialize=specialize or SpecializeConfig(),
        )
        problems = model_problems(self.config)
        if problems:
            raise ValueError("; ".join(f"{k}={v!r}: {p}" for k, v, p in problems))
        self.plan = SpecializationPlan.build(self.config.specialize, depth)

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.chunked_blocks = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        rates = drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                proj_bias,
                ffn_bias,
                rates[i],
                init_values,
                ffn_layer,
                attn_backend,
                self.plan.per_block[i],
                self.plan.num_prefix_path_tokens(num_register_tokens),
            )
            for i in range(depth)
        )
        self.norm = make_norm(embed_dim, self.plan.final_norm)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
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

    def split_streams(self, x: Tensor) -> tuple[list[Tensor], list[Route]]:
        """A prepared sequence as the streams the blocks run on: one shared stream for a
        vanilla model, prefix and patch streams for a specialized one."""
        if not self.is_specialized:
            return [x], [None]
        n = self.plan.num_prefix_path_tokens(self.num_register_tokens)
        return [x[:, :n].contiguous(), x[:, n:].contiguous()], [PREFIX, PATCH]

    def _normed(self, streams: list[Tensor], routes: list[Route]) -> Tensor:
        return join([apply_layer(self.norm, x, r) for x, r in zip(streams, routes, strict=True)])

    def _outputs(self, streams: list[Tensor], routes: list[Route], masks: Tensor | None) -> dict:
        x_norm = self._normed(streams, routes)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": join(streams),
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict]:
        """Multi-crop: each element is a batch of same-size crops, run at its own size (no
        padding); all sizes share each block call so a sharded block is gathered once per
        step, not once per crop size."""
        prepared = [
            self.split_streams(self.prepare_tokens_with_masks(x, m))
            for x, m in zip(x_list, masks_list, strict=True)
        ]
        groups = [s for s, _ in prepared]
        routes = [r for _, r in prepared]
        for blk in self.blocks:
            groups = blk(groups, routes)
        return [self._outputs(s, r, m) for s, r, m in zip(groups, routes, masks_list, strict=True)]

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict | list[dict]:
        if isinstance(x, (list, tuple)):
            masks_list = masks if masks is not None else [None] * len(x)
            return self.forward_features_list(x, masks_list)
        streams, routes = self.split_streams(self.prepare_tokens_with_masks(x, masks))
        for blk in self.blocks:
            streams = blk(streams, routes)
        return self._outputs(streams, routes, masks)

    def _intermediate(self, x: Tensor, n: int | Sequence[int], norm: bool) -> list[Tensor]:
        streams, routes = self.split_streams(self.prepare_tokens_with_masks(x))
        depth = len(self.blocks)
        take = set(range(depth - n, depth)) if isinstance(n, int) else set(n)
        if not take <= set(range(depth)):
            raise ValueError(f"requested blocks {sorted(take)} but the model has {depth}")
        outputs = []
        for i, blk in enumerate(self.blocks):
            streams = blk(streams, routes)
            if i in take:
                outputs.append(self._normed(streams, routes) if norm else join(streams))
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
    kwargs = asdict(config)
    kwargs["specialize"] = SpecializeConfig(**kwargs["specialize"])
    return DinoVisionTransformer(**kwargs)
