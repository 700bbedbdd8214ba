"""Spatially aligned context for the generation expert (``model.aligned_context = "on"``).

A deliberate deviation from BAGEL for models trained from scratch (off in ``bagel-7b``): BAGEL
conditions a generated image on its context images only through attention, which a pretrained
BAGEL-7B has learned to use for copying spatial structure; a small model trained from random
weights in minutes learns that far too slowly and draws the population-average image. Direct
image-to-image models (U-Net, InstructPix2Pix, FLUX Fill) instead give every output location
the aligned input values at the first layer. This module adds exactly that, and nothing else:

Each noisy target latent token additionally receives ``proj(stack)``, where ``stack``
[num_slots * (D + 1)] (``model.aligned_window`` w > 1: [num_slots * (w*w*D + 1)], the w x w
neighbourhood of the position) holds, per modality *slot* (the index of the modality in
``unibrain_cli.modalities.MODALITIES``), the CLEAN latent token at the same (row, col) of the
latest clean VAE image of that modality that PRECEDES the target in the same sample (D
features), followed by a presence bit. The target's own slot, every image after it, images
of other samples, images of another grid and images without a modality are never stacked.
``proj`` (``aligned_context.weight`` / ``.bias``) is a zero-initialised linear map, so a model with the module computes exactly what
it computes without it until training moves the weights (a BAGEL-7B-MoT folder loads unchanged;
they are extra tensors). ``model.aligned_gain`` k multiplies the path's output: with Adam, a
zero-initialised projection moves by about the learning rate per step whatever its gradient, so
after the demo's 400 unified steps the plain path (k = 1) still added only a tenth of what the
noisy latent's own embedding adds (column norms 0.34 vs 4.1), and the model hardly read it; a gain
k lets it grow k times faster (``small`` uses 3; README, sixth session).

``model.aligned_draft`` c > 0 adds a *draft network* (:class:`AlignedDraft`, width c): a small
convolutional net over the latent grid that maps a target's stack (window 1) and a one-hot of the
target's own slot to an estimate of the target's clean latent token, regressed on its own loss
(``data.draft_pairs`` ground-truth (context -> target) pairs per ``unified`` step, drawn like
the data flow's orders; :mod:`unibrain_cli.training.stages.unified`). Its output enters the
projection beside the stack, detached, so the flow loss never trains it: the transformer reads a
local image-to-image estimate the way a pretrained BAGEL reads what it learned to copy, and still
draws the image. With ``model.draft_residual`` the flow itself starts from the draft: the network
runs the straight path from noise to the residual ``x0 - draft`` (``UniBrainModel.embed_with_draft``),
so an untrained velocity head already lands on the draft. The draft gets its own weights (``aligned_context.draft.*``) and a fixed-seed
init that draws nothing from the global RNG.

What a slot holds is whatever the context holds: ground truth in ``unified`` training, the
model's own generated (re-encoded) images in ``dhs`` and at inference, and nothing in an
image-free guidance context. With the KV cache, the clean images already in the cache are
recorded in the cache (``KVCache.images``) and passed as ``prior``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unibrain_cli.model.kv_cache import SlotImage
from unibrain_cli.model.packing import PackedSequence


def stack_slots(tokens: Tensor, present: Tensor) -> Tensor:
    """Window-1 stacks of images held in modality slots: ``tokens`` [B, S, T, D] (slot s of
    sample b: that modality's latent tokens), ``present`` bool [B, S] -> [B, T, S * (D + 1)], per
    token and slot the D features (zeros when absent) then the presence bit: the layout
    :meth:`AlignedContext.stack` gives a noisy target whose earlier images fill those slots."""
    b, s, t, d = tokens.shape
    bit = present[:, :, None, None].to(tokens.dtype).expand(b, s, t, 1)
    held = torch.cat([tokens * bit, bit], dim=3)  # [B, S, T, D + 1]
    return held.permute(0, 2, 1, 3).reshape(b, t, s * (d + 1))


#: Seed of the draft network's init (its own generator: the global RNG is never touched).
DRAFT_INIT_SEED = 20261201


#: Grid of the draft's last layers (``ModelConfig.aligned_draft_resolution``).
DraftResolution = Literal["tokens", "latent"]


# Memory format of the draft's fine-grid convolutions: channels-last runs a draft step of 64 pairs
# 1.3x faster on the Zen 5 EPYC (1.2x with oneDNN held to AVX2; `make bench`, draft_step); the first
# two convolutions already read a channels-last view of the token grid.
DRAFT_MEMORY_FORMAT = torch.channels_last


class AlignedDraft(nn.Module):
    """A convolutional net over the latent grid: ``[B, S*(D+1) + S, H, W]`` (the stack of each
    token, then the target slot's one-hot) -> ``[B, D, H, W]``, the clean target latent it regresses.

    ``resolution = "tokens"``: four 3x3 convolutions on the token grid (SiLU between).
    ``resolution = "latent"``: two 3x3 convolutions on the token grid (width c), a pixel shuffle
    by the latent patch p to the latent grid (p x p finer: c / p^2 channels), where the context's
    latents (unpatchified, ``D / p^2`` channels per slot), the presence bits and the one-hot join
    them, then three 3x3 convolutions there (widths c / 2, c / 2, ``D / p^2``), re-patched to
    tokens: the last layers see each latent pixel instead of a token's 2 x 2 block (the draft alone
    on the demo's pairs: T1 -> T2 / FLAIR / T1ce +0.7 / +0.9 / +1.0 dB at width 192; README).

    Init: PyTorch's default conv init from a generator seeded with :data:`DRAFT_INIT_SEED`, so a
    model with a draft starts with the same other weights. ``lr_scale``: the trainer's optimizer
    trains these weights at 3x the stage's learning rate (the draft alone on the demo's pairs,
    400 steps of 64 at width 128: T1 -> T2 decoded 22.5 dB at 3e-3 against 21.0 at 1e-3; README)."""

    lr_scale = 3.0

    def __init__(self, num_slots: int, latent_dim: int, width: int, resolution: DraftResolution = "tokens",
                 patch: int = 1) -> None:
        super().__init__()
        self.num_slots = num_slots
        self.latent_dim = latent_dim
        self.resolution = resolution
        self.patch = patch
        c_in = num_slots * (latent_dim + 1) + num_slots
        if resolution == "tokens":
            chans = [(c_in, width), (width, width), (width, width), (width, latent_dim)]
        elif resolution == "latent":
            if patch < 1 or latent_dim % (patch * patch) or width % (patch * patch) or width < 2:
                raise ValueError(f"a latent-resolution draft needs the latent width {latent_dim} and the draft width "
                                 f"{width} to be multiples of patch^2 = {patch * patch}")
            z = latent_dim // (patch * patch)
            fine_in = width // (patch * patch) + num_slots * z + 2 * num_slots
            chans = [(c_in, width), (width, width), (fine_in, width // 2), (width // 2, width // 2), (width // 2, z)]
        else:
            raise ValueError(f"the draft resolution must be 'tokens' or 'latent', got {resolution!r}")
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own init draws from the global RNG
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in chans)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        g = torch.Generator().manual_seed(DRAFT_INIT_SEED)
        for conv in self.convs:
            bound = (conv.in_channels * 9) ** -0.5  # PyTorch's default (kaiming_uniform, a = sqrt(5))
            conv.weight.copy_(torch.empty(conv.weight.shape).uniform_(-bound, bound, generator=g))
            conv.bias.copy_(torch.empty(conv.bias.shape).uniform_(-bound, bound, generator=g))

    def forward(self, stack: Tensor, grid: tuple[int, int], target_slot: Tensor) -> Tensor:
        """``stack`` [B, H*W, S*(D+1)] row-major tokens, ``target_slot`` long [B] (-1: none) ->
        draft tokens [B, H*W, D]."""
        b, n, _ = stack.shape
        rows, cols = grid
        s, d = self.num_slots, self.latent_dim
        onehot = torch.zeros(b, s, device=stack.device, dtype=stack.dtype)
        known = target_slot >= 0
        onehot[known, target_slot[known]] = 1.0
        x = torch.cat([stack, onehot[:, None, :].expand(b, n, s)], dim=2)
        x = x.reshape(b, rows, cols, -1).permute(0, 3, 1, 2)
        if self.resolution == "tokens":
            for i, conv in enumerate(self.convs):
                x = conv(x)
                if i < len(self.convs) - 1:
                    x = F.silu(x)
            return x.permute(0, 2, 3, 1).reshape(b, n, d)
        p, z = self.patch, d // (self.patch * self.patch)
        h = F.pixel_shuffle(F.silu(self.convs[1](F.silu(self.convs[0](x)))), p)  # [B, c / p^2, p*rows, p*cols]
        held = stack.reshape(b, rows, cols, s, d + 1)
        # tokens are ordered (kh, kw, channel) (embeddings.patchify_latent): unpatchify every slot
        lat = held[..., :d].reshape(b, rows, cols, s, p, p, z).permute(0, 3, 6, 1, 4, 2, 5)
        lat = lat.reshape(b, s * z, p * rows, p * cols)
        bits = torch.cat([held[..., d], onehot[:, None, None, :].expand(b, rows, cols, s)], dim=3)
        bits = bits.permute(0, 3, 1, 2).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)
        y = torch.cat([h, lat, bits], dim=1).contiguous(memory_format=DRAFT_MEMORY_FORMAT)
        for i, conv in enumerate(self.convs[2:]):
            y = conv(y)
            if i < 2:
                y = F.silu(y)
        return y.reshape(b, z, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, n, d)


class AlignedContext(nn.Module):
    """A linear map ``weight`` [hidden, num_slots * (latent_dim + 1)] (+ latent_dim columns for the draft
    with ``draft`` > 0) + ``bias`` [hidden], zero-initialised
    (built from zeros directly, so adding the module draws nothing from the RNG: a model with it
    starts with the same other weights as one without, for the same seed).

    Args:
        num_slots: number of modality slots (``len(MODALITIES)``).
        latent_dim: width D of one latent token.
        hidden: LLM width.
        window: odd side w of the neighbourhood stacked per slot (``model.aligned_window``): the
            w x w context tokens around the target token's (row, col), zeros beyond the grid,
            row-major offsets; 1 = the same position only (per slot ``w*w*D + 1`` features).
        gain: fixed factor on the path's output (``model.aligned_gain``). The projection starts at
            zero either way; under Adam, whose steps do not scale with the gradient, a gain k makes
            the path's output move k times faster than the plain projection's (like a k-fold
            learning rate for these tensors alone).
        draft: width of the :class:`AlignedDraft` (``model.aligned_draft``; 0 = none, needs window 1).
        draft_resolution, patch: the draft's grid (``model.aligned_draft_resolution``) and the
            latent patch size p it unpatchifies by (``"latent"``).
    """

    def __init__(self, num_slots: int, latent_dim: int, hidden: int, window: int = 1, gain: float = 1.0,
                 draft: int = 0, draft_resolution: DraftResolution = "tokens", patch: int = 1) -> None:
        super().__init__()
        if not gain > 0:
            raise ValueError(f"the aligned gain must be > 0, got {gain}")
        if window < 1 or window % 2 == 0:
            raise ValueError(f"the aligned window must be a positive odd number, got {window}")
        if draft < 0 or (draft and window != 1):
            raise ValueError(f"the aligned draft needs window 1 and a width >= 0, got window {window}, width {draft}")
        self.num_slots = num_slots
        self.latent_dim = latent_dim
        self.window = window
        self.gain = float(gain)
        self.draft: AlignedDraft | None = (AlignedDraft(num_slots, latent_dim, draft, draft_resolution, patch)
                                           if draft else None)
        extra = latent_dim if draft else 0
        self.weight = nn.Parameter(torch.zeros(hidden, num_slots * self.slot_width + extra))
        self.bias = nn.Parameter(torch.zeros(hidden))

    @property
    def draft_width(self) -> int:
        """Width of the draft network (0: none)."""
        return self.draft.convs[0].out_channels if self.draft is not None else 0

    @property
    def draft_resolution(self) -> DraftResolution:
        """Grid of the draft network's last layers (``"tokens"`` without a draft)."""
        return self.draft.resolution if self.draft is not None else "tokens"

    @property
    def layout(self) -> tuple[int, float, int, DraftResolution]:
        """(window, gain, draft width, draft resolution): what a checkpoint's path must match to be reused."""
        return (self.window, self.gain, self.draft_width, self.draft_resolution)

    @property
    def slot_width(self) -> int:
        """Features per slot: the window's latent tokens, then the presence bit."""
        return self.window * self.window * self.latent_dim + 1

    def neighbourhood(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        """[rows*cols, D] row-major tokens -> [rows*cols, w*w*D]: each token's w x w neighbours."""
        if self.window == 1:
            return tokens
        rows, cols = grid
        r = self.window // 2
        g = F.pad(tokens.reshape(rows, cols, -1).permute(2, 0, 1), (r, r, r, r))  # [D, rows+2r, cols+2r]
        parts = [g[:, dy:dy + rows, dx:dx + cols] for dy in range(self.window) for dx in range(self.window)]
        return torch.cat(parts, dim=0).reshape(-1, rows * cols).t()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if self.draft is not None:
            self.draft.reset_parameters()

    @property
    def trained(self) -> bool:
        """True once the projection has moved from zero (a zero projection ignores the draft too)."""
        return bool(self.weight.any() or self.bias.any())

    def stack(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
              priors: Sequence[Sequence[SlotImage]] | None = None) -> Tensor:
        """See :meth:`stack_spans` (the stack alone)."""
        return self.stack_spans(packed, prior, priors)[0]

    def stack_spans(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
                    priors: Sequence[Sequence[SlotImage]] | None = None
                    ) -> tuple[Tensor, list[tuple[int, int, tuple[int, int], int]]]:
        """The aligned stack of every noisy VAE token: [N_noisy, num_slots * slot_width], rows in
        ``packed.noisy_vae_rows`` order, and per noisy image ``(first row, tokens, grid, modality)``.

        Args:
            packed: the pack (its ``vae_latents`` hold the clean images' tokens).
            prior: clean images of a cached context before the pack (one-sample packs only),
                oldest first.
            priors: per sample, the clean images of its cached context (batched inference,
                :mod:`unibrain_cli.model.batch_cache`); replaces ``prior``.
        """
        if priors is not None and len(priors) != packed.num_samples:
            raise ValueError(f"{len(priors)} priors for a pack of {packed.num_samples} samples")
        s, width = self.num_slots, self.slot_width
        lat = packed.vae_latents
        n_noisy = int(packed.vae_noisy.sum())
        out = torch.zeros(n_noisy, s * width, device=packed.device,
                          dtype=lat.dtype if lat is not None else torch.float32)
        spans: list[tuple[int, int, tuple[int, int], int]] = []
        if n_noisy == 0 or lat is None:
            return out, spans
        if prior:
            if packed.num_samples != 1:
                raise ValueError("a cached context (prior images) needs a one-sample pack")
            priors = [prior]

        def context_of(sample: int) -> dict[int, tuple[tuple[int, int], Tensor]]:
            return {slot: (grid, tokens) for slot, grid, tokens in (priors[sample] if priors else ())}

        sample = 0
        latest = context_of(0)
        row = 0
        for span in packed.images:
            if span.kind != "vae":
                continue
            if span.sample != sample:
                sample = span.sample
                latest = context_of(sample)
            tokens = lat[span.token_start: span.token_start + span.num_tokens]
            if not span.noisy:
                if 0 <= span.modality < s:
                    latest[span.modality] = (span.grid_hw, tokens)
                continue
            spans.append((row, span.num_tokens, span.grid_hw, span.modality))
            for slot, (grid, ctx) in latest.items():
                if slot == span.modality or grid != span.grid_hw:
                    continue
                block = out[row: row + span.num_tokens]
                block[:, slot * width: (slot + 1) * width - 1] = self.neighbourhood(ctx, grid).to(out.dtype)
                block[:, (slot + 1) * width - 1] = 1.0
            row += span.num_tokens
        return out, spans

    def draft_rows(self, stack: Tensor, spans: Sequence[tuple[int, int, tuple[int, int], int]]) -> Tensor:
        """The draft network's estimate of every noisy row's clean latent: [N_noisy, D] (images of
        one grid go through it together)."""
        assert self.draft is not None
        out = stack.new_zeros(stack.shape[0], self.latent_dim)
        by_grid: dict[tuple[int, int], list[tuple[int, int, int]]] = {}
        for row, n, grid, modality in spans:
            by_grid.setdefault(tuple(grid), []).append((row, n, modality))
        for grid, group in by_grid.items():
            rows = torch.stack([stack[r: r + n] for r, n, _ in group])
            slots = torch.tensor([m if 0 <= m < self.num_slots else -1 for _, _, m in group], device=stack.device)
            est = self.draft(rows.to(self.draft.convs[0].weight.dtype), grid, slots)
            for (r, n, _), e in zip(group, est):
                out[r: r + n] = e.to(out.dtype)
        return out

    def forward(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
                priors: Sequence[Sequence[SlotImage]] | None = None) -> Tensor:
        """[N_noisy, hidden]: the projection added to the noisy tokens' input embeddings (of the
        stack, then of the detached draft when there is one)."""
        return self.with_draft(packed, prior, priors)[0]

    def with_draft(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
                   priors: Sequence[Sequence[SlotImage]] | None = None) -> tuple[Tensor, Tensor | None]:
        """:meth:`forward`'s projection and the detached draft [N_noisy, D] it read (None without one)."""
        feats, spans = self.stack_spans(packed, prior, priors)
        draft = None
        if self.draft is not None:
            with torch.no_grad():
                draft = self.draft_rows(feats, spans)
            feats = torch.cat([feats, draft], dim=1)
        out = F.linear(feats.to(self.weight.dtype), self.weight, self.bias)
        return (out if self.gain == 1.0 else out * self.gain), draft


def clean_slot_images(packed: PackedSequence, sample: int | None = None) -> list[SlotImage]:
    """The clean VAE images that carry a modality slot, in order (what a KV cache records when
    the block is appended): of a one-sample block, or of ``sample`` of a multi-sample one."""
    lat = packed.vae_latents
    if lat is None:
        return []
    return [(span.modality, span.grid_hw, lat[span.token_start: span.token_start + span.num_tokens])
            for span in packed.images if span.kind == "vae" and not span.noisy and span.modality >= 0
            and (sample is None or span.sample == sample)]
