"""Sample plans -> packed training sequences, image views and loss bookkeeping (sa / unified / dhs).

The data side (:mod:`unibrain_cli.data.dataflow`) describes a sample abstractly as a
:class:`~unibrain_cli.data.dataflow.SamplePlan`. This module turns plans into what the model
runs on, in two halves:

*CPU half* (``next_batch``, deterministic, no model): :func:`plan_items` tokenises text and
assigns every image block its source pixels and, for noisy targets, a *slot* (the index of the
noisy image in the micro-batch, which selects its noise and flow time);
:func:`build_batch` places all samples in one :class:`~unibrain_cli.model.packing.PackedSequence`
(image payloads left empty) and records, per image span, where its pixels come from.

*Device half* (inside the training module's ``forward``): :func:`latent_tokens` /
:func:`vit_tokens` encode the micro-batch's pixels once (VAE posterior mean, scaled; ViT
patches), :func:`fill_pack` gathers them into the pack, replaces noisy rows by
``x_t = (1 - t) x0 + t eps`` and returns the velocity target ``eps - x0``, and
:func:`pack_losses` computes the NTP and flow terms.

Conventions (shared with inference; keep them identical there):

- **Text**: a segment becomes ``[bos] + tokens[:max_text_tokens] + [eos]`` (bos/eos =
  ``<|im_start|>`` / ``<|im_end|>``). A loss segment is added as two causal splits, ``[bos]``
  (no loss) then ``tokens + [eos]`` (targets), so every content token and the closing eos are
  predicted and the bos is not (BAGEL's ``[bos] + ids -> ids + [eos]`` labelling). Conditioning
  segments are one split without loss.
- **Images** (slice pixels in [0, 1], [S, S]): every image split is wrapped in the tokenizer's
  ``<|vision_start|>`` / ``<|vision_end|>`` markers. The VAE sees ``2 x - 1`` replicated to
  ``vae.in_channels``; its latent is the posterior MEAN, ``z = scale (z_raw - shift)``, cut into
  ``latent_patch_size`` patches. The ViT sees ``2 x - 1`` replicated to ``vit.num_channels``,
  cut into ``vit.patch_size`` patches (SigLIP's mean 0.5 / std 0.5 normalisation), after a
  bilinear resize to the nearest multiple of the patch when S is not one (256 -> 252 for 14).
- **Generated images** (DHS): the latent is decoded, averaged over channels, clamped to
  [-1, 1] and mapped to [0, 1]; it then enters the context like any image (re-encoded by the
  VAE and the ViT), as inference does with a generated modality.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.data.dataflow import ImageSegment, SamplePlan, TextSegment
from unibrain_cli.flow.objective import flow_loss, interpolate, velocity_target
from unibrain_cli.inference.blocks import images_to_vae_tokens, latent_tokens_to_images, vit_side, wrap_text
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.fused import FUSED_SLOT, fuse_patches
from unibrain_cli.model.packing import PackedSequence, SequenceBuilder
from unibrain_cli.model.vae import AutoEncoder

# ---------------------------------------------------------------------------------------------
# geometry and text
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageGeometry:
    """Token layout of one square slice of side ``image_size`` for a model config.

    Attributes:
        image_size: S, pixels.
        vit_patch, vit_channels: ViT patch side and input channels.
        vae_channels, downsample, latent_patch, z_channels: VAE input channels, spatial
            reduction d, latent patch p and latent channels.
        vit_side, latent_side: position-table sides (for the builder).
        markers: image splits carry start/end marker tokens (2 extra tokens each).
    """

    image_size: int
    vit_patch: int
    vit_channels: int
    vae_channels: int
    downsample: int
    latent_patch: int
    z_channels: int
    vit_side: int
    latent_side: int
    markers: bool = True

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_size: int) -> ImageGeometry:
        return cls(image_size, cfg.vit.patch_size, cfg.vit.num_channels, cfg.vae.in_channels, cfg.vae.downsample,
                   cfg.latent_patch_size, cfg.vae.z_channels, cfg.vit_max_num_patch_per_side, cfg.max_latent_size)

    def problems(self) -> list[str]:
        """Human-readable reasons why slices of this size cannot be tokenised (empty when fine)."""
        s, out = self.image_size, []
        if self.vit_grid[0] > self.vit_side:
            out.append(f"image size {s} gives {self.vit_grid[0]} ViT patches per side (patch "
                       f"{self.vit_patch}); model.vit_max_num_patch_per_side is {self.vit_side}")
        cell = self.downsample * self.latent_patch
        if s % cell or s // cell > self.latent_side:
            out.append(f"image size {s} must be a multiple of vae downsample x latent_patch_size = {cell} with at "
                       f"most model.max_latent_size={self.latent_side} latent tokens per side")
        return out

    @property
    def vit_size(self) -> int:
        """Side the ViT sees: S rounded to the nearest multiple of the patch (BAGEL's stride rounding,
        e.g. 256 -> 252 for patch 14); equal to S when S is a multiple already."""
        return vit_side(self.image_size, self.vit_patch)

    @property
    def vit_grid(self) -> tuple[int, int]:
        n = self.vit_size // self.vit_patch
        return (n, n)

    @property
    def latent_grid(self) -> tuple[int, int]:
        n = self.image_size // self.downsample // self.latent_patch
        return (n, n)

    @property
    def latent_hw(self) -> int:
        """Side of the latent map (S / d)."""
        return self.image_size // self.downsample

    @property
    def latent_dim(self) -> int:
        return self.latent_patch**2 * self.z_channels

    @property
    def vit_image_tokens(self) -> int:
        return self.vit_grid[0] * self.vit_grid[1]

    @property
    def vae_image_tokens(self) -> int:
        return self.latent_grid[0] * self.latent_grid[1]

    @property
    def vit_block_tokens(self) -> int:
        """Tokens of one ViT split, markers included."""
        return self.vit_image_tokens + 2 * self.markers

    @property
    def vae_block_tokens(self) -> int:
        """Tokens of one VAE split (clean or noisy), markers included."""
        return self.vae_image_tokens + 2 * self.markers


class TextIds:
    """``text -> [bos] + ids[:max_tokens] + [eos]`` (``inference.blocks.wrap_text``) with a memo
    (phrasings and findings repeat).

    Args:
        tokenizer: anything with ``encode(text) -> list[int]``, ``bos_id`` and ``eos_id``.
        max_tokens: ``data.max_text_tokens`` (>= 1): cap on the tokens of one segment's text.
    """

    def __init__(self, tokenizer: object, max_tokens: int, memo_size: int = 65536) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_text_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._memo: dict[str, tuple[int, ...]] = {}
        self._memo_size = memo_size

    def __call__(self, text: str) -> tuple[int, ...]:
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(int(i) for i in wrap_text(self.tokenizer, text, self.max_tokens))  # type: ignore[arg-type]
            if len(self._memo) >= self._memo_size:
                self._memo.clear()
            self._memo[text] = ids
        return ids

    def length(self, text: str) -> int:
        return len(self(text))


# ---------------------------------------------------------------------------------------------
# items: a plan with tokens and image sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextItem:
    """A wrapped text segment (``ids`` start with bos, end with eos); ``loss``: NTP on ids[1:]."""

    ids: tuple[int, ...]
    loss: bool
    role: str


@dataclass(frozen=True)
class ImageItem:
    """One image split.

    Attributes:
        kind: ``"vit"`` or ``"vae"``.
        noisy: a noisy VAE target (flow loss; invisible to later tokens).
        image: index of its ground-truth pixels in the micro-batch's pixel list.
        slot: for a noisy image, its index among the micro-batch's noisy images (noise, time);
            for a clean view of a generated target, the slot that generated it; else -1.
        sa: the noisy image belongs to a self-alignment sample.
        modality: index of the image's modality in ``MODALITIES`` (the slot of
            ``model.aligned_context``), -1 when unknown; ``FUSED_SLOT`` for a fused view.
        parts: of a fused view (``model.fused_view``), per shown modality ``(slot, image, gen)``:
            its modality slot, its pixels and the generation slot whose output it shows (-1: the
            ground truth); ``image`` is then the first part's pixels. Empty for other images.
    """

    kind: Literal["vit", "vae"]
    noisy: bool
    image: int
    slot: int = -1
    sa: bool = False
    modality: int = -1
    parts: tuple[tuple[int, int, int], ...] = ()


Item = TextItem | ImageItem


def gets_fused_view(plan: SamplePlan) -> bool:
    """With ``model.fused_view = "on"``, whether the plan's sequence gets a fused view: it asks a
    question after at least one ViT view (the fused view goes right before the first question)."""
    seen = False
    for seg in plan.segments:
        if isinstance(seg, ImageSegment) and seg.view == "vit":
            seen = True
        elif isinstance(seg, TextSegment) and seg.role == "question":
            return seen
    return False


def plan_items(
    plan: SamplePlan,
    pixel_index: Callable[[str], int],
    text_ids: Callable[[str], tuple[int, ...]],
    first_slot: int,
    fused: bool = False,
) -> tuple[list[Item], int]:
    """Materialise one plan into items.

    Args:
        plan: the sample plan.
        pixel_index: modality -> index of that image of the sample in the micro-batch pixel list.
        text_ids: text -> wrapped ids (:class:`TextIds`).
        first_slot: slot number of the plan's first noisy image.
        fused: ``model.fused_view = "on"``: a fused view of the ViT views so far goes right before
            the first question (:func:`gets_fused_view`; ``model/fused.py``).

    Returns:
        (items, next free slot).
    """
    items: list[Item] = []
    generated: dict[str, int] = {}
    views: dict[int, tuple[int, int]] = {}  # modality slot -> (pixels, generation slot) of its latest ViT view
    asked = False
    slot = first_slot
    sa = plan.kind == "self_alignment"
    for seg in plan.segments:
        if isinstance(seg, TextSegment):
            if fused and seg.role == "question" and not asked and views:
                parts = tuple((m, pix, gen) for m, (pix, gen) in views.items())
                items.append(ImageItem("vit", False, parts[0][1], modality=FUSED_SLOT, parts=parts))
            asked = asked or seg.role == "question"
            items.append(TextItem(text_ids(seg.text), seg.loss, seg.role))
            continue
        assert isinstance(seg, ImageSegment)
        pix = pixel_index(seg.modality)
        mod = MODALITIES.index(seg.modality)
        if seg.view == "vae_noisy":
            items.append(ImageItem("vae", True, pix, slot, sa, mod))
            generated[seg.modality] = slot
            slot += 1
        else:
            kind: Literal["vit", "vae"] = "vit" if seg.view == "vit" else "vae"
            gen = -1 if sa else generated.get(seg.modality, -1)
            items.append(ImageItem(kind, False, pix, gen, modality=mod))
            if kind == "vit":
                views[mod] = (pix, gen)
    return items, slot


def add_items(builder: SequenceBuilder, items: Sequence[Item], geom: ImageGeometry, timesteps: Sequence[float],
              with_loss: bool = True, vit_data: Callable[[ImageItem], Tensor | None] | None = None,
              vae_data: Callable[[ImageItem], Tensor | None] | None = None) -> None:
    """Append items to the current sample of ``builder`` (see the module docstring for text).

    ``timesteps[slot]`` is the flow time of a noisy image; ``with_loss=False`` adds loss text as
    plain conditioning (KV-cache context blocks); ``vit_data`` / ``vae_data`` optionally give
    each image's payload (else the pack is built without payloads).
    """
    for it in items:
        if isinstance(it, TextItem):
            if it.loss and with_loss:
                builder.add_text(it.ids[:1])
                builder.add_text(it.ids[1:], loss=True)
            else:
                builder.add_text(it.ids)
        elif it.kind == "vit":
            builder.add_vit_image(geom.vit_grid, patches=vit_data(it) if vit_data else None, modality=it.modality)
        else:
            t = float(timesteps[it.slot]) if it.noisy else None
            builder.add_vae_image(geom.latent_grid, noisy=it.noisy, timestep=t,
                                  latents=vae_data(it) if vae_data else None, modality=it.modality)


# ---------------------------------------------------------------------------------------------
# the micro-batch
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainBatch:
    """One micro-batch of a unified-model stage (CPU until the trainer moves it).

    Attributes:
        packed: the pack (no ``vit_patches`` / ``vae_latents`` yet; filled in ``forward``).
        pixels: float32 [n_img, S, S] in [0, 1], every distinct ground-truth image used.
        vit_src, vae_src: long [n_vit_spans] / [n_vae_spans], pixel index of each ViT / VAE span
            of the pack (in pack order).
        vit_gen, vae_gen: long, same shapes: the generation slot whose output this span shows
            (clean views of generated targets), else -1 (noisy spans: -1).
        timesteps: float32 [n_slots] flow time of each noisy image (pack order).
        noise: float32 [n_slots, T, latent_dim] the noise eps of each noisy image.
        slot_sa: bool [n_slots] noisy image of a self-alignment sample.
        exit_steps: long [n_slots] DHS exit step of each slot (-1 outside DHS).
        samples: per sample its items (for KV-cache rollouts).
        descriptions: per sample a one-line plan description (logs/tests).
        markers: the (start, end) image marker ids the pack was built with.
        fused: per fused view (``model.fused_view``) its index among the pack's ViT spans and its
            :attr:`ImageItem.parts`.
        vit_channels: channels of the ViT inputs (the fused view reads the first).
    """

    packed: PackedSequence
    pixels: Tensor
    vit_src: Tensor
    vae_src: Tensor
    vit_gen: Tensor
    vae_gen: Tensor
    timesteps: Tensor
    noise: Tensor
    slot_sa: Tensor
    exit_steps: Tensor
    samples: list[list[Item]] = field(default_factory=list)
    descriptions: list[str] = field(default_factory=list)
    markers: tuple[int, int] | None = None
    fused: list[tuple[int, tuple[tuple[int, int, int], ...]]] = field(default_factory=list)
    vit_channels: int = 3

    @property
    def num_slots(self) -> int:
        return int(self.timesteps.numel())

    def loss_counts(self) -> dict[str, int]:
        """Target tokens of each loss term (:func:`pack_losses`): ``ntp`` the NTP labels, ``flow``
        the noisy latent rows of generation targets, ``sa`` those of self-alignment targets (every
        noisy image carries the flow loss on all its ``T`` latent tokens, once)."""
        rows = int(self.noise.shape[1]) if self.num_slots else 0
        n_sa = int(self.slot_sa.sum())
        return {"ntp": int(self.packed.ce_labels.numel()), "flow": (self.num_slots - n_sa) * rows,
                "sa": n_sa * rows}

    def to(self, device: torch.device | str) -> TrainBatch:
        changes = {k: v.to(device) for k, v in vars(self).items() if isinstance(v, Tensor)}
        return dataclasses.replace(self, packed=self.packed.to(device), **changes)


@dataclass(frozen=True)
class DraftPairs:
    """Ground-truth (context -> target) pairs for the aligned path's draft network
    (``model.aligned_draft``; :meth:`UnifiedTrainModule.draft_loss`), as latent tokens.

    ``stack`` [B, T, num_slots * (D + 1)]: each pair's context latents in their modality slots,
    laid out as :meth:`AlignedContext.stack` lays out a noisy target's earlier images;
    ``target_slot`` long [B]: the target's slot; ``target`` [B, T, D]: its clean latent tokens.
    """

    stack: Tensor
    target_slot: Tensor
    target: Tensor

    def count(self) -> int:
        """Latent tokens the draft loss averages over."""
        return int(self.target.shape[0] * self.target.shape[1])

    def to(self, device: torch.device | str) -> DraftPairs:
        return DraftPairs(*(t.to(device) for t in (self.stack, self.target_slot, self.target)))


def build_batch(
    samples: Sequence[Sequence[Item]],
    pixels: Tensor,
    geom: ImageGeometry,
    markers: tuple[int, int] | None,
    timesteps: Tensor,
    noise: Tensor,
    exit_steps: Tensor | None = None,
    descriptions: Sequence[str] = (),
) -> TrainBatch:
    """Pack materialised samples (see :class:`TrainBatch`); slots must be numbered in pack order."""
    b = SequenceBuilder(geom.vit_side, geom.latent_side, markers)
    vit_src: list[int] = []
    vae_src: list[int] = []
    vit_gen: list[int] = []
    vae_gen: list[int] = []
    slot_sa: list[bool] = []
    fused: list[tuple[int, tuple[tuple[int, int, int], ...]]] = []
    ts = timesteps.tolist()
    for items in samples:
        add_items(b, items, geom, ts)
        for it in items:
            if not isinstance(it, ImageItem):
                continue
            if it.kind == "vit":
                if it.parts:
                    fused.append((len(vit_src), it.parts))
                vit_src.append(it.image)
                vit_gen.append(it.slot)
            else:
                vae_src.append(it.image)
                vae_gen.append(-1 if it.noisy else it.slot)
                if it.noisy:
                    if it.slot != len(slot_sa):
                        raise ValueError(f"noisy slots must be numbered in pack order; got {it.slot}, expected "
                                         f"{len(slot_sa)}")
                    slot_sa.append(it.sa)
        b.next_sample()
    n_slots = len(slot_sa)
    if timesteps.shape != (n_slots,) or noise.shape[0] != n_slots:
        raise ValueError(f"{n_slots} noisy images but timesteps {tuple(timesteps.shape)}, noise {tuple(noise.shape)}")

    def long(v: list[int]) -> Tensor:
        return torch.tensor(v, dtype=torch.long)

    return TrainBatch(
        packed=b.build(), pixels=pixels.float(), vit_src=long(vit_src), vae_src=long(vae_src),
        vit_gen=long(vit_gen), vae_gen=long(vae_gen), timesteps=timesteps.float(), noise=noise.float(),
        slot_sa=torch.tensor(slot_sa, dtype=torch.bool),
        exit_steps=exit_steps.long() if exit_steps is not None else torch.full((n_slots,), -1, dtype=torch.long),
        samples=[list(s) for s in samples], descriptions=list(descriptions), markers=markers,
        fused=fused, vit_channels=geom.vit_channels,
    )


# ---------------------------------------------------------------------------------------------
# image views (device half)
# ---------------------------------------------------------------------------------------------


def batched_patches(x: Tensor, p: int) -> Tensor:
    """[n, C, H, W] -> [n, (H/p)(W/p), p*p*C], features ordered (kh, kw, c) (``embeddings.patch_tokens``)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def unpatch(tokens: Tensor, c: int, h: int, w: int, p: int) -> Tensor:
    """Inverse of :func:`batched_patches`: [n, (h/p)(w/p), p*p*c] -> [n, c, h, w]."""
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, h, w)


