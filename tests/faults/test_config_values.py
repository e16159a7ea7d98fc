"""Config values out of range, broken override YAML and a missing dataset fail at once, with
one clean message naming the key, the value and what is allowed, under every entry point."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from train_helpers import TINY

from dinospec.config import CONFIG_RANGES, Config, ConfigError, load_config
from eval.config import EVAL_RANGES, EvalConfig, load_eval_config

NUMERIC = (int, float)
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def numeric_keys(schema: type, prefix: str = "") -> set[str]:
    """Dotted keys of every number or list of numbers in a dataclass schema (booleans and
    free-form `Any` selections excluded)."""
    keys = set()
    for f in dataclasses.fields(schema):
        kind = typing.get_type_hints(schema)[f.name]
        if dataclasses.is_dataclass(kind):
            keys |= numeric_keys(kind, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        if typing.get_origin(kind) is list:
            args = list(typing.get_args(kind))
        if all(a in NUMERIC for a in args):
            keys.add(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize(
    "schema, ranges", [(Config, CONFIG_RANGES), (EvalConfig, EVAL_RANGES)], ids=["train", "eval"]
)
def test_every_numeric_key_has_a_declared_range(schema, ranges):
    assert set(ranges) == numeric_keys(schema)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.base_lr=-0.1", "optim.base_lr=-0.1: must be in [0, inf)"),
        ("optim.weight_decay=-0.04", "optim.weight_decay=-0.04: must be in [0, inf)"),
        ("optim.weight_decay_end=-1", "optim.weight_decay_end=-1.0: must be in [0, inf)"),
        ("optim.clip_grad=-3", "optim.clip_grad=-3.0: must be in (0, inf)"),
        ("optim.clip_grad=0", "optim.clip_grad=0.0: must be in (0, inf)"),
        ("teacher.momentum_teacher=1.5", "teacher.momentum_teacher=1.5: must be in [0, 1]"),
        ("dino.head_n_prototypes=-1", "dino.head_n_prototypes=-1: must be in [1, inf)"),
        ("train.max_iterations=0", "train.max_iterations=0: must be in [1, inf) or null"),
        ("optim.base_lr=nan", "optim.base_lr=nan: must be in [0, inf)"),
        ("optim.adamw_beta2=1.0", "optim.adamw_beta2=1.0: must be in [0, 1)"),
        ("model.depth=0", "model.depth=0: must be in [1, inf)"),
        ("train.seed=-1", "train.seed=-1: must be in [0, 18446744073709551615]"),
        (
            "crops.local_crops_scale=[0.3,0.05]",
            "crops.local_crops_scale=[0.3, 0.05]: must be [low, high] with low <= high, both in",
        ),
    ],
)
def test_out_of_range_value_names_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match="invalid config") as info:
        load_config(None, [override])
    assert f"command line: {message}" in str(info.value)


def test_eval_values_are_checked_by_the_same_table():
    with pytest.raises(ConfigError, match=r"seg\.weight_decay=-1\.0: must be in \[0, inf\)"):
        load_eval_config(None, ["backbone.path=x", "seg.weight_decay=-1"])
    with pytest.raises(ConfigError, match=r"cls\.n_last_blocks=2: must be one of \[1, 4\]"):
        load_eval_config(None, ["backbone.path=x", "cls.n_last_blocks=2"])


def test_shipped_configs_load():
    """Sweep files are not configs; test_sweep validates each of their cells."""
    for path in sorted(CONFIG.parent.rglob("*.yaml")):
        if path.parent.name == "sweeps":
            continue
        if path.parent.name == "eval":
            load_eval_config(path, ["backbone.path=x"])
        else:
            load_config(path)


@pytest.mark.parametrize(
    "override", ["optim.base_lr=[1,", "optim.base_lr={a", "model.depth=a: b: c"]
)
def test_yaml_syntax_error_in_an_override_names_the_key(override):
    with pytest.raises(ConfigError, match=r"command line: (optim\.base_lr|model\.depth)="):
        load_config(None, [override])


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, check=False
    )


def test_out_of_range_value_through_the_cli():
    result = cli("dinospec.cli", "train", str(CONFIG), "teacher.momentum_teacher=1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "teacher.momentum_teacher=1.5: must be in [0, 1]" in result.stderr


def test_yaml_syntax_error_through_the_cli():
    result = cli("dinospec.cli", "train", str(CONFIG), "optim.base_lr=[1,")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "optim.base_lr='[1,'" in result.stderr


@pytest.mark.parametrize("layout", ["nothing", "empty"])
def test_missing_dataset_gives_one_message_under_every_entry_point(tmp_path, layout):
    missing = tmp_path / "imagenet"
    if layout == "empty":
        (missing / "train").mkdir(parents=True)
    what = "is empty" if layout == "empty" else "is not a directory"
    expected = f"data.path={missing}: {missing / 'train'} {what}"
    overrides = [*TINY, "data.dataset=imagenet", f"data.path={missing}"]
    overrides.append(f"train.output_dir={tmp_path / 'run'}")
    for entry in ("dinospec.cli", "launch.local"):
        result = cli(entry, "train", str(CONFIG), *overrides)
        assert result.returncode == 2, result.stderr
        assert "Traceback" not in result.stderr and expected in result.stderr
