"""Config files: any dataclass schema filled from YAML files that extend each other and
`a.b=value` overrides, remembering which source set each key so that every problem names
it; the training config loaded and checked that way, and written back as YAML."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinospec.config.checks import model_problems, training_problems
from dinospec.config.schema import Config, ModelConfig
from dinospec.config.values import ConfigError

EXTENDS_KEY = "extends"
Schema = TypeVar("Schema")


class Provenance:
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


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    """`key=value` overrides as one config. Each is parsed alone first, so that a value that
    is not valid YAML is reported with its key: the parser's own error names only a line and
    column of an anonymous string."""
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    for override in overrides:
        try:
            OmegaConf.from_dotlist([override])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            key, _, value = override.partition("=")
            reason = str(err).splitlines()[0]
            raise ConfigError(f"command line: {key}={value!r}: not valid YAML ({reason})") from err
    return OmegaConf.from_dotlist(list(overrides))


def load_schema(
    schema: type[Schema], path: str | Path | None, overrides: Sequence[str]
) -> tuple[Schema, Provenance]:
    """Any dataclass schema filled from a YAML file (and the files it extends) and
    `a.b=value` overrides, with the provenance of every key for validation messages."""
    sources = _read_yaml(Path(path).resolve(), ()) if path is not None else []
    if overrides:
        sources.append(("command line", _parse_overrides(overrides)))
    merged = OmegaConf.structured(schema)
    provenance = Provenance()
    for label, cfg in sources:
        try:
            merged = OmegaConf.merge(merged, cfg)
        except OmegaConfBaseException as err:
            value = OmegaConf.select(cfg, err.full_key, default=None)
            reason = str(err.msg).splitlines()[0]
            raise ConfigError(f"{label}: {err.full_key}={value!r}: {reason}") from err
        provenance.add(label, cfg)
    return OmegaConf.to_object(merged), provenance


def raise_problems(problems: list[tuple[str, Any, str]], provenance: Provenance, what: str) -> None:
    """One error listing every problem with the source that set the key."""
    if problems:
        lines = [f"{provenance.source_of(k)}: {k}={v!r}: {p}" for k, v, p in problems]
        raise ConfigError(f"invalid {what}:\n  " + "\n  ".join(lines))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (with the files it extends) and apply `a.b=value` overrides."""
    config, provenance = load_schema(Config, path, overrides)
    problems = [(f"model.{k}", v, p) for k, v, p in model_problems(config.model)]
    raise_problems(problems + training_problems(config), provenance, "config")
    return config


def load_model_config(path: str | Path) -> ModelConfig:
    """The `model` section of a config file, validated alone: a file that names an
    architecture (for reading weights) need not hold a trainable recipe around it."""
    config, provenance = load_schema(Config, path, ())
    problems = [(f"model.{k}", v, p) for k, v, p in model_problems(config.model)]
    raise_problems(problems, provenance, "model config")
    return config.model


def config_to_yaml(config: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))
