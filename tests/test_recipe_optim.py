"""Optimizer groups, prototype init, teacher temperature and drop path as DINOv2's code runs
them, checked against DINOv2's own functions (../shared/reference/dinov2, imported as is).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import EVERYTHING, tiny_vit
from helpers import dinov2 as reference
from train_helpers import read_metrics, tiny_config

from dinospec.models import layers
from dinospec.models.heads import DINOHead
from dinospec.models.streams import Streams
from dinospec.train.loop import schedules_for, train
from dinospec.train.optim import param_groups
from dinospec.train.schedules import CosineSchedule

LAYER_DECAY, PATCH_EMBED_LR_MULT = 0.9, 0.2


def _student(specialize=None) -> dict[str, torch.nn.Module]:
    backbone = tiny_vit(specialize, depth=4, num_register_tokens=2)
    return {
        "backbone": backbone,
        "dino_head": DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16),
        "ibot_head": DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16),
    }


def _table(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    return {
        name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        for g in groups
        for name in g["names"]
    }


def _dinov2_table(modules: dict[str, torch.nn.Module]) -> dict[str, tuple[float, float, bool]]:
    """What DINOv2's SSLMetaArch.get_params_groups gives, submodule by submodule."""
    groups = reference("dinov2.utils.param_groups")
    return {
        f"{prefix}.{d['name']}": (d["lr_multiplier"], d["wd_multiplier"], d["is_last_layer"])
        for prefix, module in modules.items()
        for d in groups.get_params_groups_with_decay(module, LAYER_DECAY, PATCH_EMBED_LR_MULT)
    }


def test_param_groups_of_a_vanilla_vit_are_dinov2s():
    modules = _student()
    vit = reference("dinov2.models.vision_transformer")
    theirs_vit = vit.DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, init_values=1e-5,
        num_register_tokens=2, block_chunks=0,
    )  # fmt: skip
    names = [n for n, _ in modules["backbone"].named_parameters()]
    assert names == [n for n, _ in theirs_vit.named_parameters()]  # DINOv2's rules go by name
    ours = param_groups(modules, LAYER_DECAY, PATCH_EMBED_LR_MULT)
    assert _table(ours) == _dinov2_table(modules)
    for token in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
        assert _table(ours)[f"backbone.{token}"][1] == 1.0, token

    # the same parameters share a group as in DINOv2's fuse_params_groups (per submodule)
    groups = reference("dinov2.utils.param_groups")
    for prefix, module in modules.items():
        theirs = groups.fuse_params_groups(
            groups.get_params_groups_with_decay(module, LAYER_DECAY, PATCH_EMBED_LR_MULT)
        )
        ids = {id(p) for p in module.parameters()}
        within = {frozenset(id(p) for p in g["params"]) & ids for g in ours}
        expected = {frozenset(id(p) for p in g["params"]) for g in theirs}
        assert within - {frozenset()} == expected, prefix


def test_param_groups_of_a_specialized_vit_follow_the_shared_twins():
    vanilla = _dinov2_table(_student())
    table = _table(param_groups(_student(EVERYTHING), LAYER_DECAY, PATCH_EMBED_LR_MULT))
    prefix = {name: row for name, row in table.items() if ".prefix_" in name}
    assert len(prefix) == 4 * 12 + 2  # 6 layers x (weight, bias) per block, final norm
    for name, row in prefix.items():
        assert row == vanilla[name.replace(".prefix_", ".")], name
    assert {name: row for name, row in table.items() if name not in prefix} == vanilla
    assert table["backbone.blocks.0.attn.qkv.prefix_bias"][1] == 0.0
    assert table["backbone.blocks.0.norm1.prefix_weight"][1] == 0.0
    assert table["backbone.norm.prefix_weight"][1] == 0.0
    assert table["backbone.blocks.0.mlp.fc2.prefix_weight"][1] == 1.0


def _row_norms(head: torch.nn.Module) -> torch.Tensor:
    return head.last_layer.weight_v.detach().norm(dim=1)


def test_prototypes_start_as_dinov2s_default_linear_init():
    """Seed-independent statistics: rows of U(-1/16, 1/16) at bottleneck 256 have norm
    about sqrt(1/3) = 0.577, with a spread of about 0.016 (trunc-normal 0.02 gives 0.32)."""
    theirs_cls = reference("dinov2.layers.dino_head").DINOHead
    torch.manual_seed(1)
    ours = DINOHead(32, 2048, hidden_dim=64, bottleneck_dim=256)
    torch.manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated
        theirs = theirs_cls(32, 2048, hidden_dim=64, bottleneck_dim=256)
    ours_norms, their_norms = _row_norms(ours), _row_norms(theirs)
    assert ours_norms.mean().item() == pytest.approx(math.sqrt(1 / 3), abs=0.005)
    assert ours_norms.mean().item() == pytest.approx(their_norms.mean().item(), abs=0.005)
    assert ours_norms.std().item() == pytest.approx(their_norms.std().item(), rel=0.2)
    assert torch.equal(ours.last_layer.weight_g, torch.ones(2048, 1))


def test_dino_head_draws_dinov2s_values_from_the_same_seed():
    """The MLP's trunc-normal draws come first, then the prototypes' default init, in
    DINOv2's order: the same seed gives the same head."""
    theirs_cls = reference("dinov2.layers.dino_head").DINOHead
    torch.manual_seed(3)
    ours = DINOHead(32, 128, hidden_dim=48, bottleneck_dim=24).state_dict()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = theirs_cls(32, 128, hidden_dim=48, bottleneck_dim=24).state_dict()
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert torch.equal(ours[name], value.view_as(ours[name])), name


