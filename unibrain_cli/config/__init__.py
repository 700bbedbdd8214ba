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
    dumps_toml,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_resolved,
    validate_model_config,
)

__all__ = [
    "DataConfig", "EvalConfig", "FlowConfig", "LLMConfig", "ModelConfig", "Recipe", "StageConfig",
    "TrainConfig", "VAEConfig", "ViTConfig", "RecipeError", "dumps_toml", "load_recipe",
    "recipe_from_dict", "recipe_to_dict", "save_resolved", "validate_model_config",
]
