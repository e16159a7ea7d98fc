"""Building blocks of the DINOv2 ViT, with optional token-type specialization.

Module and parameter names match DINOv2 (`attn.qkv`, `mlp.fc1`, `mlp.w12`, `ls1.gamma`, ...)
so that official checkpoints load without renaming.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.models.specialize import apply_layer, make_linear, make_norm
from dinospec.models.tokens import TokenTypes


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens, by a conv whose kernel equals its stride."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Joint multi-head self-attention over all tokens; QKV/proj may be specialized."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        proj_bias: bool,
        backend: str,
        specialized: frozenset[str],
    ) -> None:
        super().__init__()
        if backend == "xformers" and importlib.util.find_spec("xformers") is None:
            raise RuntimeError(
                "attn_backend='xformers' needs the xformers package, which is not installed; "
                "it is an optional CUDA backend (pip install 'dinospec[xformers]' on a CUDA "
                "machine), use attn_backend='sdpa' elsewhere"
            )
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = make_linear(dim, 3 * dim, qkv_bias, "qkv" in specialized)
        self.proj = make_linear(dim, dim, proj_bias, "proj" in specialized)

    def forward(self, x: Tensor, types: TokenTypes | None) -> Tensor:
        b, n, c = x.shape
        qkv = apply_layer(self.qkv, x, types).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if self.backend == "xformers":
            out = _xformers_attention(qkv)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return apply_layer(self.proj, out.reshape(b, n, c), types)


def _xformers_attention(qkv: Tensor) -> Tensor:
    """xformers' memory-efficient kernel; it has CUDA kernels only, hence the device check."""
    if qkv.device.type != "cuda":
        raise RuntimeError(
            f"attn_backend='xformers' runs only on CUDA tensors (xformers has no kernels for "
            f"device '{qkv.device.type}'); use attn_backend='sdpa' there"
        )
    from xformers.ops import memory_efficient_attention

    q, k, v = qkv.unbind(2)
    return memory_efficient_attention(q, k, v)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, bias: bool, specialized: frozenset[str]) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden, bias, "ffn_in" in specialized)
        self.act = nn.GELU()
        self.fc2 = make_linear(hidden, dim, bias, "ffn_out" in specialized)

    def forward(self, x: Tensor, types: TokenTypes | None) -> Tensor:
        return apply_layer(self.fc2, self.act(apply_layer(self.fc1, x, types)), types)


class SwiGLUFFN(nn.Module):
    """SwiGLU with both input projections packed in `w12`, hidden size rounded as DINOv2."""

    def __init__(self, dim: int, hidden: int, bias: bool, specialized: frozenset[str]) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = make_linear(dim, 2 * hidden, bias, "ffn_in" in specialized)
        self.w3 = make_linear(hidden, dim, bias, "ffn_out" in specialized)

    def forward(self, x: Tensor, types: TokenTypes | None) -> Tensor:
        gate, value = apply_layer(self.w12, x, types).chunk(2, dim=-1)
        return apply_layer(self.w3, F.silu(gate) * value, types)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Per-sample stochastic depth, rescaled so the expectation is unchanged."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.drop_prob == 0.0:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


Residual = Callable[[Tensor, "TokenTypes | None"], Tensor]


def add_residual_on_subset(
    x: Tensor, types: TokenTypes | None, residual: Residual, drop_ratio: float
) -> Tensor:
    """DINOv2's stochastic depth for high drop rates: compute the branch only on the kept
    samples (saving their compute) and scale it by batch / kept."""
    b = x.shape[0]
    keep = max(int(b * (1 - drop_ratio)), 1)
    index = torch.randperm(b, device=x.device)[:keep]
    sub_types = types.select_rows(index) if types is not None else None
    branch = residual(x[index], sub_types)
    out = torch.index_add(x.flatten(1), 0, index, branch.to(x.dtype).flatten(1), alpha=b / keep)
    return out.view_as(x)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        proj_bias: bool,
        ffn_bias: bool,
        drop_path: float,
        init_values: float | None,
        ffn_layer: str,
        attn_backend: str,
        specialized: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__()
        self.specialized = specialized
        self.norm1 = make_norm(dim, "norm1" in specialized)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_backend, specialized)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(dim, "norm2" in specialized)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, int(dim * mlp_ratio), ffn_bias, specialized)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.drop_path1 = DropPath(drop_path)
        self.drop_path2 = DropPath(drop_path)

    def attn_residual(self, x: Tensor, types: TokenTypes | None) -> Tensor:
        return self.ls1(self.attn(apply_layer(self.norm1, x, types), types))

    def ffn_residual(self, x: Tensor, types: TokenTypes | None) -> Tensor:
        return self.ls2(self.mlp(apply_layer(self.norm2, x, types), types))

    def forward(self, x: Tensor, types: TokenTypes | None = None) -> Tensor:
        if self.training and self.sample_drop_ratio > 0.1:
            x = add_residual_on_subset(x, types, self.attn_residual, self.sample_drop_ratio)
            return add_residual_on_subset(x, types, self.ffn_residual, self.sample_drop_ratio)
        x = x + self.drop_path1(self.attn_residual(x, types))
        return x + self.drop_path2(self.ffn_residual(x, types))