def to_model_input(pixels: Tensor, channels: int) -> Tensor:
    """[n, S, S] in [0, 1] -> [n, channels, S, S] in [-1, 1] (the modality replicated)."""
    return (pixels * 2.0 - 1.0)[:, None].expand(-1, channels, -1, -1)


def latent_tokens(vae: AutoEncoder, pixels: Tensor, cfg: ModelConfig) -> Tensor:
    """Scaled posterior-mean latent tokens of slices: [n, S, S] in [0, 1] -> float32 [n, T, p*p*z]
    (``inference.blocks.images_to_vae_tokens``, stacked)."""
    if pixels.shape[0] == 0:
        d = cfg.latent_patch_size**2 * cfg.vae.z_channels
        return pixels.new_zeros((0, 0, d))
    tokens, _ = images_to_vae_tokens(vae, pixels, cfg)
    return torch.stack(tokens)


def vit_tokens(pixels: Tensor, patch: int, channels: int, size: int | None = None) -> Tensor:
    """ViT patch inputs of slices: [n, S, S] in [0, 1] -> [n, (V/P)^2, P*P*channels] in [-1, 1].

    Equals ``inference.blocks.image_to_vit_patches`` per slice (batched) when S is a multiple of
    the patch. ``size`` V (default S, see :attr:`ImageGeometry.vit_size`): the slices are first
    resized to V x V (bilinear, antialiased) when it differs from S (e.g. 256 -> 252 for patch 14).
    """
    if size is not None and size != pixels.shape[-1]:
        pixels = F.interpolate(pixels[:, None].float(), size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)[:, 0].clamp(0.0, 1.0)
    return batched_patches(to_model_input(pixels, channels), patch)


