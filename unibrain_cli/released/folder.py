"""``--protocol`` choice, ``--ckpt`` / ``--base`` resolution and loading of the released checkpoint.

Layouts accepted by ``--protocol released``:

- a complete folder: weights (``ema.safetensors``, else ``model.safetensors``; BAGEL key names, ViT
  patch embedding as a Linear, the two fixed position tables stored), ``llm_config.json`` (Qwen2),
  ``vit_config.json`` (SigLIP), a Qwen2 tokenizer (``tokenizer.json``, or ``vocab.json`` +
  ``merges.txt`` with the added tokens of ``added_tokens.json`` / ``tokenizer_config.json``) and
  ``ae.safetensors`` (FLUX autoencoder) — a BAGEL-7B-MoT folder is one;
- an authors' step folder (7-digit name, e.g. ``checkpoints_s3/0000200``) holding only weights,
  with ``--base BAGEL_FOLDER``: every file the step folder lacks is taken from there (their
  ``evaluate_metrics.py`` symlinks the same six files from ``models/BAGEL-7B-MoT``).

Construction (their ``evaluate_metrics.py``): Qwen2 config with ``qk_norm`` and an untied head,
MoT layers; SigLIP with ``num_hidden_layers - 1`` layers; latent patch 2, latent table 64, ViT
table 70; the position tables ``latent_pos_embed.pos_embed`` / ``vit_pos_embed.pos_embed`` are
LOADED from the weights (not recomputed). The autoencoder's widths are read from the shapes in
``ae.safetensors`` (FLUX: ch 128, mult 1,2,4,4, 2 res blocks, z 16) with FLUX's latent scale
0.3611 and shift 0.1159.

``--protocol auto`` picks ``released`` for a folder in that layout (weights without our
``config.json``) or when ``--base`` is given, and ``native`` for our model folders and runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from unibrain_cli.config.components import ModelConfig, VAEConfig
from unibrain_cli.errors import UserError
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import (
    BAGEL_LLM_CONFIG,
    BAGEL_VIT_CONFIG,
    BAGEL_WEIGHTS,
    CONFIG_FILE,
    FLUX_VAE,
    MODEL_FILE,
    RECOMPUTED_KEYS,
    TOKENIZER_FILE,
    VAE_FILE,
    CheckpointError,
    SafetensorsWeights,
    bagel_model_config,
    load_model_weights,
    load_vae,
    map_bagel_key,
    read_json_object,
)
from unibrain_cli.model.memory import MemoryOptions
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.released.protocol import SPECIAL_TOKENS, STEP_FOLDER

Protocol = Literal["native", "released"]
PROTOCOLS: tuple[str, ...] = ("auto", "native", "released")
#: Weight files of a released folder, in order of preference.
WEIGHT_FILES: tuple[str, ...] = (BAGEL_WEIGHTS, MODEL_FILE)
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
#: Qwen2's pre-tokenizer split (``transformers`` ``tokenization_qwen2.PRETOKENIZE_REGEX``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ---------------------------------------------------------------------------------------------
# which protocol
# ---------------------------------------------------------------------------------------------


def is_native_folder(path: Path) -> bool:
    """Our model folder (``config.json`` + ``model.safetensors``) or a training run (``run.json``)."""
    return ((path / CONFIG_FILE).is_file() and (path / MODEL_FILE).is_file()) or (path / "run.json").is_file()


def weights_file(path: Path) -> Path | None:
    """``ema.safetensors`` if present, else ``model.safetensors``, else None."""
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    return None


def is_step_folder(path: Path) -> bool:
    """An authors' training step folder (7-digit name)."""
    return bool(STEP_FOLDER.match(path.name))


