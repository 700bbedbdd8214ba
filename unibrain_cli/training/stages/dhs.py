"""The ``dhs`` stage: dynamic hidden states (paper section 2.4), a training-time KV-cache rollout.

Per sample of the micro-batch (interleaved plans as in ``unified``), inside ``forward``:

1. **Rollout, no grad.** The context up to the first generation slot (input images, instruction,
   thinking — teacher-forced text) is prefilled into a KV cache. At every generation slot the
   model samples the target from the slot's noise ``eps`` with ``n = stage.dhs_rollout_steps``
   Euler steps on ``t_0 = 1 > t_1 > .. > t_n = 0 = timestep_schedule(n, flow.sample_timestep_shift)``
   (the inference sampler, no guidance), each step a query of the noisy block against the cache.
   The state the rollout holds at the slot's exit step ``k`` (before step k's update: ``x_{t_k}``,
   ``x_{t_0} = eps``) is recorded. The final sample is the *generated latent*; it is decoded (the
   VAE decode of a slice is cheap) and re-encoded into a clean VAE block and a ViT block exactly
   as inference re-encodes a generated modality, and these — never the ground truth — are
   appended to the cache for everything after the slot.
2. **One packed training forward, with grad,** over the whole sample where each generated
   slot's clean VAE and ViT blocks hold those detached generated views, and its noisy split
   holds the rollout's own detached state ``x_{t_k}`` at time ``t_k`` (self-forcing: the exit
   step is trained on what the model itself produced on the way there, not on a ground-truth
   mix). The exit step ``k`` is drawn uniformly in ``next_batch`` among the steps with
   ``t_k > 0`` (all of ``0 .. n-1``; the last time ``t_n = 0`` is never an exit). Losses: flow
   MSE of that split against the velocity that carries the state to the ground truth in one
   Euler step, ``(x_{t_k} - x0) / t_k`` (equal to ``eps - x0`` at ``k = 0``, where the state is
   the noise itself, and whenever the state lies on the straight path), and NTP on the text
   after the slots (thinking, impression, diagnosis), now conditioned on the model's own images.

Why (2) equals backpropagating through the cached computation: the attention rule makes a noise
split invisible to every later token, and positions/masks of a pack are those of the
cache blocks (a block's positions are offset by the cache's counter; the noisy block reuses
the position its clean copy takes). So every key/value of the packed forward equals the cached
one of the rollout that ends with the same blocks (``KVCache(detach=False)``), and the loss
gradients reach all weights through the context, at the cost of one ordinary forward/backward.
Ground-truth latents of generated slots enter only their flow target, so they never reach a
later token (tested).

Loss: ``L = ntp_weight * L_NTP + flow_weight * (L_flow + L_SA)``, each a per-token mean over
the optimizer step (summed over the micro-batch, divided by the trainer's global token count,
see ``unified``). The rollout itself carries no loss: each generation slot contributes exactly
its ``T`` noisy latent rows ONCE, at its exit step (whatever it is), in the packed forward,
the SA sample its ``T`` rows, and NTP its label tokens — which is what
``TrainBatch.loss_counts`` counts. With equal-size image slots this is the paper's
``1/k sum_i (L_SA + L_NTP + L_flow)``: the flow mean over slots is ``1/k sum_i L_flow,i``.
``L_SA`` comes from ONE self-alignment sample packed into every micro-batch (``[vit(m), prompt,
noisy vae(m)]`` of a random image, training time distribution, ground-truth target ``eps - x0``;
it costs one extra short sample and no rollout).

Sharded training (FSDP): every wrapped layer's forward is a collective (its parameters are
gathered), so all ranks must run the same sequence of layer forwards, while the rollout's
number of model passes depends on the sample (targets, context chunks). Under FSDP (or whenever
:attr:`DHSTrainModule.sync_passes` is set) the module therefore (a) plans its pass count from
the batch before the rollout and all-reduces its maximum over ranks, (b) makes every pass the
same "ViT, then decoder" sequence (a one-patch ViT call before a pass whose block has no ViT
image), and (c) after the rollout runs ``max - own`` dummy passes (a one-patch ViT call and a
one-token decoder prefill into a throw-away cache), whose outputs are discarded. DDP and single
process training need none of this (no collective inside the forward) and skip it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from unibrain_cli.config.components import DataConfig
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
    fused_item_rows,
)
from unibrain_cli.training.model_init import ModelBundle
from unibrain_cli.training.stages.sa import draw_sa_plan
from unibrain_cli.training.stages.unified import ModelStage, UnifiedTrainModule


@dataclass
class Rollout:
    """What :meth:`DHSTrainModule.rollout` returns (per slot; zeros for self-alignment slots).

    ``sampled``: the Euler sample [n_slots, T, D]; ``states``: the state at the slot's exit step
    ``x_{t_k}`` [n_slots, T, D]; ``gen_lat`` / ``gen_vit``: the re-encoded clean views of the
    sample [n_slots, T, D] / [n_slots, Tv, P]; ``passes``: model passes run (dummy ones included).
    """

    sampled: Tensor
    states: Tensor
    gen_lat: Tensor
    gen_vit: Tensor
    passes: int


def _holds_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` contains FSDP-wrapped (FSDP1) or ``fully_shard``-ed (FSDP2) submodules."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    kinds: tuple[type, ...] = (FSDP1,)
    try:
        from torch.distributed.fsdp import FSDPModule

        kinds = (*kinds, FSDPModule)
    except ImportError:  # pragma: no cover - older torch
        pass
    return any(isinstance(m, kinds) for m in module.modules())


def all_reduce_max(n: int, device: torch.device) -> int:
    """The maximum of ``n`` over all ranks (one all-reduce on the default process group)."""
    import torch.distributed as dist

    t = torch.tensor([n], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class DHSTrainModule(UnifiedTrainModule):
    """:class:`UnifiedTrainModule` whose ``forward`` first runs the no-grad KV-cache rollout.

    Args:
        rollout_steps: Euler steps per generation slot; sample_shift: schedule shift.

    Attributes:
        sync_passes: maps this rank's planned number of rollout passes to the number every rank
            runs (the module docstring's FSDP padding). None (default): the all-reduce max when
            the model holds FSDP units inside an initialised process group, else no padding.
            Tests set it to force padding on one process.
    """

    def __init__(self, model: Any, vae: Any, geom: ImageGeometry, ntp_weight: float = 1.0,
                 flow_weight: float = 1.0, rollout_steps: int = 10, sample_shift: float = 3.0) -> None:
        super().__init__(model, vae, geom, ntp_weight, flow_weight)
        if rollout_steps < 1:
            raise ValueError(f"dhs_rollout_steps must be >= 1, got {rollout_steps}")
        self.rollout_steps = int(rollout_steps)
        self.sample_shift = float(sample_shift)
        self.sync_passes: Callable[[int], int] | None = None

    def schedule(self) -> list[float]:
        """The rollout's times ``t_0 = 1 .. t_n = 0`` (``timestep_schedule``)."""
        return timestep_schedule(self.rollout_steps, self.sample_shift).tolist()

    def _context_block(self, items: list[Item], batch: TrainBatch, lat: Tensor, vit: Tensor, gen_lat: Tensor,
                       gen_vit: Tensor) -> PackedSequence:
        b = self.model.builder(batch.markers)
        add_items(b, items, self.geom, [], with_loss=False,
                  vit_data=lambda it: fused_item_rows(it.parts, vit, gen_vit, batch.vit_channels) if it.parts
                  else gen_vit[it.slot] if it.slot >= 0 else vit[it.image],
                  vae_data=lambda it: gen_lat[it.slot] if it.slot >= 0 else lat[it.image])
        return b.build(lat.device)

    def _noisy_block(self, batch: TrainBatch, x: Tensor, modality: int = -1) -> PackedSequence:
        b = self.model.builder(batch.markers)
        b.add_vae_image(self.geom.latent_grid, noisy=True, timestep=1.0, latents=x, modality=modality)
        return b.build(x.device)

    def plan(self, batch: TrainBatch) -> list[list[tuple[str, list[Item]]]]:
        """Per rolled-out sample its operations in order: ``("prefill", context items)`` (one
        cached pass) or ``("generate", [slot item])`` (``rollout_steps`` passes). Samples without
        a non-SA generation slot are not rolled out."""
        ops: list[list[tuple[str, list[Item]]]] = []
        for items in batch.samples:
            if not any(isinstance(it, ImageItem) and it.noisy and not it.sa for it in items):
                continue
            sample: list[tuple[str, list[Item]]] = []
            pending: list[Item] = []
            for it in items:
                if not (isinstance(it, ImageItem) and it.noisy):
                    pending.append(it)
                    continue
                if pending:
                    sample.append(("prefill", pending))
                    pending = []
                sample.append(("generate", [it]))
            ops.append(sample)
        return ops

    def planned_passes(self, batch: TrainBatch) -> int:
        """Model passes the rollout of ``batch`` runs (one per prefill, ``rollout_steps`` per slot)."""
        return self._count(self.plan(batch))

    def _count(self, ops: list[list[tuple[str, list[Item]]]]) -> int:
        return sum(1 if kind == "prefill" else self.rollout_steps for sample in ops for kind, _ in sample)

    def _pass_target(self, own: int, device: torch.device) -> int | None:
        """The pass count every rank runs, or None when no padding is needed (no FSDP)."""
        if self.sync_passes is not None:
            return int(self.sync_passes(own))
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and _holds_fsdp(self.model):
            return all_reduce_max(own, device)
        return None

    def _vit_dummy(self, width: int, device: torch.device) -> None:
        """One-patch ViT call (its output is discarded): keeps the ViT layers' collectives in step."""
        self.model.vit_model.vision_model(torch.zeros((1, width), dtype=self.model.dtype, device=device),
                                          torch.zeros((1,), dtype=torch.long, device=device),
                                          torch.tensor([0, 1], dtype=torch.int32, device=device))

    def _dummy_pass(self, batch: TrainBatch, width: int, device: torch.device) -> None:
        """A padding pass: one-patch ViT call, then a one-token prefill into a throw-away cache."""
        self._vit_dummy(width, device)
        b = self.model.builder(batch.markers)
        b.add_text([0])
        self.model.prefill(self.model.new_cache(detach=True), b.build(device))

    @torch.no_grad()
    def rollout(self, batch: TrainBatch, lat: Tensor, vit: Tensor) -> Rollout:
        """Generate every non-SA slot of every sample (step 1 of the module docstring).

        Args:
            lat, vit: ground-truth views [n_img, T, D] / [n_img, Tv, P] of ``batch.pixels``.

        Returns:
            the :class:`Rollout` (per slot: the sample, the exit-step state, its clean views).
        """
        n = batch.num_slots
        sampled = lat.new_zeros((n, *lat.shape[1:]))
        states = lat.new_zeros((n, *lat.shape[1:]))
        gen_lat = lat.new_zeros((n, *lat.shape[1:]))
        gen_vit = vit.new_zeros((n, *vit.shape[1:]))
        ts = self.schedule()
        ops = self.plan(batch)
        own = self._count(ops)
        target = self._pass_target(own, lat.device)
        uniform = target is not None  # every pass is "ViT, then decoder" (see the module docstring)
        width = vit.shape[-1]
        passes = 0
        for sample in ops:
            cache = self.model.new_cache(detach=True)
            for kind, items in sample:
                if kind == "prefill":
                    block = self._context_block(items, batch, lat, vit, gen_lat, gen_vit)
                    if uniform and not block.vit_indexes.numel():
                        self._vit_dummy(width, lat.device)
                    self.model.prefill(cache, block)
                    passes += 1
                    continue
                slot = items[0].slot
                k_exit = int(batch.exit_steps[slot])
                if not 0 <= k_exit < self.rollout_steps or ts[k_exit] <= 0:
                    raise ValueError(f"slot {slot}: exit step {k_exit} is not a step with t > 0 of the "
                                     f"{self.rollout_steps}-step rollout")
                if abs(float(batch.timesteps[slot]) - ts[k_exit]) > 1e-6:
                    raise ValueError(f"slot {slot}: flow time {float(batch.timesteps[slot])} is not the rollout "
                                     f"time {ts[k_exit]} of its exit step {k_exit}")
                x = batch.noise[slot].to(lat.dtype)
                block = self._noisy_block(batch, x, items[0].modality)
                for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
                    if k == k_exit:
                        states[slot] = x
                    step = block.with_vae_latents(x).with_vae_timesteps(torch.full_like(block.vae_timesteps, t))
                    if uniform:
                        self._vit_dummy(width, lat.device)
                    v = self.model.predict_velocity(cache, step)
                    x = euler_step(x, v.to(x.dtype), t, t_next)
                    passes += 1
                sampled[slot] = x
                pixels = decode_pixels(self.vae, x[None], self.geom, self.model.config)
                views = self.encode_images(pixels)
                gen_lat[slot], gen_vit[slot] = views[0][0], views[1][0]
        assert passes == own, (passes, own)
        if target is not None:
            if target < own:
                raise RuntimeError(f"the synchronised pass count {target} is below this rank's {own}")
            for _ in range(target - own):
                self._dummy_pass(batch, width, lat.device)
                passes += 1
        return Rollout(sampled, states, gen_lat, gen_vit, passes)

    def losses(self, batch: TrainBatch, lat: Tensor, vit: Tensor, norm: Mapping[str, float] | None = None
               ) -> LossTerms:
        """Rollout (no grad) then the packed training forward (with grad) whose generation slots
        start from the rollout's exit-step states; ``norm`` as in :meth:`UnifiedTrainModule.terms`."""
        r = self.rollout(batch, lat, vit)
        return self.terms(batch, lat, vit, r.gen_lat, r.gen_vit, norm=norm, states=r.states,
                          from_states=~batch.slot_sa)

    def forward(self, batch: TrainBatch, norm: Mapping[str, float] | None = None) -> dict[str, Tensor]:
        lat, vit = self.encode_images(batch.pixels, batch.vae_src)  # ViT-only images: no encoder pass
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

    def plan_config(self) -> DataConfig:
        """One noisy block per target: DHS rolls every generation slot out (``flow_draws`` is a
        ``unified`` setting)."""
        return dataclasses.replace(self.ctx.recipe.data, flow_draws=1)

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
        schedule = timestep_schedule(steps, self.ctx.recipe.flow.sample_timestep_shift)
        allowed = torch.nonzero(schedule[:-1] > 0).flatten()  # exit steps: t_k > 0 (never t_n = 0)
        if not allowed.numel():
            from unibrain_cli.errors import UserError

            raise UserError("the rollout schedule has no step with t > 0", "flow.sample_timestep_shift")
        exit_steps = allowed[torch.randint(0, len(allowed), (n,), generator=generator)]
        times = torch.where(is_sa, self.flow_times(n, generator), schedule[exit_steps])
        noise = self.noise(n, generator)
        batch = build_batch(samples, pixels, self.geometry(), self.markers(), times, noise,
                            exit_steps=torch.where(is_sa, -1, exit_steps), descriptions=desc)
        return {"batch": batch}

