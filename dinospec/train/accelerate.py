"""Faster or leaner training steps: torch.compile and activation checkpointing of the blocks.

Both change a block in place by replacing bound methods on the instance, never by wrapping
the block in another module: a wrapper module (torch.compile's OptimizedModule, the
checkpoint wrapper) puts a prefix (`_orig_mod.`, `_checkpoint_wrapped_module.`) into every
parameter name, which would break checkpoints, the DINOv2-keyed teacher export and the
name-matched EMA update. They must run before FSDP2 shards the blocks, as in torchtitan, so
that FSDP's hooks around each block call gather the parameters outside the checkpointed and
the compiled code.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch.utils.checkpoint import checkpoint

from dinospec.config import TrainConfig, compile_mode

# Dynamo keeps its compiled graphs per code object, and the residual branches of every block
# share one code object: a model needs one graph per (block structure, grad mode, crop size),
# e.g. 8 for the attention branch of a specialized ViT in training, more for unusual
# specializations. Torch's default limit (8) would silently leave later blocks uncompiled.
RECOMPILE_LIMIT = 64


def compile_enabled(mode: str, device: torch.device) -> bool:
    """`train.compile` for this device: auto compiles on CUDA only, because on a CPU the
    compilation (minutes) costs more than the fused kernels save."""
    resolved = compile_mode(mode)
    if resolved is None:
        raise ValueError(f"train.compile={mode!r}: must be one of auto, on, off")
    return resolved == "on" or (resolved == "auto" and device.type == "cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The forward passes' autocast dtype, None for plain fp32: auto is bf16 on CUDA, where
    tensor cores make it several times faster, and fp32 on a CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    if precision in ("fp32", "auto"):
        return None
    raise ValueError(f"train.precision={precision!r}: must be one of auto, bf16, fp32")


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Non-reentrant checkpointing works with FSDP2 and with inputs that are lists of
    tensors; it restores the RNG state for the recomputation, so stochastic depth draws the
    same samples twice and the gradients equal those of the plain forward."""
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> None:
    """Keep only each block's inputs in the forward pass and recompute the rest when its
    gradients are needed."""
    for block in blocks:
        block.forward = functools.partial(_checkpointed, block.forward)


def _raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep `limit` graphs per function; torch 2.6 names the setting
    `cache_size_limit`, later versions keep that name only as an alias."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(blocks: Iterable[nn.Module], backend: str = "inductor") -> None:
    """Compile the two residual branches (norm, attention or FFN, LayerScale) of each block.

    The block's own forward, which chooses between DINOv2's two stochastic-depth schemes
    from a per-block drop rate, stays eager: compiled, it would guard on that rate and make
    one graph per block (ViT-S/B have twelve different rates) instead of one per block
    structure. Shapes are static: each crop size gets its own graph, tuned for it.
    """
    _raise_recompile_limit(RECOMPILE_LIMIT)
    for block in blocks:
        for name in ("attn_residual", "ffn_residual"):
            setattr(
                block, name, torch.compile(getattr(block, name), backend=backend, dynamic=False)
            )


def accelerate(model: nn.Module, config: TrainConfig, device: torch.device) -> None:
    """Apply `train.activation_checkpointing` (student only: the teacher runs without
    gradients, so it keeps no activations) and `train.compile` (student and teacher) to the
    backbones' blocks of an SSLModel, before any FSDP sharding."""
    if config.activation_checkpointing:
        checkpoint_blocks(model.student.backbone.blocks)
    if compile_enabled(config.compile, device):
        for part in (model.student, model.teacher):
            compile_blocks(part.backbone.blocks)
