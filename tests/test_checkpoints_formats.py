"""What a weight file does not say is never guessed silently; a file that does not fit the
config is an error naming the file and the config keys; `dinospec export` writes each
format and refuses what has no equivalent."""

import json
import logging

import pytest
import torch
from helpers import PAPER, randomize, tiny_vit
from library_models import hf_model, save_hf_bin

from dinospec.cli import main
from dinospec.config import ModelConfig
from dinospec.models.architecture import UNKNOWN_HEADS, FileArchitecture, with_heads
from dinospec.models.checkpoints import CheckpointError, load_backbone, save_backbone
from dinospec.run.exports import load_frozen_backbone


@pytest.fixture
def hub_file(tmp_path):
    """A DINOv2-keyed `.pth` with 8-dimensional heads: nothing in it records the count."""
    path = tmp_path / "tiny.pth"
    save_backbone(randomize(tiny_vit()), path)
    return path


def test_head_count_not_in_the_file_is_an_error_naming_the_setting(hub_file):
    with pytest.raises(CheckpointError, match=r"attention heads is not recorded.*set num_heads"):
        load_backbone(hub_file)
    with pytest.raises(CheckpointError, match=r"tiny\.pth.*set backbone\.num_heads"):
        load_frozen_backbone(hub_file, "cpu", heads_key="backbone.num_heads")
    with pytest.raises(CheckpointError, match="set --num-heads"):
        load_frozen_backbone(hub_file, "cpu")
    assert load_backbone(hub_file, num_heads=4).num_heads == 4


def test_a_released_size_takes_its_head_count_and_says_so(caplog):
    shapes = ModelConfig(embed_dim=768, depth=12, num_heads=UNKNOWN_HEADS)
    with caplog.at_level(logging.WARNING):
        config = with_heads(FileArchitecture(shapes), None, "vitb.pth", "backbone.num_heads")
    assert config.num_heads == 12
    assert "shape of DINOv2's ViT-B/14, so num_heads=12 is assumed" in caplog.text
    assert "set backbone.num_heads if it differs" in caplog.text


def test_given_head_count_that_contradicts_the_file(tmp_path):
    path = tmp_path / "b.safetensors"
    save_backbone(tiny_vit(), path)
    with pytest.raises(CheckpointError, match="num_heads=2 but the file records num_heads=4"):
        load_backbone(path, num_heads=2)


def test_wrong_architecture_names_the_file_and_the_keys(tmp_path, hub_file):
    smaller = tiny_vit(depth=2, num_register_tokens=0, ffn_layer="swiglufused")
    with pytest.raises(CheckpointError) as info:
        load_backbone(hub_file, smaller.config)
    message = str(info.value)
    assert str(hub_file) in message
    assert "model.depth: file 3 vs config 2" in message
    assert "model.num_register_tokens: file 2 vs config 0" in message
    assert "model.ffn_layer: file 'mlp' vs config 'swiglufused'" in message


def test_a_specialized_file_does_not_go_into_a_less_specialized_model(tmp_path):
    path = tmp_path / "spec.pth"
    save_backbone(tiny_vit(PAPER), path)
    with pytest.raises(CheckpointError, match=r"model\.specialize\.norm1_blocks: the file "):
        load_backbone(path, tiny_vit().config)


def test_truncated_hf_bin_names_the_file(tmp_path):
    path = save_hf_bin(hf_model("dinov2"), tmp_path / "hf")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: cannot be read, truncated"):
        load_backbone(tmp_path / "hf")


def test_evaluation_reads_an_hf_directory_and_records_its_weight_file(tmp_path):
    hf_model("dinov2_reg4").save_pretrained(tmp_path / "hf")
    model, path = load_frozen_backbone(tmp_path / "hf", "cpu")
    assert path == tmp_path / "hf" / "model.safetensors"
    assert model.num_register_tokens == 4 and not model.training


def test_export_command_writes_each_format(tmp_path, hub_file, capsys):
    model = load_backbone(hub_file, num_heads=4).eval()
    x = torch.randn(4, 3, 32, 32)
    for fmt, out in (
        ("hub", "tiny_hub.pth"),
        ("safetensors", "tiny_dinospec.safetensors"),
        ("hf", "tiny_hf"),
    ):
        assert main(["export", str(hub_file), "--format", fmt, "--num-heads", "4"]) == 0
        back = load_backbone(tmp_path / out, num_heads=4).eval()
        with torch.no_grad():
            assert torch.equal(back(x), model(x)), fmt
    assert main(["export", str(hub_file), "--format", "timm", "--num-heads", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'tiny_timm.safetensors'}" in printed
    assert "timm.create_model('vit_small_patch14_reg4_dinov2', pretrained=False" in printed
    assert "transformers.Dinov2WithRegistersModel.from_pretrained" in printed
    config = json.loads((tmp_path / "tiny_hf" / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["num_register_tokens"] == 2


def test_export_command_specializes_and_refuses_timm_and_hf_for_it(tmp_path, hub_file, capsys):
    model_yaml = tmp_path / "spec.yaml"
    fields = tiny_vit().config
    model_yaml.write_text(
        "model:\n"
        + "".join(
            f"  {k}: {getattr(fields, k)}\n"
            for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
        )
        + "  num_register_tokens: 2\n  init_values: 1.0e-5\n"
        + "  specialize: {norm1_blocks: all, norm2_blocks: all, qkv_blocks: 1}\n"
    )
    out = tmp_path / "spec.safetensors"
    args = ["export", str(hub_file), "--model-config", str(model_yaml), "--format"]
    assert main([*args, "safetensors", "--out", str(out)]) == 0
    specialized = load_backbone(out)
    assert specialized.is_specialized and specialized.num_heads == 4
    for fmt in ("timm", "hf"):
        assert main([*args, fmt]) == 2
        err = capsys.readouterr().err
        assert "a specialized backbone has no" in err and "export a vanilla model" in err
