"""Token-type specialization: exact conversion, routing, independent training, and the
vanilla model's matrix products wherever a layer is shared."""

import pytest
import torch
from helpers import EVERYTHING, PAPER, randomize, tiny_vit
from torch.utils._python_dispatch import TorchDispatchMode

from dinospec.config import SpecializeConfig
from dinospec.models.convert import specialize_backbone
from dinospec.models.layers import drop_path
from dinospec.models.streams import Streams
from dinospec.models.sublayers import SpecializedLayerNorm, SpecializedLinear

OUTPUTS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _all_outputs(model, x, masks):
    with torch.no_grad():
        out = [model.forward_features(x)[k] for k in OUTPUTS]
        out += [model.forward_features(x, masks)[k] for k in OUTPUTS]
        out += [model.forward_features(x[:, :, :24, :40])[k] for k in OUTPUTS]
        for patch, cls in model.get_intermediate_layers(
            x, n=3, reshape=True, return_class_token=True
        ):
            out += [patch, cls]
    return out


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
@pytest.mark.parametrize("spec", [PAPER, EVERYTHING], ids=["paper", "everything"])
@pytest.mark.parametrize("registers", [0, 2])
def test_conversion_is_exact(ffn_layer, spec, registers):
    vanilla = randomize(tiny_vit(ffn_layer=ffn_layer, num_register_tokens=registers)).eval()
    converted = specialize_backbone(vanilla, spec)
    assert converted.is_specialized and not vanilla.is_specialized
    x = torch.randn(4, 3, 32, 32)
    masks = torch.rand(4, 16) < 0.4
    for ours, ref in zip(
        _all_outputs(converted, x, masks), _all_outputs(vanilla, x, masks), strict=True
    ):
        assert ours.shape == ref.shape and torch.equal(ours, ref)


def test_single_image_conversion_is_equal_up_to_rounding():
    """One image sends a single [CLS] row through each prefix linear. MKL multiplies
    fewer than four rows with another kernel than a large matrix, even in its strict
    reproducibility mode, so that row may round differently (by about 1e-6) from the
    same row inside the vanilla model's full matrix: equal up to float rounding only."""
    vanilla = randomize(tiny_vit()).eval()
    converted = specialize_backbone(vanilla, EVERYTHING)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), vanilla(x), rtol=1e-5, atol=1e-6)


def test_state_dict_conversion_matches_model_conversion():
    vanilla = randomize(tiny_vit())
    from_model = specialize_backbone(vanilla, PAPER).state_dict()
    from_dict = specialize_backbone(vanilla.state_dict(), PAPER)
    assert from_model.keys() == from_dict.keys()
    assert all(torch.equal(from_model[k], from_dict[k]) for k in from_model)
    added = sorted(set(from_dict) - set(vanilla.state_dict()))
    assert "blocks.0.attn.qkv.prefix_weight" in added and "blocks.2.norm2.prefix_bias" in added
    assert "blocks.1.attn.qkv.prefix_weight" not in added  # first third of 3 blocks = block 0
    assert all(k.startswith("blocks.") and "cls_token" not in k for k in added)
    assert all("norm" in k for k in added if "attn" not in k)


def test_prefix_path_trains_independently():
    vanilla = randomize(tiny_vit())
    model = specialize_backbone(vanilla, PAPER).train()
    qkv = model.blocks[0].attn.qkv
    assert qkv.prefix_weight.data_ptr() != qkv.weight.data_ptr()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = model(torch.randn(4, 3, 32, 32), is_training=True)
    (out["x_norm_clstoken"].square().sum() + out["x_norm_patchtokens"].mean()).backward()
    assert qkv.prefix_weight.grad.abs().sum() > 0 and qkv.weight.grad.abs().sum() > 0
    assert not torch.equal(qkv.prefix_weight.grad, qkv.weight.grad)
    opt.step()
    assert not torch.equal(qkv.prefix_weight, qkv.weight)
    assert torch.equal(
        vanilla.blocks[0].attn.qkv.weight, vanilla.state_dict()["blocks.0.attn.qkv.weight"]
    )


def _qkv_rows(model, x):
    """QKV output of block 1 for all tokens, in sequence order."""
    captured = []
    hook = model.blocks[1].attn.qkv.register_forward_hook(lambda m, a, o: captured.append(o))
    with torch.no_grad():
        model(x)
    hook.remove()
    (qkv,) = captured
    return qkv.joined()


