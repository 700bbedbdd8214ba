"""A fused ViT view of the context's images for the understanding side (``model.fused_view = "on"``).

BAGEL shows every context image to the understanding expert as its own ViT image: the expert
must find, through attention across images, that the bright FLAIR spot and the dark T1 spot sit
at the same place. A model pretrained on web data has learned to; the demo's from-scratch model
has not (twenty-fourth session, README: a ViT of ``small``'s shape reading the modalities as
separate images 76.7 / 78.7 % closed-set Top-1 on the demo's test cases, reading one image whose
patches stack the six modality channels pixel-aligned 87.0 / 82.0 %). The understanding-side
counterpart of ``model.aligned_context``:

- Before the first question of a sample, one more ViT image enters the sequence: the *fused view*.
  Patch (r, c) of it holds, in fixed per-modality slots, patch (r, c) of the latest ViT view of
  each modality the sample showed before it (its ViT input, first channel, in [-1, 1]), zeros in
  an absent slot, and one presence bit per slot. Its span carries the modality slot
  :data:`FUSED_SLOT` (one past the last modality).
- :class:`FusedView` (``fused_view.proj`` / ``fused_view.presence``, not BAGEL tensors) embeds
  those rows to the ViT width in place of ``patch_embedding``; the SigLIP position embedding,
  encoder, connector and ``vit_pos_embed`` are shared with the ordinary views.
- In training the slots hold the sample's own views (in ``dhs``: the generated images where they
  replace the ground truth); at inference the ViT views the context holds (KV caches record them,
  :func:`vit_views`), so the generated modalities enter the fused view as they enter the context.

``"off"`` (the default, and ``bagel-7b``) builds nothing and adds nothing: BAGEL exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.packing import PackedSequence

#: Modality slot of a fused view's span (``ImageSpan.modality``): one past the last modality.
FUSED_SLOT = len(MODALITIES)
#: A ViT view recorded by a cache: (modality slot, ViT inputs [Tv, p*p*C]).
ViewRecord = tuple[int, Tensor]
#: seed of the fixed generator the module is initialised from (the same weights whether it is built
#: with the model or added to a loaded one)
INIT_SEED = 1729


def fused_width(patch: int, num_slots: int = FUSED_SLOT) -> int:
    """Features of one fused patch: ``num_slots`` single-channel patches, then ``num_slots`` presence bits."""
    return num_slots * patch * patch + num_slots


def fuse_patches(views: Sequence[ViewRecord], channels: int, num_slots: int = FUSED_SLOT) -> Tensor:
    """The fused view's rows [Tv, :func:`fused_width`] from ViT views (slot, [Tv, p*p*channels]).

    A later view of a slot replaces an earlier one; views with a slot outside ``0..num_slots-1``
    (e.g. an earlier fused view) are skipped. Patches are laid out (kh, kw, c), so channel 0 of
    the replicated grayscale input is every ``channels``-th feature."""
    latest: dict[int, Tensor] = {}
    for slot, patches in views:
        if 0 <= slot < num_slots:
            latest[int(slot)] = patches
    if not latest:
        raise ValueError("a fused view needs at least one ViT view with a modality slot")
    ref = next(iter(latest.values()))
    tv, pp = ref.shape[0], ref.shape[1] // channels
    out = ref.new_zeros(tv, num_slots * pp + num_slots)
    for slot, patches in latest.items():
        if patches.shape != ref.shape:
            raise ValueError(f"ViT views of one fused view differ in shape: {tuple(patches.shape)} vs {tuple(ref.shape)}")
        out[:, slot * pp:(slot + 1) * pp] = patches[:, ::channels]
        out[:, num_slots * pp + slot] = 1.0
    return out


def vit_views(packed: PackedSequence, sample: int | None = None) -> list[ViewRecord]:
    """The ViT views that carry a slot (modalities and fused views), in order, of a one-sample block
    or of ``sample`` of a multi-sample one: what a KV cache records when the block is appended."""
    patches = packed.vit_patches
    if patches is None:
        return []
    return [(span.modality, patches[span.token_start: span.token_start + span.num_tokens])
            for span in packed.images if span.kind == "vit" and span.modality >= 0
            and (sample is None or span.sample == sample)]


def needs_fused(views: Sequence[ViewRecord]) -> bool:
    """A context needs a fused view before its question: it holds a modality's ViT view after its
    last fused view (or has none yet)."""
    return bool(views) and views[-1][0] != FUSED_SLOT


def fused_spans(packed: PackedSequence) -> list[int]:
    """Indexes (among the pack's ViT spans, in order) of its fused views."""
    vit = [s for s in packed.images if s.kind == "vit"]
    return [i for i, s in enumerate(vit) if s.modality == FUSED_SLOT]


class FusedView(nn.Module):
    """Embeds fused-view rows [n, :func:`fused_width`] to the ViT width: a linear map of the stacked
    slot patches plus the sum of the present slots' learned vectors (the role ``patch_embedding``
    plays for an ordinary view)."""

    def __init__(self, patch: int, vit_hidden: int, num_slots: int = FUSED_SLOT) -> None:
        super().__init__()
        self.patch = patch
        self.num_slots = num_slots
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init would draw from the global RNG
            self.proj = nn.Linear(num_slots * patch * patch, vit_hidden)
        self.presence = nn.Parameter(torch.zeros(num_slots, vit_hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LeCun-normal ``proj`` (unit-scale output for inputs in [-1, 1]), zero bias, N(0, 0.02)
        presence vectors, drawn from a fixed-seed generator (the global RNG is untouched)."""
        g = torch.Generator().manual_seed(INIT_SEED)
        w = torch.randn(self.proj.weight.shape, generator=g) * self.proj.in_features ** -0.5
        self.proj.weight.copy_(w)
        self.proj.bias.zero_()
        self.presence.copy_(torch.randn(self.presence.shape, generator=g) * 0.02)

    @property
    def width(self) -> int:
        return fused_width(self.patch, self.num_slots)

    def forward(self, rows: Tensor) -> Tensor:
        if rows.shape[-1] < self.width:
            raise ValueError(f"fused-view rows need {self.width} features, got {rows.shape[-1]}")
        pix = rows[:, : self.num_slots * self.patch**2]
        present = rows[:, self.num_slots * self.patch**2: self.width]
        w = self.proj.weight
        return self.proj(pix.to(w.dtype)) + present.to(w.dtype) @ self.presence
