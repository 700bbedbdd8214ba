"""The ``unified`` stage: interleaved generation + understanding on packed sequences, all trainable.

Per micro-batch (``next_batch``, every random choice from the stage generator):

1. a numpy generator seeded from the stage generator draws samples: a random train slice
   (uniformly, with replacement — each rank has its own generator, so ranks see different
   samples) and its randomised interleaved plan (``build_plan``: task, thinking, order,
   targets, visual/text dropout, phrasings);
2. candidates are drawn until they hold ``data.pack_tokens`` tokens; the first pack of
   ``pack_plans`` (first-fit) is the micro-batch (a lone over-long sample is packed alone);
3. per noisy target a flow time ``t = shift(sigmoid(N(mean, std)))`` (``flow.train_timestep_shift``,
   ``flow.logit_normal_*``) and its noise ``eps`` [T, D] are drawn from the stage generator.

Loss (``UnifiedTrainModule.forward``): ``ntp_weight * L_NTP + flow_weight * L_flow`` where
``L_NTP`` is the cross-entropy summed over NTP targets (thinking and answer tokens + their eos)
and ``L_flow`` the velocity MSE (target ``eps - x0``) summed over noisy latent tokens — each
divided by its GLOBAL token count: ``ModelStage.loss_counts`` reports each micro-batch's counts
(:meth:`TrainBatch.loss_counts`), the trainer sums them over the optimizer step's micro-batches
and all ranks and passes ``norm`` (see :mod:`unibrain_cli.training.trainer`), so the step's
gradient is that of the per-token mean over the whole step (BAGEL), not a mean of micro-batch
means. Without ``norm`` (direct calls) each term is the micro-batch's own per-token mean. VAE
latents and ViT patches are computed in ``forward`` (VAE frozen, no grad) from the slices'
pixels. Trainable: the whole unified model; the autoencoder is frozen.

With ``model.aligned_draft`` > 0 each micro-batch also carries ``data.draft_pairs`` ground-truth
(context -> target) pairs of random train slices (:func:`dataflow.draft_pair`, drawn after the pack
from the same numpy generator, so the packs are those of a run without a draft), and the loss adds
the draft network's latent MSE (``draft``, normalised like the other terms by its global token
count). The draft is read by the aligned projection detached, so only this term trains it
(:mod:`unibrain_cli.model.aligned`).

This module also holds what the three model stages share: :class:`UnifiedTrainModule` (the
wrapped loss module) and :class:`ModelStage` (data, model building, export).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from unibrain_cli.config.components import DRAFT_VIEW_FLIPS, DataConfig
from unibrain_cli.config.loader import recipe_to_dict
from unibrain_cli.data.dataflow import (
    SamplePlan,
    build_plan,
    describe_plan,
    draft_pair,
    pack_plans,
    plan_token_count,
    record_diseases,
    record_impression,
    record_modalities,
)
from unibrain_cli.data.slices_data import SliceDataset, read_slices_meta
from unibrain_cli.data.tokenizer import TextTokenizer
from unibrain_cli.errors import UserError
from unibrain_cli.flow.objective import sample_timesteps
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.aligned import stack_slots
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.checkpoint import save_pretrained
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.training.materialize import (
    DraftPairs,
    ImageGeometry,
    Item,
    LossTerms,
    TextIds,
    TrainBatch,
    build_batch,
    fill_pack,
    gets_fused_view,
    latent_tokens,
    pack_losses,
    plan_items,
    similarity_transform,
    vit_tokens,
)
from unibrain_cli.training.model_init import ModelBundle, check_sources, load_bundle, load_tokenizer
from unibrain_cli.training.stages import StageTask, StepOutput

logger = logging.getLogger(__name__)

#: Upper bound on candidate samples drawn for one micro-batch.
MAX_CANDIDATES = 512

#: The last draft bank encoded in this process, by :func:`_bank_key`: the ``draft`` and ``unified``
#: stages of one ``train`` run encode the same slices with the same frozen autoencoder (16.8 s of
#: the demo's ``unified`` start on the Zen 3 EPYC, README); one entry, so at most one bank stays in memory.
_BANK_CACHE: dict[str, tuple[list[int], list[tuple[str, ...]], Tensor]] = {}


def _bank_key(vae: AutoEncoder, data_dir: Path, slice_ids: Sequence[str], parts: Any) -> str:
    """Digest of everything a draft bank depends on: the autoencoder's weights (bytes), the data
    folder, the train slices drawn from and the settings ``parts`` (views, modalities, latent layout)."""
    h = hashlib.sha256(repr((str(Path(data_dir).resolve()), tuple(slice_ids), parts)).encode("utf-8"))
    for name, tensor in sorted(vae.state_dict().items()):
        h.update(name.encode("utf-8"))
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class UnifiedTrainModule(nn.Module):
    """The unified model + its frozen autoencoder; ``forward(batch)`` returns the loss terms.

    Args:
        model: the unified model (trained).
        vae: the autoencoder (frozen; encodes the slices, decodes DHS generations).
        geom: token layout of the slices.
        ntp_weight, flow_weight: weights of the NTP and flow (incl. self-alignment) terms.
    """

    def __init__(self, model: UniBrainModel, vae: AutoEncoder, geom: ImageGeometry,
                 ntp_weight: float = 1.0, flow_weight: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.vae = vae
        self.geom = geom
        self.ntp_weight = float(ntp_weight)
        self.flow_weight = float(flow_weight)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor, need: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Ground-truth views of ``pixels`` [n, S, S]: (latent tokens [n, T, D], ViT patches [n, Tv, P]).

        ``need``: indices of the pixels whose latents are used (a pack's ``vae_src``); the autoencoder
        encodes only those and the other rows are zeros (images shown only as ViT views, e.g. every
        understanding-only sample, cost no encoder pass). None: all. A pack that needs no latent still
        encodes its first image (unread), so under FSDP every rank runs the sharded encoder alike."""
        g = self.geom
        vit = vit_tokens(pixels, g.vit_patch, g.vit_channels, g.vit_size)
        if need is None:
            return latent_tokens(self.vae, pixels, self.model.config), vit
        rows = torch.unique(need.to(pixels.device))
        if not rows.numel():
            rows = torch.zeros(1, dtype=torch.long, device=pixels.device)
        enc = latent_tokens(self.vae, pixels[rows], self.model.config)
        lat = enc.new_zeros(pixels.shape[0], *enc.shape[1:])
        lat[rows] = enc
        return lat, vit

    def terms(self, batch: TrainBatch, lat: Tensor, vit: Tensor, gen_lat: Tensor | None = None,
              gen_vit: Tensor | None = None, norm: Mapping[str, float] | None = None,
              states: Tensor | None = None, from_states: Tensor | None = None) -> LossTerms:
        """One packed forward with grad and its loss terms (see :func:`materialize.fill_pack`, also
        for ``states`` / ``from_states``; ``norm``: the trainer's per-term divisors, see
        :func:`materialize.pack_losses`)."""
        filled = fill_pack(batch, lat, vit, gen_lat, gen_vit, states, from_states)
        has_flow = filled.target.shape[0] > 0
        has_text = filled.packed.ce_indexes.numel() > 0
        out = self.model(filled.packed, logits_at="loss" if has_text else "none",
                         velocity_at="noisy" if has_flow else "none")
        return pack_losses(out.logits, filled.packed.ce_labels, out.velocity, filled.target, filled.row_sa, norm)

    def combine(self, t: LossTerms) -> dict[str, Tensor]:
        """``loss = ntp_weight * ntp + flow_weight * (flow + sa)`` plus the detached terms."""
        loss = self.ntp_weight * t.ntp + self.flow_weight * (t.flow + t.sa)
        return {"loss": loss, "ntp": t.ntp.detach(), "flow": t.flow.detach(), "sa": t.sa.detach()}

    def draft_estimates(self, pairs: DraftPairs) -> tuple[Tensor, Tensor]:
        """The draft network's estimates of the pairs' target latents and those latents, [B, T, D] each."""
        aligned = self.model.aligned_context
        if aligned is None or aligned.draft is None:
            raise ValueError("draft pairs need a model with model.aligned_draft > 0")
        return aligned.draft(pairs.stack, self.geom.latent_grid, pairs.target_slot), pairs.target

    def draft_loss(self, pairs: DraftPairs, norm: Mapping[str, float] | None = None) -> Tensor:
        """MSE of the draft's estimates (per token, mean over features), summed over tokens and
        divided by ``norm["draft"]`` (default: this batch's token count)."""
        est, target = self.draft_estimates(pairs)
        per_token = (est.float() - target.float()).pow(2).mean(dim=-1)
        denom = float((norm or {}).get("draft", per_token.numel()))
        return per_token.sum() / max(denom, 1e-12)

    def forward(self, batch: TrainBatch | None, norm: Mapping[str, float] | None = None,
                draft: DraftPairs | None = None) -> dict[str, Tensor]:
        """Loss terms of a packed micro-batch plus the draft pairs' term; ``batch`` None: the
        draft term alone (the ``draft`` stage)."""
        if batch is None:
            if draft is None:
                raise ValueError("nothing to train: no packed batch and no draft pairs")
            d = self.draft_loss(draft, norm)
            return {"loss": d, "draft": d.detach()}
        lat, vit = self.encode_images(batch.pixels, batch.vae_src)
        out = self.combine(self.terms(batch, lat, vit, norm=norm))
        if draft is not None:
            d = self.draft_loss(draft, norm)
            out["loss"] = out["loss"] + d
            out["draft"] = d.detach()
        return out


