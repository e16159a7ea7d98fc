"""timm's DINOv2 ViTs into dinospec and back, through the files timm itself writes:
the outputs ([CLS], patch tokens, intermediate layers) are compared with timm's own."""

from dataclasses import replace

import pytest
import timm
import timm.layers
import torch
from helpers import EVERYTHING, randomize, tiny_vit
from library_models import (
    TIMM_MODELS,
    dinospec_outputs,
    images,
    max_differences,
    timm_model,
    timm_outputs,
)
from safetensors.torch import load_file
from timm.models import save_for_hf

from dinospec.models.checkpoints import CheckpointError, load_backbone, read_weights
from dinospec.models.export_formats import export_backbone
from dinospec.models.timm_layout import timm_model_args

TOLERANCE = 1e-6  # relative to each output's largest magnitude; measured on CPU: 0.0
FILES = {
    "safetensors": "model.safetensors",
    "bin": "pytorch_model.bin",
    "directory": ".",
}


def _saved(model, directory):
    save_for_hf(model, directory, safe_serialization="both")
    return directory


def _timm_from_args(args):
    classes = {"timm.layers.SwiGLUPacked": timm.layers.SwiGLUPacked, "torch.nn.SiLU": torch.nn.SiLU}
    args = {k: classes.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    return timm.create_model(args.pop("model_name"), **args).eval()


@pytest.mark.parametrize("file", list(FILES))
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_files_load_with_timms_outputs(tmp_path, caplog, name, file):
    theirs = timm_model(name)
    directory = _saved(theirs, tmp_path / name)
    ours = load_backbone(directory / FILES[file], num_heads=2).eval()
    x = images()
    diffs = max_differences(dinospec_outputs(ours, x, norm=True), timm_outputs(theirs, x))
    assert max(diffs.values()) <= TOLERANCE, diffs
    assert ours.num_register_tokens == theirs.num_reg_tokens
    assert ours.config.ffn_layer == ("swiglufused" if "giant" in name else "mlp")
    assert torch.equal(ours.mask_token, torch.zeros(1, 64))
    assert "no mask_token; initialised to zeros, as DINOv2 initialises it" in caplog.text


def test_layouts_are_told_apart_by_their_keys(tmp_path):
    """A vanilla MLP model without registers has DINOv2's keys exactly (read as hub);
    registers and packed SwiGLU are timm's own."""
    layouts = {}
    for name in TIMM_MODELS:
        directory = _saved(timm_model(name), tmp_path / name)
        layouts[name] = read_weights(directory / "model.safetensors").layout
    assert layouts == {
        "vit_small_patch14_dinov2": "hub",
        "vit_small_patch14_reg4_dinov2": "timm",
        "vit_giant_patch14_dinov2": "timm",
        "vit_giant_patch14_reg4_dinov2": "timm",
    }


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_giant_patch14_dinov2"])
def test_timm_file_specializes_on_load_with_the_same_function(tmp_path, name):
    theirs = timm_model(name)
    path = _saved(theirs, tmp_path / name) / "model.safetensors"
    vanilla = load_backbone(path, num_heads=2).eval()
    specialized = load_backbone(path, replace(vanilla.config, specialize=EVERYTHING)).eval()
    assert specialized.is_specialized
    x = images()
    ours = dinospec_outputs(specialized, x, norm=True)
    diffs = max_differences(ours, timm_outputs(theirs, x))
    assert max(diffs.values()) <= TOLERANCE, diffs
    same = dinospec_outputs(vanilla, x, norm=True)
    assert all(torch.equal(ours[k], same[k]) for k in ours)


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_export_to_timm_gives_back_timms_weights(tmp_path, name):
    original = timm_model(name)
    ours = load_backbone(_saved(original, tmp_path / "in") / "model.safetensors", num_heads=2)
    out = tmp_path / "exported.safetensors"
    lines = export_backbone(ours, "timm", out)
    assert any("timm.create_model(" in line for line in lines)
    rebuilt = _timm_from_args(timm_model_args(ours.config))
    rebuilt.load_state_dict(load_file(out), strict=True)
    expected = original.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], expected[k]) for k in expected)


@pytest.mark.parametrize("registers", [0, 4])
def test_dinospec_model_exported_to_timm_computes_the_same(tmp_path, registers):
    """A dinospec model's [CLS] position is moved into the token for timm's register
    layout; timm then computes the same outputs."""
    model = randomize(
        tiny_vit(
            img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2,
            num_register_tokens=registers, ffn_layer="swiglufused",
        )
    ).eval()  # fmt: skip
    out = tmp_path / "exported.safetensors"
    export_backbone(model, "timm", out)
    theirs = _timm_from_args(timm_model_args(model.config))
    theirs.load_state_dict(load_file(out), strict=True)
    x = images()
    diffs = max_differences(dinospec_outputs(model, x, norm=True), timm_outputs(theirs, x))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_specialized_backbone_is_refused_for_timm(tmp_path):
    path = _saved(timm_model("vit_small_patch14_dinov2"), tmp_path / "in") / "model.safetensors"
    vanilla = load_backbone(path, num_heads=2)
    specialized = load_backbone(path, replace(vanilla.config, specialize=EVERYTHING))
    with pytest.raises(CheckpointError, match="specialized backbone has no timm equivalent"):
        export_backbone(specialized, "timm", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
