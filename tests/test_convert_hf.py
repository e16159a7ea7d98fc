"""Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` into dinospec and back, through
`save_pretrained` and `from_pretrained`: outputs compared with transformers' own."""

import json
from dataclasses import replace

import pytest
import torch
import transformers
from helpers import EVERYTHING, randomize, tiny_vit
from library_models import (
    HF_MODELS,
    dinospec_outputs,
    hf_model,
    hf_outputs,
    images,
    max_differences,
    save_hf_bin,
)

from dinospec.models.checkpoints import CheckpointError, load_backbone, read_weights
from dinospec.models.export_formats import export_backbone

# Relative to each output's largest magnitude (a few float32 rounding steps). Measured on
# CPU: 0.0 for every output, except the SwiGLU models since transformers 5.25 (separate
# gate and up matmuls where dinospec runs one fused matmul): up to 1.6e-7.
TOLERANCE = 1e-6


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hf_model_directory_loads_with_transformers_outputs(tmp_path, name):
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path / name)
    ours = load_backbone(tmp_path / name).eval()
    assert read_weights(tmp_path / name).layout == "hf"
    assert ours.num_heads == 2  # read from config.json
    for x in (images(), images(84, 70)):  # also resized positions, as HF resizes them
        diffs = max_differences(dinospec_outputs(ours, x, norm=False), hf_outputs(theirs, x))
        assert max(diffs.values()) <= TOLERANCE, diffs
    assert torch.equal(ours.mask_token, theirs.embeddings.mask_token)


@pytest.mark.parametrize("name", ["dinov2_swiglu", "dinov2_reg4"])
def test_hf_bin_file_loads_with_weights_only(tmp_path, name):
    theirs = hf_model(name)
    path = save_hf_bin(theirs, tmp_path / name)
    ours = load_backbone(path).eval()
    x = images()
    diffs = max_differences(dinospec_outputs(ours, x, norm=False), hf_outputs(theirs, x))
    assert max(diffs.values()) <= TOLERANCE, diffs


def test_sharded_checkpoint_and_in_memory_state_dict(tmp_path):
    """`save_pretrained` with a small shard size writes an index and shards; a state dict
    saved from memory has the layout of the installed transformers (5: `q_proj`,
    `gate_proj`/`up_proj`)."""
    theirs = hf_model("dinov2_reg4_swiglu")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    torch.save(theirs.state_dict(), tmp_path / "memory.pth")
    x = images()
    expected = hf_outputs(theirs, x)
    for source, num_heads in ((tmp_path / "sharded", None), (tmp_path / "memory.pth", 2)):
        ours = load_backbone(source, num_heads=num_heads).eval()
        diffs = max_differences(dinospec_outputs(ours, x, norm=False), expected)
        assert max(diffs.values()) <= TOLERANCE, (source, diffs)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_reg4_swiglu"])
def test_hf_model_specializes_on_load_with_the_same_function(tmp_path, name):
    theirs = hf_model(name)
    theirs.save_pretrained(tmp_path / name)
    vanilla = load_backbone(tmp_path / name).eval()
    specialized = load_backbone(tmp_path / name, replace(vanilla.config, specialize=EVERYTHING))
    x = images()
    ours = dinospec_outputs(specialized.eval(), x, norm=False)
    diffs = max_differences(ours, hf_outputs(theirs, x))
    assert max(diffs.values()) <= TOLERANCE, diffs
    same = dinospec_outputs(vanilla, x, norm=False)
    assert all(torch.equal(ours[k], same[k]) for k in ours)


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_export_to_hf_round_trip(tmp_path, name):
    original = hf_model(name)
    original.save_pretrained(tmp_path / "in")
    ours = load_backbone(tmp_path / "in")
    lines = export_backbone(ours, "hf", tmp_path / "out")
    assert any("from_pretrained" in line for line in lines)
    rebuilt = type(original).from_pretrained(tmp_path / "out").eval()
    expected = original.state_dict()
    assert rebuilt.state_dict().keys() == expected.keys()
    assert all(torch.equal(rebuilt.state_dict()[k], expected[k]) for k in expected)


@pytest.mark.parametrize("registers", [0, 2])
def test_dinospec_model_exported_to_hf_computes_the_same(tmp_path, registers):
    model = randomize(
        tiny_vit(
            img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=2, init_values=None,
            num_register_tokens=registers, interpolate_offset=0.0,
            interpolate_antialias=bool(registers),
        )
    ).eval()  # fmt: skip
    export_backbone(model, "hf", tmp_path / "hf")
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    theirs = cls.from_pretrained(tmp_path / "hf").eval()
    for x in (images(), images(70, 84)):
        diffs = max_differences(dinospec_outputs(model, x, norm=False), hf_outputs(theirs, x))
        assert max(diffs.values()) <= TOLERANCE, diffs


def test_hf_config_that_disagrees_with_the_tensors_names_file_and_keys(tmp_path):
    hf_model("dinov2_reg4").save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(hidden_size=384, num_register_tokens=0)
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        load_backbone(tmp_path / "m")
    message = str(info.value)
    assert str(config_path) in message
    assert "hidden_size=384 but the tensors say 64" in message
    assert "num_register_tokens=0 but the tensors say 4" in message


def test_hf_config_with_heads_that_do_not_divide_the_width(tmp_path):
    hf_model("dinov2").save_pretrained(tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(config | {"num_attention_heads": 3}))
    with pytest.raises(CheckpointError, match="num_attention_heads=3 does not divide 64"):
        load_backbone(tmp_path / "m")


def test_specialized_backbone_is_refused_for_hf(tmp_path):
    hf_model("dinov2").save_pretrained(tmp_path / "m")
    vanilla = load_backbone(tmp_path / "m")
    specialized = load_backbone(tmp_path / "m", replace(vanilla.config, specialize=EVERYTHING))
    with pytest.raises(CheckpointError, match="no Hugging Face equivalent"):
        export_backbone(specialized, "hf", tmp_path / "out")
