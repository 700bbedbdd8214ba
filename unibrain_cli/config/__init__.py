"""Component configs and strict recipe loading."""

from unibrain_cli.config.components import (
    DataConfig,
    EvalConfig,
    FlowConfig,
    LLMConfig,
    ModelConfig,
    Recipe,
    StageConfig,
    TrainConfig,
    VAEConfig,
    ViTConfig,
)
from unibrain_cli.config.loader import (
    RecipeError,
    config_from_dict,
    dumps_toml,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_resolved,
)
from unibrain_cli.config.validate import validate_llm_config, validate_model_config

__all__ = [
    "DataConfig", "EvalConfig", "FlowConfig", "LLMConfig", "ModelConfig", "Recipe", "StageConfig",
    "TrainConfig", "VAEConfig", "ViTConfig", "RecipeError", "dumps_toml", "load_recipe",
    "recipe_from_dict", "config_from_dict", "validate_llm_config", "recipe_to_dict", "save_resolved", "validate_model_config",
]
