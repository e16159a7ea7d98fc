"""The training recipes hold the values DINOv2's own config files give, key by key.

The reference files (../shared/reference/dinov2/dinov2/configs) are merged as DINOv2's
`setup` does: ssl_default_config.yaml first, then the training file. Every key dinospec
has a counterpart for is compared; the few deliberate differences are listed in DELIBERATE
with their reason, and are documented in the recipe files and the README.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from dinospec.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "train"
REFERENCE = REPO.parent / "shared" / "reference" / "dinov2" / "dinov2" / "configs"
ARCHES = {"vit_large": (1024, 24, 16), "vit_giant2": (1536, 40, 24)}
CENTERING = {"centering": "softmax", "sinkhorn_knopp": "sinkhorn_knopp"}
SECTIONS = {
    "dino": (
        "loss_weight",
        "koleo_loss_weight",
        "head_n_prototypes",
        "head_hidden_dim",
        "head_bottleneck_dim",
        "head_nlayers",
    ),
    "ibot": (
        "loss_weight",
        "mask_sample_probability",
        "mask_ratio_min_max",
        "separate_head",
        "head_n_prototypes",
        "head_hidden_dim",
        "head_bottleneck_dim",
        "head_nlayers",
    ),
    "teacher": (
        "momentum_teacher",
        "final_momentum_teacher",
        "teacher_temp",
        "warmup_teacher_temp",
        "warmup_teacher_temp_epochs",
    ),
    "optim": (
        "epochs",
        "base_lr",
        "min_lr",
        "warmup_epochs",
        "weight_decay",
        "weight_decay_end",
        "layerwise_decay",
        "patch_embed_lr_mult",
        "clip_grad",
        "freeze_last_layer_epochs",
        "adamw_beta1",
        "adamw_beta2",
    ),
    "crops": (
        "global_crops_scale",
        "local_crops_scale",
        "local_crops_number",
        "global_crops_size",
        "local_crops_size",
    ),
}
MODEL_KEYS = (
    "patch_size",
    "drop_path_rate",
    "drop_path_uniform",
    "ffn_layer",
    "qkv_bias",
    "proj_bias",
    "ffn_bias",
    "num_register_tokens",
    "interpolate_antialias",
    "interpolate_offset",
)
# (dinospec recipe, DINOv2 training file or None for ssl_default_config.yaml alone)
RECIPES = {
    "vitl14_in22k": "vitl14.yaml",
    "vitg14_in22k": "vitg14.yaml",
    "vitl14_in1k": None,
}
PATCH14 = {"model.patch_size": 14, "crops.local_crops_size": 98}
DELIBERATE: dict[str, dict[str, Any]] = {
    # The released ViT-L/14 weights have an MLP FFN although vitl14.yaml says swiglufused.
    "vitl14_in22k": {"model.ffn_layer": "mlp"},
    # The default file describes ViT-L/16 (96 px local crops); dinospec's recipes use patch
    # 14, with the 98 px local crops of DINOv2's own patch-14 files.
    "vitl14_in1k": PATCH14,
}


def reference_values(training_file: str | None) -> dict[str, Any]:
    """DINOv2's merged config, flattened to dinospec's key names."""
    layers = [OmegaConf.load(REFERENCE / "ssl_default_config.yaml")]
    if training_file is not None:
        layers.append(OmegaConf.load(REFERENCE / "train" / training_file))
    ref = OmegaConf.to_container(OmegaConf.merge(*layers))
    values = {
        f"{section}.{key}": ref[section][key] for section, keys in SECTIONS.items() for key in keys
    }
    student = ref["student"]
    values |= {f"model.{key}": student[key] for key in MODEL_KEYS}
    values["model.init_values"] = student["layerscale"]
    embed_dim, depth, num_heads = ARCHES[student["arch"]]
    values |= {"model.embed_dim": embed_dim, "model.depth": depth, "model.num_heads": num_heads}
    train = ref["train"]
    values |= {
        "train.batch_size_per_gpu": train["batch_size_per_gpu"],
        "train.centering": CENTERING[train["centering"]],
        "train.epoch_length": train["OFFICIAL_EPOCH_LENGTH"],
        "train.seed": train["seed"],
        "data.num_workers": train["num_workers"],
    }
    return values


def dinospec_values(cfg: Config, keys: list[str]) -> dict[str, Any]:
    container = OmegaConf.to_container(OmegaConf.structured(cfg))
    values = {}
    for key in keys:
        section, name = key.split(".")
        values[key] = container[section][name]
    return values


@pytest.mark.parametrize("variant", ["", "_spec"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_matches_dinov2_config_files(recipe, variant):
    expected = reference_values(RECIPES[recipe]) | DELIBERATE.get(recipe, {})
    cfg = load_config(CONFIGS / f"{recipe}{variant}.yaml")
    actual = dinospec_values(cfg, sorted(expected))
    differences = {k: (actual[k], expected[k]) for k in expected if actual[k] != expected[k]}
    assert not differences, f"dinospec value vs DINOv2's: {differences}"


def test_deliberate_differences_are_real_and_one_override_away():
    """Each listed difference does differ from the reference file, so the list stays
    honest, and the FFN one is undone by the override the recipe file names."""
    for recipe, overrides in DELIBERATE.items():
        reference = reference_values(RECIPES[recipe])
        assert all(reference[key] != value for key, value in overrides.items()), recipe
    cfg = load_config(CONFIGS / "vitl14_in22k.yaml", ["model.ffn_layer=swiglufused"])
    assert cfg.model.ffn_layer == reference_values("vitl14.yaml")["model.ffn_layer"]
