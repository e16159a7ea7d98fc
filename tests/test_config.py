"""Config loading: every shipped file loads; bad input fails with key, value and file."""

from pathlib import Path

import pytest

from dinospec.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = {
    "vits14": (384, 12, 6),
    "vitb14": (768, 12, 12),
    "vitl14": (1024, 24, 16),
    "vitg14": (1536, 40, 24),
}


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("variant", ["", "_reg4", "_spec", "_reg4_spec"])
def test_model_configs(size, variant):
    model = load_config(CONFIGS / "models" / f"{size}{variant}.yaml").model
    assert (model.embed_dim, model.depth, model.num_heads) == SIZES[size]
    assert model.patch_size == 14 and model.img_size == 224
    assert model.num_register_tokens == (4 if "reg4" in variant else 0)
    assert model.ffn_layer == ("swiglufused" if size == "vitg14" else "mlp")
    spec = model.specialize
    if "spec" in variant:
        assert (spec.norm1_blocks, spec.norm2_blocks, spec.qkv_blocks) == ("all", "all", 0.3333)
        assert spec.tokens == "cls+registers" and not spec.final_norm
    else:
        assert spec.qkv_blocks == "none" and spec.norm1_blocks == "none"


def test_overrides_and_list_values():
    cfg = load_config(
        CONFIGS / "models" / "vits14_spec.yaml",
        ["model.specialize.qkv_blocks=0.5", "model.specialize.proj_blocks=[0,2]", "model.depth=6"],
    )
    assert cfg.model.specialize.qkv_blocks == 0.5
    assert list(cfg.model.specialize.proj_blocks) == [0, 2]
    assert cfg.model.depth == 6


def _error(tmp_path, text, overrides=()):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value), str(path)


def test_unknown_key_names_key_value_and_file(tmp_path):
    message, path = _error(tmp_path, "model:\n  embed_dimm: 64\n")
    assert path in message and "model.embed_dimm" in message and "64" in message


def test_wrong_type(tmp_path):
    message, path = _error(tmp_path, "model:\n  depth: twelve\n")
    assert path in message and "model.depth" in message and "twelve" in message


def test_heads_must_divide_dim_names_the_file_that_set_it(tmp_path):
    (tmp_path / "base.yaml").write_text("model:\n  embed_dim: 64\n  num_heads: 4\n")
    message, path = _error(tmp_path, "extends: base.yaml\nmodel:\n  num_heads: 5\n")
    assert f"{path}: model.num_heads=5" in message and "embed_dim=64" in message


def test_block_index_past_depth_from_command_line(tmp_path):
    message, _ = _error(tmp_path, "model:\n  depth: 4\n", ["model.specialize.qkv_blocks=[1,4]"])
    assert "command line: model.specialize.qkv_blocks=[1, 4]" in message and "[4]" in message


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("1.5", "fraction"),
        ("13", "block count"),
        ("true", "boolean"),
        ("some", "expected"),
        ("[0,0]", "repeated"),
    ],
)
def test_bad_block_selections(tmp_path, value, fragment):
    message, path = _error(tmp_path, f"model:\n  specialize:\n    norm1_blocks: {value}\n")
    assert path in message and "model.specialize.norm1_blocks" in message and fragment in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("model:\n  ffn_layer: gelu\n", "ffn_layer='gelu'"),
        ("model:\n  attn_backend: flash\n", "attn_backend='flash'"),
        ("model:\n  specialize:\n    tokens: registers\n", "specialize.tokens='registers'"),
        ("model:\n  img_size: 100\n", "multiple of patch_size=14"),
    ],
)
def test_impossible_values(tmp_path, text, fragment):
    message, path = _error(tmp_path, text)
    assert path in message and fragment in message


def test_missing_file_cycle_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match=r"not found: .*nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.depth"])


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("dataset", ["in1k", "in22k"])
@pytest.mark.parametrize("variant", ["", "_spec"])
def test_training_recipes(size, dataset, variant):
    cfg = load_config(CONFIGS / "train" / f"{size}_{dataset}{variant}.yaml")
    assert (cfg.model.embed_dim, cfg.model.depth, cfg.model.num_heads) == SIZES[size]
    assert (cfg.model.specialize.qkv_blocks == 0.3333) == (variant == "_spec")
    assert cfg.crops.local_crops_size == 98 and cfg.crops.local_crops_number == 8
    if dataset == "in1k":
        assert (cfg.data.dataset, cfg.train.centering, cfg.optim.base_lr) == (
            "imagenet",
            "softmax",
            0.004,
        )
        assert cfg.dino.head_n_prototypes == 65536 and not cfg.ibot.separate_head
    else:
        assert (cfg.data.dataset, cfg.train.centering, cfg.optim.epochs) == (
            "folder",
            "sinkhorn_knopp",
            500,
        )
        assert cfg.dino.head_n_prototypes == 131072 and cfg.ibot.separate_head


@pytest.mark.parametrize("sigma", ["[0.0,1.0]", "[2.0,1.0]", "[0.5]"])
def test_blur_sigma_must_be_a_positive_range(sigma):
    with pytest.raises(ConfigError, match=r"crops\.blur_sigma=.*must be \[low, high\]"):
        load_config(None, [f"crops.blur_sigma={sigma}"])
