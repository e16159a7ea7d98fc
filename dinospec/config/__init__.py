"""Structured configuration: the schema (`schema`), what its values may be (`checks`,
`values`) and the YAML files that fill it (`files`).

A typo in a key, a value of the wrong type, or a value that cannot work must fail at load
time with the key, the value and the file that set it. Everything a caller needs is
imported from here.
"""

from dinospec.config.checks import (
    CONFIG_RANGES,
    MODEL_RANGES,
    TRAINING_RANGES,
    compile_mode,
    data_path_problems,
    model_problems,
    resolve_blocks,
    training_problems,
)
from dinospec.config.files import (
    Provenance,
    config_to_yaml,
    load_config,
    load_model_config,
    load_schema,
    raise_problems,
)
from dinospec.config.schema import (
    BLOCK_SUBLAYERS,
    Config,
    CropsConfig,
    DataConfig,
    DinoConfig,
    DistillConfig,
    GramConfig,
    IbotConfig,
    ModelConfig,
    OptimConfig,
    SpecializeConfig,
    TeacherConfig,
    TrainConfig,
)
from dinospec.config.values import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Allowed,
    ConfigError,
    Each,
    OneOf,
    Range,
    range_problems,
)

__all__ = [
    "BLOCK_SUBLAYERS",
    "CONFIG_RANGES",
    "COUNT",
    "MODEL_RANGES",
    "NON_NEGATIVE",
    "POSITIVE",
    "SEED",
    "TRAINING_RANGES",
    "Allowed",
    "Config",
    "ConfigError",
    "CropsConfig",
    "DataConfig",
    "DinoConfig",
    "DistillConfig",
    "Each",
    "GramConfig",
    "IbotConfig",
    "ModelConfig",
    "OneOf",
    "OptimConfig",
    "Provenance",
    "Range",
    "SpecializeConfig",
    "TeacherConfig",
    "TrainConfig",
    "compile_mode",
    "config_to_yaml",
    "data_path_problems",
    "load_config",
    "load_model_config",
    "load_schema",
    "model_problems",
    "raise_problems",
    "range_problems",
    "resolve_blocks",
    "training_problems",
]
