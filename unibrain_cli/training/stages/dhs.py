"""The ``dhs`` stage: dynamic hidden states (paper section 2.4), a training-time KV-cache rollout.

Per sample of the micro-batch (interleaved plans as in ``unified``), inside ``forward``:

1. **Rollout, no grad.** The context up to the first generation slot (input images, instruction,
   thinking — teacher-forced text) is prefilled into a KV cache. At every generation slot the
   model samples the target from the slot's noise ``eps`` with ``stage.dhs_rollout_steps`` Euler
   steps on ``timestep_schedule(n, flow.sample_timestep_shift)`` (the inference sampler, no
   guidance), each step a query of the noisy block against the cache. The final sample is the
   *generated latent*; it is decoded (the VAE decode of a slice is cheap) and re-encoded into a
   clean VAE block and a ViT block exactly as inference re-encodes a generated modality, and
   these — never the ground truth — are appended to the cache for everything after the slot.
2. **One packed training forward, with grad,** over the whole sample where each generated
   slot's clean VAE and ViT blocks hold those detached generated views, and its noisy split
   holds ``x_t = (1 - t_k) x0 + t_k eps`` with ``t_k = schedule[k]`` at the slot's exit step
   ``k ~ U{0, .., n-1}`` (drawn in ``next_batch``). Losses: flow MSE of that split against the
   ground-truth velocity ``eps - x0`` (the standard rectified-flow target at the exit step's
   time; the rollout's own x at step k is not used as input, so the loss stays an unbiased
   flow-matching objective while its CONTEXT is dynamic), and NTP on the text after the slots
   (thinking, impression, diagnosis), now conditioned on the model's own images.

Why (2) equals backpropagating through the cached computation: the attention rule makes a noise
split invisible to every later token, and positions/masks of a pack are those of the
cache blocks (a block's positions are offset by the cache's counter; the noisy block reuses
the position its clean copy takes). So every key/value of the packed forward equals the cached
one of the rollout that ends with the same blocks (``KVCache(detach=False)``), and the loss
gradients reach all weights through the context, at the cost of one ordinary forward/backward.
Ground-truth latents of generated slots enter only their noise split, so they never reach a
later token (tested).

Loss: ``L = ntp_weight * L_NTP + flow_weight * (L_flow + L_SA)``, each a per-token mean over
the optimizer step (summed over the micro-batch, divided by the trainer's global token count,
see ``unified``). The rollout itself carries no loss: each generation slot contributes exactly
its ``T`` noisy latent rows ONCE, at its exit-step time, in the packed forward (whatever its
exit step), the SA sample its ``T`` rows, and NTP its label tokens — which is what
``TrainBatch.loss_counts`` counts. With equal-size image slots this is the paper's
``1/k sum_i (L_SA + L_NTP + L_flow)``: the flow mean over slots is ``1/k sum_i L_flow,i``.
``L_SA`` comes from ONE self-alignment sample packed into every micro-batch (``[vit(m), prompt,
noisy vae(m)]`` of a random image, training time distribution; it costs one extra short sample
and no rollout).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from unibrain_cli.flow.sampler import euler_step, timestep_schedule
from unibrain_cli.model.packing import PackedSequence
from unibrain_cli.training.materialize import (
    ImageGeometry,
    ImageItem,
    Item,
    LossTerms,
    TrainBatch,
    add_items,
    build_batch,
    decode_pixels,
)
from unibrain_cli.training.model_init import ModelBundle
from unibrain_cli.training.stages.sa import draw_sa_plan
from unibrain_cli.training.stages.unified import ModelStage, UnifiedTrainModule


class DHSTrainModule(UnifiedTrainModule):
    """:class:`UnifiedTrainModule` whose ``forward`` first runs the no-grad KV-cache rollout.

    Args:
        rollout_steps: Euler steps per generation slot; sample_shift: schedule shift.
    """

    def __init__(self, model: Any, vae: Any, geom: ImageGeometry, ntp_weight: float = 1.0,
                 flow_weight: float = 1.0, rollout_steps: int = 10, sample_shift: float = 3.0) -> None:
        super().__init__(model, vae, geom, ntp_weight, flow_weight)
        if rollout_steps < 1:
            raise ValueError(f"dhs_rollout_steps must be >= 1, got {rollout_steps}")
        self.rollout_steps = int(rollout_steps)
        self.sample_shift = float(sample_shift)

    def _context_block(self, items: list[Item], batch: TrainBatch, lat: Tensor, vit: Tensor, gen_lat: Tensor,
                       gen_vit: Tensor) -> PackedSequence:
        b = self.model.builder(batch.markers)
        add_items(b, items, self.geom, [], with_loss=False,
                  vit_data=lambda it: gen_vit[it.slot] if it.slot >= 0 else vit[it.image],
                  vae_data=lambda it: gen_lat[it.slot] if it.slot >= 0 else lat[it.image])
        return b.build(lat.device)

    def _noisy_block(self, batch: TrainBatch, x: Tensor) -> PackedSequence:
        b = self.model.builder(batch.markers)
        b.add_vae_image(self.geom.latent_grid, noisy=True, timestep=1.0, latents=x)
        return b.build(x.device)

    @torch.no_grad()
    def rollout(self, batch: TrainBatch, lat: Tensor, vit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Generate every non-SA slot of every sample (step 1 of the module docstring).

        Args:
            lat, vit: ground-truth views [n_img, T, D] / [n_img, Tv, P] of ``batch.pixels``.

        Returns:
            per slot: generated latent tokens [n_slots, T, D] (the Euler sample), its re-encoded
            clean views (latent tokens [n_slots, T, D], ViT patches [n_slots, Tv, P]); zeros
            for self-alignment slots.
        """
        n = batch.num_slots
        sampled = lat.new_zeros((n, *lat.shape[1:]))
        gen_lat = lat.new_zeros((n, *lat.shape[1:]))
        gen_vit = vit.new_zeros((n, *vit.shape[1:]))
        ts = timestep_schedule(self.rollout_steps, self.sample_shift).tolist()
        for items in batch.samples:
            if not any(isinstance(it, ImageItem) and it.noisy and not it.sa for it in items):
                continue
            cache = self.model.new_cache(detach=True)
            pending: list[Item] = []
            for it in items:
                if not (isinstance(it, ImageItem) and it.noisy):
                    pending.append(it)
                    continue
                if pending:
                    self.model.prefill(cache, self._context_block(pending, batch, lat, vit, gen_lat, gen_vit))
                    pending = []
                x = batch.noise[it.slot].to(lat.dtype)
                block = self._noisy_block(batch, x)
                for t, t_next in zip(ts[:-1], ts[1:], strict=True):
                    step = block.with_vae_latents(x).with_vae_timesteps(torch.full_like(block.vae_timesteps, t))
                    v = self.model.predict_velocity(cache, step)
                    x = euler_step(x, v.to(x.dtype), t, t_next)
                sampled[it.slot] = x
                pixels = decode_pixels(self.vae, x[None], self.geom, self.model.config)
                views = self.encode_images(pixels)
                gen_lat[it.slot], gen_vit[it.slot] = views[0][0], views[1][0]
        return sampled, gen_lat, gen_vit

    def losses(self, batch: TrainBatch, lat: Tensor, vit: Tensor, norm: Mapping[str, float] | None = None
               ) -> LossTerms:
        """Rollout (no grad) then the packed training forward (with grad); ``norm`` as in
        :meth:`UnifiedTrainModule.terms`."""
        _, gen_lat, gen_vit = self.rollout(batch, lat, vit)
        return self.terms(batch, lat, vit, gen_lat, gen_vit, norm=norm)

    def forward(self, batch: TrainBatch, norm: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        lat, vit = self.encode_images(batch.pixels)
        return self.combine(self.losses(batch, lat, vit, norm))


class DHSStage(ModelStage):
    """See the module docstring."""

    name = "dhs"
    #: Pack one self-alignment sample into every micro-batch (the L_SA term).
    include_sa: bool = True

    def make_module(self, bundle: ModelBundle) -> nn.Module:
        st, flow = self.ctx.stage, self.ctx.recipe.flow
        return DHSTrainModule(bundle.model, bundle.vae, self.geometry(), st.ntp_weight, st.flow_weight,
                              st.dhs_rollout_steps, flow.sample_timestep_shift)

    def check(self) -> None:
        super().check()
        if self.ctx.stage.dhs_rollout_steps < 1:
            from unibrain_cli.errors import UserError

            raise UserError("must be >= 1", f"train.stages[{self.ctx.index}].dhs_rollout_steps")

    def next_batch(self, position: int, generator: torch.Generator) -> dict[str, Any]:
        """Interleaved samples + one SA sample; per slot its exit step, flow time and noise."""
        rng = self.numpy_rng(generator)
        budget = self.ctx.recipe.data.pack_tokens
        sa = []
        if self.include_sa:
            sa = [draw_sa_plan(self.dataset()[1], self.ctx.recipe.data.modalities, rng)]
            budget = max(1, budget - self.token_count(sa[0][1]))
        samples, pixels, desc = self.materialize(self.draw_pack(rng, budget) + sa)
        slots = [it for items in samples for it in items if isinstance(it, ImageItem) and it.noisy]
        is_sa = torch.tensor([it.sa for it in slots], dtype=torch.bool)
        n, steps = len(slots), self.ctx.stage.dhs_rollout_steps
        exit_steps = torch.randint(0, steps, (n,), generator=generator)
        schedule = timestep_schedule(steps, self.ctx.recipe.flow.sample_timestep_shift)
        times = torch.where(is_sa, self.flow_times(n, generator), schedule[exit_steps])
        noise = self.noise(n, generator)
        batch = build_batch(samples, pixels, self.geometry(), self.markers(), times, noise,
                            exit_steps=torch.where(is_sa, -1, exit_steps), descriptions=desc)
        return {"batch": batch}

