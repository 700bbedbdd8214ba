"""The released protocol's three tasks over KV caches, with their exact guidance contexts.

A :class:`Context` is one KV cache plus the record (:class:`Block`) of everything stored in it,
taken from the very packs the model received (token ids, RoPE positions, 2D position ids,
timesteps). Items (``inferencer.py`` of the authors):

- text item: ``<|im_start|> + encode(text) + <|im_end|>``, causal, RoPE +1 per token;
- context image: VAE block ``<|vision_start|> + latent tokens + <|vision_end|>`` at RoPE p (full
  attention, t = 0, latent ids ``row * 64 + col``, the posterior SAMPLED), then ViT block
  ``<|vision_start|> + patches + <|vision_end|>`` at p + 1 (ids ``row * 70 + col``);
- text generation: ``<|im_start|>`` fed at the current position, greedy until ``<|im_end|>`` or
  ``max_length`` steps (the fed token counting as one); the context is not changed;
- image generation: noise [n, 64] -> Euler from t = 1 to 0 (:class:`SamplerSettings`) with the
  conditional context and two guidance contexts (own caches, own RoPE positions).

Tasks (``evaluate_metrics.py``):

- :func:`run_generation` (imputation only): ``[images] + [instruction]``; text-free guidance =
  the images, image-free guidance = the instruction alone; shift 3;
- :func:`run_unified` (the chain): system prompt, images, first instruction; per target greedy
  thinking (appended), the image (shift 1), the image appended, the next instruction; guidance
  for the first target: text-free = system + images, image-free = system + instruction; for
  target k >= 2: text-free = everything up to the previous generated image, image-free = that
  without it plus the next instruction (the current thinking is in neither); then the
  impression instruction -> greedy impression (not appended) -> the diagnosis question -> label;
- :func:`run_diagnosis` (understanding only): ``[images] + [question]`` -> greedy answer.

Randomness (posterior samples, initial noise) comes from one ``torch.Generator`` in call order.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from unibrain_cli.data.tokenizer import BOS_TOKEN, EOS_TOKEN
from unibrain_cli.flow.sampler import cfg_active, sample
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.embeddings import patch_tokens, patchify_latent, unpatchify_latent
from unibrain_cli.model.kv_cache import KVCache
from unibrain_cli.model.packing import PackedSequence, SequenceBuilder, TokenType
from unibrain_cli.model.vae import AutoEncoder
from unibrain_cli.released.folder import ReleasedTokenizer
from unibrain_cli.released.images import average_draws, decoded_to_rgb, encoder_inputs, generation_size
from unibrain_cli.released.protocol import (
    DIAGNOSIS_MAX_LENGTH,
    DIAGNOSIS_QUESTION,
    FINAL_DIAGNOSIS_QUESTION,
    GENERATION_SAMPLER,
    IMPRESSION_INSTRUCTION,
    SYSTEM_PROMPT,
    THINK_MAX_LENGTH,
    UNIFIED_SAMPLER,
    SamplerSettings,
    chain_instruction,
    generation_instruction,
)

#: Placeholder ids of image rows in a :class:`Block` (text rows hold their token id).
VAE_ROW = -1
VIT_ROW = -2


# ---------------------------------------------------------------------------------------------
# contexts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One stored forward, as the model received it.

    Attributes:
        ids: per row the text id (image markers included), :data:`VAE_ROW` or :data:`VIT_ROW`.
        positions: per row the RoPE position (after the cache offset).
        latent_position_ids: 2D ids of the VAE rows; vit_position_ids: 2D ids of the ViT rows.
        timesteps: flow time of each VAE row (0 for context images).
    """

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    latent_position_ids: tuple[int, ...] = ()
    vit_position_ids: tuple[int, ...] = ()
    timesteps: tuple[float, ...] = ()


def block_of(packed: PackedSequence, offset: int) -> Block:
    """The :class:`Block` of a one-sample pack run after ``offset`` cached positions."""
    types = packed.token_types.tolist()
    ids = [VAE_ROW if t == TokenType.VAE else VIT_ROW for t in types]
    for row, tok in zip(packed.text_indexes.tolist(), packed.text_ids.tolist(), strict=True):
        ids[row] = int(tok)
    return Block(tuple(ids), tuple(int(p) + offset for p in packed.position_ids.tolist()),
                 tuple(packed.vae_position_ids.tolist()), tuple(packed.vit_position_ids.tolist()),
                 tuple(float(t) for t in packed.vae_timesteps.tolist()))