def choose_protocol(requested: str, ckpt: str | Path | None, base: str | Path | None) -> Protocol:
    """Resolve ``--protocol`` (``auto`` | ``native`` | ``released``) for ``--ckpt`` / ``--base``.

    ``auto``: ``released`` when ``--base`` is given or ``--ckpt`` holds weights in the released /
    BAGEL layout (``ema.safetensors`` or ``model.safetensors`` without our ``config.json``), else
    ``native``. UserError for an unknown value and for ``--base`` with ``native``.
    """
    value = (requested or "auto").strip().lower()
    if value not in PROTOCOLS:
        raise UserError(f"unknown protocol '{requested}'; use auto, native or released", "--protocol")
    if value == "native":
        if base is not None:
            raise UserError("--base only applies to --protocol released (an authors' step folder)", "--base")
        return "native"
    if value == "released" or base is not None:
        return "released"
    if ckpt is None:
        return "native"
    path = Path(ckpt)
    if path.is_dir() and not is_native_folder(path) and weights_file(path) is not None:
        return "released"
    return "native"


# ---------------------------------------------------------------------------------------------
# which files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleasedFiles:
    """The files a released model is built from (each from ``--ckpt`` or, when absent there, ``--base``)."""

    weights: Path
    llm_config: Path
    vit_config: Path
    tokenizer_dir: Path
    autoencoder: Path

    def to_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in vars(self).items()}


def has_tokenizer(path: Path) -> bool:
    """``tokenizer.json``, or ``vocab.json`` + ``merges.txt``."""
    return (path / TOKENIZER_FILE).is_file() or ((path / VOCAB_FILE).is_file() and (path / MERGES_FILE).is_file())


def resolve_released(ckpt: str | Path | None, base: str | Path | None = None) -> ReleasedFiles:
    """The files behind ``--ckpt`` (+ ``--base``); UserError naming the folder or flag otherwise.

    Checks only that files exist (fast: called before inputs are read and before any output).
    """
    if ckpt is None:
        raise UserError("a checkpoint is required: pass the released step folder or a BAGEL-7B-MoT folder", "--ckpt")
    folder = Path(ckpt)
    if not folder.is_dir():
        raise UserError("checkpoint folder not found; check the path", str(folder))
    weights = weights_file(folder)
    if weights is None:
        raise UserError(f"no {' or '.join(WEIGHT_FILES)} here: neither a UniBrain model folder (config.json + "
                        "model.safetensors) nor a released / BAGEL folder", str(folder))
    base_dir = Path(base) if base is not None else None
    if base_dir is not None and not base_dir.is_dir():
        raise UserError("BAGEL folder not found; pass the BAGEL-7B-MoT folder (configs, tokenizer, ae.safetensors)",
                        "--base")
    search = [folder] if base_dir is None else [folder, base_dir]

    def find(name: str) -> Path | None:
        return next((d / name for d in search if (d / name).is_file()), None)

    found = {BAGEL_LLM_CONFIG: find(BAGEL_LLM_CONFIG), BAGEL_VIT_CONFIG: find(BAGEL_VIT_CONFIG), VAE_FILE: find(VAE_FILE)}
    tok_dir = next((d for d in search if has_tokenizer(d)), None)
    missing = [name for name, p in found.items() if p is None]
    if tok_dir is None:
        missing.insert(2, f"a tokenizer ({TOKENIZER_FILE} or {VOCAB_FILE} + {MERGES_FILE})")
    if missing:
        listing = ", ".join(missing)
        if base_dir is not None:
            raise UserError(f"missing {listing} (looked in --ckpt {folder} and here)", str(base_dir))
        if is_step_folder(folder):
            raise UserError(f"{folder} is an authors' step folder without {listing}; pass --base BAGEL-7B-MoT "
                            "folder to take them from", "--base")
        raise UserError(f"neither a UniBrain model folder (config.json + model.safetensors) nor a complete "
                        f"released / BAGEL folder: missing {listing}; pass --base BAGEL_FOLDER for them", str(folder))
    return ReleasedFiles(weights, found[BAGEL_LLM_CONFIG], found[BAGEL_VIT_CONFIG], tok_dir,  # type: ignore[arg-type]
                         found[VAE_FILE])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