SHORT_RUN = (
    "optim.epochs=2",
    "teacher.warmup_teacher_temp_epochs=5",
    "teacher.warmup_teacher_temp=0.04",
    "teacher.teacher_temp=0.07",
)  # 8 iterations (epoch_length 4) of a 20-iteration warm-up


def _dinov2_teacher_temp(epoch_length: int) -> object:
    """DINOv2's teacher temperature schedule as its build_schedulers makes it: the warm-up
    has its own length, whatever the run's."""
    cosine = reference("dinov2.utils.utils").CosineScheduler
    return cosine(
        base_value=0.07,
        final_value=0.07,
        total_iters=5 * epoch_length,
        warmup_iters=5 * epoch_length,
        start_warmup_value=0.04,
    )


@pytest.mark.parametrize(
    "args",
    [
        (0.07, 0.07, 1, 1, 0.04, 0),  # a one-iteration warm-up holds the start value
        (0.3, 0.1, 50, 7, 0.1, 0),  # the warm-up's last value is the base value itself
        (0.004, 1e-6, 100, 10, 0.0, 5),
    ],
)
def test_cosine_schedule_is_dinov2s(args):
    """Freeze and warm-up values exactly; the cosine up to libm's rounding of cos."""
    theirs = reference("dinov2.utils.utils").CosineScheduler(*args)
    ours = CosineSchedule(*args)
    _, _, total, warmup, _, freeze = args
    for iteration in range(total + 2):
        expected = float(theirs[iteration])
        if iteration < freeze + warmup:
            assert ours(iteration) == expected, iteration
        else:
            assert ours(iteration) == pytest.approx(expected, rel=1e-14, abs=0.0), iteration


def test_teacher_temperature_of_a_short_run_keeps_dinov2s_warm_up(tmp_path):
    config = tiny_config(tmp_path, *SHORT_RUN)
    schedules = schedules_for(config, config.train.batch_size_per_gpu)
    expected = _dinov2_teacher_temp(config.train.epoch_length)
    for iteration in range(25):
        assert schedules.teacher_temp(iteration) == float(expected[iteration]), iteration
    assert schedules.teacher_temp(7) < 0.07
    assert schedules.teacher_temp_warning(8) is not None
    assert schedules.teacher_temp_warning(20) is None


def test_a_run_shorter_than_the_warm_up_says_so_and_logs_dinov2s_temperatures(tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path, *SHORT_RUN, "train.max_iterations=3"))
    out = capsys.readouterr().out
    assert "WARNING the run ends at iteration 8, before the teacher temperature warm-up" in out
    expected = _dinov2_teacher_temp(4)
    logged = {m["iteration"]: m["teacher_temp"] for m in read_metrics(run_dir)}
    assert logged == {done: float(expected[done - 1]) for done in (1, 2, 3)}


def _dinov2_rates(rate: float, uniform: bool) -> list[float]:
    vit = reference("dinov2.models.vision_transformer")
    model = vit.DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=4,
        drop_path_rate=rate, drop_path_uniform=uniform, block_chunks=0,
    )  # fmt: skip
    return [block.sample_drop_ratio for block in model.blocks]


def _dinov2_scheme(rate: float, nested: bool) -> str:
    """dinov2/layers/block.py in training: `NestedTensorBlock.forward_nested` (a list of
    crop batches, the student's call) takes the batch subset for any positive rate;
    `Block.forward` (one tensor) only above 0.1, and a DropPath mask below."""
    if rate == 0.0:
        return "none"
    return "subset" if nested or rate > 0.1 else "mask"


def _schemes_taken(block: torch.nn.Module, nested: bool, monkeypatch) -> set[str]:
    taken: list[str] = []
    subset, mask = layers.add_residual_on_subset, layers.drop_path

    def spy_subset(*args):
        taken.append("subset")
        return subset(*args)

    def spy_mask(branches, drop_prob, training):
        taken.append("mask" if training and drop_prob > 0.0 else "none")
        return mask(branches, drop_prob, training)

    monkeypatch.setattr(layers, "add_residual_on_subset", spy_subset)
    monkeypatch.setattr(layers, "drop_path", spy_mask)
    x = torch.randn(8, 5, 32)
    if nested:
        block([Streams.of_sequence(x, 0), Streams.of_sequence(x[:, :3], 0)], multi_crop=True)
    else:
        block([Streams.of_sequence(x, 0)])
    return set(taken) or {"none"}


@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_drop_path_rate_and_scheme_per_block_follow_dinov2(rate, uniform, monkeypatch):
    model = tiny_vit(depth=12, drop_path_rate=rate, drop_path_uniform=uniform).train()
    rates = [block.sample_drop_ratio for block in model.blocks]
    assert rates == _dinov2_rates(rate, uniform)
    for i, block in enumerate(model.blocks):
        for nested in (False, True):
            expected = _dinov2_scheme(rates[i], nested)
            assert _schemes_taken(block, nested, monkeypatch) == {expected}, (i, nested)


def test_dino_head_forward_and_gradients_equal_dinov2s():
    """The prototypes go through torch's fused weight norm, as DINOv2's nn.utils.weight_norm
    does: same outputs and gradients, bit for bit, on the same weights."""
    theirs_cls = reference("dinov2.layers.dino_head").DINOHead
    torch.manual_seed(4)
    ours = DINOHead(32, 96, hidden_dim=48, bottleneck_dim=24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = theirs_cls(32, 96, hidden_dim=48, bottleneck_dim=24)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        ours.last_layer.weight_g.uniform_(0.5, 1.5)
        theirs.last_layer.weight_g.copy_(ours.last_layer.weight_g)
    x = torch.randn(8, 32)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    assert torch.equal(ours(x), theirs(x))
    for name, value in ours.named_parameters():
        assert torch.equal(value.grad, dict(theirs.named_parameters())[name].grad), name
