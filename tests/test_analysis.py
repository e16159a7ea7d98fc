"""Token analysis, PCA picture and training-curve plots, checked on known answers."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import PAPER, randomize, tiny_vit
from matplotlib.image import imread

from dinospec.analysis.cli import read_metrics, register
from dinospec.analysis.pca import foreground_mask, pca_rgb, principal_components
from dinospec.analysis.plots import DPI, HEADER_INCHES, PANEL_INCHES, cosine_figure, metrics_figure
from dinospec.analysis.tokens import (
    STAGE_TITLES,
    STAGES,
    NormRecorder,
    StageAccumulator,
    TokenLayout,
    analyze_backbone,
    cross_cosine,
    norm_sites,
    pairwise_cosine,
)
from dinospec.config import SpecializeConfig
from dinospec.models.checkpoints import save_backbone
from dinospec.models.convert import specialize_backbone
from dinospec.models.sublayers import SpecializedLayerNorm

NORMS_ONLY = SpecializeConfig(norm1_blocks="all", norm2_blocks="all", final_norm=True)
# tiny_vit: 32 px images, patch 8 -> 16 patches, 2 registers, 32 channels, 3 blocks
TOKENS, DIM, NORMS = 1 + 2 + 16, 32, 7


def _images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {
            k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()
        }
    if isinstance(tree, list) and tree and isinstance(tree[0], dict):
        return {
            k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}/{i}").items()
        }
    return {prefix: tree}


def test_cosine_means_equal_explicit_pair_averages() -> None:
    x = torch.randn(3, 7, 5)
    cos = F.cosine_similarity(x.unsqueeze(2), x.unsqueeze(1), dim=-1)
    off_diagonal = ~torch.eye(7, dtype=torch.bool)
    expected_pairs = torch.stack([c[off_diagonal].mean() for c in cos])
    expected_cross = cos[:, :2, 2:].mean(dim=(1, 2))
    torch.testing.assert_close(pairwise_cosine(x).float(), expected_pairs)
    torch.testing.assert_close(cross_cosine(x[:, :2], x[:, 2:]).float(), expected_cross)


def test_known_channel_magnitudes_give_known_log_ratios() -> None:
    cls = torch.tensor([1.0, 10.0, 100.0, 0.1])
    x = torch.ones(2, 1 + 1 + 5, 4)
    x[:, 0] = cls * torch.tensor([1.0, -1.0, 1.0, -1.0])
    x[:, 1] = 3.0
    x[:, 2:] *= -1.0
    acc = StageAccumulator()
    acc.add(x, TokenLayout(num_registers=1))
    stats = acc.finish(threshold=5.0)
    np.testing.assert_allclose(stats.log_ratio, [0.0, 1.0, 2.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(stats.register_log_ratio, np.log10([3.0] * 4), atol=1e-9)
    separation = stats.separation
    assert separation == {"cls_dominant": 0.5, "patch_dominant": 0.25, "total": 0.75}


@pytest.mark.parametrize(
    "spec",
    [None, PAPER, SpecializeConfig(norm1_blocks="all", tokens="cls")],
    ids=["vanilla", "paper", "cls-only-prefix"],
)
def test_recorder_sees_every_norm_once_per_forward_as_full_sequences(spec) -> None:
    model = randomize(tiny_vit(spec)).eval()
    seen = []
    with torch.no_grad(), NormRecorder(model, lambda site, t: seen.append((site, t))):
        model.forward_features(_images(2))
    assert [s.name for s, _ in seen] == [s.name for s in norm_sites(model)]
    assert len(seen) == NORMS
    prefix = model.plan.num_prefix_path_tokens(model.num_register_tokens)
    for site, tensors in seen:
        assert all(tensors.stage(s).shape == (2, TOKENS, DIM) for s in STAGES)
        norm = site.module
        if isinstance(norm, SpecializedLayerNorm):
            cls_path = F.layer_norm(
                tensors.input[:, :prefix], (DIM,), norm.prefix_weight, norm.prefix_bias, 1e-6
            )
            torch.testing.assert_close(tensors.output[:, :prefix], cls_path)
            patch_path = F.layer_norm(
                tensors.input[:, prefix:], (DIM,), norm.weight, norm.bias, 1e-6
            )
            torch.testing.assert_close(tensors.output[:, prefix:], patch_path)
        else:
            shared = F.layer_norm(tensors.input, (DIM,), norm.weight, norm.bias, 1e-6)
            torch.testing.assert_close(tensors.output, shared)
        torch.testing.assert_close(
            tensors.normalized, F.layer_norm(tensors.input, (DIM,), eps=1e-6)
        )


@pytest.mark.parametrize(
    "spec", [PAPER, SpecializeConfig(norm1_blocks="all", norm2_blocks="all", tokens="cls")]
)
def test_converted_model_gives_the_vanilla_statistics(spec) -> None:
    vanilla = randomize(tiny_vit()).eval()
    converted = specialize_backbone(vanilla, spec)
    assert converted.is_specialized
    images = _images(4)
    reference = _flatten(analyze_backbone(vanilla, [images[:2], images[2:]]).to_json())
    result = _flatten(analyze_backbone(converted, [images[:2], images[2:]]).to_json())
    compared = [k for k in reference if "/model/" not in k and not k.endswith("/specialized")]
    assert len(compared) > 200
    for key in compared:
        if isinstance(reference[key], str):
            assert result[key] == reference[key]
        else:
            np.testing.assert_allclose(
                result[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key
            )


def _orthogonal_tokens_model() -> torch.nn.Module:
    """Every patch token is (1, -1, 0, ...) and [CLS] is (0, 0, 1, -1, 0, ...) at the
    first norm: zero-mean and orthogonal, so LayerNorm keeps them orthogonal."""
    model = tiny_vit(num_register_tokens=0).eval()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
        model.pos_embed[0, 1:, 0], model.pos_embed[0, 1:, 1] = 1.0, -1.0
        model.cls_token.zero_()
        model.cls_token[0, 0, 2], model.cls_token[0, 0, 3] = 1.0, -1.0
    return model


def test_orthogonal_tokens_give_zero_cls_patch_cosine_and_known_figures() -> None:
    analysis = analyze_backbone(_orthogonal_tokens_model(), [_images(3)], threshold=10.0)
    first = analysis.norm("blocks.0.norm1")
    for stage in STAGES:
        assert first.stages[stage].cosine_summary("cls_patch") == pytest.approx(
            {"mean": 0.0, "std": 0.0}, abs=1e-7
        )
        assert first.stages[stage].cosine_summary("patch_patch")["mean"] == pytest.approx(1.0)
        # [CLS] owns channels 2 and 3, patches own 0 and 1: 4 of 32 channels separated
        assert first.stages[stage].separation["total"] == pytest.approx(4 / 32)
    assert "register_patch" not in first.stages["input"].cosine
    fig = cosine_figure([("orthogonal", analysis)])
    plotted = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
    for stage in STAGES:
        assert plotted[STAGE_TITLES[stage]][0] == pytest.approx(0.0, abs=1e-7)


def test_heatmap_holds_the_first_image_at_the_chosen_norm() -> None:
    analysis = analyze_backbone(
        _orthogonal_tokens_model(), [_images(2)], heatmap_site="blocks.0.norm1"
    )
    normalized = analysis.heatmap["normalized"]
    assert normalized.shape == (1 + 16, DIM)
    np.testing.assert_allclose(normalized[0, :4], [0.0, 0.0, 4.0, 4.0], atol=1e-4)
    np.testing.assert_allclose(normalized[1:, :4], [[4.0, 4.0, 0.0, 0.0]] * 16, atol=1e-4)


@pytest.mark.parametrize(
    ("tokens", "registers_orthogonal"), [("cls+registers", True), ("cls", False)]
)
def test_disjoint_prefix_and_patch_affines_make_cls_orthogonal_to_patches(
    tokens: str, registers_orthogonal: bool
) -> None:
    model = randomize(tiny_vit(replace(NORMS_ONLY, tokens=tokens)))
    with torch.no_grad():
        for norm in model.modules():
            if isinstance(norm, SpecializedLayerNorm):
                norm.prefix_weight[DIM // 2 :] = 0.0
                norm.prefix_bias[DIM // 2 :] = 0.0
                norm.weight[: DIM // 2] = 0.0
                norm.bias[: DIM // 2] = 0.0
    analysis = analyze_backbone(model, [_images(3)])
    assert len(analysis.norms) == NORMS and all(n.specialized for n in analysis.norms)
    for norm in analysis.norms:
        output, before = norm.stages["output"], norm.stages["normalized"]
        assert output.cosine_summary("cls_patch")["mean"] == pytest.approx(0.0, abs=1e-7)
        assert abs(before.cosine_summary("cls_patch")["mean"]) > 1e-3
        register_patch = output.cosine_summary("register_patch")["mean"]
        assert (abs(register_patch) < 1e-7) == registers_orthogonal


def test_principal_components_of_known_variances() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 0.1, 0.1])
    x = torch.randn(4000, 5, generator=gen) * scales + 7.0
    mean, components = principal_components(x, 3)
    np.testing.assert_allclose(mean.numpy(), [7.0] * 5, atol=0.3)
    np.testing.assert_allclose(components.abs().numpy(), np.eye(5)[:3], atol=0.05)
    assert (components.gather(1, components.abs().argmax(1, keepdim=True)) > 0).all()


def test_foreground_is_the_object_whatever_the_component_sign() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 6, 6, 8, generator=gen) * 0.05
    features[:, 2:4, 2:4, 0] += 3.0
    for sign in (1.0, -1.0):
        mask = foreground_mask(features * sign, threshold=0.5)
        expected = torch.zeros(2, 6, 6, dtype=torch.bool)
        expected[:, 2:4, 2:4] = True
        assert torch.equal(mask, expected)
    maps = pca_rgb(features, threshold=0.5)
    assert maps.rgb.shape == (2, 6, 6, 3)
    assert (maps.rgb[~maps.foreground] == 0).all() and maps.rgb.max() <= 1.0
    assert pca_rgb(features, per_image=True).rgb.shape == (2, 6, 6, 3)


def test_pca_cli_writes_a_grid_of_the_documented_size(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_backbone(randomize(tiny_vit(PAPER)), run / "teacher_backbone.safetensors")
    out = tmp_path / "pca.png"
    _run_cli(
        [
            *("pca", str(run), "--images", "synthetic", "--n", "3", "--size", "35"),
            *("--columns", "2", "--threshold", "0.3", "--out", str(out), "--device", "cpu"),
        ]
    )
    pixels = imread(out)
    rows, cols = 2, 2
    expected = ((rows * PANEL_INCHES + HEADER_INCHES) * DPI, 2 * cols * PANEL_INCHES * DPI)
    assert pixels.shape[:2] == tuple(round(v) for v in expected)


def _write_metrics(path: Path, losses: list[float], extra: str = "") -> None:
    path.mkdir()
    records = [
        {"iteration": i, "loss": v, "loss_ibot": v / 2, "lr": 1e-3 * i, "teacher_entropy": 0.5}
        for i, v in enumerate(losses)
    ]
    path.joinpath("metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + extra
    )


def test_plot_metrics_overlays_runs(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "vanilla", [3.0, 2.0, 1.5])
    resumed = json.dumps({"iteration": 1, "loss": 9.0}) + "\n" + '{"iteration": 2, "lo'
    _write_metrics(tmp_path / "spec", [3.0, 1.0, 0.5], extra=resumed)
    records = read_metrics(tmp_path / "spec" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[1]["loss"] == 9.0
    fig = metrics_figure({"vanilla": read_metrics(tmp_path / "vanilla" / "metrics.jsonl")})
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()][:4] == [
        "total loss",
        "iBOT loss",
        "learning rate",
        "teacher entropy / log K",
    ]
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [3.0, 2.0, 1.5])
    out = tmp_path / "curves.png"
    _run_cli(["plot-metrics", str(tmp_path / "vanilla"), str(tmp_path / "spec"), "--out", str(out)])
    assert imread(out).shape[0] > 100


def test_read_metrics_refuses_a_corrupt_line_in_the_middle(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "run", [1.0])
    path = tmp_path / "run" / "metrics.jsonl"
    path.write_text("{oops\n" + path.read_text())
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1"):
        read_metrics(path)


def test_analyze_cli_writes_json_and_figures_for_two_backbones(tmp_path: Path) -> None:
    vanilla = randomize(tiny_vit())
    save_backbone(vanilla, tmp_path / "vanilla.pth")
    run = tmp_path / "spec_run"
    run.mkdir()
    save_backbone(specialize_backbone(vanilla, PAPER), run / "teacher_backbone.safetensors")
    out = tmp_path / "analysis"
    _run_cli(
        [
            *("analyze", str(tmp_path / "vanilla.pth"), str(run), "--images", "synthetic"),
            *("--n", "3", "--size", "35", "--num-heads", "4", "--out", str(out)),
            *("--blocks", "0", "2"),
        ]
    )
    record = json.loads((out / "analysis.json").read_text())
    assert set(record) == {"images", "requested_size", "blocks_plotted", "checkpoints"}
    assert [c["label"] for c in record["checkpoints"]] == ["vanilla.pth", "spec_run"]
    spec = record["checkpoints"][1]
    assert set(spec) >= {"label", "path", "model", "num_images", "image_size", "norms"}
    assert spec["image_size"] == [32, 32] and spec["num_images"] == 3
    assert spec["model"]["specialized"] and not record["checkpoints"][0]["model"]["specialized"]
    stage = spec["norms"][0]["stages"]["output"]
    assert set(stage) == {
        "cosine",
        "magnitude",
        "log10_ratio_cls_patch",
        "separation",
        "log10_ratio_register_patch",
    }
    assert len(stage["log10_ratio_cls_patch"]) == DIM
    same = record["checkpoints"][0]["norms"][3]["stages"]["output"]["cosine"]["cls_patch"]
    assert spec["norms"][3]["stages"]["output"]["cosine"]["cls_patch"] == pytest.approx(same)
    for name in ("cosine_vs_block", "log_ratio", "separation_vs_block", "heatmap"):
        assert imread(out / f"{name}.png").shape[1] > 300


def test_analyze_rejects_blocks_outside_the_model(tmp_path: Path) -> None:
    save_backbone(randomize(tiny_vit()), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="outside the blocks 0-2"):
        _run_cli(
            [
                *("analyze", str(tmp_path / "model.safetensors"), "--images", "synthetic"),
                *("--n", "2", "--size", "32", "--blocks", "5", "--out", str(tmp_path / "a")),
            ]
        )


def test_image_folder_is_resized_to_a_patch_multiple(tmp_path: Path) -> None:
    from PIL import Image

    from dinospec.analysis.cli import load_images

    folder = tmp_path / "images"
    folder.mkdir()
    for i, size in enumerate([(50, 40), (30, 60)]):
        Image.new("RGB", size, (10 * i, 100, 200)).save(folder / f"{i}.png")
    images = load_images(str(folder), 5, 24)
    assert images.shape == (2, 3, 24, 24)
    assert math.isclose(float(images[0, 1].mean()), (100 / 255 - 0.456) / 0.224, rel_tol=1e-3)
