"""`model.multi_crop_attention=one_pass` computes the per-crop path's function.

The one-pass path packs every crop of a multi-crop call into one sequence (shared GEMMs
once over all tokens, specialized sublayers once per stream) with block-diagonal attention;
the per-crop path, the default, runs each crop size as its own batch. Same weights, same
crops (three sizes: the two global crops with iBOT masks, local crops, and a third size),
registers, vanilla and specialized models: outputs and gradients must agree.

Tolerances, relative to each output's (each parameter gradient's) largest magnitude:
outputs 1e-6 (the SDPA path runs the same kernels on the same rows; with MKL's strict mode,
conftest, they have come out bit-identical), gradients 1e-5 (a shared weight's gradient
sums the same products in another grouping: one GEMM over all crops instead of one per crop
size). The xformers path's stand-in kernel is dense attention under the mask, another
kernel than the per-crop path's: 1e-5 for its outputs.
"""

from __future__ import annotations

import types
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import EVERYTHING, PAPER, randomize, tiny_vit

from dinospec.config import ConfigError, SpecializeConfig, load_config
from dinospec.models import DinoVisionTransformer, one_pass
from dinospec.models import layers as layers_module

OUTPUT_RTOL = 1e-6
GRAD_RTOL = 1e-5
DENSE_KERNEL_RTOL = 1e-5
VARIANTS = {
    "vanilla": SpecializeConfig(),
    "paper": PAPER,
    "everything_cls_only": replace(EVERYTHING, tokens="cls"),
}


def twins(spec: SpecializeConfig, **overrides: object) -> dict[str, DinoVisionTransformer]:
    """A per-crop and a one-pass model with the same random weights."""
    models = {
        mode: tiny_vit(spec, multi_crop_attention=mode, **overrides)
        for mode in ("per_crop", "one_pass")
    }
    randomize(models["per_crop"])
    models["one_pass"].load_state_dict(models["per_crop"].state_dict())
    return models


def crops() -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """2 global crops of 3 images (32 px, iBOT-masked), 4 local crops of 3 images (16 px)
    and a third size (24 px, 5 crops): three sequence lengths in one call."""
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(b, 3, s, s, generator=gen) for b, s in ((6, 32), (12, 16), (5, 24))]
    masks = torch.rand(6, 16, generator=gen) < 0.4
    return images, [masks, None, None]


def run(model: DinoVisionTransformer, seed: int = 0) -> tuple[list[dict], dict]:
    """Outputs of a multi-crop call and the gradients of a loss that weighs every output
    token differently (so no permutation of tokens could pass unnoticed)."""
    model.zero_grad(set_to_none=True)
    images, masks = crops()
    torch.manual_seed(seed)
    outs = model.forward_features(images, masks)
    gen = torch.Generator().manual_seed(2)
    loss = sum(
        (out[key] * torch.randn(out[key].shape, generator=gen)).sum()
        for out in outs
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
    )
    loss.backward()
    outs = [{k: v.detach() for k, v in out.items() if v is not None} for out in outs]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outs, grads


def max_output_difference(a: list[dict], b: list[dict]) -> float:
    """The largest difference of an output relative to that output's largest magnitude."""
    keys = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")
    return max(
        float((x[k] - y[k]).abs().max() / y[k].abs().max())
        for x, y in zip(a, b, strict=True)
        for k in keys
    )


def max_grad_difference(a: dict, b: dict) -> float:
    """The largest gradient difference relative to that parameter's largest gradient."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max()) for n in a)


@pytest.fixture
def spied(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """The layouts the block-diagonal kernel was called with: proof the one-pass path ran."""
    calls: list[tuple] = []
    real = one_pass.block_diagonal_attention

    def spy(qkv: torch.Tensor, layout: one_pass.OnePass, backend: str) -> torch.Tensor:
        calls.append(layout.shapes)
        return real(qkv, layout, backend)

    monkeypatch.setattr(layers_module, "block_diagonal_attention", spy)
    return calls


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_pass_equals_per_crop_in_outputs_and_gradients(variant: str, spied: list) -> None:
    models = twins(VARIANTS[variant])
    (per_crop, g_per_crop), (packed, g_packed) = (run(models[m].train()) for m in models)
    assert len(spied) == 3, "the one-pass model did not pack its crops"
    assert [b for b, _ in spied[0]] == [6, 12, 5]
    assert max_output_difference(packed, per_crop) <= OUTPUT_RTOL
    assert max_grad_difference(g_packed, g_per_crop) <= GRAD_RTOL
    assert g_per_crop.keys() == {n for n, _ in models["per_crop"].named_parameters()}


@pytest.mark.parametrize("variant", ["vanilla", "paper"])
def test_stochastic_depth_draws_the_same_subsets_as_the_per_crop_path(variant: str) -> None:
    """forward_nested's scheme in both paths (a batch subset per crop size and branch, in
    the same order), so the same seed gives the same function and gradients."""
    models = twins(VARIANTS[variant], drop_path_rate=0.4, drop_path_uniform=True)
    (per_crop, g_per_crop), (packed, g_packed) = (run(models[m].train(), 7) for m in models)
    assert max_output_difference(packed, per_crop) <= OUTPUT_RTOL
    assert max_grad_difference(g_packed, g_per_crop) <= GRAD_RTOL
    other_seed, _ = run(models["one_pass"], 8)
    assert max_output_difference(other_seed, packed) > 1e-3, "no sample was dropped"


def test_eval_mode_drops_nothing_and_is_deterministic() -> None:
    models = twins(PAPER, drop_path_rate=0.4, drop_path_uniform=True)
    with torch.no_grad():
        per_crop = models["per_crop"].eval().forward_features(*crops())
        first = models["one_pass"].eval().forward_features(*crops())
        torch.manual_seed(123)
        second = models["one_pass"].forward_features(*crops())
    assert max_output_difference(first, per_crop) <= OUTPUT_RTOL
    assert max_output_difference(second, first) == 0.0


def test_image_order_gathers_each_images_tokens_together() -> None:
    """The packed sequence holds the prefix stream then the patch stream; `to_images`
    must give every image's own sequence, [CLS] + registers + patches, image after image."""
    model = tiny_vit(PAPER)
    images, _ = crops()
    sequences = [model.prepare_tokens_with_masks(x) for x in images]
    streams = [model.streams_of(x) for x in sequences]
    layout = one_pass.OnePass(streams)
    packed = layout.pack(streams)
    assert packed.sizes == (3 * 23, sum(b * (n - 3) for b, n in ((6, 19), (12, 7), (5, 12))))
    expected = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in sequences], dim=1)
    assert torch.equal(layout.to_images(packed.joined()), expected)
    assert torch.equal(layout.to_streams(expected), packed.joined())
    assert layout.seqlens == [19] * 6 + [7] * 12 + [12] * 5
    unpacked = layout.unpack(packed)
    assert all(torch.equal(u.joined(), s.joined()) for u, s in zip(unpacked, streams, strict=True))


