"""Schedules, parameter groups, EMA and the DINO head."""

import copy
import math

import pytest
import torch
from helpers import PAPER, randomize, tiny_vit

from dinospec.models.heads import DINOHead
from dinospec.train.ema import ema_update
from dinospec.train.optim import apply_schedule_values, param_groups
from dinospec.train.schedules import CosineSchedule, dinov2_schedules


def test_dinov2_schedule_values():
    s = dinov2_schedules(epochs=100, epoch_length=1250, batch_size=2048)
    peak = 0.004 * math.sqrt(2)
    warmup = 10 * 1250
    assert s.lr(0) == 0.0
    assert s.lr(warmup - 1) == pytest.approx(peak)
    assert s.lr(warmup // 2) == pytest.approx(peak * (warmup // 2) / (warmup - 1))
    middle = warmup + (125_000 - warmup) // 2
    assert s.lr(middle) == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))
    assert s.lr(125_000) == 1e-6
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(62_500) == pytest.approx(
        0.22
    )
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(10**9) == 1.0
    assert s.teacher_temp(0) == pytest.approx(0.04)
    assert s.teacher_temp(30 * 1250 - 1) == pytest.approx(0.07)
    assert s.teacher_temp(100_000) == 0.07
    assert s.last_layer_lr(1249) == 0.0 and s.last_layer_lr(1250) == s.lr(1250) > 0


def test_schedule_rejects_impossible_lengths():
    with pytest.raises(ValueError, match="exceed"):
        CosineSchedule(1.0, 0.0, total_iters=10, warmup_iters=8, freeze_iters=5)


def _groups_by_name(groups):
    return {name: g for g in groups for name in g["names"]}


def test_param_groups():
    backbone = tiny_vit(PAPER, depth=4)
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    groups = param_groups({"backbone": backbone, "dino_head": head}, layer_decay=0.9)
    by_name = _groups_by_name(groups)
    expect = {
        "backbone.blocks.3.attn.qkv.weight": (0.9**1, 1.0),
        "backbone.blocks.0.attn.qkv.weight": (0.9**4, 1.0),
        "backbone.blocks.0.attn.qkv.prefix_weight": (0.9**4, 1.0),
        "backbone.blocks.0.attn.qkv.prefix_bias": (0.9**4, 0.0),
        "backbone.blocks.2.norm1.prefix_weight": (0.9**2, 0.0),
        "backbone.blocks.1.ls1.gamma": (0.9**3, 0.0),
        "backbone.patch_embed.proj.weight": (0.9**5 * 0.2, 1.0),
        "backbone.pos_embed": (0.9**5, 1.0),
        "backbone.cls_token": (0.9**5, 1.0),
        "backbone.register_tokens": (0.9**5, 1.0),
        "backbone.norm.weight": (1.0, 0.0),
        "dino_head.mlp.0.weight": (1.0, 1.0),
        "dino_head.mlp.0.bias": (1.0, 0.0),
    }
    for name, (lr_mult, wd_mult) in expect.items():
        assert by_name[name]["lr_multiplier"] == pytest.approx(lr_mult), name
        assert by_name[name]["wd_multiplier"] == wd_mult, name
    assert by_name["dino_head.last_layer.weight_v"]["is_last_layer"]
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])

    optimizer = torch.optim.AdamW(groups)
    values = {"lr": 0.1, "backbone_lr": 0.1, "last_layer_lr": 0.0, "wd": 0.04}
    apply_schedule_values(optimizer, values)
    by_name = _groups_by_name(optimizer.param_groups)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(0.1 * 0.9**4)
    assert by_name["backbone.blocks.0.attn.qkv.weight"]["weight_decay"] == pytest.approx(0.04)
    assert by_name["backbone.pos_embed"]["weight_decay"] == pytest.approx(0.04)
    assert by_name["backbone.blocks.0.attn.qkv.prefix_bias"]["weight_decay"] == 0.0
    assert by_name["dino_head.last_layer.weight_g"]["lr"] == 0.0


def test_ema_update_includes_prefix_path_and_never_needs_gradients():
    student = randomize(tiny_vit(PAPER), seed=1)
    teacher = randomize(tiny_vit(PAPER), seed=2)
    teacher.requires_grad_(False)
    before = copy.deepcopy(teacher.state_dict())
    ema_update(teacher, student, momentum=0.9)
    for name, value in teacher.named_parameters():
        expected = 0.9 * before[name] + 0.1 * student.get_parameter(name)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(
        teacher.blocks[0].attn.qkv.prefix_weight, before["blocks.0.attn.qkv.prefix_weight"]
    )
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="differ"):
        ema_update(tiny_vit(), student, 0.9)


def test_dino_head_output_and_weight_norm():
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    x = torch.randn(5, 32)
    out = head(x)
    assert out.shape == (5, 100)
    bottleneck = torch.nn.functional.normalize(head.mlp(x), dim=-1)
    rows = head.last_layer.weight_v / head.last_layer.weight_v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, bottleneck @ rows.T)
    assert out.abs().max() <= 1.0 + 1e-5  # unit bottleneck against unit prototypes
    assert {n for n, _ in head.named_parameters()} >= {"last_layer.weight_g", "last_layer.weight_v"}
