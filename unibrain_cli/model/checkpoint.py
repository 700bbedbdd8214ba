"""Model folders: our own format, and BAGEL-7B-MoT folders. Safetensors + JSON only, never pickle.

Our format (:func:`save_pretrained` / :func:`from_pretrained`), one folder::

    model.safetensors   UniBrainModel state dict (recomputed tables excluded; a tied lm_head not duplicated)
    config.json         {"format": "unibrain", "version": 1, "model": <ModelConfig>, "extra": {...}}
    ae.safetensors      the autoencoder (optional; its config is ModelConfig.vae)
    tokenizer.json      the text tokenizer (optional)

A BAGEL-7B-MoT folder (:func:`load_bagel_folder`) holds ``ema.safetensors`` (the unified model
by BAGEL's key names, which are ours), ``ae.safetensors`` (FLUX autoencoder), ``llm_config.json``
(Qwen2), ``vit_config.json`` (SigLIP) and the Qwen2 tokenizer files. Every key of the model
must be found and nothing may be left over (the two fixed position tables BAGEL stores,
``latent_pos_embed.pos_embed`` and ``vit_pos_embed.pos_embed``, are ignored and recomputed).

Big models are built on the meta device (no memory, no init) and receive the loaded tensors
directly (``load_state_dict(assign=True)``), so a 14B checkpoint is held in memory once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from unibrain_cli.config.components import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from unibrain_cli.config.loader import RecipeError, config_from_dict
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.vae import AutoEncoder

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
VAE_FILE = "ae.safetensors"
TOKENIZER_FILE = "tokenizer.json"
BAGEL_WEIGHTS = "ema.safetensors"
BAGEL_LLM_CONFIG = "llm_config.json"
BAGEL_VIT_CONFIG = "vit_config.json"
FORMAT_VERSION = 1

#: Fixed 2D sin-cos tables that BAGEL checkpoints store; we recompute them instead of loading.
RECOMPUTED_KEYS: frozenset[str] = frozenset({"latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed"})
TIED_HEAD_KEY = "language_model.lm_head.weight"

#: The FLUX autoencoder of BAGEL-7B-MoT (its folder carries no VAE config).
FLUX_VAE = VAEConfig(
    in_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16,
    scale_factor=0.3611, shift_factor=0.1159, resolution=256,
)


class CheckpointError(UserError):
    """A model folder that cannot be loaded (missing file, wrong keys or shapes, bad config)."""


class SavableTokenizer(Protocol):
    """Anything with ``save(directory)`` writing ``directory/tokenizer.json`` (``data.tokenizer.TextTokenizer``)."""

    def save(self, directory: str | os.PathLike[str]) -> Any: ...


@dataclass
class Pretrained:
    """What a model folder holds.

    Attributes:
        model: the unified model (eval mode).
        vae: the autoencoder, or None when the folder has none or it was not requested.
        config: the model config.
        extra: extra JSON saved with the model (``extra_config``; BAGEL: the two raw json configs).
        tokenizer_dir: folder holding ``tokenizer.json`` (load it with ``TextTokenizer.load``), or None.
        path: the folder.
    """

    model: UniBrainModel
    vae: AutoEncoder | None
    config: ModelConfig
    extra: dict[str, Any] = field(default_factory=dict)
    tokenizer_dir: Path | None = None
    path: Path | None = None


# ---------------------------------------------------------------------------------------------
# config <-> JSON
# ---------------------------------------------------------------------------------------------


def config_to_dict(cfg: Any) -> Any:
    """Plain JSON-able nested dict of a config dataclass (tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    return cfg


def model_config_from_dict(data: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Strictly rebuild a :class:`ModelConfig` (an unknown key or wrong type names its path and ``source``)."""
    return config_from_dict(ModelConfig, data, source, prefix="model")


# ---------------------------------------------------------------------------------------------
# building and materialising
# ---------------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> UniBrainModel:
    """Build a freshly initialised model; ``device="meta"`` builds shapes only (no memory)."""
    with torch.device(device):
        model = UniBrainModel(cfg)
    if dtype is not None and str(device) != "meta":
        model = model.to(dtype)
    return model


def _materialize_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Give every meta buffer real storage on ``device``, then recompute the tables."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
    typing.cast(UniBrainModel, model).reset_buffers()


def load_into_meta_model(
    cfg: ModelConfig,
    state: dict[str, Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    where: str | None = None,
) -> UniBrainModel:
    """Build on the meta device and assign ``state`` (checked: no missing/extra keys, equal shapes)."""
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    state = dict(state)
    if cfg.llm.tie_word_embeddings and TIED_HEAD_KEY not in state and "language_model.model.embed_tokens.weight" in state:
        state[TIED_HEAD_KEY] = state["language_model.model.embed_tokens.weight"]
    check_state_keys(expected, {k: tuple(v.shape) for k, v in state.items()}, where=where)
    state = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.llm.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    _materialize_buffers(model, device)
    return model.eval()


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


def check_state_keys(
    expected: dict[str, Tensor], found: dict[str, tuple[int, ...]], where: str | None = None
) -> None:
    """Raise :class:`CheckpointError` listing missing keys, extra keys and shape mismatches."""
    missing = set(expected) - set(found)
    extra = set(found) - set(expected)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected key(s): {_listing(extra)}")
    bad = [
        f"{k} {list(found[k])} != {list(expected[k].shape)}"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k]) != tuple(expected[k].shape)
    ]
    if bad:
        problems.append(f"{len(bad)} shape mismatch(es): {_listing(bad)}")
    if problems:
        raise CheckpointError("weights do not match the model: " + "; ".join(problems), where=where)


# ---------------------------------------------------------------------------------------------
# our format
# ---------------------------------------------------------------------------------------------


def _state_for_saving(model: nn.Module, drop: Iterable[str] = ()) -> dict[str, Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in set(drop)}
    return state


def save_pretrained(
    model: UniBrainModel,
    directory: str | os.PathLike[str],
    tokenizer: SavableTokenizer | None = None,
    vae: AutoEncoder | None = None,
    extra_config: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a model folder atomically (temp dir + rename); returns its path.

    Args:
        model: the unified model.
        directory: target folder (replaced when ``overwrite``).
        tokenizer: optional, saved as ``tokenizer.json`` through its ``save(dir)``.
        vae: optional autoencoder, saved as ``ae.safetensors`` (config: ``model.config.vae``).
        extra_config: JSON-able dict stored under ``"extra"`` in ``config.json``.
    """
    directory = Path(directory)
    cfg = model.config
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        drop = [TIED_HEAD_KEY] if cfg.llm.tie_word_embeddings else []
        save_file(_state_for_saving(model, drop), str(tmp / MODEL_FILE), metadata={"format": "pt"})
        meta = {"format": "unibrain", "version": FORMAT_VERSION, "model": config_to_dict(cfg), "extra": extra_config or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if vae is not None:
            if config_to_dict(vae.config) != config_to_dict(cfg.vae):
                raise ValueError("the autoencoder's config differs from model.config.vae; save a matching pair")
            save_file(_state_for_saving(vae), str(tmp / VAE_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name}; is this a model folder?", where=str(path.parent))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}", where=str(path)) from exc
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", where=str(path))
    return data


def read_safetensors(path: Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """All tensors of a safetensors file (CheckpointError if absent or unreadable)."""
    if not path.is_file():
        raise CheckpointError(f"missing {path.name}", where=str(path.parent))
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read weights ({exc}); the file is corrupt or not safetensors", where=str(path)) from exc


def load_vae(path: Path, cfg: VAEConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> AutoEncoder:
    """Load an ``ae.safetensors`` into an :class:`AutoEncoder` of ``cfg`` (keys and shapes checked)."""
    state = read_safetensors(path, device)
    with torch.device("meta"):
        vae = AutoEncoder(cfg)
    check_state_keys(vae.state_dict(), {k: tuple(v.shape) for k, v in state.items()}, where=str(path))
    state = {k: v.to(dtype=dtype or v.dtype) for k, v in state.items()}
    vae.load_state_dict(state, strict=True, assign=True)
    for module in vae.modules():  # any non-persistent buffer
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                raise CheckpointError(f"autoencoder buffer {name} is not stored in {path.name}", where=str(path))
    return vae.eval()


def from_pretrained(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load_autoencoder: bool = True,
) -> Pretrained:
    """Load a folder written by :func:`save_pretrained` (or a BAGEL-7B-MoT folder, detected by its files)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError("not a folder; pass a model folder", where=str(directory))
    if (directory / BAGEL_WEIGHTS).is_file() and not (directory / MODEL_FILE).is_file():
        return load_bagel_folder(directory, device=device, dtype=dtype, load_autoencoder=load_autoencoder)
    meta = _read_json(directory / CONFIG_FILE)
    if meta.get("format") != "unibrain" or "model" not in meta:
        raise CheckpointError("config.json is not a UniBrain model config", where=str(directory / CONFIG_FILE))
    try:
        cfg = model_config_from_dict(meta["model"], str(directory / CONFIG_FILE))
    except RecipeError as exc:
        raise CheckpointError(f"bad model config: {exc.message}", where=str(directory / CONFIG_FILE)) from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"bad model config: {exc}", where=str(directory / CONFIG_FILE)) from exc
    state = read_safetensors(directory / MODEL_FILE)
    model = load_into_meta_model(cfg, state, device, dtype, where=str(directory / MODEL_FILE))
    vae = None
    if load_autoencoder and (directory / VAE_FILE).is_file():
        vae = load_vae(directory / VAE_FILE, cfg.vae, device, dtype)
    tok = directory if (directory / TOKENIZER_FILE).is_file() else None
    return Pretrained(model, vae, cfg, dict(meta.get("extra", {})), tok, directory)


# ---------------------------------------------------------------------------------------------
# BAGEL-7B-MoT folders
# ---------------------------------------------------------------------------------------------


def bagel_model_config(llm: dict[str, Any], vit: dict[str, Any], vae: VAEConfig = FLUX_VAE, **model_fields: Any) -> ModelConfig:
    """ModelConfig of a BAGEL folder from its ``llm_config.json`` (Qwen2) and ``vit_config.json`` (SigLIP).

    BAGEL's conventions: q/k norm on, untied head unless the json says tied; the ViT is built
    with ``num_hidden_layers - 1`` layers (BAGEL's ``vit_select_layer = -2`` drops the last one,
    and the checkpoint holds that many); latent patch 2, latent table 64, ViT tables
    ``image_size / patch_size`` per side (70). ``model_fields`` override ModelConfig fields.
    """
    try:
        heads = int(llm["num_attention_heads"])
        hidden = int(llm["hidden_size"])
        llm_cfg = LLMConfig(
            hidden_size=hidden,
            intermediate_size=int(llm["intermediate_size"]),
            num_layers=int(llm["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(llm.get("num_key_value_heads", heads)),
            head_dim=int(llm.get("head_dim") or hidden // heads),
            rms_norm_eps=float(llm.get("rms_norm_eps", 1e-6)),
            rope_theta=float(llm.get("rope_theta", 10_000.0)),
            vocab_size=int(llm["vocab_size"]),
            qk_norm=bool(llm.get("qk_norm", True)),
            tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        )
        side = int(vit.get("image_size", 980)) // int(vit["patch_size"])
        vit_cfg = ViTConfig(
            patch_size=int(vit["patch_size"]),
            hidden_size=int(vit["hidden_size"]),
            intermediate_size=int(vit["intermediate_size"]),
            num_layers=int(vit["num_hidden_layers"]) - 1,
            num_heads=int(vit["num_attention_heads"]),
            num_channels=int(vit.get("num_channels", 3)),
            layer_norm_eps=float(vit.get("layer_norm_eps", 1e-6)),
            max_patches_per_side=side,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"llm_config.json / vit_config.json lack a field or hold a bad value: {exc}") from exc
    fields = {"latent_patch_size": 2, "max_latent_size": 64, "vit_max_num_patch_per_side": side, "tokenizer": "qwen2"}
    fields.update(model_fields)
    return ModelConfig(llm=llm_cfg, vit=vit_cfg, vae=vae, **fields)


def bagel_config_jsons(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (llm_config.json, vit_config.json) contents BAGEL would ship for ``cfg``."""
    llm, vit = cfg.llm, cfg.vit
    llm_json = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
        "vocab_size": llm.vocab_size, "tie_word_embeddings": llm.tie_word_embeddings,
    }
    if llm.head_dim * llm.num_heads != llm.hidden_size:
        llm_json["head_dim"] = llm.head_dim
    vit_json = {
        "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": vit.hidden_size, "intermediate_size": vit.intermediate_size,
        "num_hidden_layers": vit.num_layers + 1, "num_attention_heads": vit.num_heads,
        "num_channels": vit.num_channels, "patch_size": vit.patch_size,
        "image_size": cfg.vit_max_num_patch_per_side * vit.patch_size, "layer_norm_eps": vit.layer_norm_eps,
    }
    return llm_json, vit_json


def map_bagel_key(name: str) -> str | None:
    """Our state-dict name of a BAGEL checkpoint key, or None for keys that are recomputed.

    BAGEL's module tree is ours, so names map to themselves; a ``module.`` prefix (DDP/FSDP
    saves) is stripped and the fixed position tables are dropped.
    """
    name = name.removeprefix("module.")
    return None if name in RECOMPUTED_KEYS else name


def to_bagel_state_dict(model: UniBrainModel) -> dict[str, Tensor]:
    """BAGEL ``ema.safetensors`` contents of a model, position tables included (as BAGEL stores them)."""
    state = _state_for_saving(model)
    state["latent_pos_embed.pos_embed"] = model.latent_pos_embed.pos_embed.detach().to(model.dtype).contiguous()
    state["vit_pos_embed.pos_embed"] = model.vit_pos_embed.pos_embed.detach().to(model.dtype).contiguous()
    return state


def save_bagel_folder(
    model: UniBrainModel, directory: str | os.PathLike[str], vae: AutoEncoder | None = None, overwrite: bool = True
) -> Path:
    """Write a model in BAGEL-7B-MoT folder layout (ema.safetensors, ae.safetensors, *_config.json)."""
    directory = Path(directory)
    llm_json, vit_json = bagel_config_jsons(model.config)
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file(to_bagel_state_dict(model), str(tmp / BAGEL_WEIGHTS), metadata={"format": "pt"})
        (tmp / BAGEL_LLM_CONFIG).write_text(json.dumps(llm_json, indent=2) + "\n", encoding="utf-8")
        (tmp / BAGEL_VIT_CONFIG).write_text(json.dumps(vit_json, indent=2) + "\n", encoding="utf-8")
        if vae is not None:
            save_file(_state_for_saving(vae), str(tmp / VAE_FILE), metadata={"format": "pt"})
    return directory


def load_bagel_folder(
    directory: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    load_autoencoder: bool = True,
    vae_config: VAEConfig = FLUX_VAE,
) -> Pretrained:
    """Load a BAGEL-7B-MoT folder into a :class:`UniBrainModel` (+ its FLUX autoencoder).

    Every model key must be present in ``ema.safetensors`` and every file key must be used
    (the two recomputed position tables excepted); otherwise :class:`CheckpointError` lists
    the missing and unexpected keys and any shape mismatch.

    Args:
        directory: the folder.
        device: where the weights go.
        dtype: cast weights to this dtype (default: as stored, bf16 for BAGEL).
        load_autoencoder: also load ``ae.safetensors`` with ``vae_config``.
        vae_config: autoencoder config (BAGEL's FLUX AE by default).
    """
    directory = Path(directory)
    llm_json = _read_json(directory / BAGEL_LLM_CONFIG)
    vit_json = _read_json(directory / BAGEL_VIT_CONFIG)
    cfg = bagel_model_config(llm_json, vit_json, vae_config, tokenizer_path=str(directory))
    raw = read_safetensors(directory / BAGEL_WEIGHTS)
    state: dict[str, Tensor] = {}
    for key, tensor in raw.items():
        ours = map_bagel_key(key)
        if ours is not None:
            state[ours] = tensor
    del raw
    model = load_into_meta_model(cfg, state, device, dtype, where=str(directory / BAGEL_WEIGHTS))
    vae = None
    if load_autoencoder:
        vae = load_vae(directory / VAE_FILE, vae_config, device, dtype)
    tok = directory if (directory / TOKENIZER_FILE).is_file() else None
    extra = {"bagel_llm_config": llm_json, "bagel_vit_config": vit_json}
    return Pretrained(model, vae, cfg, extra, tok, directory)