def decode_pixels(vae: AutoEncoder, tokens: Tensor, geom: ImageGeometry, cfg: ModelConfig) -> Tensor:
    """Latent tokens [n, T, D] -> slices [n, S, S] in [0, 1] (``inference.blocks.latent_tokens_to_images``)."""
    return latent_tokens_to_images(vae, list(tokens), geom.latent_grid, cfg)


# ---------------------------------------------------------------------------------------------
# filling a pack and the losses
# ---------------------------------------------------------------------------------------------


def fused_item_rows(parts: Sequence[tuple[int, int, int]], vit: Tensor, gen_vit: Tensor | None, channels: int) -> Tensor:
    """A fused view's ViT inputs [Tv, width] from its :attr:`ImageItem.parts`: each modality's ViT
    inputs from ``vit`` [n_img, Tv, P] (ground truth) or ``gen_vit`` [n_slots, Tv, P] (generated)."""
    return fuse_patches([(m, gen_vit[gen] if gen >= 0 and gen_vit is not None else vit[pix])
                         for m, pix, gen in parts], channels)


@dataclass
class FilledPack:
    """A pack ready for the model plus its flow targets.

    ``packed``: with ``vit_patches`` and ``vae_latents`` (noisy rows = x_t);
    ``target``: [n_slots * T, D] velocity targets of the noisy rows (pack order): ``eps - x0``, or
    ``(x_t - x0) / t`` for slots whose x_t is a given state (``fill_pack``'s ``states``);
    ``row_sa``: bool [n_slots * T] rows of self-alignment images.
    """

    packed: PackedSequence
    target: Tensor
    row_sa: Tensor


