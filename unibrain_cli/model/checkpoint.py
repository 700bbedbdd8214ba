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

Big models are built on the meta device (no memory, no init) and receive the tensors directly
(``load_state_dict(assign=True)``). Weights files are read through :class:`SafetensorsWeights`:
the header first (every key and shape checked before any tensor is read), then the tensors
memory-mapped one at a time (the tensors outside the decoder layers, then the decoder layers
one by one), each from a mapping of its own byte range. A tensor already in the wanted dtype
and device stays the mapped file pages (no copy at all); a converted one is copied and its
mapping released before the next is read, so a 14B checkpoint is held in memory once. The
options of :mod:`unibrain_cli.model.memory` (int8 / nf4 quantisation, layer streaming) act
per layer during that same pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from unibrain_cli.config.components import LLMConfig, ModelConfig, VAEConfig, ViTConfig
from unibrain_cli.config.loader import RecipeError, config_from_dict
from unibrain_cli.errors import UserError
from unibrain_cli.io.atomic import atomic_dir
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.memory import (
    LAYER_PREFIX,
    BufferPool,
    MemoryOptions,
    attach_streamer,
    decoder_layers,
    layer_index,
    quantize_linears,
    set_tensor,
)
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
EMBED_KEY = "language_model.model.embed_tokens.weight"

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


class WeightSource(Protocol):
    """Named tensors that can be read a group at a time (:class:`SafetensorsWeights`, :class:`StateWeights`)."""

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def load(self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             copy: bool = False) -> dict[str, Tensor]: ...


