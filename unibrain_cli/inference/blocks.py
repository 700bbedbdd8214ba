"""How images and text enter the model: the one place both training and inference use.

Pure functions over the model's building blocks (no KV cache, no protocol). The trainer
imports these from here (``training -> inference`` for these helpers only), so that a slice
is turned into tokens identically when it is learned and when it is generated.

Conventions:

- An image is one 2D slice ``[H, W]`` with values in [0, 1] (``H = W = data.image_size``).
  It is mapped to [-1, 1] and replicated to the channel count of the encoder that reads it.
- VAE view: ``vae.encode`` (posterior mean, scaled latent) -> ``patchify_latent`` with
  ``latent_patch_size``: tokens ``[rows * cols, p * p * z_channels]`` on a (rows, cols) grid.
- ViT view: ``patchify`` with the ViT patch: ``[rows * cols, patch * patch * num_channels]``.
- Text segment: ``[bos] + ids + [eos]`` (ids truncated to ``max_tokens``).
- Every image split carries the tokenizer's image markers (``image_start_id``, ``image_end_id``):
  build packs with ``model.builder(image_markers(tokenizer))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.embeddings import patchify_latent, unpatchify_latent
from unibrain_cli.model.packing import SequenceBuilder
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.model.vit import patchify

ImageView = Literal["vit", "vae_clean", "vae_noisy"]


class TokenizerLike(Protocol):
    """What the helpers need from ``data.tokenizer.TextTokenizer``."""

    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def image_start_id(self) -> int: ...
    @property
    def image_end_id(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class EncodedImage:
    """Both views of one image, ready for a builder.

    Attributes:
        vae_tokens: [n_vae, p*p*z] clean latent tokens (scaled latent, see ``model.vae``).
        vae_grid: (rows, cols) of the latent-token grid.
        vit_patches: [n_vit, patch*patch*C] ViT inputs in [-1, 1].
        vit_grid: (rows, cols) of the ViT patch grid.
        modality: index of its modality in ``MODALITIES`` (``model.aligned_context`` slot), -1
            when unknown.
    """

    vae_tokens: Tensor
    vae_grid: tuple[int, int]
    vit_patches: Tensor
    vit_grid: tuple[int, int]
    modality: int = -1


def image_markers(tokenizer: TokenizerLike) -> tuple[int, int]:
    """(start, end) marker ids wrapped around every image split."""
    return tokenizer.image_start_id, tokenizer.image_end_id


def wrap_text(tokenizer: TokenizerLike, text: str, max_tokens: int | None = None) -> list[int]:
    """``[bos] + encode(text)[:max_tokens] + [eos]``: one text segment of the data flow."""
    ids = tokenizer.encode(text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def to_model_range(images: Tensor, channels: int) -> Tensor:
    """Slices [B, H, W] (or one [H, W]) in [0, 1] -> [B, channels, H, W] in [-1, 1]."""
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected slices [B, H, W] or [H, W], got {tuple(images.shape)}")
    x = images.clamp(0.0, 1.0) * 2.0 - 1.0
    return x[:, None].expand(-1, channels, -1, -1)


def vit_side(size: int, patch: int) -> int:
    """Side the ViT sees for a ``size`` x ``size`` slice: ``size`` rounded to the nearest multiple of
    the patch (BAGEL's stride rounding, e.g. 256 -> 252 for patch 14). Training uses the same rule."""
    return max(1, round(size / patch)) * patch


def check_image_size(cfg: ModelConfig, size: int) -> None:
    """ValueError unless a ``size`` x ``size`` slice fits both encoders and the position tables."""
    lat_unit = cfg.vae.downsample * cfg.latent_patch_size
    if size % lat_unit:
        raise ValueError(f"image size {size} must be a multiple of {lat_unit} (VAE downsample x latent patch)")
    vit_grid = vit_side(size, cfg.vit.patch_size) // cfg.vit.patch_size
    if size // lat_unit > cfg.max_latent_size or vit_grid > cfg.vit_max_num_patch_per_side:
        raise ValueError(f"image size {size} exceeds the model's position tables")


@torch.no_grad()
def images_to_vae_tokens(vae: AutoEncoder, images: Tensor, cfg: ModelConfig) -> tuple[list[Tensor], tuple[int, int]]:
    """Encode slices [B, H, W] in [0, 1] (one batched VAE call) -> B token tensors [n, p*p*z] and the grid.

    Uses the posterior mean (deterministic); tokens are float32 on the VAE's device.
    """
    vae_param = next(vae.parameters())
    x = to_model_range(images.to(vae_param.device, torch.float32), vae.config.in_channels).to(vae_param.dtype)
    z = vae.encode(x).float()  # [B, z, h, w]
    p = cfg.latent_patch_size
    tokens = [patchify_latent(zi, p, cfg.max_latent_size)[0] for zi in z]
    return tokens, (z.shape[2] // p, z.shape[3] // p)


def image_to_vae_tokens(vae: AutoEncoder, image: Tensor, cfg: ModelConfig) -> tuple[Tensor, tuple[int, int]]:
    """One slice [H, W] in [0, 1] -> (clean latent tokens [n, p*p*z], grid (rows, cols))."""
    tokens, grid = images_to_vae_tokens(vae, image[None], cfg)
    return tokens[0], grid


def image_to_vit_patches(image: Tensor, cfg: ModelConfig) -> tuple[Tensor, tuple[int, int]]:
    """One slice [H, W] in [0, 1] -> (ViT patches [n, patch*patch*C] in [-1, 1], grid (rows, cols)).

    A side that is not a multiple of the patch is first resized to :func:`vit_side` (bilinear,
    antialiased), exactly as the training materialiser does."""
    p = cfg.vit.patch_size
    side = vit_side(image.shape[-1], p)
    img = image.float()
    if side != image.shape[-1] or side != image.shape[-2]:
        img = torch.nn.functional.interpolate(img[None, None], size=(side, side), mode="bilinear",
                                              align_corners=False, antialias=True)[0, 0].clamp(0.0, 1.0)
    x = to_model_range(img, cfg.vit.num_channels)[0]
    patches, _ = patchify(x, p, cfg.vit_max_num_patch_per_side)
    return patches, (side // p, side // p)


def encode_images(vae: AutoEncoder, images: Tensor, cfg: ModelConfig,
                  modalities: Sequence[str | None] | None = None) -> list[EncodedImage]:
    """Slices [B, H, W] in [0, 1] -> both views of each (VAE encode batched); ``modalities``
    (canonical names, one per slice) tags each with its modality slot."""
    vae_tokens, vae_grid = images_to_vae_tokens(vae, images, cfg)
    if modalities is not None and len(modalities) != len(vae_tokens):
        raise ValueError(f"{len(vae_tokens)} slices but {len(modalities)} modalities")
    out = []
    for i, (img, tok) in enumerate(zip(images, vae_tokens, strict=True)):
        patches, vit_grid = image_to_vit_patches(img, cfg)
        out.append(EncodedImage(tok, vae_grid, patches.to(tok.device), vit_grid,
                                modality_slot(modalities[i] if modalities is not None else None)))
    return out


def modality_slot(modality: str | None) -> int:
    """Index of a canonical modality in ``MODALITIES`` (-1 for None)."""
    return -1 if modality is None else MODALITIES.index(modality)


@torch.no_grad()
def latent_tokens_to_images(vae: AutoEncoder, tokens: Sequence[Tensor], grid: tuple[int, int], cfg: ModelConfig) -> Tensor:
    """Decode latent tokens (each [n, p*p*z]) -> slices [B, H, W] in [0, 1] (channel mean, clipped)."""
    p = cfg.latent_patch_size
    vae_param = next(vae.parameters())
    z = torch.stack([
        unpatchify_latent(t.to(vae_param.device, torch.float32), vae.z_channels, grid[0] * p, grid[1] * p, p)
        for t in tokens
    ])
    x = vae.decode(z.to(vae_param.dtype)).float().mean(dim=1)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def add_image(
    builder: SequenceBuilder,
    view: ImageView,
    image: EncodedImage,
    timestep: float | None = None,
    latents: Tensor | None = None,
) -> None:
    """Append one view of an encoded image to ``builder``.

    Args:
        view: ``"vit"`` (ViT patches), ``"vae_clean"`` (clean latent, context) or ``"vae_noisy"``
            (a noisy target at flow time ``timestep``; its tokens are ``latents`` when given,
            e.g. ``x_t``, else the clean tokens, which the trainer noises later).
    """
    if view == "vit":
        builder.add_vit_image(image.vit_grid, patches=image.vit_patches, modality=image.modality)
    elif view == "vae_clean":
        builder.add_vae_image(image.vae_grid, noisy=False, latents=image.vae_tokens, modality=image.modality)
    elif view == "vae_noisy":
        if timestep is None:
            raise ValueError("a vae_noisy view needs its timestep")
        builder.add_vae_image(image.vae_grid, noisy=True, timestep=timestep,
                              latents=image.vae_tokens if latents is None else latents, modality=image.modality)
    else:
        raise ValueError(f"unknown image view {view!r}; expected vit, vae_clean or vae_noisy")