def fill_pack(batch: TrainBatch, lat: Tensor, vit: Tensor, gen_lat: Tensor | None = None,
              gen_vit: Tensor | None = None, states: Tensor | None = None,
              from_states: Tensor | None = None) -> FilledPack:
    """Gather image payloads into the pack.

    Args:
        batch: the micro-batch.
        lat: [n_img, T, D] ground-truth latent tokens of ``batch.pixels``.
        vit: [n_img, Tv, P] ViT inputs of ``batch.pixels``.
        gen_lat, gen_vit: [n_slots, T, D] / [n_slots, Tv, P] views of the generated images
            (DHS). When given, clean spans of generated targets (``vae_gen`` / ``vit_gen`` >= 0)
            show them instead of the ground truth; noisy spans interpolate the ground truth
            ``x_t = (1 - t) x0 + t eps`` (target ``eps - x0``) unless ``from_states`` says otherwise.
        states, from_states: [n_slots, T, D] and bool [n_slots] (DHS): a slot with
            ``from_states[slot]`` has ``x_t = states[slot]`` (the rollout's own state at its flow
            time ``t = batch.timesteps[slot]``, which must be > 0) and the velocity target that
            carries that state to the ground truth in one Euler step, ``(x_t - x0) / t`` (equal
            to ``eps - x0`` when the state lies on the straight path).
    """
    vae_rows = lat[batch.vae_src]  # [n_vae_spans, T, D]
    if gen_lat is not None:
        use = batch.vae_gen >= 0
        if bool(use.any()):
            vae_rows = vae_rows.clone()
            vae_rows[use] = gen_lat[batch.vae_gen[use]].to(vae_rows.dtype)
    vit_rows = vit[batch.vit_src]
    if gen_vit is not None:
        use = batch.vit_gen >= 0
        if bool(use.any()):
            vit_rows = vit_rows.clone()
            vit_rows[use] = gen_vit[batch.vit_gen[use]].to(vit_rows.dtype)
    if batch.fused:
        rows = torch.stack([fused_item_rows(parts, vit, gen_vit, batch.vit_channels) for _, parts in batch.fused])
        vit_rows = F.pad(vit_rows, (0, rows.shape[-1] - vit_rows.shape[-1]))
        vit_rows[torch.tensor([i for i, _ in batch.fused], device=vit_rows.device)] = rows.to(vit_rows.dtype)
    noisy_spans = [i for i, img in enumerate(s for s in batch.packed.images if s.kind == "vae") if img.noisy]
    x0 = vae_rows[noisy_spans] if noisy_spans else vae_rows[:0]  # [n_slots, T, D]
    eps, t = batch.noise.to(x0.dtype), batch.timesteps.to(x0.dtype)
    x_t = interpolate(x0, eps, t)
    target = velocity_target(x0, eps)
    if from_states is not None and bool(from_states.any()):
        if states is None:
            raise ValueError("from_states needs states")
        own = from_states.to(torch.bool)
        if bool((t[own] <= 0).any()):
            raise ValueError("a slot trained from a rollout state needs a flow time > 0")
        x_own = states[own].to(x0.dtype)
        x_t, target = x_t.clone(), target.clone()
        x_t[own] = x_own
        target[own] = (x_own - x0[own]) / t[own][:, None, None]
    if noisy_spans:
        vae_rows = vae_rows.clone()
        vae_rows[noisy_spans] = x_t
    packed = dataclasses.replace(
        batch.packed,
        vit_patches=vit_rows.reshape(-1, vit_rows.shape[-1]) if vit_rows.numel() else None,
        vae_latents=vae_rows.reshape(-1, vae_rows.shape[-1]) if vae_rows.numel() else None,
    )
    target = target.reshape(-1, x0.shape[-1])
    row_sa = batch.slot_sa[:, None].expand(-1, x0.shape[1]).reshape(-1)
    return FilledPack(packed, target, row_sa)


