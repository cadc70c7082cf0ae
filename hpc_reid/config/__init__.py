"""Typed experiment configuration: one YAML file per experiment, validated, with CLI overrides.

A config file is a YAML mapping of the sections of :class:`Config`; any key left out takes the
default shown in the schema. ``_base_: other.yaml`` (a path relative to the file) merges the file
onto another one, so method and data set variants state only what differs. ``--set a.b=c``
overrides one key; the value is read as YAML (``--set optimizer.lr=1e-3``, ``--set
schedule.milestones=[20,40]``) and then validated like the file. Every error names the key path,
the bad value and what is allowed.

The schema is a module per group of sections: ``data`` (data, sampler, loader), ``model``,
``loss``, ``training`` (optimizer, schedule, engine, logging, distributed), ``evaluation``, and
``schema`` (:class:`Config`, the whole experiment, and its checks across sections) on ``base``
(the section base class and :class:`ConfigError`); ``loading`` reads files and overrides.
Everything is importable from ``hpc_reid.config``.
"""

from hpc_reid.config.base import ConfigError, Section, did_you_mean
from hpc_reid.config.data import (
    SYNTHETIC,
    AugmentConfig,
    DataConfig,
    LoaderConfig,
    SamplerConfig,
    SyntheticConfig,
    TexturesConfig,
    ValidationConfig,
    VideoConfig,
)
from hpc_reid.config.evaluation import EvaluationConfig, RerankConfig, SpatialTemporalConfig
from hpc_reid.config.loading import (
    apply_override,
    build_config,
    config_with_overrides,
    load_config,
    read_yaml,
    save_resolved,
)
from hpc_reid.config.loss import (
    AnchorConfig,
    CenterConfig,
    CrossEntropyConfig,
    DecoderTripletConfig,
    LocalTripletConfig,
    LossConfig,
    MutualConfig,
    OsmConfig,
    PairIdConfig,
    PairTripletConfig,
    RankConsistencyConfig,
    SatisfiedRankConfig,
    TextureLossConfig,
    TripletConfig,
    VarianceConfig,
)
from hpc_reid.config.model import (
    BACKBONES,
    HEADS,
    CaceConfig,
    FGReIDConfig,
    LocalBranchConfig,
    ModelConfig,
    SanConfig,
    TemporalConfig,
)
from hpc_reid.config.schema import Config
from hpc_reid.config.training import (
    DistributedConfig,
    EngineConfig,
    LoggingConfig,
    LRScalingConfig,
    OptimizerConfig,
    ScheduleConfig,
)

__all__ = [
    "BACKBONES",
    "HEADS",
    "SYNTHETIC",
    "AnchorConfig",
    "AugmentConfig",
    "CaceConfig",
    "CenterConfig",
    "Config",
    "ConfigError",
    "CrossEntropyConfig",
    "DataConfig",
    "DecoderTripletConfig",
    "DistributedConfig",
    "EngineConfig",
    "EvaluationConfig",
    "FGReIDConfig",
    "LRScalingConfig",
    "LoaderConfig",
    "LocalBranchConfig",
    "LocalTripletConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "MutualConfig",
    "OptimizerConfig",
    "OsmConfig",
    "PairIdConfig",
    "PairTripletConfig",
    "RankConsistencyConfig",
    "RerankConfig",
    "SamplerConfig",
    "SanConfig",
    "SatisfiedRankConfig",
    "ScheduleConfig",
    "Section",
    "SpatialTemporalConfig",
    "SyntheticConfig",
    "TemporalConfig",
    "TextureLossConfig",
    "TexturesConfig",
    "TripletConfig",
    "ValidationConfig",
    "VarianceConfig",
    "VideoConfig",
    "apply_override",
    "build_config",
    "config_with_overrides",
    "did_you_mean",
    "load_config",
    "read_yaml",
    "save_resolved",
]