def test_one_crop_size_runs_the_per_crop_path(spied: list) -> None:
    """Nothing to join: a call with one crop size (the teacher's) is not packed."""
    models = twins(PAPER)
    images, masks = crops()
    with torch.no_grad():
        outs = {m: models[m].forward_features(images[:1], masks[:1]) for m in models}
    assert spied == []
    assert max_output_difference(outs["one_pass"], outs["per_crop"]) == 0.0


class StandInMask:
    """xformers' BlockDiagonalMask where xformers is not installed: from_seqlens and the
    dense form, as the real class documents them."""

    def __init__(self, seqlens: list[int]) -> None:
        self.seqlens = seqlens

    @classmethod
    def from_seqlens(cls, seqlens: list[int], device: torch.device | None = None) -> StandInMask:
        return cls(list(seqlens))

    def materialize(self, shape: tuple[int, int]) -> torch.Tensor:
        mask = torch.full(shape, float("-inf"))
        start = 0
        for n in self.seqlens:
            mask[start : start + n, start : start + n] = 0.0
            start += n
        return mask


def xformers_on_cpu(masks: list) -> types.SimpleNamespace:
    """xformers' fmha with its CUDA kernel replaced by dense attention under the mask's
    dense form: the real BlockDiagonalMask where xformers imports, the stand-in elsewhere."""
    try:
        from xformers.ops import fmha

        mask_class = fmha.BlockDiagonalMask
    except ImportError:
        mask_class = StandInMask

    def memory_efficient_attention(q, k, v, attn_bias):  # (1, T, heads, head_dim)
        masks.append(attn_bias)
        n = q.shape[1]
        bias = attn_bias.materialize((n, n)).to(q.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2)

    return types.SimpleNamespace(
        BlockDiagonalMask=mask_class, memory_efficient_attention=memory_efficient_attention
    )


@pytest.mark.parametrize("variant", ["vanilla", "paper"])
def test_xformers_block_diagonal_path_with_a_dense_stand_in_kernel(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The xformers path (mask from the images' lengths, (1, T, heads, head_dim) layout,
    output back in stream order) on a CPU: only the CUDA kernel is replaced."""
    masks: list = []
    monkeypatch.setattr(one_pass, "xformers_fmha", lambda: xformers_on_cpu(masks))
    monkeypatch.setattr(one_pass, "require_cuda", lambda device: None)
    one_pass._block_diagonal_mask.cache_clear()
    models = twins(VARIANTS[variant])
    for block in models["one_pass"].blocks:
        block.attn.backend = "xformers"
    (per_crop, g_per_crop), (packed, g_packed) = (run(models[m].train()) for m in models)
    one_pass._block_diagonal_mask.cache_clear()
    assert len(masks) == 3 and all(m is masks[0] for m in masks), "one mask per layout"
    seqlens = [19] * 6 + [7] * 12 + [12] * 5  # [CLS] + 2 registers + patches, per image
    dense = StandInMask(seqlens).materialize((258, 258))
    assert torch.equal(masks[0].materialize((258, 258)), dense)
    assert max_output_difference(packed, per_crop) <= DENSE_KERNEL_RTOL
    assert max_grad_difference(g_packed, g_per_crop) <= GRAD_RTOL


def test_xformers_one_pass_refuses_cpu_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = twins(PAPER)["one_pass"]
    for block in model.blocks:
        block.attn.backend = "xformers"
    with pytest.raises(RuntimeError, match=r"only on CUDA tensors .* device 'cpu'"):
        model.forward_features(*crops())


def test_an_unknown_mode_is_refused_with_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"multi_crop_attention.*'nested'.*per_crop.*one_pass"):
        load_config(None, ["model.multi_crop_attention=nested"])
    with pytest.raises(ValueError, match=r"multi_crop_attention='packed': must be one of"):
        tiny_vit(multi_crop_attention="packed")


def test_the_default_is_per_crop() -> None:
    assert load_config(None, []).model.multi_crop_attention == "per_crop"
    assert not any(block.one_pass for block in tiny_vit().blocks)