@dataclass
class LossTerms:
    """The terms of one micro-batch (0 when a term has no token): per-token means, or with
    ``norm`` the sums of per-token losses divided by ``norm[term]`` (:func:`pack_losses`).

    ``ntp``: cross-entropy over NTP targets; ``flow``: velocity MSE over noisy rows of
    generation targets; ``sa``: the same over self-alignment rows; counts in tokens (of this
    micro-batch; equal to :meth:`TrainBatch.loss_counts`).
    """

    ntp: Tensor
    flow: Tensor
    sa: Tensor
    n_ntp: int
    n_flow: int
    n_sa: int


def pack_losses(logits: Tensor | None, labels: Tensor, velocity: Tensor | None, target: Tensor,
                row_sa: Tensor, norm: Mapping[str, float] | None = None) -> LossTerms:
    """NTP and flow terms from model outputs at ``ce_indexes`` / noisy rows (float32 math).

    Args:
        logits: [N_ce, vocab] (or None when the pack has no NTP target).
        labels: long [N_ce].
        velocity: [N_noisy, D] predicted velocity of the noisy rows (pack order) or None.
        target: [N_noisy, D] velocity targets (``FilledPack.target``); row_sa: bool [N_noisy].
        norm: per-term divisors ``{"ntp", "flow", "sa"}`` of the summed per-token losses — the
            trainer's ``global token count / (grad_accum * world_size)`` (see
            :mod:`unibrain_cli.training.trainer`); a missing key or None divides by this
            micro-batch's own count (the per-token mean).
    """
    norm = norm or {}
    zero = target.new_zeros(()).float()
    n_ce = int(labels.numel())
    if logits is not None and n_ce:
        denom = max(float(norm.get("ntp", n_ce)), 1e-12)  # a global count of 0 implies n_ce == 0
        ntp = F.cross_entropy(logits.float(), labels, reduction="sum") / denom
    else:
        ntp = zero if logits is None else logits.float().sum() * 0.0
    n_sa = int(row_sa.sum())
    n_gen = int(row_sa.numel()) - n_sa
    if velocity is None or not row_sa.numel():
        return LossTerms(ntp, zero, zero, n_ce, 0, 0)
    flow = (flow_loss(velocity, target, weight=~row_sa, num_tokens=norm.get("flow")) if n_gen
            else velocity.float().sum() * 0.0)
    sa = flow_loss(velocity, target, weight=row_sa, num_tokens=norm.get("sa")) if n_sa else velocity.float().sum() * 0.0
    return LossTerms(ntp, flow, sa, n_ce, n_gen, n_sa)


