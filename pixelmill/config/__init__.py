"""Typed flow configs: loaded from YAML, overridden from the CLI, validated before work starts.

One module per flow (``edit``, ``retrieve``, ``pairs``, ``campaign``, ``video``,
``pipeline``) on a shared base (``base``: strict models, loading, ``placement``,
``plugins``). Methods are not listed here: configs look them up in ``pixelmill.registry``.
"""

from __future__ import annotations

from pixelmill.config.base import (
    ConfigError,
    FlowConfig,
    Placement,
    RuntimeConfig,
    StageTimeouts,
    StallTimeouts,
    StrictModel,
    apply_overrides,
    format_validation_error,
    load_config,
    parse_override,
    read_yaml,
    validate,
)
from pixelmill.config.campaign import (
    PLACEMENT_SETTINGS,
    CampaignConfig,
    Concept,
    EvalSettings,
    ExpandedJob,
    GridConfig,
    JobConfig,
    TrainSettings,
    method_settings,
    train_method,
)
from pixelmill.config.edit import (
    AdapterSpec,
    EditConfig,
    EditSettings,
    EditSpeed,
    VideoEditSettings,
    adapters_affecting,
)
from pixelmill.config.pairs import InstructionSettings, PairRenderSettings, PairsConfig
from pixelmill.config.retrieve import DownloadSettings, RetrievalFilters, RetrieveConfig
from pixelmill.config.video import NEURAL_PLACEMENT_SETTINGS, NeuralAtlasConfig, VideoAtlasSettings, VideoConfig

__all__ = [
    "PLACEMENT_SETTINGS", "NEURAL_PLACEMENT_SETTINGS", "AdapterSpec", "CampaignConfig", "Concept", "ConfigError",
    "DownloadSettings", "EditConfig", "EditSettings", "EditSpeed", "EvalSettings", "ExpandedJob", "FlowConfig",
    "GridConfig", "InstructionSettings", "JobConfig", "NeuralAtlasConfig", "PairRenderSettings", "PairsConfig",
    "Placement", "RetrievalFilters", "RetrieveConfig", "RuntimeConfig", "StageTimeouts", "StallTimeouts", "StrictModel",
    "TrainSettings", "VideoAtlasSettings",
    "VideoConfig", "VideoEditSettings", "adapters_affecting", "apply_overrides", "format_validation_error",
    "load_config", "method_settings", "parse_override", "read_yaml", "train_method", "validate",
]