class ReleasedTokenizer:
    """A Qwen2 tokenizer with the four special ids the protocol needs (looked up by name).

    Raises UserError (naming ``where``) when one of ``SPECIAL_TOKENS`` is missing.
    """

    def __init__(self, tokenizer: Tokenizer, where: str | None = None) -> None:
        self._tok = tokenizer
        ids: dict[str, int] = {}
        for name in SPECIAL_TOKENS:
            idx = tokenizer.token_to_id(name)
            if idx is None:
                raise UserError(f"the tokenizer has no special token {name!r}; the released protocol needs the "
                                "Qwen2.5 tokenizer of BAGEL-7B-MoT", where)
            ids[name] = idx
        self.bos_id, self.eos_id, self.image_start_id, self.image_end_id = (ids[n] for n in SPECIAL_TOKENS)

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        """(``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``)."""
        return self.bos_id, self.eos_id, self.image_start_id, self.image_end_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added; special tokens written in the text are matched)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode_raw(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens kept (Qwen2: no spaces between them, no clean-up)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)


def qwen2_from_vocab(vocab: Path, merges: Path) -> Tokenizer:
    """A ``tokenizers`` Qwen2 pipeline from ``vocab.json`` + ``merges.txt`` (as ``transformers``
    converts ``Qwen2Tokenizer``: NFC, the Qwen2 regex split, byte-level BPE, byte-level decoder)."""
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _declared_added_tokens(folder: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from ``added_tokens.json`` and ``tokenizer_config.json``."""
    out: dict[int, tuple[str, bool]] = {}
    added = folder / "added_tokens.json"
    if added.is_file():
        for content, idx in read_json_object(added).items():
            out[int(idx)] = (str(content), True)
    config = folder / "tokenizer_config.json"
    if config.is_file():
        for idx, spec in dict(read_json_object(config).get("added_tokens_decoder", {})).items():
            out[int(idx)] = (str(spec["content"]), bool(spec.get("special", True)))
    return out


def load_qwen2_tokenizer(folder: Path) -> ReleasedTokenizer:
    """The tokenizer of a released / BAGEL folder (``tokenizer.json`` preferred)."""
    path = folder / TOKENIZER_FILE
    if path.is_file():
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception on bad JSON
            raise UserError(f"cannot read tokenizer ({exc}); the file is corrupt or not a tokenizers file",
                            str(path)) from exc
        return ReleasedTokenizer(tok, str(path))
    try:
        tok = qwen2_from_vocab(folder / VOCAB_FILE, folder / MERGES_FILE)
    except Exception as exc:
        raise UserError(f"cannot read {VOCAB_FILE} / {MERGES_FILE} ({exc})", str(folder)) from exc
    for idx, (content, special) in sorted(_declared_added_tokens(folder).items()):
        token = AddedToken(content, special=special, normalized=False)
        tok.add_special_tokens([token]) if special else tok.add_tokens([token])
        if tok.token_to_id(content) != idx:
            raise UserError(f"added token {content!r} should have id {idx} but follows the vocabulary at "
                            f"{tok.token_to_id(content)}", str(folder))
    return ReleasedTokenizer(tok, str(folder / VOCAB_FILE))


# ---------------------------------------------------------------------------------------------
# model and autoencoder
# ---------------------------------------------------------------------------------------------


@dataclass
class ReleasedBundle:
    """A loaded released model: what the released engine needs."""

    model: UniBrainModel
    vae: AutoEncoder
    tokenizer: ReleasedTokenizer
    files: ReleasedFiles


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a safetensors file, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:
        raise CheckpointError(f"cannot read weights ({exc}); the file is corrupt or not safetensors", str(path)) from exc


def flux_vae_config(shapes: dict[str, tuple[int, ...]], where: str | None = None) -> VAEConfig:
    """The FLUX-layout autoencoder config whose tensors have ``shapes`` (widths read, FLUX's latent
    scale/shift kept). CheckpointError when the layout is not FLUX's."""
    try:
        ch, in_channels = shapes["encoder.conv_in.weight"][:2]
        z2 = shapes["encoder.conv_out.weight"][0]
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        mult = tuple(shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in levels)
        blocks = {int(k.split(".")[4]) for k in shapes if k.startswith("encoder.down.0.block.")}
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"not a FLUX autoencoder (no {exc})", where) from exc
    if not levels or not blocks or z2 % 2:
        raise CheckpointError("not a FLUX autoencoder (no encoder levels)", where)
    return VAEConfig(in_channels=in_channels, ch=ch, ch_mult=mult, num_res_blocks=len(blocks), z_channels=z2 // 2,
                     scale_factor=FLUX_VAE.scale_factor, shift_factor=FLUX_VAE.shift_factor, resolution=256)


