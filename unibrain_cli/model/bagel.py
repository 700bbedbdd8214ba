"""The unified BAGEL-architecture model: MoT decoder + SigLIP ViT + latent bridges.

``UniBrainModel`` is a pure single-device ``nn.Module`` (no losses, no VAE inside: the FLUX
autoencoder lives in ``ae.safetensors`` and turns images into the latent tokens this model
reads). Top-level modules and their BAGEL state-dict names:

- ``language_model``: :class:`~unibrain_cli.model.decoder.MoTLanguageModel` (``language_model.model.*``,
  ``language_model.lm_head``);
- ``vit_model.vision_model``: SigLIP NaViT encoder;
- ``connector`` (``fc1``, GELU-tanh, ``fc2``) and ``vit_pos_embed``: ViT width -> LLM width,
  plus a fixed 2D sin-cos table (non-persistent);
- ``vae2llm`` (latent token -> hidden), ``time_embedder`` (flow time t in [0, 1]),
  ``latent_pos_embed`` (fixed 2D sin-cos table, non-persistent), ``llm2vae`` (hidden -> velocity,
  zero-initialised);
- ``aligned_context`` (only with ``model.aligned_context = "on"``, not a BAGEL tensor):
  :class:`~unibrain_cli.model.aligned.AlignedContext`, zero-initialised;
- ``fused_view`` (only with ``model.fused_view = "on"``, not a BAGEL tensor):
  :class:`~unibrain_cli.model.fused.FusedView`, the patch embedding of fused ViT views.

Embedding of a :class:`~unibrain_cli.model.packing.PackedSequence`:
text -> ``embed_tokens``; ViT patches -> ViT -> connector + ``vit_pos_embed``; latent tokens ->
``vae2llm`` + ``time_embedder(t)`` + ``latent_pos_embed``. Outputs: text logits (``lm_head``)
and the predicted velocity ``llm2vae(h)`` (flow convention: ``x_t = (1 - t) x0 + t eps``,
velocity target ``eps - x0``; see ``unibrain_cli.flow``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.config.validate import validate_model_config
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.aligned import AlignedContext, clean_slot_images
from unibrain_cli.model.attention import MODE_NOISE
from unibrain_cli.model.batch_cache import BatchKVCache, BatchStep
from unibrain_cli.model.decoder import MoTLanguageModel, Routing
from unibrain_cli.model.embeddings import MLPconnector, PositionEmbedding, TimestepEmbedder
from unibrain_cli.model.fused import FusedView, fuse_patches, fused_spans, vit_views
from unibrain_cli.model.kv_cache import KVCache, SlotImage
from unibrain_cli.model.packing import PackedSequence, SequenceBuilder
from unibrain_cli.model.vit import SiglipVisionModel

LogitsAt = Literal["loss", "text", "last", "all", "none"]
VelocityAt = Literal["noisy", "vae", "none"]


def latent_dim(cfg: ModelConfig) -> int:
    """Width of one latent token: ``latent_patch_size**2 * vae.z_channels``."""
    return cfg.latent_patch_size**2 * cfg.vae.z_channels


@dataclass
class ModelOutput:
    """Outputs of one forward.

    Attributes:
        hidden: [N, hidden] final-normed hidden states of every packed row.
        logits: [N_sel, vocab] text logits at ``logit_indexes`` (None if not asked).
        logit_indexes: long [N_sel] packed rows of ``logits``.
        velocity: [N_sel_vae, latent_dim] predicted velocity at ``velocity_rows`` (None if not asked).
        velocity_rows: long [N_sel_vae] rows INTO THE VAE TOKEN LIST (not packed rows).
    """

    hidden: Tensor
    logits: Tensor | None = None
    logit_indexes: Tensor | None = None
    velocity: Tensor | None = None
    velocity_rows: Tensor | None = None


class _ViTHolder(nn.Module):
    """Gives the ViT BAGEL's ``vit_model.vision_model`` prefix."""

    def __init__(self, vision_model: SiglipVisionModel) -> None:
        super().__init__()
        self.vision_model = vision_model


