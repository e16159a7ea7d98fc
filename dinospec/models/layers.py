"""Building blocks of the DINOv2 ViT, with optional token-type specialization.

Module and parameter names match DINOv2 (`attn.qkv`, `mlp.fc1`, `mlp.w12`, `ls1.gamma`, ...)
so that official checkpoints load without renaming. A block carries its tokens as
`Streams` (dinospec.models.streams); its sublayers (dinospec.models.sublayers) are each
shared or specialized, as the model's `SpecializationPlan` declares.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec.models.one_pass import (
    OnePass,
    add_rows,
    block_diagonal_attention,
    one_pass_block,
    require_cuda,
    subset_of,
)
from dinospec.models.streams import Streams
from dinospec.models.sublayers import make_linear, make_norm


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

    def forward(self, x: Streams, layout: OnePass | None = None) -> Streams:
        """Attention over the joined streams; the output is joint after a shared `proj`,
        one tensor per stream after a specialized one. With a `layout`, `x` is a multi-crop
        call packed into one sequence and attention is block-diagonal over its images."""
        qkv = self.qkv(x).joined()
        b, n, c3 = qkv.shape
        c = c3 // 3
        if layout is not None:
            qkv = layout.to_images(qkv).reshape(b, n, 3, self.num_heads, c // self.num_heads)
            out = block_diagonal_attention(qkv, layout, self.backend)
            return self.proj(x.with_whole(layout.to_streams(out)))
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if self.backend == "xformers":
            out = _xformers_attention(qkv)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(x.with_whole(out.reshape(b, n, c)))


def _xformers_attention(qkv: Tensor) -> Tensor:
    """xformers' memory-efficient kernel."""
    require_cuda(qkv.device)
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

    def forward(self, x: Streams) -> Streams:
        """Joint or per-stream output, as `Attention.forward`."""
        return self.fc2(self.fc1(x).map(self.act))


class SwiGLUFFN(nn.Module):
    """SwiGLU with both input projections packed in `w12`, hidden size rounded as DINOv2."""

    def __init__(self, dim: int, hidden: int, bias: bool, specialized: frozenset[str]) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = make_linear(dim, 2 * hidden, bias, "ffn_in" in specialized)
        self.w3 = make_linear(hidden, dim, bias, "ffn_out" in specialized)

    def forward(self, x: Streams) -> Streams:
        """Joint or per-stream output, as `Attention.forward`."""
        return self.w3(self.w12(x).map(_swiglu))


def _swiglu(x: Tensor) -> Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(branch: Streams, drop_prob: float, training: bool) -> Streams:
    """Per-sample stochastic depth, one draw per image shared by all of its streams,
    rescaled so the expectation is unchanged. The mask is scaled before it multiplies, as
    in DINOv2: the same rounding, and one pass over each branch instead of two."""
    if not training or drop_prob == 0.0:
        return branch
    keep = 1.0 - drop_prob
    first = branch.parts[0]
    mask = first.new_empty((first.shape[0],) + (1,) * (first.dim() - 1)).bernoulli_(keep)
    mask.div_(keep)
    return branch.map(lambda part: part * mask)


Residual = Callable[[Streams], Streams]

# DINOv2's Block.forward (one sequence) takes the batch subset above this drop rate
SUBSET_ABOVE = 0.1


def add_residual_on_subset(x: Streams, residual: Residual, drop_ratio: float) -> Streams:
    """DINOv2's stochastic depth for high drop rates: compute the branch only on the kept
    samples (saving their compute) and scale it by batch / kept."""
    index, scale = subset_of(x.parts[0].shape[0], drop_ratio, x.parts[0].device)
    branch = residual(x.map(lambda part: part[index])).split()
    added = (add_rows(part, index, rows, scale) for part, rows in zip(x.parts, branch, strict=True))
    return Streams(tuple(added), x.sizes)


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
        multi_crop_attention: str = "per_crop",
    ) -> None:
        """`multi_crop_attention`: how a multi-crop call runs its crop sizes, `per_crop`
        (one after the other) or `one_pass` (packed into one sequence, see
        dinospec.models.one_pass)."""
        super().__init__()
        self.norm1 = make_norm(dim, "norm1" in specialized)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_backend, specialized)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(dim, "norm2" in specialized)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, int(dim * mlp_ratio), ffn_bias, specialized)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path
        self.one_pass = multi_crop_attention == "one_pass"

    def attn_residual(self, x: Streams, layout: OnePass | None = None) -> Streams:
        return self.attn(self.norm1(x), layout).map(self.ls1).as_split()

    def ffn_residual(self, x: Streams) -> Streams:
        return self.mlp(self.norm2(x)).map(self.ls2).as_split()

    def _forward_one(self, x: Streams) -> Streams:
        """DINOv2's `Block.forward` (one sequence): the batch subset only above a drop rate
        of 0.1 (below it the saved compute does not pay for the indexing), a per-sample
        mask otherwise."""
        ratio = self.sample_drop_ratio
        if self.training and ratio > SUBSET_ABOVE:
            x = add_residual_on_subset(x, self.attn_residual, ratio)
            return add_residual_on_subset(x, self.ffn_residual, ratio)
        for residual in (self.attn_residual, self.ffn_residual):
            x = x.add(drop_path(residual(x), ratio, self.training))
        return x

    def forward(self, crops: list[Streams], multi_crop: bool = False) -> list[Streams]:
        """The block on the tokens of every crop size in one call (through `__call__`, so
        FSDP's hooks gather a sharded block's parameters once for all of them).
        `multi_crop` is DINOv2's nested call (`forward_nested`), the student's path in
        training: there any positive drop rate takes the batch subset, drawn per crop
        size, for attention on every size before the FFN; otherwise each crop size runs as
        DINOv2's `Block.forward` runs one sequence. A one-pass block runs a multi-crop call
        of several sizes as one sequence, with the same stochastic depth."""
        ratio = self.sample_drop_ratio
        if multi_crop and self.one_pass and len(crops) > 1:
            residuals = (self.attn_residual, self._packed_ffn)
            drop = ratio if self.training else 0.0
            return one_pass_block(crops, residuals, drop, self.attn.backend)
        if not (multi_crop and self.training and ratio > 0.0):
            return [self._forward_one(x) for x in crops]
        for residual in (self.attn_residual, self.ffn_residual):
            crops = [add_residual_on_subset(x, residual, ratio) for x in crops]
        return crops

    def _packed_ffn(self, x: Streams, _: OnePass) -> Streams:
        """The FFN branch, per token: the packing changes nothing for it."""
        return self.ffn_residual(x)