def similarity_transform(images: Tensor, angle_deg: float, shift_px: tuple[float, float], scale: float) -> Tensor:
    """``images`` [..., S, S] rotated by ``angle_deg`` (counter-clockwise in the displayed (row, col)
    plane) about the slice centre, scaled by ``scale`` and shifted by ``shift_px`` = (rows, cols)
    pixels: every image alike (the modalities of one slice stay aligned), bilinear, zero outside the
    slice (the stored slices' background). The identity (0, (0, 0), 1) returns ``images`` unchanged.
    """
    if angle_deg == 0.0 and shift_px == (0.0, 0.0) and scale == 1.0:
        return images
    *lead, h, w = images.shape
    a = torch.deg2rad(torch.tensor(angle_deg, dtype=torch.float64))
    # output (x, y) = (col, row) in affine_grid's normalised units -> input coordinates
    inv = torch.stack([torch.stack([torch.cos(a), -torch.sin(a)]), torch.stack([torch.sin(a), torch.cos(a)])]) / scale
    shift = torch.tensor([2.0 * shift_px[1] / w, 2.0 * shift_px[0] / h], dtype=torch.float64)
    theta = torch.cat([inv, (-inv @ shift)[:, None]], dim=1).to(torch.float32)[None]
    flat = images.reshape(1, -1, h, w).to(torch.float32)
    grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
    out = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(*lead, h, w).to(images.dtype)
