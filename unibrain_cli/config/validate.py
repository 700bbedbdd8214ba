"""Cross-field checks of the model config, shared by recipe loading and model construction.

Each check raises ValueError naming the offending field (with a ``prefix`` such as ``model.``).
"""

from __future__ import annotations

from typing import get_args

from unibrain_cli.config.components import AttentionBackend, LLMConfig, ModelConfig

#: Attention backends a config may name (``dense`` is the reference used in tests).
CONFIG_BACKENDS: tuple[str, ...] = (*get_args(AttentionBackend), "dense")


def validate_llm_config(cfg: LLMConfig, prefix: str = "llm.") -> None:
    """Raise ValueError naming the field when the decoder shape is inconsistent."""
    if cfg.num_heads <= 0 or cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"{prefix}num_heads={cfg.num_heads} does not divide {prefix}hidden_size={cfg.hidden_size}")
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(
            f"{prefix}head_dim={cfg.head_dim} x {prefix}num_heads={cfg.num_heads} != {prefix}hidden_size={cfg.hidden_size}"
        )
    if cfg.num_kv_heads <= 0 or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"{prefix}num_kv_heads={cfg.num_kv_heads} does not divide {prefix}num_heads={cfg.num_heads}")
    if cfg.head_dim % 2:
        raise ValueError(f"{prefix}head_dim={cfg.head_dim} must be even for rotary embeddings")
    for name in ("intermediate_size", "num_layers", "vocab_size"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{prefix}{name} must be positive, got {getattr(cfg, name)}")


def validate_model_config(cfg: ModelConfig, prefix: str = "") -> None:
    """Raise ValueError naming the offending field when the model cannot be built from ``cfg``."""
    p = prefix
    validate_llm_config(cfg.llm, prefix=f"{p}llm.")
    if cfg.llm.hidden_size % 4:
        raise ValueError(f"{p}llm.hidden_size={cfg.llm.hidden_size} must be divisible by 4 (2D sin-cos tables)")
    if cfg.vit.num_heads <= 0 or cfg.vit.hidden_size % cfg.vit.num_heads:
        raise ValueError(f"{p}vit.num_heads={cfg.vit.num_heads} does not divide {p}vit.hidden_size={cfg.vit.hidden_size}")
    if any(w <= 0 for w in cfg.vit.stem_widths):
        raise ValueError(f"{p}vit.stem_widths={list(cfg.vit.stem_widths)} must all be positive")
    if cfg.vit.patch_size % 2 ** len(cfg.vit.stem_widths):
        raise ValueError(f"{p}vit.patch_size={cfg.vit.patch_size} must be a multiple of 2 ** len({p}vit.stem_widths) = "
                         f"{2 ** len(cfg.vit.stem_widths)} (one stride-2 convolution per stem entry)")
    if cfg.vit.max_patches_per_side != cfg.vit_max_num_patch_per_side:
        raise ValueError(
            f"{p}vit_max_num_patch_per_side={cfg.vit_max_num_patch_per_side} must equal "
            f"{p}vit.max_patches_per_side={cfg.vit.max_patches_per_side} (ViT tokens share one position id)"
        )
    if cfg.latent_patch_size <= 0 or cfg.max_latent_size <= 0:
        raise ValueError(f"{p}latent_patch_size and {p}max_latent_size must be positive")
    grid = cfg.vae.resolution // cfg.vae.downsample // cfg.latent_patch_size
    if grid > cfg.max_latent_size:
        raise ValueError(
            f"{p}max_latent_size={cfg.max_latent_size} is smaller than the latent grid {grid} of "
            f"{p}vae.resolution={cfg.vae.resolution} (downsample {cfg.vae.downsample}, latent_patch_size "
            f"{cfg.latent_patch_size})"
        )
    if cfg.timestep_freq_dim <= 0 or cfg.timestep_freq_dim % 2:
        raise ValueError(f"{p}timestep_freq_dim={cfg.timestep_freq_dim} must be a positive even number")
    if cfg.image_rope not in ("1d", "2d"):
        raise ValueError(f"{p}image_rope={cfg.image_rope!r} must be '1d' (BAGEL) or '2d'")
    if cfg.fused_view not in ("off", "on"):
        raise ValueError(f"{p}fused_view={cfg.fused_view!r} must be 'off' (BAGEL) or 'on'")
    if cfg.aligned_context not in ("off", "on"):
        raise ValueError(f"{p}aligned_context={cfg.aligned_context!r} must be 'off' (BAGEL) or 'on'")
    if cfg.aligned_window < 1 or cfg.aligned_window % 2 == 0:
        raise ValueError(f"{p}aligned_window={cfg.aligned_window} must be a positive odd number")
    if not cfg.aligned_gain > 0:
        raise ValueError(f"{p}aligned_gain={cfg.aligned_gain} must be > 0 (1: the plain projection)")
    if cfg.aligned_draft < 0:
        raise ValueError(f"{p}aligned_draft={cfg.aligned_draft} must be >= 0 (0: no draft network)")
    if cfg.aligned_draft and (cfg.aligned_context != "on" or cfg.aligned_window != 1):
        raise ValueError(f"{p}aligned_draft={cfg.aligned_draft} needs {p}aligned_context='on' and "
                         f"{p}aligned_window=1")
    if cfg.aligned_draft_resolution not in ("tokens", "latent"):
        raise ValueError(f"{p}aligned_draft_resolution={cfg.aligned_draft_resolution!r} must be 'tokens' or 'latent'")
    if cfg.aligned_draft_resolution == "latent" and cfg.aligned_draft % (cfg.latent_patch_size ** 2):
        raise ValueError(f"{p}aligned_draft={cfg.aligned_draft} must be a multiple of {p}latent_patch_size^2 = "
                         f"{cfg.latent_patch_size ** 2} with {p}aligned_draft_resolution='latent'")
    if cfg.draft_residual and not cfg.aligned_draft:
        raise ValueError(f"{p}draft_residual=true needs a draft network: set {p}aligned_draft > 0")
    if cfg.image_rope == "2d" and cfg.llm.head_dim < 16:
        raise ValueError(f"{p}image_rope='2d' needs llm.head_dim >= 16, got {cfg.llm.head_dim}")
    if cfg.attention_backend not in CONFIG_BACKENDS:
        raise ValueError(f"{p}attention_backend={cfg.attention_backend!r} is not one of {CONFIG_BACKENDS}")