@dataclass
class Context:
    """A KV cache and the blocks stored in it (forks share tensors; nothing is copied)."""

    cache: KVCache
    blocks: tuple[Block, ...] = ()

    def fork(self) -> Context:
        return Context(self.cache.fork(), self.blocks)

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def next_position(self) -> int:
        return self.cache.next_position

    def layout(self) -> tuple[list[int], list[int]]:
        """(ids, positions) of every stored row, in order (see :class:`Block`)."""
        ids = [i for b in self.blocks for i in b.ids]
        return ids, [p for b in self.blocks for p in b.positions]


@dataclass(frozen=True)
class GuidanceRecord:
    """The three contexts one image was generated with, and how often each was queried."""

    cond: tuple[Block, ...]
    text_free: tuple[Block, ...]
    image_free: tuple[Block, ...]
    query_positions: tuple[int, int, int]
    size: tuple[int, int]
    calls: dict[str, int]


# ---------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------


class ReleasedEngine:
    """Runs the released protocol's items on a model (see the module docstring).

    Attributes:
        records: one :class:`GuidanceRecord` per generated image, in order.
    """

    def __init__(self, model: UniBrainModel, vae: AutoEncoder, tokenizer: ReleasedTokenizer,
                 progress: bool = False) -> None:
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.progress = progress
        self.records: list[GuidanceRecord] = []

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side: VAE downsample x latent patch (16)."""
        return self.vae.downsample * self.model.config.latent_patch_size

    def new_context(self) -> Context:
        return Context(self.model.new_cache())

    def _builder(self) -> SequenceBuilder:
        return self.model.builder((self.tokenizer.image_start_id, self.tokenizer.image_end_id))

    @torch.no_grad()
    def _store(self, ctx: Context, b: SequenceBuilder) -> None:
        packed = b.build(self.device)
        offset = ctx.cache.next_position
        self.model.prefill(ctx.cache, packed)
        ctx.blocks = (*ctx.blocks, block_of(packed, offset))

    # -- items --------------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        """A text item: ``<|im_start|> + encode(text) + <|im_end|>``."""
        return [self.tokenizer.bos_id, *self.tokenizer.encode(text), self.tokenizer.eos_id]

    def add_text(self, ctx: Context, text: str) -> None:
        """Append a text item."""
        b = self._builder()
        b.add_text(self.text_ids(text))
        self._store(ctx, b)

    @torch.no_grad()
    def add_image(self, ctx: Context, rgb: np.ndarray, generator: torch.Generator) -> None:
        """Append a context image (RGB uint8 [H, W, 3]): VAE block (posterior sample) then ViT block."""
        vae_in, vit_in = encoder_inputs(rgb)
        p_vae = next(self.vae.parameters())
        mean, logvar = self.vae.encode_moments(vae_in[None].to(p_vae.device, p_vae.dtype))
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        z = self.vae.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - self.vae.shift_factor)
        cfg = self.model.config
        lat, _ = patchify_latent(z[0].float(), cfg.latent_patch_size, cfg.max_latent_size)
        patch = cfg.vit.patch_size
        b = self._builder()
        b.add_vae_image((vae_in.shape[1] // self.latent_downsample, vae_in.shape[2] // self.latent_downsample),
                        latents=lat)
        b.add_vit_image((vit_in.shape[1] // patch, vit_in.shape[2] // patch),
                        patches=patch_tokens(vit_in, patch).to(self.device))
        self._store(ctx, b)

    @torch.no_grad()
    def gen_text(self, ctx: Context, max_length: int) -> str:
        """Greedy text after ``ctx`` (unchanged): ``<|im_start|>`` fed, at most ``max_length`` steps
        counting it, stop at ``<|im_end|>``; the text between the first ``<|im_start|>`` and
        ``<|im_end|>`` of the decoded sequence (their ``gen_text``)."""
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        tok = self.tokenizer
        new = self.model.generate_text(ctx.cache.fork(), [tok.bos_id], max_length - 1, eos_id=tok.eos_id,
                                       append_last=False)
        if new and new[-1] == tok.eos_id:
            new = new[:-1]
        return tok.decode_raw([tok.bos_id, *new]).split(EOS_TOKEN)[0].split(BOS_TOKEN)[1]

    @torch.no_grad()
    def velocity(self, ctx: Context, x: Tensor, t: float, grid: tuple[int, int]) -> Tensor:
        """Velocity [n, 64] (float32) of noisy latent tokens ``x`` at time ``t`` after ``ctx``
        (a ``<|vision_start|> + tokens + <|vision_end|>`` block at ``ctx``'s next position)."""
        b = self._builder()
        b.add_vae_image(grid, noisy=True, timestep=float(t), latents=x.to(self.device))
        return self.model.predict_velocity(ctx.cache, b.build(self.device)).float()

    @torch.no_grad()
    def decode(self, tokens: Tensor, grid: tuple[int, int]) -> np.ndarray:
        """Latent tokens [n, 64] on a (rows, cols) grid -> RGB uint8 [H, W, 3]."""
        p = self.model.config.latent_patch_size
        p_vae = next(self.vae.parameters())
        z = unpatchify_latent(tokens.to(p_vae.device, torch.float32), self.vae.z_channels, grid[0] * p, grid[1] * p, p)
        return decoded_to_rgb(self.vae.decode(z[None].to(p_vae.dtype))[0])

    @torch.no_grad()
    def gen_image(self, cond: Context, text_free: Context, image_free: Context, size: tuple[int, int],
                  sampler: SamplerSettings, generator: torch.Generator, steps: int | None = None) -> np.ndarray:
        """Sample one image of ``size`` (H, W) -> RGB uint8 [H, W, 3] (see the module docstring).

        ``steps`` overrides the Euler updates (default ``sampler.euler_steps`` = 9).
        """
        grid = (size[0] // self.latent_downsample, size[1] // self.latent_downsample)
        noise = torch.randn(grid[0] * grid[1], self.model.latent_dim, generator=generator)
        calls: Counter[str] = Counter()

        def velocity_fn(x: Tensor, t: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
            need_text, need_img = cfg_active(t, sampler.text_scale, sampler.img_scale, sampler.interval)
            calls.update(["cond"] + ["text_free"] * need_text + ["image_free"] * need_img)
            return (self.velocity(cond, x, t, grid),
                    self.velocity(text_free, x, t, grid) if need_text else None,
                    self.velocity(image_free, x, t, grid) if need_img else None)

        x0 = sample(velocity_fn, noise.to(self.device), steps=sampler.euler_steps if steps is None else steps,
                    shift=sampler.shift, text_scale=sampler.text_scale, img_scale=sampler.img_scale,
                    interval=sampler.interval, renorm_type=sampler.renorm_type,  # type: ignore[arg-type]
                    renorm_min=sampler.renorm_min, progress=self.progress)
        self.records.append(GuidanceRecord(cond.blocks, text_free.blocks, image_free.blocks,
                                           (cond.next_position, text_free.next_position, image_free.next_position),
                                           size, dict(calls)))
        return self.decode(x0, grid)


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class GenerationResult:
    """Imputation only: the (draw-averaged) RGB uint8 image, every draw, the last draw's contexts."""

    image: np.ndarray
    draws: list[np.ndarray]
    contexts: tuple[Context, Context, Context]


def generation_contexts(engine: ReleasedEngine, inputs: Sequence[np.ndarray], target: str,
                        generator: torch.Generator) -> tuple[Context, Context, Context]:
    """(conditional, text-free, image-free) contexts of imputation only (``think=False``, no system prompt)."""
    cond, image_free = engine.new_context(), engine.new_context()
    for rgb in inputs:
        engine.add_image(cond, rgb, generator)
    text_free = cond.fork()
    instruction = generation_instruction(target)
    engine.add_text(cond, instruction)
    engine.add_text(image_free, instruction)
    return cond, text_free, image_free


def run_generation(engine: ReleasedEngine, inputs: Sequence[np.ndarray], target: str,
                   generators: Sequence[torch.Generator], steps: int | None = None,
                   sampler: SamplerSettings = GENERATION_SAMPLER) -> GenerationResult:
    """Impute ``target`` from padded RGB inputs; one draw per generator (each a fresh run, as
    their ``sample_time`` loop), averaged as uint8."""
    if not inputs or not generators:
        raise ValueError("run_generation needs at least one input image and one generator")
    draws, contexts = [], None
    for gen in generators:
        contexts = generation_contexts(engine, inputs, target, gen)
        draws.append(engine.gen_image(*contexts, generation_size(inputs[-1]), sampler, gen, steps))
    assert contexts is not None
    return GenerationResult(average_draws(draws), draws, contexts)


@dataclass
class UnifiedResult:
    """The unified chain: per target the (draw-averaged) RGB uint8 image, its draws and the thinking;
    the impression and the final label (None when not asked); the final context."""

    images: dict[str, np.ndarray]
    draws: dict[str, list[np.ndarray]]
    thinking: dict[str, str]
    impression: str | None
    label: str | None
    context: Context
    answer_contexts: tuple[Context, Context] | None = None
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)


def run_unified(engine: ReleasedEngine, inputs: Sequence[np.ndarray], targets: Sequence[str],
                generator: torch.Generator, sample_time: int = 1, think_max_length: int = THINK_MAX_LENGTH,
                answer: bool = True, steps: int | None = None,
                sampler: SamplerSettings = UNIFIED_SAMPLER) -> UnifiedResult:
    """The unified chain on one slice (see the module docstring); ``sample_time`` draws per target
    are averaged (uint8) and that image becomes context."""
    if not inputs or not targets:
        raise ValueError("the unified chain needs input images and at least one target")
    gen = engine.new_context()
    image_free = engine.new_context()
    engine.add_text(gen, SYSTEM_PROMPT)
    engine.add_text(image_free, SYSTEM_PROMPT)
    for rgb in inputs:
        engine.add_image(gen, rgb, generator)
    text_free = gen.fork()
    first = generation_instruction(targets[0])
    engine.add_text(gen, first)
    engine.add_text(image_free, first)
    size = generation_size(inputs[0])
    images: dict[str, np.ndarray] = {}
    draws: dict[str, list[np.ndarray]] = {}
    thinking: dict[str, str] = {}
    for i, target in enumerate(targets):
        thinking[target] = engine.gen_text(gen, think_max_length)
        engine.add_text(gen, thinking[target])
        draws[target] = [engine.gen_image(gen, text_free, image_free, size, sampler, generator, steps)
                         for _ in range(sample_time)]
        images[target] = average_draws(draws[target])
        image_free = gen.fork()
        engine.add_image(gen, images[target], generator)
        text_free = gen.fork()
        if i < len(targets) - 1:
            nxt = chain_instruction(targets[i + 1])
            engine.add_text(gen, nxt)
            engine.add_text(image_free, nxt)
    impression = label = None
    answer_contexts = None
    if answer:
        q_imp = gen.fork()
        engine.add_text(q_imp, IMPRESSION_INSTRUCTION)
        impression = engine.gen_text(q_imp, think_max_length)
        q_dx = q_imp.fork()
        engine.add_text(q_dx, FINAL_DIAGNOSIS_QUESTION)
        label = engine.gen_text(q_dx, think_max_length)
        answer_contexts = (q_imp, q_dx)
    return UnifiedResult(images, draws, thinking, impression, label, gen, answer_contexts,
                         {t: size for t in targets})


def run_diagnosis(engine: ReleasedEngine, inputs: Sequence[np.ndarray], generator: torch.Generator,
                  max_length: int = DIAGNOSIS_MAX_LENGTH) -> tuple[str, Context]:
    """Understanding only: ``[images] + [DIAGNOSIS_QUESTION]`` -> (greedy answer, the context)."""
    ctx = engine.new_context()
    for rgb in inputs:
        engine.add_image(ctx, rgb, generator)
    engine.add_text(ctx, DIAGNOSIS_QUESTION)
    return engine.gen_text(ctx, max_length), ctx
