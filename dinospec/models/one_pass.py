"""One pass for all crop sizes: the multi-crop call as one sequence (`model.multi_crop_attention
= one_pass`), DINOv2's nested call (`NestedTensorBlock.forward_nested`).

The per-crop path (the default) runs each block once per crop size, so a step of DINOv2's
recipe launches every norm, GEMM and activation kernel twice per block (global and local
crops), the local crops' small GEMMs leaving much of a GPU idle. Here the tokens of every
crop of every size are packed into one sequence of batch 1 (`OnePass.pack`): each shared
linear then runs one GEMM over all tokens, each specialized sublayer one per stream (prefix
and patch streams stay apart, every stream packed over all crops), and attention is
block-diagonal: each image attends to its own tokens only.

Attention kernels, chosen by `model.attn_backend`:
- `xformers` (CUDA only): DINOv2's kernel, `memory_efficient_attention` with a
  `BlockDiagonalMask` over every image's tokens: one launch for all crops and sizes.
- `sdpa` (any device): PyTorch's `scaled_dot_product_attention` once per crop size, on that
  size's images as a batch of equal-length sequences. All images of a size have the same
  length, so this is exactly block-diagonal attention at linear cost in the total length,
  with the flash kernel on GPUs; it costs one attention launch per crop size (two in
  DINOv2's recipe) instead of one. Chosen over the alternatives for these reasons: a dense
  block-diagonal boolean mask is quadratic in the total length (ViT-L's 32 images x (2 x
  257 + 8 x 50) tokens would need a 0.8 GB mask and rule out the flash kernel); flex
  attention is fast only compiled (eager it runs a dense reference), and compiled on a CPU
  it needs a C++ toolchain and, for gradients, a recent torch; nested (jagged) tensors
  reach a fused kernel on CUDA only and complicate the streams' joins and splits, for
  nothing the per-size call does not already give.

Specialized models: attention needs each image's tokens together, the streams keep prefix
and patch tokens apart. The packed sequence holds the prefix stream then the patch stream;
QKV is gathered into image order (`to_images`) before the kernel and its output back into
stream order (`to_streams`), one index copy each way. A vanilla model has one stream, whose
packed order is already the image order, and copies nothing.

Stochastic depth follows `forward_nested`: in training with a positive drop rate each crop
size keeps a random batch subset per residual branch (attention on every size, then the
FFN), drawn in the per-crop path's order, so the two paths draw the same subsets from the
same seed; otherwise every image runs both branches. The tokens are packed once per block,
as DINOv2 does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinospec.models.streams import Streams

Shape = tuple[int, tuple[int, ...]]
"""One crop size in the packed sequence: (images, tokens per stream)."""


class OnePass:
    """The layout of a multi-crop call packed into one sequence: every stream packed over
    all crops (crop sizes in call order, images in batch order), and the permutation that
    puts each image's tokens together for attention."""

    def __init__(self, crops: Sequence[Streams], backend: str = "sdpa") -> None:
        """The layout of `crops` for the attention `backend`. Everything attention needs
        (index tensors, xformers' mask) is made here, before any compiled branch runs, and
        cached per layout, as DINOv2 caches its masks: a run meets few distinct layouts."""
        self.shapes: tuple[Shape, ...] = tuple((c.parts[0].shape[0], c.sizes) for c in crops)
        if len({len(sizes) for _, sizes in self.shapes}) != 1:
            raise ValueError(f"crops with different stream counts: {self.shapes}")
        self.lengths = tuple(sum(sizes) for _, sizes in self.shapes)
        """Tokens per image of each crop size."""
        device = crops[0].parts[0].device
        if backend == "xformers":
            require_cuda(device)
        self.order = _image_order(self.shapes, device)
        self.xformers_mask = (
            _block_diagonal_mask(tuple(self.seqlens), device) if backend == "xformers" else None
        )

    @property
    def seqlens(self) -> list[int]:
        """Every image's token count, in the packed sequence's image order: the blocks of
        the block-diagonal attention."""
        return [n for (b, _), n in zip(self.shapes, self.lengths, strict=True) for _ in range(b)]

    def pack(self, crops: Sequence[Streams]) -> Streams:
        """The crops as one sequence of batch 1: stream s holds stream s of every image."""
        per_stream = zip(*(c.split() for c in crops), strict=True)
        parts = tuple(
            torch.cat([p.reshape(1, -1, p.shape[-1]) for p in ps], dim=1) for ps in per_stream
        )
        return Streams(parts, tuple(p.shape[1] for p in parts))

    def unpack(self, x: Streams) -> list[Streams]:
        """The packed sequence as per-crop streams again (views, no copy)."""
        chunks = [
            part.split([b * sizes[s] for b, sizes in self.shapes], dim=1)
            for s, part in enumerate(x.split())
        ]
        return [
            Streams(
                tuple(ch[i].reshape(b, sizes[s], ch[i].shape[-1]) for s, ch in enumerate(chunks)),
                sizes,
            )
            for i, (b, sizes) in enumerate(self.shapes)
        ]

    def to_images(self, x: Tensor) -> Tensor:
        """A joined (1, T, C) sequence in stream order -> image order."""
        return x if self.order is None else x.index_select(1, self.order[0])

    def to_streams(self, x: Tensor) -> Tensor:
        """The inverse of `to_images`."""
        return x if self.order is None else x.index_select(1, self.order[1])


