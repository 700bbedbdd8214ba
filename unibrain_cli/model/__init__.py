"""The BAGEL-architecture model: MoT decoder, ViT, VAE, embeddings, attention, KV cache, checkpoints.

Main entry points (import from the submodules for the rest):

- :class:`~unibrain_cli.model.bagel.UniBrainModel` and :class:`~unibrain_cli.model.bagel.ModelOutput`;
- :class:`~unibrain_cli.model.packing.SequenceBuilder` / :class:`~unibrain_cli.model.packing.PackedSequence`;
- :class:`~unibrain_cli.model.kv_cache.KVCache`;
- :func:`~unibrain_cli.model.checkpoint.save_pretrained`, :func:`~unibrain_cli.model.checkpoint.from_pretrained`,
  :func:`~unibrain_cli.model.checkpoint.load_bagel_folder`, :func:`~unibrain_cli.model.checkpoint.build_model`;
- :func:`~unibrain_cli.model.flops.count_parameters`, :func:`~unibrain_cli.model.flops.flops_per_token`.
"""

from unibrain_cli.model.bagel import ModelOutput, UniBrainModel, validate_model_config
from unibrain_cli.model.checkpoint import (
    CheckpointError,
    Pretrained,
    build_model,
    from_pretrained,
    load_bagel_folder,
    save_pretrained,
)
from unibrain_cli.model.flops import count_parameters, flops_per_token
from unibrain_cli.model.kv_cache import KVCache
from unibrain_cli.model.packing import PackedSequence, SequenceBuilder, TokenType

__all__ = [
    "CheckpointError",
    "KVCache",
    "ModelOutput",
    "PackedSequence",
    "Pretrained",
    "SequenceBuilder",
    "TokenType",
    "UniBrainModel",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "from_pretrained",
    "load_bagel_folder",
    "save_pretrained",
    "validate_model_config",
]
