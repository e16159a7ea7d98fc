"""Loading and saving backbone weights; every bad file fails with a clear message."""

import json
import pickle

import pytest
import torch
from helpers import PAPER, randomize, tiny_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dinospec.config import ModelConfig
from dinospec.models.checkpoints import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    load_backbone,
    save_backbone,
)


@pytest.fixture
def golden_reg4(golden_dir):
    return torch.load(golden_dir / "vit_swiglu_reg4.pt", weights_only=True)


def test_hub_style_file_infers_architecture(tmp_path, golden_reg4):
    path = tmp_path / "dinov2_tiny_reg4_pretrain.pth"
    torch.save(golden_reg4["state_dict"], path)
    model = load_backbone(path, num_heads=4).eval()
    config = json.loads(golden_reg4["config"])
    assert (model.embed_dim, model.n_blocks, model.patch_size) == (64, 4, 16)
    assert model.config.ffn_layer == "swiglufused" and model.num_register_tokens == 4
    model.interpolate_offset, model.interpolate_antialias = config["interpolate_offset"], False
    with torch.no_grad():
        out = model.forward_features(golden_reg4["in0.x"])["x_norm_patchtokens"]
    torch.testing.assert_close(
        out, golden_reg4["in0.features.x_norm_patchtokens"], rtol=1e-4, atol=1e-4
    )


def test_vanilla_file_into_specialized_model_keeps_function(tmp_path):
    vanilla = randomize(tiny_vit()).eval()
    path = tmp_path / "vanilla.pth"
    save_backbone(vanilla, path)
    specialized = load_backbone(path, tiny_vit(PAPER)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(specialized(x), vanilla(x))
    assert torch.equal(specialized.blocks[0].norm1.prefix_weight, vanilla.blocks[0].norm1.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip(tmp_path, suffix):
    model = randomize(tiny_vit(PAPER, num_heads=2)).eval()
    path = tmp_path / f"backbone{suffix}"
    save_backbone(model, path)
    loaded = load_backbone(path, num_heads=2).eval()
    if suffix == ".safetensors":
        assert loaded.config == model.config
    assert loaded.blocks[0].attn.qkv.prefix_weight.shape == (96, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_dinov2_training_checkpoint_with_chunked_blocks(tmp_path):
    model = randomize(tiny_vit()).eval()
    chunked = {}
    for key, value in model.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{key.split('.', 1)[1]}"
        chunked[f"teacher.backbone.{key}"] = value
    chunked["student.backbone.cls_token"] = torch.zeros(1)
    path = tmp_path / "model_0001249.rank_0.pth"
    torch.save({"model": chunked, "iteration": 1249}, path)
    loaded = load_backbone(path, tiny_vit()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatches_are_listed_together(tmp_path):
    state = tiny_vit().state_dict()
    state.pop("norm.bias")
    state["blocks.0.extra.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 5, 32)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_backbone(path, tiny_vit())
    message = str(info.value)
    assert "missing keys (1): norm.bias" in message
    assert "unexpected keys (1): blocks.0.extra.weight" in message
    assert "pos_embed: file (1, 5, 32) vs model (1, 17, 32)" in message


def test_config_that_disagrees_with_stored_config(tmp_path):
    path = tmp_path / "b.safetensors"
    save_backbone(tiny_vit(), path)
    other = ModelConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_register_tokens=2
    )
    with pytest.raises(CheckpointError, match="num_heads: file 4 vs config 2"):
        load_backbone(path, other)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: {**c, "future_option": 1}, r"does not know: model\.future_option \(written"),
        (
            lambda c: {**c, "specialize": {**c["specialize"], "router": "x"}},
            r"does not know: model\.specialize\.router",
        ),
        (lambda c: [c], r"is not a model config"),
    ],
)
def test_a_stored_config_this_version_cannot_read_is_named(tmp_path, edit, message):
    """A file from a newer dinospec (or a damaged one) names its file and field."""
    path = tmp_path / "b.safetensors"
    save_backbone(tiny_vit(), path)
    tensors = load_file(path)
    metadata = safe_open(str(path), framework="pt").metadata()
    stored = json.loads(metadata[CONFIG_METADATA_KEY])
    save_file(tensors, path, {**metadata, CONFIG_METADATA_KEY: json.dumps(edit(stored))})
    with pytest.raises(CheckpointError, match=rf"{path}: metadata .*{message}"):
        load_backbone(path)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_arbitrary_pickles(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_backbone(path, tiny_vit())
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_files(tmp_path, suffix):
    path = tmp_path / f"b{suffix}"
    save_backbone(tiny_vit(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_backbone(path, tiny_vit())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.pth"):
        load_backbone(tmp_path / "nothing.pth")
