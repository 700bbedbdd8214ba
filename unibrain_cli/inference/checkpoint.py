"""``--ckpt`` resolution and loading for inference.

``--ckpt`` is either

- a model folder written by ``save_pretrained`` (``config.json`` + ``model.safetensors`` +
  ``ae.safetensors`` + ``tokenizer.json``; ``config.json``'s ``"extra"`` may hold
  ``{"recipe": <recipe dict>}``), or a BAGEL-7B-MoT folder (``ema.safetensors``...), or
- a training run folder (``run.json``) whose per-stage exports live in ``RUN/<stage>/final/``:
  the last of ``dhs``, ``unified``, ``sa`` that exists is used.

The recipe gives the sampler (``flow``), the slice size (``data.image_size``) and the text
truncation (``data.max_text_tokens``). It is read from ``extra.recipe``, else from the run's
``recipe.resolved.toml``; without either, defaults are used with the slice size of the
autoencoder config (``model.vae.resolution``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import torch

from unibrain_cli.config.components import DataConfig, Recipe
from unibrain_cli.config.loader import load_recipe, recipe_from_dict
from unibrain_cli.data.tokenizer import TextTokenizer
from unibrain_cli.errors import UserError
from unibrain_cli.inference.blocks import check_image_size
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import (
    BAGEL_WEIGHTS,
    CONFIG_FILE,
    MODEL_FILE,
    TOKENIZER_FILE,
    VAE_FILE,
    from_pretrained,
)
from unibrain_cli.model.memory import MemoryOptions, check_memory_options
from unibrain_cli.model.vae import AutoEncoder

#: Stage exports usable for inference, most trained first.
INFERENCE_STAGES: tuple[str, ...] = ("dhs", "und", "unified", "sa")


class InferenceBundle(NamedTuple):
    """What inference needs; unpacks as ``model, vae, tokenizer, recipe, image_size``."""

    model: UniBrainModel
    vae: AutoEncoder
    tokenizer: TextTokenizer
    recipe: Recipe
    image_size: int


def _is_model_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file() or (path / BAGEL_WEIGHTS).is_file()


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The model folder behind ``--ckpt`` (see the module docstring); UserError otherwise."""
    if path is None:
        raise UserError("a checkpoint is required: pass a training run folder or a model folder", "--ckpt")
    path = Path(path)
    if not path.exists():
        raise UserError("checkpoint folder not found; check the path", str(path))
    if path.is_dir() and _is_model_folder(path):
        return path
    if path.is_dir() and (path / "run.json").is_file():
        for stage in INFERENCE_STAGES:
            final = path / stage / "final"
            if final.is_dir() and _is_model_folder(final):
                return final
        raise UserError(
            f"this training run has no exported {'/'.join(INFERENCE_STAGES)} stage yet "
            "(RUN/<stage>/final); train it further or pass a model folder", str(path))
    raise UserError(
        "not a UniBrain checkpoint: expected a model folder (config.json + model.safetensors) "
        "or a training run folder (run.json)", str(path))


def run_folder_of(model_dir: Path) -> Path | None:
    """The training run folder a ``RUN/<stage>/final`` model folder belongs to; None for any other folder."""
    run = model_dir.parent.parent
    return run if model_dir.name == "final" and (run / "run.json").is_file() else None


def _recipe_for(model_dir: Path, extra: dict, model_cfg) -> tuple[Recipe, bool]:
    """(recipe, found): the saved recipe with the loaded model config, or defaults."""
    recipe = None
    if isinstance(extra.get("recipe"), dict):
        try:
            recipe = recipe_from_dict(extra["recipe"], str(model_dir / CONFIG_FILE))
        except UserError as exc:
            raise UserError(f"the recipe saved with the model is invalid: {exc}", str(model_dir / CONFIG_FILE)) from exc
    else:
        run = run_folder_of(model_dir)
        if run is not None and (run / "recipe.resolved.toml").is_file():
            recipe = load_recipe(run / "recipe.resolved.toml")
    if recipe is None:
        return Recipe(model=model_cfg, data=DataConfig(image_size=model_cfg.vae.resolution)), False
    return dataclasses.replace(recipe, model=model_cfg), True


def resolve_device(device: str) -> tuple[torch.device, torch.dtype]:
    """``cpu`` (float32) or ``cuda[:N]`` (bf16 where supported, else float32); UserError otherwise."""
    name = device.strip().lower()
    if name == "cpu":
        return torch.device("cpu"), torch.float32
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available on this machine; use --device cpu", "--device")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"there are only {torch.cuda.device_count()} CUDA device(s)", "--device")
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    raise UserError(f"unknown device '{device}'; use cpu, cuda or cuda:N", "--device")


def resolve_memory(device: str | torch.device, memory: MemoryOptions | None = None) -> tuple[torch.device, torch.dtype]:
    """(device, compute dtype) of ``--device`` with ``--dtype`` / ``--quantize`` / ``--offload``
    (``memory``); UserError naming the flag when this device cannot run those options."""
    dev, dtype = resolve_device(str(device))
    memory = memory or MemoryOptions()
    check_memory_options(memory, dev)
    return dev, memory.torch_dtype(dtype)


def load_for_inference(path: str | Path | None, device: str | torch.device = "cpu",
                       memory: MemoryOptions | None = None) -> InferenceBundle:
    """Resolve ``--ckpt`` and load model, autoencoder, tokenizer and recipe onto ``device``.

    ``memory``: ``--dtype`` (default: :func:`resolve_device`'s), ``--quantize`` and ``--offload``
    (:mod:`unibrain_cli.model.memory`).
    """
    folder = resolve_checkpoint(path)
    dev, dtype = resolve_memory(device, memory)
    pre = from_pretrained(folder, device=dev, dtype=dtype, load_autoencoder=True, memory=memory)
    if pre.vae is None or not (folder / VAE_FILE).is_file():
        raise UserError(f"the model folder has no {VAE_FILE}; images cannot be encoded", str(folder))
    if pre.tokenizer_dir is None or not (pre.tokenizer_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"the model folder has no {TOKENIZER_FILE}", str(folder))
    tokenizer = TextTokenizer.load(pre.tokenizer_dir)
    if tokenizer.vocab_size > pre.config.llm.vocab_size:
        raise UserError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model only {pre.config.llm.vocab_size}", str(folder))
    recipe, _ = _recipe_for(folder, pre.extra, pre.config)
    size = recipe.data.image_size
    try:
        check_image_size(pre.config, size)
    except ValueError as exc:
        raise UserError(f"the checkpoint's slice size does not fit its model: {exc}", str(folder)) from exc
    return InferenceBundle(pre.model.eval(), pre.vae.eval(), tokenizer, recipe, size)
