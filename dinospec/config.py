"""Structured configuration: dataclass schema, YAML files that extend each other, overrides.

A typo in a key, a value of the wrong type, or a value that cannot work (embed_dim not
divisible by num_heads, a block index past the depth) must fail at load time with the key,
the value and the file that set it, not hours later on a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

EXTENDS_KEY = "extends"
FFN_LAYERS = ("mlp", "swiglu", "swiglufused")
ATTN_BACKENDS = ("sdpa", "xformers")
PREFIX_TOKENS = ("cls+registers", "cls")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the source, key and value."""


@dataclass
class SpecializeConfig:
    """Which sublayers give prefix tokens their own parameters, and in which blocks.

    Each `*_blocks` value selects blocks: "all", "none", a fraction of the depth counted
    from the input (float in [0, 1], e.g. 0.3333 for the first third), a count from the
    input (int), or an explicit list of block indices.
    """

    tokens: str = "cls+registers"
    norm1_blocks: Any = "none"
    qkv_blocks: Any = "none"
    proj_blocks: Any = "none"
    norm2_blocks: Any = "none"
    ffn_in_blocks: Any = "none"
    ffn_out_blocks: Any = "none"
    final_norm: bool = False


@dataclass
class ModelConfig:
    """DINOv2 backbone arguments plus the specialization; names match DINOv2's constructor."""

    img_size: int = 224
    patch_size: int = 14
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    ffn_layer: str = "mlp"
    drop_path_rate: float = 0.0
    drop_path_uniform: bool = False
    init_values: float | None = 1.0e-5
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attn_backend: str = "sdpa"
    specialize: SpecializeConfig = field(default_factory=SpecializeConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)


def resolve_blocks(value: Any, depth: int) -> list[int]:
    """Turn a block selection (see SpecializeConfig) into sorted block indices.

    Raises ValueError describing the problem; callers add the key and the source.
    """
    if value is None or value == "none":
        return []
    if value == "all":
        return list(range(depth))
    if isinstance(value, bool):
        raise ValueError("a boolean is ambiguous; use 'all' or 'none'")
    if isinstance(value, int):
        if not 0 <= value <= depth:
            raise ValueError(f"block count must be in [0, depth={depth}]")
        return list(range(value))
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError("a fraction of the depth must be in [0, 1]")
        return list(range(math.floor(value * depth + 0.5)))
    if isinstance(value, (list, tuple, ListConfig)):
        indices = list(value)
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in indices if i not in bad and not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} are not in [0, {depth - 1}]")
        if len(set(indices)) != len(indices):
            raise ValueError("repeated block index")
        return sorted(indices)
    raise ValueError(
        "expected 'all', 'none', a fraction in [0, 1], a block count, or a list of block indices"
    )


class _Provenance:
    """Remembers which source (file or command line) set each key last."""

    def __init__(self) -> None:
        self._sources: list[tuple[str, set[str]]] = []

    def add(self, label: str, cfg: DictConfig) -> None:
        self._sources.append((label, set(_flat_keys(cfg))))

    def source_of(self, key: str) -> str:
        for label, keys in reversed(self._sources):
            if key in keys:
                return label
        return "defaults of the schema"


def _flat_keys(cfg: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(cfg, DictConfig):
        for k, v in cfg.items_ex(resolve=False):
            full = f"{prefix}{k}"
            yield full
            yield from _flat_keys(v, f"{full}.")


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> list[tuple[str, DictConfig]]:
    """Read a file and, first, every file it extends (depth first, in order)."""
    if not path.is_file():
        origin = f" (extended from {chain[-1]})" if chain else ""
        raise ConfigError(f"config file not found: {path}{origin}")
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"config files extend each other in a cycle: {cycle}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    parents = raw.pop(EXTENDS_KEY, [])
    parents = [parents] if isinstance(parents, str) else parents
    sources: list[tuple[str, DictConfig]] = []
    for parent in parents:
        sources += _read_yaml((path.parent / parent).resolve(), (*chain, path))
    sources.append((str(path), OmegaConf.create(raw)))
    return sources


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with the files it extends) and apply `a.b=value` overrides."""
    sources = _read_yaml(Path(path).resolve(), ()) if path is not None else []
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
        sources.append(("command line", OmegaConf.from_dotlist(list(overrides))))
    merged = OmegaConf.structured(Config)
    provenance = _Provenance()
    for label, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as err:
            value = OmegaConf.select(cfg, err.full_key, default=None)
            reason = str(err.msg).splitlines()[0]
            raise ConfigError(f"{label}: {err.full_key}={value!r}: {reason}") from err
        provenance.add(label, cfg)
    config: Config = OmegaConf.to_object(merged)
    _validate(config, provenance)
    return config


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def _validate(config: Config, provenance: _Provenance) -> None:
    problems = [(f"model.{k}", v, p) for k, v, p in model_problems(config.model)]
    if problems:
        lines = [f"{provenance.source_of(k)}: {k}={v!r}: {p}" for k, v, p in problems]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines))


def model_problems(m: ModelConfig) -> list[tuple[str, Any, str]]:
    """Every impossible value of a model config, as (key, value, what is wrong)."""
    out: list[tuple[str, Any, str]] = []
    positive = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")
    out += [(k, getattr(m, k), "must be > 0") for k in positive if getattr(m, k) <= 0]
    if m.num_heads > 0 and m.embed_dim % m.num_heads:
        out.append(("num_heads", m.num_heads, f"must divide embed_dim={m.embed_dim}"))
    if m.patch_size > 0 and m.img_size % m.patch_size:
        out.append(("img_size", m.img_size, f"must be a multiple of patch_size={m.patch_size}"))
    if m.mlp_ratio <= 0:
        out.append(("mlp_ratio", m.mlp_ratio, "must be > 0"))
    if m.ffn_layer not in FFN_LAYERS:
        out.append(("ffn_layer", m.ffn_layer, f"must be one of {list(FFN_LAYERS)}"))
    if m.attn_backend not in ATTN_BACKENDS:
        out.append(("attn_backend", m.attn_backend, f"must be one of {list(ATTN_BACKENDS)}"))
    if m.num_register_tokens < 0:
        out.append(("num_register_tokens", m.num_register_tokens, "must be >= 0"))
    if not 0.0 <= m.drop_path_rate < 1.0:
        out.append(("drop_path_rate", m.drop_path_rate, "must be in [0, 1)"))
    if m.init_values is not None and m.init_values <= 0:
        out.append(("init_values", m.init_values, "must be > 0, or null for no LayerScale"))
    if m.interpolate_offset < 0:
        out.append(("interpolate_offset", m.interpolate_offset, "must be >= 0"))
    if m.specialize.tokens not in PREFIX_TOKENS:
        out.append(("specialize.tokens", m.specialize.tokens, f"must be one of {PREFIX_TOKENS}"))
    for name in ("norm1", "qkv", "proj", "norm2", "ffn_in", "ffn_out"):
        key = f"{name}_blocks"
        value = getattr(m.specialize, key)
        try:
            resolve_blocks(value, max(m.depth, 0))
        except ValueError as err:
            out.append((f"specialize.{key}", value, f"{err} (depth={m.depth})"))
    return out