@pytest.mark.parametrize("tokens, num_prefix", [("cls+registers", 3), ("cls", 1)])
@pytest.mark.parametrize(
    "param", ["norm1.prefix_weight", "attn.qkv.prefix_weight", "norm1.weight", "attn.qkv.weight"]
)
def test_routing_before_attention(tokens, num_prefix, param):
    spec = SpecializeConfig(tokens=tokens, norm1_blocks="all", qkv_blocks="all")
    model = randomize(tiny_vit(spec, num_register_tokens=2)).eval()
    x = torch.randn(2, 3, 32, 32)
    before = _qkv_rows(model, x)
    assert before.shape == (2, 3 + 16, 96)
    with torch.no_grad():
        model.blocks[1].get_parameter(param).add_(0.5)
    after = _qkv_rows(model, x)
    prefix_changed = not torch.equal(before[:, :num_prefix], after[:, :num_prefix])
    patch_changed = not torch.equal(before[:, num_prefix:], after[:, num_prefix:])
    if "prefix" in param:
        assert prefix_changed and not patch_changed
    else:
        assert patch_changed and not prefix_changed


def test_dropping_a_prefix_path_is_refused():
    model = tiny_vit(EVERYTHING)
    with pytest.raises(ValueError, match="drops prefix parameters"):
        specialize_backbone(model, PAPER)


@pytest.mark.parametrize(
    "depth, expected", [(12, [0, 1, 2, 3]), (24, list(range(8))), (40, list(range(13)))]
)
def test_paper_default_is_first_third(depth, expected):
    with torch.device("meta"):
        model = tiny_vit(PAPER, depth=depth)
    qkv = [i for i, b in enumerate(model.blocks) if isinstance(b.attn.qkv, SpecializedLinear)]
    norms = [i for i, b in enumerate(model.blocks) if isinstance(b.norm1, SpecializedLayerNorm)]
    assert qkv == expected and norms == list(range(depth))


def test_stochastic_depth_on_subset_is_unbiased_and_inactive_in_eval():
    model = randomize(tiny_vit(PAPER, drop_path_rate=0.5, drop_path_uniform=True))
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    model.train()
    with torch.no_grad():
        runs = [model(x, is_training=True)["x_norm_clstoken"] for _ in range(3)]
    assert not torch.equal(runs[0], runs[1]) and all(torch.isfinite(r).all() for r in runs)


def test_block_loop_on_specialized_model():
    """The loop DINOv2 code writes over `model.blocks`, with the tokens as the blocks
    carry them (a list of crop sizes, each a Streams)."""
    model = randomize(tiny_vit(PAPER)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        crops = [model.streams_of(model.prepare_tokens_with_masks(x))]
        for blk in model.blocks:
            crops = blk(crops)
        expected = model.forward_features(x)["x_prenorm"]
    assert torch.equal(crops[0].joined(), expected)


class MatmulShapes(TorchDispatchMode):
    """The operand shapes of every matrix product dispatched, forward and backward."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm")

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.PRODUCTS:
            self.shapes.append(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def _matmuls(model, images):
    with MatmulShapes() as spy:
        out = model(images, is_training=True)
        (out["x_norm_clstoken"].sum() + out["x_norm_patchtokens"].square().sum()).backward()
    return sorted(spy.shapes)


@pytest.mark.parametrize("ffn_layer", ["mlp", "swiglufused"])
def test_shared_layers_run_the_vanilla_model_matrix_products(ffn_layer):
    """With only the norms specialized every linear layer is shared, and a specialized model
    must then run exactly its vanilla twin's matrix products (same number, same shapes):
    the streams are joined before a shared layer, not sent through it one by one, which
    would add a small product per stream and layer in the forward and two in the backward."""
    norms_only = SpecializeConfig(norm1_blocks="all", norm2_blocks="all", final_norm=True)
    images = torch.randn(4, 3, 32, 32)
    vanilla = randomize(tiny_vit(ffn_layer=ffn_layer))
    specialized = randomize(tiny_vit(norms_only, ffn_layer=ffn_layer))
    expected = _matmuls(vanilla, images)
    assert len(expected) == 3 * 4 * 3  # per block: qkv, proj, fc1, fc2; x (forward, 2 grads)
    assert _matmuls(specialized, images) == expected


def test_drop_path_rounds_as_dinov2():
    """DINOv2 scales the Bernoulli mask by 1/keep and then multiplies; dividing the product
    instead rounds differently in the last bit."""
    x = torch.randn(16, 5, 32)
    torch.manual_seed(0)
    (ours,) = drop_path(Streams.of_sequence(x, 0), 0.3, training=True).parts
    torch.manual_seed(0)
    mask = x.new_empty(16, 1, 1).bernoulli_(0.7)
    assert torch.equal(ours, x * mask.div_(0.7))