def _load_position_tables(model: UniBrainModel, tables: dict[str, torch.Tensor], where: str) -> None:
    """Copy the stored fixed position tables into the model (their values, e.g. bf16-rounded)."""
    targets = {"latent_pos_embed.pos_embed": model.latent_pos_embed.pos_embed,
               "vit_pos_embed.pos_embed": model.vit_pos_embed.pos_embed}
    for name, table in tables.items():
        buf = targets[name]
        if tuple(table.shape) != tuple(buf.shape):
            raise CheckpointError(f"weights do not match the model: {name} {list(table.shape)} != {list(buf.shape)}",
                                  where)
        with torch.no_grad():
            buf.copy_(table.to(buf.dtype))


def released_model_config(llm_json: dict[str, Any], vit_json: dict[str, Any], vae_config: VAEConfig,
                          tokenizer_path: str = "") -> ModelConfig:
    """The model of ``llm_config.json`` + ``vit_config.json`` as their ``evaluate_metrics.py`` builds it:
    ``qk_norm`` on and an untied head whatever the json says, the ViT one layer short, latent patch 2,
    latent table 64, ViT table ``image_size / patch_size`` (70)."""
    llm_json = llm_json | {"qk_norm": True, "tie_word_embeddings": False}
    return bagel_model_config(llm_json, vit_json, vae_config, tokenizer_path=tokenizer_path)


def _released_key(key: str) -> str | None:
    """Our name of a released-file key (``module.`` stripped); None for the two stored position tables."""
    name = key.removeprefix("module.")
    return None if name in RECOMPUTED_KEYS else map_bagel_key(name)


def load_released_model(files: ReleasedFiles, vae_config: VAEConfig, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None, memory: MemoryOptions | None = None) -> UniBrainModel:
    """Build the model from the two json configs and assign the weights (checked: every key, every
    shape; the stored position tables are loaded too). The weights are memory-mapped and read a
    group at a time into the meta-built model (:func:`~unibrain_cli.model.checkpoint.load_model_weights`);
    ``memory`` quantises or streams the decoder layers."""
    try:
        cfg = released_model_config(read_json_object(files.llm_config), read_json_object(files.vit_config), vae_config,
                                    str(files.tokenizer_dir))
        weights = SafetensorsWeights(files.weights, rename=_released_key)
        model = load_model_weights(cfg, weights, device, dtype, where=str(files.weights), memory=memory)
    except ValueError as exc:  # an invalid ModelConfig (CheckpointError is a UserError, not a ValueError)
        raise CheckpointError(f"the configs describe no valid model: {exc}", str(files.llm_config)) from exc
    tables = {k.removeprefix("module."): t for k, t in weights.load_raw(weights.skipped).items()}
    _load_position_tables(model, tables, str(files.weights))
    return model.eval()


def load_released(files: ReleasedFiles, device: torch.device | str = "cpu",
                  dtype: torch.dtype | None = None, memory: MemoryOptions | None = None) -> ReleasedBundle:
    """Load tokenizer, autoencoder and model (tokenizer first: it is the cheapest to get wrong);
    ``memory`` quantises or streams the decoder layers (:mod:`unibrain_cli.model.memory`)."""
    tokenizer = load_qwen2_tokenizer(files.tokenizer_dir)
    vae_cfg = flux_vae_config(safetensors_shapes(files.autoencoder), str(files.autoencoder))
    vae = load_vae(files.autoencoder, vae_cfg, device, dtype)
    model = load_released_model(files, vae_cfg, device, dtype, memory)
    worst = max(tokenizer.special_ids)
    if worst >= model.config.llm.vocab_size:
        raise CheckpointError(f"the tokenizer's special id {worst} is outside the model's vocabulary "
                              f"({model.config.llm.vocab_size})", str(files.tokenizer_dir))
    return ReleasedBundle(model, vae, tokenizer, files)