class StateWeights:
    """An in-memory state dict as a :class:`WeightSource`."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        self.state = state

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def load(self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             copy: bool = False) -> dict[str, Tensor]:
        return {k: self.state[k].to(device=device, dtype=dtype or self.state[k].dtype, copy=copy) for k in names}


#: safetensors dtype codes -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsWeights:
    """A safetensors file read lazily: names and shapes from its header, each tensor memory-mapped on demand.

    The header is read and checked here. Tensor data is mapped one tensor at a time, each
    tensor's own byte range (copy-on-write, like safetensors' own mapping), never the whole file:
    ``safetensors.safe_open`` maps the WHOLE file privately when it opens it, which the kernel's
    default overcommit check refuses for a file larger than RAM + swap (a 29 GB BAGEL-7B
    ``ema.safetensors`` on a 24 GiB machine: "Cannot allocate memory"). A tensor returned
    unconverted is its mapping (file pages, no copy); a converted one is a copy and its mapping
    is gone when the call returns.

    ``rename`` maps a file key to our state-dict name (None: the key is not part of the model;
    it is kept in :attr:`skipped` and readable with :meth:`load_raw`).
    """

    def __init__(self, path: Path, rename: typing.Callable[[str], str | None] | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"missing {self.path.name}", where=str(self.path.parent))
        self.keys: dict[str, str] = {}
        self.skipped: list[str] = []
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        try:
            self._read_header()
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CheckpointError(f"cannot read weights ({exc}); the file is corrupt or not safetensors",
                                  where=str(self.path)) from exc
        for key in self._entries:
            ours = rename(key) if rename is not None else key
            if ours is None:
                self.skipped.append(key)
            else:
                self.keys[ours] = key

    def _read_header(self) -> None:
        """Parse and check the header: 8-byte little-endian length, then JSON ``{name: {dtype, shape,
        data_offsets}}`` (+ ``__metadata__``); each tensor's bytes must match its shape and lie in the file.
        (Read here, not with ``safe_open``, which maps the whole file even to read the header.)"""
        size = self.path.stat().st_size
        with open(self.path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {n} is impossible")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        self._data_start = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{key}: unknown dtype {info['dtype']!r}")
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
            numel = 1
            for d in shape:
                numel *= d
            if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
                raise ValueError(f"{key}: offsets {begin}..{end} do not hold a {info['dtype']} {list(shape)}")
            if self._data_start + end > size:
                raise ValueError(f"{key} lies past the end of the file (truncated?)")
            self._entries[key] = (dtype, shape, begin, end)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {ours: self._entries[key][1] for ours, key in self.keys.items()}

    def _map(self, key: str) -> Tensor:
        """The tensor ``key`` (file key) as a copy-on-write mapping of its byte range."""
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = np.memmap(self.path, dtype=np.uint8, mode="c", offset=self._data_start + begin, shape=(end - begin,))
        if raw.ctypes.data % dtype.itemsize:  # a misaligned tensor (not written by safetensors): copy it
            raw = np.array(raw)
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def load(self, names: Iterable[str], device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
             copy: bool = False, pool: BufferPool | None = None) -> dict[str, Tensor]:
        """Tensors ``names`` (our names) on ``device`` in ``dtype`` (default: as stored).

        When one of them needs a conversion (dtype, device) or ``copy``, all are copies and no
        mapping outlives the call. ``pool``: copies are written into free buffers of the pool when
        it has one of the same shape, dtype and device (layer streaming: no fresh allocation per layer).
        """
        try:
            views = {name: self._map(self.keys[name]) for name in names}
            target = torch.device(device)
            copy = copy or any(t.dtype != (dtype or t.dtype) or t.device != target for t in views.values())
            out = {}
            for name in list(views):
                t = views.pop(name)
                if pool is not None and copy:
                    buf = pool.take(t.shape, dtype or t.dtype, target)
                    out[name] = buf.copy_(t) if buf is not None else pool.adopt(
                        t.to(device=device, dtype=dtype or t.dtype, copy=True))
                else:
                    out[name] = t.to(device=device, dtype=dtype or t.dtype, copy=copy)
                del t  # a converted tensor's mapping goes now
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read weights ({exc}); the file is corrupt or truncated",
                                  where=str(self.path)) from exc
        return out

    def load_raw(self, keys: Iterable[str]) -> dict[str, Tensor]:
        """Tensors by their file keys (e.g. :attr:`skipped` ones), as stored, on the CPU (mapped)."""
        return {k: self._map(k) for k in keys}


def load_into_meta_model(
    cfg: ModelConfig,
    state: dict[str, Tensor],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    where: str | None = None,
    memory: MemoryOptions | None = None,
) -> UniBrainModel:
    """Build on the meta device and assign ``state`` (checked: no missing/extra keys, equal shapes)."""
    return load_model_weights(cfg, StateWeights(dict(state)), device, dtype, where, memory)


def load_model_weights(
    cfg: ModelConfig,
    weights: WeightSource,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    where: str | None = None,
    memory: MemoryOptions | None = None,
) -> UniBrainModel:
    """Build ``cfg`` on the meta device and fill it from ``weights`` without a second copy.

    Keys and shapes are checked first (no tensor read). Then the tensors outside the decoder
    layers are read one by one, then the decoder layers one by one (with ``memory.quantize``
    tensor by tensor, each linear quantised as soon as its weight is read); with
    ``memory.offload`` the layers are not read at all but streamed at run time
    (:class:`~unibrain_cli.model.memory.LayerStreamer`): ``disk`` from ``weights`` itself, ``cpu``
    from copies held in CPU memory.

    Args:
        cfg: the model config.
        weights: the tensors by our state-dict names (a tied head may be absent).
        device, dtype: where and in which dtype the weights go (default: as stored).
        where: file named in errors.
        memory: quantisation / offload (default: none).
    """
    memory = memory or MemoryOptions()
    if memory.quantize != "none" and memory.offload != "none":
        raise ValueError("quantisation and layer offload cannot be combined")
    model = build_model(cfg, device="meta")
    expected = model.state_dict()
    found = weights.shapes
    tied = cfg.llm.tie_word_embeddings
    if tied and TIED_HEAD_KEY not in found and EMBED_KEY in found:
        found[TIED_HEAD_KEY] = found[EMBED_KEY]
    check_state_keys(expected, found, where=where)
    per_layer: dict[int, list[str]] = {}
    rest: list[str] = []
    for name in expected:
        i = layer_index(name)
        if i is not None:
            per_layer.setdefault(i, []).append(name)
        elif not (tied and name == TIED_HEAD_KEY):
            rest.append(name)
    # one read (one mapping) per tensor: a converted tensor's file pages are released before the next is read
    state: dict[str, Tensor] = {}
    for name in rest:
        state.update(weights.load([name], device, dtype))
    _assign(model, state, where)
    del state
    if tied:
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    layers = decoder_layers(model)
    compute_dtype = dtype or model.vae2llm.weight.dtype

    def layer_state(i: int, on: torch.device | str) -> dict[str, Tensor]:
        prefix = f"{LAYER_PREFIX}{i}."
        return {k[len(prefix):]: v for k, v in weights.load(per_layer[i], on, dtype).items()}

    if memory.offload == "disk":
        pool = BufferPool()  # converted layers reuse the buffers of the layer that ran before them
        prefixes = {i: f"{LAYER_PREFIX}{i}." for i in per_layer}
        attach_streamer(model, lambda i: {k[len(prefixes[i]):]: v for k, v in
                                          weights.load(per_layer[i], device, dtype, pool=pool).items()},
                        release=pool.give)
    elif memory.offload == "cpu":
        held = [layer_state(i, "cpu") for i in range(len(layers))]
        attach_streamer(model, lambda i: {k: v.to(device, non_blocking=True) for k, v in held[i].items()})
    elif memory.quantize != "none":
        for i, layer in enumerate(layers):
            prefix = f"{LAYER_PREFIX}{i}."
            # tensor by tensor (biases before weights), each linear quantised as soon as its weight is in:
            # only one unquantised weight exists at a time
            for name in sorted(per_layer[i], key=lambda n: (n.rpartition(".")[0], n.endswith(".weight"))):
                rel = name[len(prefix):]
                set_tensor(layer, rel, weights.load([name], device, dtype, copy=True)[name])
                owner_name = rel.rpartition(".")[0]
                owner = layer.get_submodule(owner_name)
                if isinstance(owner, nn.Linear) and rel.endswith(".weight"):
                    quantized = quantize_linears(owner, memory.quantize, compute_dtype, device)
                    if quantized is not owner:  # nf4: a new module takes the linear's place
                        parent, _, attr = owner_name.rpartition(".")
                        setattr(layer.get_submodule(parent), attr, quantized)
    else:
        for i, layer in enumerate(layers):
            layer.load_state_dict(layer_state(i, device), strict=True, assign=True)
    _materialize_buffers(model, device)
    return model.eval()


def _assign(module: nn.Module, state: dict[str, Tensor], where: str | None) -> None:
    """``load_state_dict(assign=True)`` of a part of the state (keys were checked beforehand)."""
    result = module.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"unexpected key(s): {_listing(result.unexpected_keys)}", where=where)


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


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a model folder; CheckpointError (one line) when missing or unreadable."""
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
    memory: MemoryOptions | None = None,
) -> Pretrained:
    """Load a folder written by :func:`save_pretrained` (or a BAGEL-7B-MoT folder, detected by its files).

    ``memory``: quantisation / layer offload of the decoder (:mod:`unibrain_cli.model.memory`).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError("not a folder; pass a model folder", where=str(directory))
    if (directory / BAGEL_WEIGHTS).is_file() and not (directory / MODEL_FILE).is_file():
        return load_bagel_folder(directory, device=device, dtype=dtype, load_autoencoder=load_autoencoder,
                                 memory=memory)
    meta = read_json_object(directory / CONFIG_FILE)
    if meta.get("format") != "unibrain" or "model" not in meta:
        raise CheckpointError("config.json is not a UniBrain model config", where=str(directory / CONFIG_FILE))
    try:
        cfg = model_config_from_dict(meta["model"], str(directory / CONFIG_FILE))
    except RecipeError as exc:
        raise CheckpointError(f"bad model config: {exc.message}", where=str(directory / CONFIG_FILE)) from exc
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"bad model config: {exc}", where=str(directory / CONFIG_FILE)) from exc
    weights = SafetensorsWeights(directory / MODEL_FILE)
    model = load_model_weights(cfg, weights, device, dtype, where=str(directory / MODEL_FILE), memory=memory)
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
    memory: MemoryOptions | None = None,
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
        memory: quantisation / layer offload of the decoder (:mod:`unibrain_cli.model.memory`).
    """
    directory = Path(directory)
    llm_json = read_json_object(directory / BAGEL_LLM_CONFIG)
    vit_json = read_json_object(directory / BAGEL_VIT_CONFIG)
    cfg = bagel_model_config(llm_json, vit_json, vae_config, tokenizer_path=str(directory))
    weights = SafetensorsWeights(directory / BAGEL_WEIGHTS, rename=map_bagel_key)
    model = load_model_weights(cfg, weights, device, dtype, where=str(directory / BAGEL_WEIGHTS), memory=memory)
    vae = None
    if load_autoencoder:
        vae = load_vae(directory / VAE_FILE, vae_config, device, dtype)
    tok = directory if (directory / TOKENIZER_FILE).is_file() else None
    extra = {"bagel_llm_config": llm_json, "bagel_vit_config": vit_json}
    return Pretrained(model, vae, cfg, extra, tok, directory)
