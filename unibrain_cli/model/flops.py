"""Parameter counts and FLOP estimates of the unified model.

FLOPs per token (the usual transformer estimate, as in PaLM / nanochat):

    forward  = 2 N_active + 4 L (Hq D) T
    training = 3 x forward = 6 N_active + 12 L (Hq D) T

- ``N_active``: weights one token multiplies through: ONE expert's decoder layers (a token is
  routed to exactly one expert, so MoT doubles parameters but not per-token compute) plus the
  LM head (``include_lm_head``; strictly only text positions whose logits are computed need it).
  Embedding lookups, norms' elementwise work, the ViT and the VAE are excluded.
- ``4 L (Hq D) T``: scores ``Q K^T`` and the weighted sum ``A V`` (2 FLOPs per multiply-add)
  over T attended keys per query, in L layers. For a causal sequence of length S use
  T ~ S / 2; for packed samples T is the mean context per token, not the pack length.
"""

from __future__ import annotations

import torch
from torch import nn

from unibrain_cli.config.components import ModelConfig

TABLE_BUFFERS = ("latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed")


def _meta_model(cfg: ModelConfig) -> nn.Module:
    from unibrain_cli.model.bagel import UniBrainModel

    with torch.device("meta"):
        return UniBrainModel(cfg)


def count_parameters(model_or_cfg: nn.Module | ModelConfig, include_tables: bool = False, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once).

    Args:
        model_or_cfg: a model, or a config (built on the meta device, no memory).
        include_tables: add the two fixed 2D sin-cos position tables (BAGEL stores them in its
            checkpoint; the ``bagel-7b`` total is then 14,607,260,128).
        trainable_only: only parameters with ``requires_grad``.
    """
    model = _meta_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    if include_tables:
        buffers = dict(model.named_buffers())
        total += sum(buffers[name].numel() for name in TABLE_BUFFERS if name in buffers)
    return total


def parameter_breakdown(model_or_cfg: nn.Module | ModelConfig) -> dict[str, int]:
    """Parameters by part: ``embed+lm_head``, ``llm-und-expert`` (layers + ``norm``),
    ``gen-expert`` (``*_moe_gen``), ``bridges`` (connector, vae2llm, llm2vae, time embedder and
    the two position tables) and ``vit`` — the grouping of ``bagel-7b-mot-keys.tsv``."""
    model = _meta_model(model_or_cfg) if isinstance(model_or_cfg, ModelConfig) else model_or_cfg
    parts = {"embed+lm_head": 0, "llm-und-expert": 0, "gen-expert": 0, "bridges": 0, "vit": 0}
    named = dict(model.named_parameters(remove_duplicate=True))
    named.update({k: v for k, v in model.named_buffers() if k in TABLE_BUFFERS})
    for name, t in named.items():
        if name.startswith("vit_model."):
            parts["vit"] += t.numel()
        elif name.startswith(("language_model.model.embed_tokens", "language_model.lm_head")):
            parts["embed+lm_head"] += t.numel()
        elif name.startswith("language_model."):
            parts["gen-expert" if "_moe_gen" in name else "llm-und-expert"] += t.numel()
        else:
            parts["bridges"] += t.numel()
    return parts


def active_parameters(cfg: ModelConfig, include_lm_head: bool = True) -> int:
    """Matmul weights one decoder token passes through (one expert + optionally the LM head)."""
    llm = cfg.llm
    q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    attn = llm.hidden_size * (q + 2 * kv) + q * llm.hidden_size
    mlp = 3 * llm.hidden_size * llm.intermediate_size
    return llm.num_layers * (attn + mlp) + (llm.hidden_size * llm.vocab_size if include_lm_head else 0)


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True, include_lm_head: bool = True) -> int:
    """Estimated FLOPs per decoder token (see the module docstring).

    Args:
        cfg: model config.
        seq_len: T, keys attended per query (mean context length).
        training: forward + backward (x3) instead of forward only.
        include_lm_head: count the LM head matmul for every token.
    """
    if seq_len < 0:
        raise ValueError(f"seq_len must be >= 0, got {seq_len}")
    llm = cfg.llm
    forward = 2 * active_parameters(cfg, include_lm_head) + 4 * llm.num_layers * llm.num_heads * llm.head_dim * seq_len
    return 3 * forward if training else forward
