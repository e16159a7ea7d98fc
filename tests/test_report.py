"""Parameter counts against the analytic formula, and equal FLOPs with specialization."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import EVERYTHING, PAPER

from dinospec.config import ModelConfig, SpecializeConfig, load_config
from dinospec.models import build_backbone
from dinospec.report import compare_with_vanilla, count_gflops, count_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def analytic_vanilla(
    d: int, depth: int, patch: int, grid: int, registers: int, swiglu: bool
) -> int:
    tokens = d * (1 + (grid * grid + 1) + registers + 1)  # cls, pos_embed, registers, mask_token
    patch_embed = 3 * patch * patch * d + d
    if swiglu:
        hidden = (int(4 * d * 2 / 3) + 7) // 8 * 8
        ffn = d * 2 * hidden + 2 * hidden + hidden * d + d
    else:
        ffn = d * 4 * d + 4 * d + 4 * d * d + d
    attention = 3 * d * d + 3 * d + d * d + d
    block = 2 * d + attention + d + 2 * d + ffn + d  # norm1, attn, ls1, norm2, ffn, ls2
    return tokens + patch_embed + depth * block + 2 * d


def analytic_paper_extra(d: int, depth: int) -> int:
    qkv_blocks = int(depth / 3 + 0.5)
    return depth * 2 * (2 * d) + qkv_blocks * (3 * d * d + 3 * d)


@pytest.mark.parametrize(
    "name, d, depth, swiglu, percent",
    [
        ("vits14", 384, 12, False, 8.2),
        ("vitb14", 768, 12, False, 8.3),
        ("vitl14", 1024, 24, False, 8.3),
        ("vitg14", 1536, 40, True, 8.1),
    ],
)
@pytest.mark.parametrize("registers", [0, 4])
def test_parameter_counts(name, d, depth, swiglu, percent, registers):
    suffix = "_reg4" if registers else ""
    with torch.device("meta"):
        vanilla = build_backbone(load_config(CONFIGS / "models" / f"{name}{suffix}.yaml").model)
        special = build_backbone(
            load_config(CONFIGS / "models" / f"{name}{suffix}_spec.yaml").model
        )
    expected = analytic_vanilla(d, depth, 14, 16, registers, swiglu)
    assert count_parameters(vanilla) == expected
    assert count_parameters(special) == expected + analytic_paper_extra(d, depth)
    overhead = 100 * (count_parameters(special) - expected) / expected
    assert overhead == pytest.approx(percent, abs=0.1)  # SPEC section 2: about 8.2 / 8.3 / 8.3 %


@pytest.mark.parametrize("spec", [PAPER, EVERYTHING], ids=["paper", "everything"])
def test_specialization_adds_no_flops(spec):
    config = ModelConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_register_tokens=2
    )
    vanilla, special = build_backbone(config), build_backbone(replace(config, specialize=spec))
    flops = count_gflops(vanilla, 32)
    assert count_gflops(special, 32) == flops
    d, n, depth = 32, 1 + 2 + 16, 3
    matmuls = depth * n * (4 * d * d + 8 * d * d) + depth * 2 * n * n * d + 16 * 3 * 64 * d
    norms = (2 * depth + 1) * 5 * n * d
    assert flops * 1e9 == pytest.approx(matmuls + norms, rel=1e-9)


def test_report_rows():
    config = replace(
        load_config(CONFIGS / "quickstart.yaml").model,
        specialize=SpecializeConfig(qkv_blocks="all"),
    )
    rows = compare_with_vanilla(config, 64)
    assert [r.name for r in rows] == ["config", "vanilla twin"]
    assert rows[0].params - rows[1].params == 4 * (3 * 64 * 64 + 3 * 64)
    assert rows[0].gflops == rows[1].gflops > 0


@pytest.mark.slow
def test_info_command_prints_the_config_and_its_vanilla_twin():
    """The command end to end on ViT-S/14 at a small FLOP-count size; the parameter
    overheads of every size are test_parameter_counts' (on the meta device)."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dinospec.cli",
            "info",
            str(CONFIGS / "models" / "vits14_spec.yaml"),
            "--img-size",
            "56",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    config_row, vanilla_row = result.stdout.splitlines()[-2:]
    assert "+8.29%" in config_row
    assert config_row.split()[-1] == vanilla_row.split()[-1]