class UniBrainModel(nn.Module):
    """BAGEL-architecture unified model (see the module docstring).

    Args:
        cfg: the model config (validated; ValueError names a bad field).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        validate_model_config(cfg)
        self.config = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = MoTLanguageModel(cfg.llm)
        self.vit_model = _ViTHolder(SiglipVisionModel(cfg.vit))
        self.connector = MLPconnector(cfg.vit.hidden_size, hidden, cfg.connector_act)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, hidden)
        self.vae2llm = nn.Linear(latent_dim(cfg), hidden)
        self.llm2vae = nn.Linear(hidden, latent_dim(cfg))
        self.time_embedder = TimestepEmbedder(hidden, cfg.timestep_freq_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)
        self.aligned_context: AlignedContext | None = None
        if cfg.aligned_context == "on":
            self.aligned_context = AlignedContext(len(MODALITIES), latent_dim(cfg), hidden, cfg.aligned_window,
                                                  cfg.aligned_gain, cfg.aligned_draft,
                                                  cfg.aligned_draft_resolution, cfg.latent_patch_size)
        # initialised from its own fixed-seed generator: the other modules draw what they drew without it
        self.fused_view: FusedView | None = None
        if cfg.fused_view == "on":
            self.fused_view = FusedView(cfg.vit.patch_size, cfg.vit.hidden_size)
        self.language_model.model.activation_checkpointing = cfg.activation_checkpointing
        self.reset_parameters()

    # -- init ---------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh init: N(0, 0.02) linears/embeddings of the LLM side, LeCun-normal modality
        adapters (``vae2llm``, connector, timestep MLP), zero biases, unit norms, zero
        ``llm2vae``, generation expert = copy of the understanding expert. The ViT keeps its own
        init."""
        for module in [self.language_model, self.connector, self.vae2llm, self.time_embedder]:
            for m in module.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    if m.bias is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.Embedding):
                    nn.init.normal_(m.weight, std=0.02)
        # The modality adapters get a variance-preserving (LeCun normal) init instead: at N(0, 0.02)
        # their outputs would be ~10x smaller than the fixed 2D sin-cos tables (per-dim RMS
        # sqrt(1/2)) they are added to, so every image would enter as "position only" and a
        # from-scratch model would spend hundreds of steps growing these weights before it could
        # tell one image (or noise level) from another.
        for m in [self.vae2llm, self.connector.fc1, self.connector.fc2, *self.time_embedder.mlp]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)
        if self.aligned_context is not None:
            self.aligned_context.reset_parameters()
        if self.fused_view is not None:
            self.fused_view.reset_parameters()
        self.language_model.init_generation_expert()

    def set_fused_view(self, mode: str) -> None:
        """Switch ``model.fused_view`` on a built model: ``"on"`` adds a freshly initialised
        :class:`FusedView` when there is none (e.g. a checkpoint of a stage trained without it),
        ``"off"`` removes it."""
        if mode == "on":
            if self.fused_view is None:
                p = self.vae2llm.weight
                module = FusedView(self.config.vit.patch_size, self.config.vit.hidden_size)
                self.fused_view = module.to(device=p.device, dtype=p.dtype)
        elif mode == "off":
            self.fused_view = None
        else:
            raise ValueError(f"fused_view must be 'off' or 'on', got {mode!r}")

    def fused_rows(self, views: Sequence[tuple[int, Tensor]]) -> Tensor:
        """The fused view's ViT inputs [Tv, width] from a context's slotted ViT views (model/fused.py)."""
        return fuse_patches(views, self.config.vit.num_channels)

    def set_aligned_context(self, mode: str, window: int | None = None, gain: float | None = None,
                            draft: int | None = None, draft_resolution: str | None = None) -> None:
        """Switch ``model.aligned_context`` on a built model: ``"on"`` adds a zero-initialised
        :class:`AlignedContext` of the given layout (``window`` / ``gain`` / ``draft`` width,
        default: this model's config) when there is none (e.g. after loading a BAGEL folder: outputs
        are unchanged until it is trained), or replaces one of another layout whose projection is
        still all zeros (e.g. the ``sa`` stage's, which never trains it); ``"off"`` removes it. A
        trained path of another layout is refused (ValueError): its weights would be dropped or
        rescaled."""
        window = self.config.aligned_window if window is None else window
        gain = self.config.aligned_gain if gain is None else gain
        draft = self.config.aligned_draft if draft is None else draft
        res = self.config.aligned_draft_resolution if draft_resolution is None else draft_resolution
        res = res if draft else "tokens"
        current = self.aligned_context
        if mode == "on":
            if current is not None and current.layout == (window, float(gain), draft, res):
                return
            if current is not None and current.trained:
                raise ValueError(f"the loaded aligned path (window {current.window}, gain {current.gain:g}, draft "
                                 f"{current.draft_width} at {current.draft_resolution} resolution) is trained; it cannot "
                                 f"become window {window}, gain {gain:g}, draft {draft} at {res} resolution")
            p = self.vae2llm.weight
            module = AlignedContext(len(MODALITIES), self.latent_dim, self.config.llm.hidden_size, window, gain, draft,
                                    res, self.config.latent_patch_size)
            self.aligned_context = module.to(device=p.device, dtype=p.dtype)
        elif mode == "off":
            self.aligned_context = None
        else:
            raise ValueError(f"aligned_context must be 'off' or 'on', got {mode!r}")

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the non-persistent tables (position tables, rotary frequencies), e.g. after
        building on the meta device and materialising with ``to_empty``."""
        for m in self.modules():
            if m is self:
                continue
            if hasattr(m, "reset_table"):
                m.reset_table()
            if hasattr(m, "reset_buffers"):
                m.reset_buffers()

    # -- helpers ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.config.llm.num_layers

    @property
    def latent_dim(self) -> int:
        return latent_dim(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def builder(self, image_markers: tuple[int, int] | None = None) -> SequenceBuilder:
        """A :class:`SequenceBuilder` with this model's position-table sides."""
        return SequenceBuilder(self.config.vit_max_num_patch_per_side, self.config.max_latent_size, image_markers)

    def new_cache(self, detach: bool = True) -> KVCache:
        """An empty KV cache for this model."""
        return KVCache(self.num_layers, detach=detach)

    def _backend(self, backend: str | None) -> str:
        return backend or self.config.attention_backend

    # -- embedding ----------------------------------------------------------------------------

    def embed(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
              priors: Sequence[Sequence[SlotImage]] | None = None) -> Tensor:
        """Input embeddings of a pack: [N, hidden] in the model dtype (see :meth:`embed_with_draft`)."""
        return self.embed_with_draft(packed, prior, priors)[0]

    def embed_with_draft(self, packed: PackedSequence, prior: Sequence[SlotImage] = (),
                         priors: Sequence[Sequence[SlotImage]] | None = None) -> tuple[Tensor, Tensor | None]:
        """Input embeddings of a pack: [N, hidden] in the model dtype, and with
        ``model.draft_residual`` the draft [N_noisy, D] the flow runs from (else None).

        Text rows: ``embed_tokens``; ViT rows: connector(ViT(patches)) + vit_pos_embed; VAE rows:
        vae2llm(latents) + time_embedder(t) + latent_pos_embed; with ``aligned_context`` noisy VAE
        rows also get the aligned projection of the earlier clean images (``prior``: those of a
        cached context, see :mod:`unibrain_cli.model.aligned`; ``priors``: one per sample, for a
        batched cache). With ``model.draft_residual`` a noisy row of time t embeds
        ``x_t - (1 - t) d`` (d: its detached draft), the point at time t of the straight path from
        noise to the residual ``x0 - d``; :meth:`_heads` then returns ``v_net - d``.
        """
        dtype = self.dtype
        draft: Tensor | None = None
        h = torch.zeros(packed.length, self.config.llm.hidden_size, dtype=dtype, device=packed.device)
        if packed.text_indexes.numel():
            emb = self.language_model.model.embed_tokens(packed.text_ids)
            h = h.index_put((packed.text_indexes,), emb.to(dtype))
        if packed.vit_indexes.numel():
            if packed.vit_patches is None:
                raise ValueError("the pack has ViT tokens but no vit_patches")
            patches = packed.vit_patches
            override = None
            fused = fused_spans(packed) if self.fused_view is not None else []
            if fused:
                spans = [s for s in packed.images if s.kind == "vit"]
                rows = torch.cat([torch.arange(spans[i].token_start, spans[i].token_start + spans[i].num_tokens)
                                  for i in fused]).to(packed.device)
                override = (rows, self.fused_view(patches[rows]))
            cfg_vit = self.config.vit
            patches = patches[:, : cfg_vit.patch_size**2 * cfg_vit.num_channels]
            feats = self.vit_model.vision_model(
                patches.to(dtype), packed.vit_position_ids, packed.vit_cu_seqlens, override
            )
            emb = self.connector(feats) + self.vit_pos_embed(packed.vit_position_ids)
            h = h.index_put((packed.vit_indexes,), emb.to(dtype))
        if packed.vae_indexes.numel():
            if packed.vae_latents is None:
                raise ValueError("the pack has VAE tokens but no vae_latents")
            if packed.vae_latents.shape[-1] != self.latent_dim:
                raise ValueError(f"latent tokens must have {self.latent_dim} features, got {packed.vae_latents.shape[-1]}")
            latents = packed.vae_latents.to(dtype)
            projection = None
            if self.aligned_context is not None and bool(packed.vae_noisy.any()):
                noisy = packed.noisy_vae_rows
                projection, draft = self.aligned_context.with_draft(packed, prior, priors)
                if self.config.draft_residual:
                    assert draft is not None, "model.draft_residual needs model.aligned_draft > 0"
                    shift = (1.0 - packed.vae_timesteps[noisy])[:, None] * draft
                    latents = latents.index_add(0, noisy, -shift.to(dtype))
                else:
                    draft = None
            emb = (
                self.vae2llm(latents)
                + self.time_embedder(packed.vae_timesteps)
                + self.latent_pos_embed(packed.vae_position_ids)
            )
            if projection is not None:
                emb = emb.index_add(0, packed.noisy_vae_rows, projection.to(emb.dtype))
            h = h.index_put((packed.vae_indexes,), emb.to(dtype))
        return h, draft

    def image_grid(self, packed: PackedSequence) -> Tensor | None:
        """Per-row normalised image coordinates for ``image_rope = "2d"`` (None for BAGEL's "1d").

        float [N, 2]: ``((row + 0.5) / rows, (col + 0.5) / cols)`` of each ViT / VAE token in its
        own image grid (row-major, as the tokens are laid out), NaN for text rows. ViT and latent
        grids of one slice thus share coordinates even when their sizes differ.
        """
        if self.config.image_rope != "2d":
            return None
        grid = torch.full((packed.length, 2), float("nan"), device=packed.device)
        for span in packed.images:
            rows, cols = span.grid_hw
            index = packed.vit_indexes if span.kind == "vit" else packed.vae_indexes
            at = index[span.token_start: span.token_start + span.num_tokens]
            r = torch.arange(rows, device=packed.device, dtype=torch.float32).add_(0.5).div_(rows)
            c = torch.arange(cols, device=packed.device, dtype=torch.float32).add_(0.5).div_(cols)
            grid[at] = torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)
        return grid

    # -- heads --------------------------------------------------------------------------------

    def _heads(
        self, packed: PackedSequence, hidden: Tensor, logits_at: LogitsAt, velocity_at: VelocityAt,
        draft: Tensor | None = None,
    ) -> ModelOutput:
        """Text logits and velocities of the asked rows; ``draft`` [N_noisy, D] (``model.draft_residual``)
        is subtracted from the noisy rows' velocity (the network predicts the residual flow's)."""
        out = ModelOutput(hidden=hidden)
        if logits_at != "none":
            if logits_at == "loss":
                rows = packed.ce_indexes
            elif logits_at == "text":
                rows = packed.text_indexes
            elif logits_at == "last":
                ends = torch.tensor(packed.sample_lens, device=hidden.device).cumsum(0) - 1
                rows = ends
            elif logits_at == "all":
                rows = torch.arange(packed.length, device=hidden.device)
            else:
                raise ValueError(f"unknown logits_at {logits_at!r}")
            out.logit_indexes = rows
            out.logits = self.language_model.lm_head(hidden[rows])
        if velocity_at != "none":
            if velocity_at == "noisy":
                rows = packed.noisy_vae_rows
            elif velocity_at == "vae":
                rows = torch.arange(packed.vae_indexes.numel(), device=hidden.device)
            else:
                raise ValueError(f"unknown velocity_at {velocity_at!r}")
            out.velocity_rows = rows
            out.velocity = self.llm2vae(hidden[packed.vae_indexes[rows]])
            if draft is not None:
                if velocity_at == "noisy":
                    out.velocity = out.velocity - draft.to(out.velocity.dtype)
                else:
                    full = draft.new_zeros(packed.vae_indexes.numel(), draft.shape[1])
                    full[packed.noisy_vae_rows] = draft
                    out.velocity = out.velocity - full[rows].to(out.velocity.dtype)
        return out

    # -- forward ------------------------------------------------------------------------------

    def forward(
        self,
        packed: PackedSequence,
        logits_at: LogitsAt = "loss",
        velocity_at: VelocityAt = "noisy",
        backend: str | None = None,
    ) -> ModelOutput:
        """Run a whole pack (training path).

        Args:
            packed: the pack; ``vae_latents`` are the tokens embedded (noised by the caller).
            logits_at: rows whose text logits are computed: ``"loss"`` (``ce_indexes``),
                ``"text"`` (all text rows), ``"last"`` (last row of each sample), ``"all"``, ``"none"``.
            velocity_at: ``"noisy"`` (flow-loss tokens), ``"vae"`` (all VAE tokens) or ``"none"``.
            backend: attention backend; default ``config.attention_backend``.
        """
        h, draft = self.embed_with_draft(packed)
        route = Routing(packed.und_indexes, packed.gen_indexes, packed.length)
        hidden, _ = self.language_model(h, packed.position_ids, route, packed.mask_info(), self._backend(backend),
                                        grid=self.image_grid(packed))
        return self._heads(packed, hidden, logits_at, velocity_at, draft)

    # -- cached (inference) -------------------------------------------------------------------

    def forward_cached(
        self,
        block: PackedSequence,
        cache: KVCache,
        update: bool,
        logits_at: LogitsAt = "last",
        velocity_at: VelocityAt = "none",
        backend: str | None = None,
    ) -> ModelOutput:
        """Run a one-sample block after the cached context.

        The block's positions (built from 0) are offset by ``cache.next_position``; its queries
        see every cached token plus the block itself under the split rules.

        Args:
            block: a one-sample pack (text, ViT, clean or noisy VAE splits).
            cache: the context; modified only when ``update``.
            update: store the block's non-noise keys/values and advance the position counter.
            logits_at, velocity_at, backend: as in :meth:`forward`.
        """
        if block.num_samples != 1:
            raise ValueError(f"a cached block must hold exactly one sample, got {block.num_samples}")
        h, draft = self.embed_with_draft(block, cache.images)
        route = Routing(block.und_indexes, block.gen_indexes, block.length)
        mask = block.mask_info(prefix_len=cache.length)
        positions = block.position_ids + cache.next_position
        hidden, present = self.language_model(h, positions, route, mask, self._backend(backend), cache.past(),
                                              grid=self.image_grid(block))
        if update:
            noise_rows = mask.q_mode == MODE_NOISE
            keep = None if not bool(noise_rows.any()) else (~noise_rows).nonzero().flatten()
            images = clean_slot_images(block) if self.aligned_context is not None else ()
            views = vit_views(block) if self.fused_view is not None else ()
            cache.append(present, keep, block.sample_next_positions[0], images, views)
        return self._heads(block, hidden, logits_at, velocity_at, draft)

    def forward_batch(
        self,
        block: PackedSequence,
        cache: BatchKVCache,
        rows: Sequence[int],
        update: bool,
        logits_at: LogitsAt = "last",
        velocity_at: VelocityAt = "none",
        step: BatchStep | None = None,
    ) -> ModelOutput:
        """Run a multi-sample block, sample i after row ``rows[i]`` of a batched cache.

        The batched twin of :meth:`forward_cached` (one decoder forward for every row; see
        :mod:`unibrain_cli.model.batch_cache`). Outputs are in block order (sample by sample).

        Args:
            block: B' samples (text, ViT, clean or noisy VAE splits), built from position 0 each.
            cache: the rows' contexts; modified only when ``update``.
            rows: the cache row each sample continues (distinct).
            update: store the block's non-noise keys/values and advance the rows' positions.
            logits_at, velocity_at: as in :meth:`forward` (``"last"`` = last row of each sample).
            step: the :meth:`BatchStep.plan` of this block's layout against this cache state, when
                the caller reuses it (Euler steps: same layout and cache, new latents and time).
        """
        cfg = self.config.llm
        rows = [int(r) for r in rows]
        h, draft = self.embed_with_draft(block, priors=[cache.images[r] for r in rows])
        route = Routing(block.und_indexes, block.gen_indexes, block.length)
        step = step if step is not None else BatchStep.plan(cache, rows, block)
        cache.reserve(step.l_max, cfg.num_kv_heads, cfg.head_dim, self.dtype, block.device)
        offsets = torch.tensor([cache.next_positions[r] for r in rows], device=block.device)
        positions = block.position_ids + offsets[block.sample_ids]
        past = [step.layer(i) for i in range(self.num_layers)]
        hidden, _ = self.language_model(h, positions, route, None, "sdpa", past, grid=self.image_grid(block))
        if update:
            step.commit()
            if self.aligned_context is not None:
                for i, r in enumerate(rows):
                    cache.images[r] = cache.images[r] + tuple(clean_slot_images(block, i))
            if self.fused_view is not None:
                for i, r in enumerate(rows):
                    cache.views[r] = cache.views[r] + tuple(vit_views(block, i))
        return self._heads(block, hidden, logits_at, velocity_at, draft)

    def new_batch_cache(self, batch: int) -> BatchKVCache:
        """An empty batched cache of ``batch`` rows."""
        return BatchKVCache(self.num_layers, batch)

    def prefill(self, cache: KVCache, block: PackedSequence, backend: str | None = None) -> ModelOutput:
        """Append a context block (text / ViT / clean VAE) to the cache; returns last-row logits."""
        return self.forward_cached(block, cache, update=True, logits_at="last", backend=backend)

    def predict_velocity(self, cache: KVCache, block: PackedSequence, backend: str | None = None) -> Tensor:
        """Velocity [N_noisy, latent_dim] of a noisy-image block given the cache (cache unchanged).

        Call once per sampling step with the block's latents/timesteps replaced
        (``block.with_vae_latents(x_t).with_vae_timesteps(t)``).
        """
        out = self.forward_cached(block, cache, update=False, logits_at="none", velocity_at="noisy", backend=backend)
        assert out.velocity is not None
        return out.velocity

    def _text_block(self, ids: Sequence[int], loss_ids: Sequence[int] = ()) -> PackedSequence:
        b = self.builder()
        b.add_text(list(ids))
        if loss_ids:
            b.add_text(list(loss_ids), loss=True)
        return b.build(self.device)

    @torch.no_grad()
    def generate_text(
        self,
        cache: KVCache,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        eos_id: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        append_last: bool = True,
        backend: str | None = None,
    ) -> list[int]:
        """Decode text after the cached context, token by token.

        Args:
            cache: context; the prompt and the generated tokens are appended to it.
            prompt_ids: at least one token (e.g. "Impression:"): its last token predicts the first
                new token.
            max_new_tokens: upper bound on generated tokens.
            eos_id: stop after generating this id (it is returned).
            temperature: 0 = greedy argmax, else softmax sampling at this temperature.
            top_k: keep only the k most likely tokens when sampling (0 = all).
            generator: RNG for sampling.
            append_last: also append the last generated token to the cache (so the cache holds
                prompt + all generated tokens, ready for the next block).

        Returns:
            generated ids (without the prompt).
        """
        if not prompt_ids:
            raise ValueError("generate_text needs at least one prompt token")
        out = self.forward_cached(self._text_block(prompt_ids), cache, update=True, logits_at="last", backend=backend)
        tokens: list[int] = []
        for step in range(max_new_tokens):
            assert out.logits is not None
            tok = sample_token(out.logits[-1], temperature, top_k, generator)
            tokens.append(tok)
            last = step == max_new_tokens - 1 or tok == eos_id
            if last and not append_last:
                break
            out = self.forward_cached(
                self._text_block([tok]), cache, update=True, logits_at="none" if last else "last", backend=backend
            )
            if last:
                break
        return tokens

    @torch.no_grad()
    def score_text(
        self, cache: KVCache, prompt_ids: Sequence[int], candidate_ids: Sequence[int], backend: str | None = None
    ) -> Tensor:
        """Log-probabilities [len(candidate_ids)] of a candidate answer after context + prompt.

        The cache is not modified. ``prompt_ids`` must be non-empty (its last token predicts the
        first candidate token). Sum the result for the sequence log-likelihood.
        """
        if not prompt_ids or not candidate_ids:
            raise ValueError("score_text needs a non-empty prompt and a non-empty candidate")
        block = self._text_block(prompt_ids, candidate_ids)
        out = self.forward_cached(block, cache, update=False, logits_at="loss", backend=backend)
        assert out.logits is not None
        logp = F.log_softmax(out.logits.float(), dim=-1)
        return logp.gather(1, block.ce_labels[:, None]).squeeze(1)


def sample_token(logits: Tensor, temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None) -> int:
    """Pick a token id from logits [vocab]: argmax when ``temperature == 0``, else sample."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
