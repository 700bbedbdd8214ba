"""Packed sequences: many samples, each a list of splits, in one token sequence.

A *pack* is the unit the model runs on (training, DHS and inference alike). It is one long
sequence made of *samples* placed one after the other; samples never see each other. A
sample is a list of *splits*; each split has a mode (see :mod:`unibrain_cli.model.attention`
for the exact rule):

- ``causal`` — text. Causal inside; sees all earlier visible tokens of its sample.
- ``full``   — a ViT image, or a clean VAE image. Bidirectional inside; sees the past.
- ``noise``  — a noisy VAE target. Sees the past and itself; NO later token sees it.

Token types (routing to the MoT experts): ``TEXT`` and ``VIT`` go to the understanding
expert, ``VAE`` (noisy or clean latent tokens) to the generation expert.

Positions (1D RoPE): restart at 0 for every sample; +1 per text token; all tokens of one
image split (markers included) share one position; a clean image (ViT or clean VAE)
advances the counter by 1 after the split; a noisy image does not, so the clean copy of the
same image that follows it reuses the position.

Image markers: when the builder gets ``image_markers=(start_id, end_id)``, every image split
is ``[start marker, image tokens..., end marker]`` (markers are TEXT tokens inside the image
split, with the image's mode and position; BAGEL's layout). Without markers a split holds the
image tokens only.

Losses carried by a pack:

- NTP: ``add_text(ids, loss=True)`` makes every token of ``ids`` a *target*: the logits at the
  PREVIOUS position (the predictor) must predict it. ``ce_indexes`` holds the predictor
  positions, ``ce_labels`` the target ids. The predictor of the first target is the last token
  before the split; it must be a text token of the same sample outside a noise split (with
  image markers an image's end marker qualifies); a loss split opening a sample drops its first
  target (nothing predicts it).
- Flow: the tokens of a noisy VAE image carry flow loss; ``vae_noisy`` marks them among the
  VAE tokens, ``vae_timesteps`` holds their flow time t in [0, 1] (t = 1 is pure noise; clean
  VAE tokens get t = 0, as in BAGEL where sigmoid(-inf) = 0).

Usage (training)::

    b = SequenceBuilder(vit_side=70, latent_side=64, image_markers=(tok.image_start_id, tok.image_end_id))
    b.add_vae_image((16, 16), noisy=False, latents=z_in)          # input image, clean
    b.add_vit_image((32, 32), patches=vit_patches)                # and its ViT view
    b.add_text(tok.encode("Translate T1 into T2"), loss=False)
    b.add_vae_image((16, 16), noisy=True, timestep=0.7, latents=z_target)
    b.add_vae_image((16, 16), noisy=False, latents=z_target)       # clean copy for later tokens
    b.add_text(tok.encode("Impression: ...") + [tok.eos_id], loss=True)
    b.next_sample()
    ...                                                           # more samples
    packed = b.build()

The model (``UniBrainModel.forward``) reads ``packed.vae_latents`` as the tokens to embed; the
training step replaces the noisy rows by ``x_t = (1 - t) x0 + t eps`` with
:meth:`PackedSequence.with_vae_latents` (``vae_noisy`` and ``vae_timesteps`` give the rows
and t). Inference builds one-sample blocks with the same builder and feeds them to the KV
cache methods of the model; positions of a block start at 0 and are offset by the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Literal

import torch
from torch import Tensor

from unibrain_cli.model.attention import MaskInfo

SplitMode = Literal["causal", "full", "noise"]


class TokenType(IntEnum):
    """Kind of a packed token; TEXT and VIT use the understanding expert, VAE the generation expert."""

    TEXT = 0
    VIT = 1
    VAE = 2


@dataclass(frozen=True)
class ImageSpan:
    """One image in a pack.

    Attributes:
        kind: ``"vit"`` or ``"vae"``.
        grid_hw: token grid (rows, cols): ViT patches, or latent patches (latent / latent_patch).
        noisy: a noisy VAE target (flow loss).
        timestep: flow time of a noisy image (0 for clean images).
        sample: sample id; split: global split id.
        token_start: first row of this image among the pack's ViT tokens (kind vit) or VAE
            tokens (kind vae); ``num_tokens`` rows follow.
        position: its RoPE position.
        modality: modality slot of the image (index in ``unibrain_cli.modalities.MODALITIES``),
            -1 when unknown (read only by ``model.aligned_context``).
    """

    kind: Literal["vit", "vae"]
    grid_hw: tuple[int, int]
    noisy: bool
    timestep: float
    sample: int
    split: int
    token_start: int
    num_tokens: int
    position: int
    modality: int = -1


@dataclass
class PackedSequence:
    """A built pack (see the module docstring). Index tensors are long, on ``device``.

    Attributes:
        length: N, total tokens.
        token_types: [N] :class:`TokenType` codes.
        position_ids: [N] RoPE positions (restart at 0 per sample).
        sample_ids: [N] sample of each token; split_ids: [N] global split id of each token.
        split_lens, split_modes, split_samples: per split, in order.
        sample_lens: tokens per sample; sample_next_positions: the position counter after
            each sample's last split (where a following block would continue).
        text_ids, text_indexes: [N_text] ids of the text tokens and their positions in the pack.
        vit_indexes: [N_vit] positions of ViT tokens; vit_position_ids: [N_vit]
            ``row * vit_side + col``; vit_seqlens: tokens per ViT image.
        vae_indexes: [N_vae] positions of VAE tokens; vae_position_ids: [N_vae]
            ``row * latent_side + col``; vae_timesteps: float [N_vae] flow time (0 if clean);
            vae_noisy: bool [N_vae] tokens carrying flow loss; vae_image_ids: [N_vae] index of
            the token's image in ``images``.
        ce_indexes: [N_ce] predictor positions carrying NTP loss; ce_labels: [N_ce] next-token ids.
        images: every image, in order.
        vit_patches: [N_vit, p*p*C] ViT inputs or None (wider when the pack holds a fused view,
            ``model.fused_view``: the other rows are zero-padded and read up to p*p*C);
            vae_latents: [N_vae, p*p*z] latent tokens or None.
    """

    length: int
    token_types: Tensor
    position_ids: Tensor
    sample_ids: Tensor
    split_ids: Tensor
    split_lens: list[int]
    split_modes: list[SplitMode]
    split_samples: list[int]
    sample_lens: list[int]
    sample_next_positions: list[int]
    text_ids: Tensor
    text_indexes: Tensor
    vit_indexes: Tensor
    vit_position_ids: Tensor
    vit_seqlens: list[int]
    vae_indexes: Tensor
    vae_position_ids: Tensor
    vae_timesteps: Tensor
    vae_noisy: Tensor
    vae_image_ids: Tensor
    ce_indexes: Tensor
    ce_labels: Tensor
    images: list[ImageSpan] = field(default_factory=list)
    vit_patches: Tensor | None = None
    vae_latents: Tensor | None = None

    @property
    def num_samples(self) -> int:
        return len(self.sample_lens)

    @property
    def device(self) -> torch.device:
        return self.token_types.device

    @property
    def und_indexes(self) -> Tensor:
        """[N_und] sorted positions routed to the understanding expert (text + ViT)."""
        return (self.token_types != TokenType.VAE).nonzero().flatten()

    @property
    def gen_indexes(self) -> Tensor:
        """[N_vae] positions routed to the generation expert (VAE tokens)."""
        return self.vae_indexes

    @property
    def vit_cu_seqlens(self) -> Tensor:
        """int32 [num_vit_images + 1] cumulative ViT token counts (for the ViT encoder)."""
        lens = torch.tensor([0, *self.vit_seqlens], dtype=torch.long).cumsum(0)
        return lens.to(torch.int32).to(self.device)

    @property
    def noisy_vae_rows(self) -> Tensor:
        """[N_flow] rows (into the VAE token list) of noisy tokens."""
        return self.vae_noisy.nonzero().flatten()

    def mask_info(self, prefix_len: int = 0) -> MaskInfo:
        """The attention mask of this pack (after ``prefix_len`` cached keys, single sample only)."""
        return MaskInfo.from_splits(
            self.split_lens, list(self.split_modes), self.split_samples, prefix_len=prefix_len, device=self.device
        )

    def to(self, device: torch.device | str) -> PackedSequence:
        """A copy with every tensor on ``device``."""
        changes = {
            name: value.to(device)
            for name, value in vars(self).items()
            if isinstance(value, Tensor)
        }
        return replace(self, **changes)

    def with_vae_latents(self, latents: Tensor) -> PackedSequence:
        """A copy whose VAE tokens are ``latents`` [N_vae, D] (e.g. noised targets)."""
        if latents.shape[0] != self.vae_indexes.numel():
            raise ValueError(f"expected {self.vae_indexes.numel()} latent tokens, got {latents.shape[0]}")
        return replace(self, vae_latents=latents)

    def with_vae_timesteps(self, timesteps: Tensor) -> PackedSequence:
        """A copy with flow times ``timesteps`` [N_vae] (e.g. resampled by the trainer)."""
        if timesteps.shape != self.vae_timesteps.shape:
            raise ValueError(f"expected timesteps of shape {tuple(self.vae_timesteps.shape)}, got {tuple(timesteps.shape)}")
        return replace(self, vae_timesteps=timesteps)


def grid_position_ids(grid_hw: tuple[int, int], side: int) -> Tensor:
    """Flattened 2D position ids ``row * side + col`` of a (rows, cols) grid, row-major: long [rows*cols]."""
    rows, cols = grid_hw
    if rows <= 0 or cols <= 0:
        raise ValueError(f"image grid must be positive, got {grid_hw}")
    if rows > side or cols > side:
        raise ValueError(f"image grid {rows}x{cols} exceeds the position table side {side}")
    return (torch.arange(rows)[:, None] * side + torch.arange(cols)[None, :]).reshape(-1)


class SequenceBuilder:
    """Builds a :class:`PackedSequence` split by split (see the module docstring).

    Args:
        vit_side: side of the ViT position tables (``ModelConfig.vit_max_num_patch_per_side``).
        latent_side: side of the latent position table (``ModelConfig.max_latent_size``).
        image_markers: ``(start_id, end_id)`` text tokens wrapped around every image, or None.
    """

    def __init__(self, vit_side: int, latent_side: int, image_markers: tuple[int, int] | None = None) -> None:
        self.vit_side = vit_side
        self.latent_side = latent_side
        self.image_markers = image_markers
        self._types: list[int] = []
        self._positions: list[int] = []
        self._samples: list[int] = []
        self._splits: list[int] = []
        self.split_lens: list[int] = []
        self.split_modes: list[SplitMode] = []
        self.split_samples: list[int] = []
        self._sample_lens: list[int] = []
        self._sample_next: list[int] = []
        self._text_ids: list[int] = []
        self._text_idx: list[int] = []
        self._vit_idx: list[int] = []
        self._vit_pos: list[Tensor] = []
        self._vit_lens: list[int] = []
        self._vit_patches: list[Tensor | None] = []
        self._vae_idx: list[int] = []
        self._vae_pos: list[Tensor] = []
        self._vae_t: list[float] = []
        self._vae_noisy: list[bool] = []
        self._vae_img: list[int] = []
        self._vae_latents: list[Tensor | None] = []
        self._ce_idx: list[int] = []
        self._ce_labels: list[int] = []
        self.images: list[ImageSpan] = []
        self._sample = 0
        self._sample_start = 0
        self._position = 0
        self._last_noise = False  # the last token belongs to a noise split

    # -- state --------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """Tokens added so far (all samples)."""
        return len(self._types)

    @property
    def current_sample_tokens(self) -> int:
        """Tokens of the sample being built."""
        return self.num_tokens - self._sample_start

    @property
    def position(self) -> int:
        """The RoPE position the next text token of the current sample gets."""
        return self._position

    def _push(self, ttype: int, position: int) -> int:
        idx = len(self._types)
        self._types.append(ttype)
        self._positions.append(position)
        self._samples.append(self._sample)
        self._splits.append(len(self.split_lens))
        return idx

    def _close_split(self, n: int, mode: SplitMode) -> None:
        self.split_lens.append(n)
        self.split_modes.append(mode)
        self.split_samples.append(self._sample)
        self._last_noise = mode == "noise"

    # -- splits -------------------------------------------------------------------------------

    def add_text(self, ids: Sequence[int], loss: bool = False) -> None:
        """Append a causal text split.

        Args:
            ids: token ids (at least one).
            loss: every token of ``ids`` becomes an NTP target, predicted from the position
                before it (see the module docstring for the first token's predictor).
        """
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("add_text needs at least one token id")
        if loss and self.current_sample_tokens > 0:
            prev = self.num_tokens - 1
            if self._types[prev] != TokenType.TEXT or self._last_noise:
                raise ValueError(
                    "an NTP target's predictor must be a text token outside a noise split; "
                    "use image_markers or start the loss text after a text split"
                )
        start = self.num_tokens
        for j, tok in enumerate(ids):
            idx = self._push(TokenType.TEXT, self._position)
            self._position += 1
            self._text_ids.append(tok)
            self._text_idx.append(idx)
            if loss and (j > 0 or self.current_sample_tokens > 1):
                self._ce_idx.append(idx - 1)
                self._ce_labels.append(tok)
        self._close_split(self.num_tokens - start, "causal")

    def _add_image(
        self,
        kind: Literal["vit", "vae"],
        grid_hw: tuple[int, int],
        mode: SplitMode,
        timestep: float,
        data: Tensor | None,
        side: int,
        modality: int = -1,
    ) -> ImageSpan:
        pos_ids = grid_position_ids(grid_hw, side)
        n = int(pos_ids.numel())
        if data is not None and data.shape[0] != n:
            raise ValueError(f"{kind} image grid {grid_hw} has {n} tokens but its data has {data.shape[0]} rows")
        start = self.num_tokens
        position = self._position
        if self.image_markers is not None:
            idx = self._push(TokenType.TEXT, position)
            self._text_ids.append(self.image_markers[0])
            self._text_idx.append(idx)
        ttype = TokenType.VIT if kind == "vit" else TokenType.VAE
        image_id = len(self.images)
        token_start = len(self._vit_idx) if kind == "vit" else len(self._vae_idx)
        for _ in range(n):
            idx = self._push(ttype, position)
            if kind == "vit":
                self._vit_idx.append(idx)
            else:
                self._vae_idx.append(idx)
                self._vae_t.append(timestep)
                self._vae_noisy.append(mode == "noise")
                self._vae_img.append(image_id)
        if kind == "vit":
            self._vit_pos.append(pos_ids)
            self._vit_lens.append(n)
            self._vit_patches.append(data)
        else:
            self._vae_pos.append(pos_ids)
            self._vae_latents.append(data)
        if self.image_markers is not None:
            idx = self._push(TokenType.TEXT, position)
            self._text_ids.append(self.image_markers[1])
            self._text_idx.append(idx)
        span = ImageSpan(
            kind=kind, grid_hw=(int(grid_hw[0]), int(grid_hw[1])), noisy=mode == "noise", timestep=timestep,
            sample=self._sample, split=len(self.split_lens), token_start=token_start, num_tokens=n,
            position=position, modality=int(modality),
        )
        self.images.append(span)
        self._close_split(self.num_tokens - start, mode)
        if mode != "noise":
            self._position += 1
        return span

    def add_vit_image(self, grid_hw: tuple[int, int], patches: Tensor | None = None, modality: int = -1) -> ImageSpan:
        """Append a ViT image split (mode ``full``).

        Args:
            grid_hw: patch grid (rows, cols) = (H / patch, W / patch).
            patches: optional [rows*cols, p*p*C] ViT inputs (row-major, from ``vit.patchify``).
            modality: modality slot (:attr:`ImageSpan.modality`), -1 when unknown.
        """
        return self._add_image("vit", grid_hw, "full", 0.0, patches, self.vit_side, modality)

    def add_vae_image(
        self,
        grid_hw: tuple[int, int],
        noisy: bool = False,
        timestep: float | None = None,
        latents: Tensor | None = None,
        modality: int = -1,
    ) -> ImageSpan:
        """Append a VAE image split: clean (mode ``full``) or a noisy target (mode ``noise``).

        Args:
            grid_hw: latent-token grid (rows, cols) = latent size / latent patch size.
            noisy: a noisy target (flow loss; invisible to later tokens; does not advance
                the position, so the clean copy added next reuses it).
            timestep: flow time t in [0, 1] of a noisy image (required when ``noisy``; the
                trainer may overwrite it later with :meth:`PackedSequence.with_vae_timesteps`).
            latents: optional [rows*cols, p*p*z] latent tokens (for noisy images: the clean
                x0 or already-noised x_t — the model embeds whatever is here).
            modality: modality slot (:attr:`ImageSpan.modality`), -1 when unknown.
        """
        if noisy and timestep is None:
            raise ValueError("a noisy VAE image needs its timestep")
        t = float(timestep) if noisy else 0.0
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"timestep must lie in [0, 1], got {t}")
        return self._add_image("vae", grid_hw, "noise" if noisy else "full", t, latents, self.latent_side, modality)

    def next_sample(self) -> None:
        """Close the current sample; the next split starts a new one (positions restart at 0)."""
        if self.current_sample_tokens == 0:
            raise ValueError("next_sample() called on an empty sample")
        self._sample_lens.append(self.current_sample_tokens)
        self._sample_next.append(self._position)
        self._sample += 1
        self._sample_start = self.num_tokens
        self._position = 0
        self._last_noise = False

    def build(self, device: torch.device | str = "cpu") -> PackedSequence:
        """Finish (closing an open sample) and return the :class:`PackedSequence`."""
        if self.current_sample_tokens > 0:
            self.next_sample()
        if not self._sample_lens:
            raise ValueError("cannot build an empty pack")

        def long(values: Sequence[int]) -> Tensor:
            return torch.tensor(list(values), dtype=torch.long)

        def cat_data(parts: list[Tensor | None], what: str) -> Tensor | None:
            if not parts or all(p is None for p in parts):
                return None
            if any(p is None for p in parts):
                raise ValueError(f"give {what} for every image or for none")
            given = [p for p in parts if p is not None]
            width = max(p.shape[-1] for p in given)  # fused ViT views are wider: pad the others with zeros
            return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in given], dim=0)

        packed = PackedSequence(
            length=self.num_tokens,
            token_types=long(self._types),
            position_ids=long(self._positions),
            sample_ids=long(self._samples),
            split_ids=long(self._splits),
            split_lens=list(self.split_lens),
            split_modes=list(self.split_modes),
            split_samples=list(self.split_samples),
            sample_lens=list(self._sample_lens),
            sample_next_positions=list(self._sample_next),
            text_ids=long(self._text_ids),
            text_indexes=long(self._text_idx),
            vit_indexes=long(self._vit_idx),
            vit_position_ids=torch.cat(self._vit_pos) if self._vit_pos else long([]),
            vit_seqlens=list(self._vit_lens),
            vae_indexes=long(self._vae_idx),
            vae_position_ids=torch.cat(self._vae_pos) if self._vae_pos else long([]),
            vae_timesteps=torch.tensor(self._vae_t, dtype=torch.float32),
            vae_noisy=torch.tensor(self._vae_noisy, dtype=torch.bool),
            vae_image_ids=long(self._vae_img),
            ce_indexes=long(self._ce_idx),
            ce_labels=long(self._ce_labels),
            images=list(self.images),
            vit_patches=cat_data(self._vit_patches, "ViT patches"),
            vae_latents=cat_data(self._vae_latents, "VAE latents"),
        )
        return packed.to(device)