@functools.lru_cache(maxsize=64)
def _image_order(shapes: tuple[Shape, ...], device: torch.device) -> tuple[Tensor, Tensor] | None:
    """(image-order -> stream-order positions, and its inverse), None for one stream."""
    if len(shapes[0][1]) == 1:
        return None
    totals = [sum(b * sizes[s] for b, sizes in shapes) for s in range(len(shapes[0][1]))]
    stream_starts = [sum(totals[:s]) for s in range(len(totals))]
    offsets = list(stream_starts)
    pieces = []
    for b, sizes in shapes:
        # positions[j, s-range]: stream s of image j, in stream order
        per_stream = [offsets[s] + torch.arange(b * n).reshape(b, n) for s, n in enumerate(sizes)]
        pieces.append(torch.cat(per_stream, dim=1).flatten())
        offsets = [o + b * n for o, n in zip(offsets, sizes, strict=True)]
    order = torch.cat(pieces)
    return order.to(device), torch.argsort(order).to(device)


def block_diagonal_attention(qkv: Tensor, layout: OnePass, backend: str) -> Tensor:
    """Attention of every image over its own tokens. `qkv` is (1, T, 3, heads, head_dim)
    in image order; returns (1, T, heads * head_dim)."""
    if backend == "xformers":
        return _xformers_block_diagonal(qkv, layout)
    return _sdpa_per_crop_size(qkv, layout)


def _sdpa_per_crop_size(qkv: Tensor, layout: OnePass) -> Tensor:
    """One SDPA call per crop size, its images as a batch (see the module docstring)."""
    groups = qkv.split([b * n for (b, _), n in zip(layout.shapes, layout.lengths, strict=True)], 1)
    outs = []
    for group, (b, _), n in zip(groups, layout.shapes, layout.lengths, strict=True):
        q, k, v = group.reshape(b, n, *qkv.shape[2:]).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        outs.append(out.reshape(1, b * n, -1))
    return torch.cat(outs, dim=1)


def _xformers_block_diagonal(qkv: Tensor, layout: OnePass) -> Tensor:
    """xformers' memory-efficient kernel with DINOv2's block-diagonal mask, all images in
    one launch."""
    q, k, v = qkv.unbind(2)
    out = xformers_fmha().memory_efficient_attention(q, k, v, attn_bias=layout.xformers_mask)
    return out.reshape(1, qkv.shape[1], -1)


def require_cuda(device: torch.device) -> None:
    """xformers has CUDA kernels only: name the backend rather than fail inside it."""
    if device.type != "cuda":
        raise RuntimeError(
            f"attn_backend='xformers' runs only on CUDA tensors (xformers has no kernels for "
            f"device '{device.type}'); use attn_backend='sdpa' there"
        )


def xformers_fmha() -> Any:
    """xformers.ops.fmha, imported on first use: an optional CUDA dependency."""
    from xformers.ops import fmha

    return fmha


@functools.lru_cache(maxsize=64)
def _block_diagonal_mask(seqlens: tuple[int, ...], device: torch.device) -> Any:
    """The mask for these image lengths (its construction copies the offsets to the
    device)."""
    mask_class = xformers_fmha().BlockDiagonalMask
    try:
        return mask_class.from_seqlens(list(seqlens), device=device)
    except TypeError:  # xformers before 0.0.27 takes no device
        return mask_class.from_seqlens(list(seqlens))


PackedResidual = Callable[[Streams, OnePass], Streams]


def one_pass_block(
    crops: list[Streams], residuals: Sequence[PackedResidual], drop_ratio: float, backend: str
) -> list[Streams]:
    """A block's residual branches (attention, then FFN) on all crops packed into one
    sequence, attention by `backend`; with a positive `drop_ratio` (in training) each
    branch runs on a batch subset per crop size, as `forward_nested`."""
    if drop_ratio > 0.0:
        for residual in residuals:
            crops = _on_subsets(crops, residual, drop_ratio, backend)
        return crops
    layout = OnePass(crops, backend)
    x = layout.pack(crops)
    for residual in residuals:
        x = x.add(residual(x, layout))
    return layout.unpack(x)


def subset_of(batch: int, drop_ratio: float, device: torch.device) -> tuple[Tensor, float]:
    """DINOv2's stochastic-depth subset: the kept samples (a random permutation's first
    max(int(batch * (1 - drop_ratio)), 1)) and the scale of their branch, batch / kept."""
    keep = max(int(batch * (1 - drop_ratio)), 1)
    return torch.randperm(batch, device=device)[:keep], batch / keep


def add_rows(x: Tensor, index: Tensor, rows: Tensor, scale: float) -> Tensor:
    """`x` with `scale * rows` added at the batch rows `index`."""
    out = torch.index_add(x.flatten(1), 0, index, rows.to(x.dtype).flatten(1), alpha=scale)
    return out.view_as(x)


def _on_subsets(
    crops: list[Streams], residual: PackedResidual, ratio: float, backend: str
) -> list[Streams]:
    """One branch on a subset of every crop size's batch, drawn size by size in call order,
    the subsets packed into one sequence."""
    subsets = [subset_of(x.parts[0].shape[0], ratio, x.parts[0].device) for x in crops]
    kept = [
        x.map(lambda part, index=index: part[index])
        for x, (index, _) in zip(crops, subsets, strict=True)
    ]
    layout = OnePass(kept, backend)
    branches = layout.unpack(residual(layout.pack(kept), layout))
    return [
        Streams(
            tuple(
                add_rows(part, index, rows, scale)
                for part, rows in zip(x.parts, branch.split(), strict=True)
            ),
            x.sizes,
        )
        for x, branch, (index, scale) in zip(crops, branches, subsets, strict=True)
    ]
