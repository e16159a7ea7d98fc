"""The backbone reproduces the reference DINOv2 implementation (../shared/golden)."""

import json

import pytest
import torch
from torch.testing import assert_close

from dinospec.config import ModelConfig
from dinospec.models import DinoVisionTransformer

FEATURES = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def _load(golden_dir, name):
    data = torch.load(golden_dir / f"{name}.pt", weights_only=True)
    config = json.loads(data["config"])
    model = DinoVisionTransformer(ModelConfig(**config, init_values=1.0)).eval()
    model.load_state_dict(data["state_dict"], strict=True)
    inputs = sorted({k.split(".")[0] for k in data if k.startswith("in")})
    return data, config, model, inputs


@pytest.mark.parametrize("name", ["vit_mlp_noreg", "vit_swiglu_reg4"])
def test_matches_reference_outputs(golden_dir, name):
    data, config, model, inputs = _load(golden_dir, name)
    sizes = {tuple(data[f"{i}.x"].shape[-2:]) for i in inputs}
    assert any(s != (config["img_size"],) * 2 for s in sizes), "position interpolation untested"
    with torch.no_grad():
        for i in inputs:
            x, masks = data[f"{i}.x"], data[f"{i}.masks"]
            plain, masked = model.forward_features(x), model.forward_features(x, masks)
            for key in FEATURES:
                assert_close(plain[key], data[f"{i}.features.{key}"], rtol=1e-4, atol=1e-4)
                assert_close(masked[key], data[f"{i}.masked_features.{key}"], rtol=1e-4, atol=1e-4)
            layers = model.get_intermediate_layers(
                x, n=2, reshape=True, return_class_token=True, norm=True
            )
            for j, (patch, cls) in enumerate(layers):
                assert_close(patch, data[f"{i}.intermediate{j}.patch"], rtol=1e-4, atol=1e-4)
                assert_close(cls, data[f"{i}.intermediate{j}.cls"], rtol=1e-4, atol=1e-4)


def test_masking_changes_only_through_mask_token(golden_dir):
    data, _, model, _ = _load(golden_dir, "vit_mlp_noreg")
    x, masks = data["in0.x"], data["in0.masks"]
    assert masks.any()
    with torch.no_grad():
        assert not torch.equal(
            model.forward_features(x)["x_prenorm"], model.forward_features(x, masks)["x_prenorm"]
        )
        model.mask_token.zero_()
        tokens = model.prepare_tokens_with_masks(x, masks)
        plain = model.prepare_tokens_with_masks(x)
    masked_rows = torch.cat([torch.zeros(x.shape[0], 1, dtype=torch.bool), masks], dim=1)
    assert torch.equal(tokens[~masked_rows], plain[~masked_rows])


def test_dinov2_call_conventions(golden_dir):
    data, _, model, inputs = _load(golden_dir, "vit_swiglu_reg4")
    x = data[f"{inputs[0]}.x"]
    with torch.no_grad():
        out = model(x)
        train_out = model(x, is_training=True)
        crops = model.forward_features([x, x[:, :, :32, :32]], [None, None])
        separate = model.forward_features(x[:, :, :32, :32])
        by_index = model.get_intermediate_layers(x, n=[0, 3])
    assert_close(out, data[f"{inputs[0]}.features.x_norm_clstoken"], rtol=1e-4, atol=1e-4)
    assert set(train_out) == {*FEATURES, "masks"}
    assert isinstance(crops, list) and len(crops) == 2
    assert torch.equal(crops[1]["x_norm_patchtokens"], separate["x_norm_patchtokens"])
    assert len(by_index) == 2 and by_index[0].shape == (x.shape[0], 16, 64)
    assert model.embed_dim == model.num_features == 64 and model.num_register_tokens == 4