class ModelStage(StageTask):
    """Shared machinery of the sa / unified / dhs stages (data, model, batches, export)."""

    name = "unified"
    unit = "tokens"
    find_unused_parameters = True  # a pack without text targets or without images skips weights

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self._tok: TextTokenizer | None = None
        self._dataset: SliceDataset | None = None
        self._records: list[dict[str, Any]] = []
        self._text: TextIds | None = None
        self._draft_bank: tuple[list[int], list[tuple[str, ...]], Tensor] | None = None
        self._vae: AutoEncoder | None = None

    # -- checks and data ---------------------------------------------------------------------------
    def usable(self, record: dict[str, Any]) -> bool:
        """Records this stage can draw (default: ones ``build_plan`` accepts)."""
        mods = record_modalities(record, self.ctx.recipe.data.modalities)
        return bool(mods) and (len(mods) >= 2 or bool(record_impression(record)) or bool(record_diseases(record)))

    def dataset(self) -> tuple[SliceDataset, list[dict[str, Any]]]:
        """The train split restricted to usable records, and those records as dicts."""
        if self._dataset is None:
            ds = SliceDataset(self.ctx.data_dir, split="train")
            records = ds.index.to_dict("records")
            keep = [i for i, r in enumerate(records) if self.usable(r)]
            ds.index = ds.index.iloc[keep].reset_index(drop=True)
            self._records = [records[i] for i in keep]
            self._dataset = ds
        return self._dataset, self._records

    def geometry(self) -> ImageGeometry:
        return ImageGeometry.from_config(self.ctx.recipe.model, self.ctx.recipe.data.image_size)

    def check(self) -> None:
        recipe, data_dir = self.ctx.recipe, self.ctx.data_dir
        meta = read_slices_meta(data_dir)
        size = recipe.data.image_size
        if int(meta["size"]) != size:
            raise UserError(f"slices have image size {meta['size']} but the recipe's data.image_size is {size}; "
                            f"re-run `unibrain slice --size {size}` or --set data.image_size={meta['size']}",
                            str(data_dir))
        bad = self.geometry().problems()
        if bad:
            raise UserError("; ".join(bad), "data.image_size")
        if recipe.data.max_text_tokens < 1:
            raise UserError("must be at least 1", "data.max_text_tokens")
        if self.ctx.stage.ntp_weight < 0 or self.ctx.stage.flow_weight < 0:
            raise UserError("loss weights must be >= 0", f"train.stages[{self.ctx.index}]")
        _, records = self.dataset()
        if not records:
            raise UserError(f"the train split has no slice usable by the {self.name} stage (modalities "
                            f"{list(recipe.data.modalities)}, reports); check `unibrain slice` and data.modalities",
                            str(data_dir))
        check_sources(recipe, self.ctx.inputs)

    # -- model -------------------------------------------------------------------------------------
    def load(self) -> ModelBundle:
        bundle = load_bundle(self.ctx.recipe, self.ctx.inputs, self.ctx.data_dir)
        logger.info("%s stage starts from %s", self.name, bundle.source)
        if self._tok is None:
            self._tok = bundle.tokenizer
        return bundle

    def tokenizer(self) -> TextTokenizer:
        if self._tok is None:
            self._tok = load_tokenizer(self.ctx.recipe, self.ctx.inputs, self.ctx.data_dir)
        return self._tok

    def text_ids(self) -> TextIds:
        if self._text is None:
            self._text = TextIds(self.tokenizer(), self.ctx.recipe.data.max_text_tokens)
        return self._text

    def make_module(self, bundle: ModelBundle) -> UnifiedTrainModule:
        st = self.ctx.stage
        self._vae = bundle.vae  # the frozen autoencoder also encodes the draft pairs' bank
        return UnifiedTrainModule(bundle.model, bundle.vae, self.geometry(), st.ntp_weight, st.flow_weight)

    def build_model(self) -> nn.Module:
        return self.make_module(self.load())

    def trainable_modules(self, model: nn.Module) -> Sequence[str]:
        return ("model",)

    # -- batches -----------------------------------------------------------------------------------
    def markers(self) -> tuple[int, int]:
        tok = self.tokenizer()
        return (tok.image_start_id, tok.image_end_id)

    def numpy_rng(self, generator: torch.Generator) -> np.random.Generator:
        """A numpy generator for plan randomness, seeded from the stage generator."""
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))

    def token_count(self, plan: SamplePlan) -> int:
        g = self.geometry()
        n = plan_token_count(plan, self.text_ids().length, g.vit_block_tokens, g.vae_block_tokens)
        return n + g.vit_block_tokens if self.fused() and gets_fused_view(plan) else n

    def fused(self) -> bool:
        """``model.fused_view = "on"``: questions get a fused view before them (materialize.plan_items)."""
        return self.ctx.recipe.model.fused_view == "on"

    def plan_config(self) -> DataConfig:
        """The data-flow settings plans are drawn with (the recipe's ``data``)."""
        return self.ctx.recipe.data

    def draw_plan(self, rng: np.random.Generator) -> tuple[int, SamplePlan]:
        """One candidate sample: (record index, plan)."""
        _, records = self.dataset()
        i = int(rng.integers(len(records)))
        return i, build_plan(records[i], rng, self.plan_config())

    def draw_pack(self, rng: np.random.Generator, budget: int | None = None) -> list[tuple[int, SamplePlan]]:
        """Candidates until ``budget`` tokens are reached, then the first first-fit pack of them."""
        budget = budget or self.ctx.recipe.data.pack_tokens
        cands, counts = [], []
        while sum(counts) < budget and len(cands) < MAX_CANDIDATES:
            cands.append(self.draw_plan(rng))
            counts.append(self.token_count(cands[-1][1]))
        first = pack_plans([p for _, p in cands], budget, counts)[0]
        return [cands[i] for i in first]

    def materialize(self, chosen: Sequence[tuple[int, SamplePlan]]) -> tuple[list[list[Item]], Tensor, list[str]]:
        """Items of each sample and the stacked distinct pixels [n_img, S, S]."""
        ds, _ = self.dataset()
        pixels: list[np.ndarray] = []
        samples: list[list[Item]] = []
        slot = 0
        for rec, plan in chosen:
            arrays = ds.arrays(rec)["images"]
            if plan.meta.get("mirrored"):  # dataflow.mirror_plan: the slice's left-right mirror
                arrays = np.ascontiguousarray(arrays[..., ::-1])
            if plan.meta.get("affine"):  # und.UndStage.draw_plan: a random similarity transform
                angle, dy, dx, scale = plan.meta["affine"]
                arrays = similarity_transform(torch.from_numpy(np.asarray(arrays)), angle, (dy, dx), scale).numpy()
            local: dict[str, int] = {}

            def pixel_index(m: str, arrays: np.ndarray = arrays, local: dict[str, int] = local) -> int:
                if m not in local:
                    local[m] = len(pixels)
                    pixels.append(arrays[MODALITIES.index(m)])
                return local[m]

            items, slot = plan_items(plan, pixel_index, self.text_ids(), slot, self.fused())
            samples.append(items)
        s = self.ctx.recipe.data.image_size
        stack = torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros((0, s, s))
        return samples, stack, [describe_plan(p) for _, p in chosen]

    def flow_times(self, n: int, generator: torch.Generator) -> Tensor:
        f = self.ctx.recipe.flow
        return sample_timesteps(n, generator, f.logit_normal_mean, f.logit_normal_std, f.train_timestep_shift)

    def noise(self, n: int, generator: torch.Generator) -> Tensor:
        g = self.geometry()
        return torch.randn((n, g.vae_image_tokens, g.latent_dim), generator=generator)

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        return self.pack_batch(self.numpy_rng(generator), generator)

    def pack_batch(self, rng: np.random.Generator, generator: torch.Generator) -> dict[str, Any]:
        """One packed micro-batch: plans from ``rng``, flow times and noise from ``generator``."""
        samples, pixels, desc = self.materialize(self.draw_pack(rng))
        n = sum(1 for items in samples for it in items if getattr(it, "noisy", False))
        times = self.flow_times(n, generator)
        noise = self.noise(n, generator)
        batch = build_batch(samples, pixels, self.geometry(), self.markers(), times, noise, descriptions=desc)
        return {"batch": batch}

    def draft_bank(self) -> tuple[list[int], list[tuple[str, ...]], Tensor]:
        """Latent tokens of every train slice with at least two modalities, encoded once per stage by
        :meth:`build_model` (in record order, 64 images per batch: the same values after a
        resume): (record indices,
        their modalities, bank [n, num_slots, T, D] with zeros for absent modalities; with
        ``data.draft_flip_prob`` > 0, [V n, ...] for the V = ``data.draft_views`` views of
        :data:`DRAFT_VIEW_FLIPS`: row v n + k holds slice k in view v, encoded as such). Held on the
        CPU: 24 MB per view for the demo's 990 slices (num_slots * T * D floats per slice). A bank
        of the same autoencoder weights, slices and settings encoded earlier in this process (the
        ``draft`` stage before ``unified``) is reused (:data:`_BANK_CACHE`; the tensors are only read)."""
        if self._draft_bank is None:
            if self._vae is None:
                raise RuntimeError("build_model() must run before the draft pairs are drawn")
            cfg, geom = self.ctx.recipe.data, self.geometry()
            ds, records = self.dataset()
            key = _bank_key(self._vae, self.ctx.data_dir, [str(r.get("slice_id")) for r in records],
                            (cfg.modalities, cfg.draft_flip_prob > 0, cfg.draft_views, DRAFT_VIEW_FLIPS,
                             geom, recipe_to_dict(self.ctx.recipe)["model"]))
            if key in _BANK_CACHE:
                self._draft_bank = _BANK_CACHE[key]
                return self._draft_bank
            idx = [i for i, r in enumerate(records) if len(record_modalities(r, cfg.modalities)) >= 2]
            if not idx:
                raise UserError("no train slice has two modalities for the draft network's pairs",
                                str(self.ctx.data_dir))
            mods = [record_modalities(records[i], cfg.modalities) for i in idx]
            where = [(k, MODALITIES.index(m)) for k, ms in enumerate(mods) for m in ms]
            views = cfg.draft_views if cfg.draft_flip_prob > 0 else 1
            bank = torch.zeros(views * len(idx), len(MODALITIES), geom.vae_image_tokens, geom.latent_dim)
            device = next(self._vae.parameters()).device
            for start in range(0, len(where), 64):
                chunk = where[start:start + 64]
                pixels = torch.from_numpy(np.stack([ds.arrays(idx[k])["images"][slot] for k, slot in chunk]))
                for view in range(views):
                    with torch.no_grad():
                        flips = DRAFT_VIEW_FLIPS[view]
                        lat = latent_tokens(self._vae, (pixels.flip(flips) if flips else pixels).to(device),
                                            self.ctx.recipe.model).cpu()
                    for (k, slot), tokens in zip(chunk, lat):
                        bank[view * len(idx) + k, slot] = tokens
            self._draft_bank = (idx, mods, bank)
            _BANK_CACHE.clear()
            _BANK_CACHE[key] = self._draft_bank
        return self._draft_bank

    def draw_draft_pairs(self, rng: np.random.Generator, n: int | None = None) -> DraftPairs:
        """``n`` (default ``data.draft_pairs``) ground-truth pairs (:func:`dataflow.draft_pair`) of
        random train slices with at least two modalities, from :meth:`draft_bank`, for the draft
        network's loss; each pair a mirrored view with ``data.draft_flip_prob`` (drawn after its
        pair, only when > 0; with more than two views, which one is drawn after that)."""
        cfg = self.ctx.recipe.data
        n = cfg.draft_pairs if n is None else n
        idx, mods, bank = self.draft_bank()
        rows = np.empty(n, dtype=np.int64)
        present = torch.zeros(n, len(MODALITIES), dtype=torch.bool)
        target_slot = torch.zeros(n, dtype=torch.long)
        for j in range(n):
            k = int(rng.integers(len(idx)))
            inputs, out = draft_pair(mods[k], rng, cfg)
            view = 0
            if cfg.draft_flip_prob > 0 and rng.random() < cfg.draft_flip_prob:
                view = 1 if cfg.draft_views == 2 else 1 + int(rng.integers(cfg.draft_views - 1))
            rows[j] = k + view * len(idx)
            present[j, [MODALITIES.index(m) for m in inputs]] = True
            target_slot[j] = MODALITIES.index(out)
        tokens = bank[torch.from_numpy(rows)]  # [B, S, T, D]
        return DraftPairs(stack_slots(tokens, present), target_slot, tokens[torch.arange(len(rows)), target_slot])

    # -- loss and export ---------------------------------------------------------------------------
    def loss_counts(self, batch: dict[str, Any]) -> dict[str, int]:
        """NTP labels, generation and self-alignment noisy rows of the micro-batch (always all
        three keys, so every rank joins the same all-reduce), and the draft pairs' latent tokens
        when the stage draws them."""
        counts = batch["batch"].loss_counts()
        if "draft" in batch:
            counts["draft"] = batch["draft"].count()
        return counts

    def loss(self, model: nn.Module, batch: dict[str, Any], norm: Mapping[str, float] | None = None) -> StepOutput:
        extra = {"draft": batch["draft"]} if "draft" in batch else {}
        out = model(batch["batch"], norm=norm, **extra)
        terms = {k: float(v) for k, v in out.items() if k != "loss"}
        return StepOutput(out["loss"], terms, int(batch["batch"].packed.length))

    def export(self, model: nn.Module, out_dir: Path) -> None:
        module: UnifiedTrainModule = model  # type: ignore[assignment]
        extra = {"recipe": recipe_to_dict(self.ctx.recipe), "stage": self.name}
        save_pretrained(module.model, out_dir, tokenizer=self.tokenizer(), vae=module.vae, extra_config=extra)


class UnifiedStage(ModelStage):
    """See the module docstring."""

    name = "unified"

    def build_model(self) -> nn.Module:
        """The stage's module; with ``model.aligned_draft`` the draft pairs' latent bank is encoded
        here, before the trainer wraps the module (DDP / FSDP: sharded autoencoder weights could not
        encode outside the wrapped forward)."""
        module = super().build_model()
        if self.ctx.recipe.model.aligned_draft:
            self.draft_bank()
        return module

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """The packed micro-batch, plus ``data.draft_pairs`` draft pairs with ``model.aligned_draft``
        (drawn after the pack from the same generator, so the packs are those of a run without)."""
        rng = self.numpy_rng(generator)
        out = self.pack_batch(rng, generator)
        if self.ctx.recipe.model.aligned_draft:
            out["draft"] = self.draw_draft_pairs(rng)
        return out
