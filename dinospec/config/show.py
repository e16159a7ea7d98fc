"""`dinospec config show`: the resolved config, one key a line with its value, its default,
the source that set it and what it means (dinospec.config.docs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dinospec.config.docs import KEY_DOCS, SECTION_DOCS
from dinospec.config.files import load_config, load_schema
from dinospec.config.schema import Config
from dinospec.nested import flatten


def flat_config(config: Config) -> dict[str, Any]:
    return dict(flatten(OmegaConf.to_container(OmegaConf.structured(config))))


def _text(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def describe_config(path: str | Path | None, overrides: Sequence[str]) -> list[str]:
    """The lines `config show` prints: per section a heading, then per key
    `key = value  # doc [default X, set by SOURCE]` (source and default only where the
    value is not the schema's). The config is validated first, as training would."""
    config = load_config(path, overrides)
    _, provenance = load_schema(Config, path, overrides)
    defaults = flat_config(Config())
    lines: list[str] = []
    section = None
    for key, value in flat_config(config).items():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += ["" if lines else None, f"# {top}: {SECTION_DOCS.get(top, '')}"]
        note = f"  # {KEY_DOCS.get(key, '(no description)')}"
        if value != defaults[key]:
            note += f" [default {_text(defaults[key])}, set by {provenance.source_of(key)}]"
        lines.append(f"{key} = {_text(value)}{note}")
    return [line for line in lines if line is not None]
