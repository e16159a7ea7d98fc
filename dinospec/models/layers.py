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

from dinospec.models.specialize import apply_layer, apply_sublayer, make_linear, make_norm
from dinospec.models.tokens import PATCH, PREFIX, Route, join, select_rows, split


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


def _sizes(streams: list[Tensor]) -> list[int]:
    return [x.shape[1] for x in streams]


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

    def forward(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        """Attention over the joined streams; the output is joint after a shared `proj`,
        one tensor per stream after a specialized one (see `apply_sublayer`)."""
        sizes = _sizes(streams)
        qkv = join(apply_sublayer(self.qkv, streams, routes, sizes))
        b, n, c3 = qkv.shape
        c = c3 // 3
        qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
        if self.backend == "xformers":
            out = _xformers_attention(qkv)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return apply_sublayer(self.proj, [out.reshape(b, n, c)], routes, sizes)


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

    def forward(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        """Joint or per-stream output, as `Attention.forward`."""
        sizes = _sizes(streams)
        hidden = [self.act(h) for h in apply_sublayer(self.fc1, streams, routes, sizes)]
        return apply_sublayer(self.fc2, hidden, routes, sizes)


class SwiGLUFFN(nn.Module):
    """SwiGLU with both input projections packed in `w12`, hidden size rounded as DINOv2."""

    def __init__(self, dim: int, hidden: int, bias: bool, specialized: frozenset[str]) -> None:
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = make_linear(dim, 2 * hidden, bias, "ffn_in" in specialized)
        self.w3 = make_linear(hidden, dim, bias, "ffn_out" in specialized)

    def forward(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        """Joint or per-stream output, as `Attention.forward`."""
        sizes = _sizes(streams)
        hidden = [_swiglu(h) for h in apply_sublayer(self.w12, streams, routes, sizes)]
        return apply_sublayer(self.w3, hidden, routes, sizes)


def _swiglu(x: Tensor) -> Tensor:
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


def drop_path(branches: list[Tensor], drop_prob: float, training: bool) -> list[Tensor]:
    """Per-sample stochastic depth, one draw per image shared by all of its streams,
    rescaled so the expectation is unchanged. The mask is scaled before it multiplies, as
    in DINOv2: the same rounding, and one pass over each branch instead of two."""
    if not training or drop_prob == 0.0:
        return branches
    keep = 1.0 - drop_prob
    first = branches[0]
    mask = first.new_empty((first.shape[0],) + (1,) * (first.dim() - 1)).bernoulli_(keep)
    mask.div_(keep)
    return [branch * mask for branch in branches]


Residual = Callable[[list[Tensor], list[Route]], list[Tensor]]

# DINOv2's Block.forward (one sequence) takes the batch subset above this drop rate
SUBSET_ABOVE = 0.1


def add_residual_on_subset(
    streams: list[Tensor], routes: list[Route], residual: Residual, drop_ratio: float
) -> list[Tensor]:
    """DINOv2's stochastic depth for high drop rates: compute the branch only on the kept
    samples (saving their compute) and scale it by batch / kept."""
    b = streams[0].shape[0]
    keep = max(int(b * (1 - drop_ratio)), 1)
    index = torch.randperm(b, device=streams[0].device)[:keep]
    branches = residual([x[index] for x in streams], [select_rows(r, index) for r in routes])
    scale = b / keep
    return [_add_rows(x, index, branch, scale) for x, branch in zip(streams, branches, strict=True)]


def _add_rows(x: Tensor, index: Tensor, rows: Tensor, scale: float) -> Tensor:
    out = torch.index_add(x.flatten(1), 0, index, rows.to(x.dtype).flatten(1), alpha=scale)
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
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.specialized = specialized
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1 = make_norm(dim, "norm1" in specialized)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_backend, specialized)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = make_norm(dim, "norm2" in specialized)
        ffn = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp = ffn(dim, int(dim * mlp_ratio), ffn_bias, specialized)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        normed = [apply_layer(self.norm1, x, r) for x, r in zip(streams, routes, strict=True)]
        return split([self.ls1(out) for out in self.attn(normed, routes)], _sizes(streams))

    def ffn_residual(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        normed = [apply_layer(self.norm2, x, r) for x, r in zip(streams, routes, strict=True)]
        return split([self.ls2(out) for out in self.mlp(normed, routes)], _sizes(streams))

    def forward_streams(self, streams: list[Tensor], routes: list[Route]) -> list[Tensor]:
        """The block on a sequence held as streams (see dinospec.models.tokens). In training,
        DINOv2's `Block.forward` takes the batch subset only above a drop rate of 0.1 (below
        it the saved compute does not pay for the indexing) and masks samples otherwise."""
        ratio = self.sample_drop_ratio
        if self.training and ratio > SUBSET_ABOVE:
            streams = add_residual_on_subset(streams, routes, self.attn_residual, ratio)
            return add_residual_on_subset(streams, routes, self.ffn_residual, ratio)
        for residual in (self.attn_residual, self.ffn_residual):
            branches = drop_path(residual(streams, routes), ratio, self.training)
            streams = [x + br for x, br in zip(streams, branches, strict=True)]
        return streams

    def forward_crop_sizes(
        self, groups: list[list[Tensor]], routes: list[list[Route]]
    ) -> list[list[Tensor]]:
        """The block on every crop size at once, DINOv2's nested call (`forward_nested`),
        which is the path its student takes in training: there any positive drop rate takes
        the batch subset, drawn per crop size, for attention on every size before the FFN."""
        ratio = self.sample_drop_ratio
        if not (self.training and ratio > 0.0):
            return [self.forward_streams(s, r) for s, r in zip(groups, routes, strict=True)]
        for residual in (self.attn_residual, self.ffn_residual):
            groups = [
                add_residual_on_subset(s, r, residual, ratio)
                for s, r in zip(groups, routes, strict=True)
            ]
        return groups

    def forward(
        self,
        x: Tensor | list[Tensor] | list[list[Tensor]],
        route: Route | list[Route] | list[list[Route]] = None,
    ) -> Tensor | list[Tensor] | list[list[Tensor]]:
        """Streams in, streams out, as the backbone calls it (through `__call__`, so FSDP's
        hooks gather the block's parameters). A list of stream lists (one per crop size, with
        a list of routes each) runs every crop size in this one call, so a sharded block is
        gathered once for all of them. A plain tensor, as DINOv2 code passes it, is routed by
        `route`; a specialized block given no route treats the first `num_prefix_tokens`
        tokens of every row as the prefix stream."""
        if isinstance(x, list) and x and isinstance(x[0], list):
            return self.forward_crop_sizes(x, route)
        if isinstance(x, list):
            return self.forward_streams(x, route)
        if route is None and self.specialized:
            n = self.num_prefix_tokens
            streams = [x[:, :n].contiguous(), x[:, n:].contiguous()]
            return torch.cat(self.forward_streams(streams, [PREFIX, PATCH]), dim=1)
        return self.forward_streams([x], [route])[0]
