"""The interleaved inference protocol over ONE KV cache (DESIGN section 1).

A case is one sequence, built the way the training data flow builds it
(:mod:`unibrain_cli.data.dataflow`), with the model producing the parts it learned to produce::

    [input images: clean VAE + ViT]*
    for each wanted modality:
        instruction (given)  ->  thinking (generated, greedy)  ->  image (sampled by rectified flow)
        -> the generated image, re-encoded (clean VAE + ViT), becomes context
    question -> "Impression: ..." (generated) -> "Final Diagnosis: ..." (generated)

Text segments are ``[bos] + text + [eos]`` and images carry image markers
(:mod:`unibrain_cli.inference.blocks`). The deterministic phrasings come from
:mod:`unibrain_cli.data.templates` (``instruction_for``, ``both_question``...), the same the
training data flow uses as its first variant.

Thinking: with ``flow.thinking_plan = "forced"`` its opening planning sentence is the data flow's
template for the known inputs and the target (:func:`thinking_prompt`), forced like a prompt,
and the model generates the rest (the findings of the known modalities); ``"generated"``: the
model writes all of it after ``[bos]``.

Image sampling: from seeded Gaussian noise, Euler steps with the recipe's ``sample_steps`` and
``sample_timestep_shift``; at every step the noisy latent block is queried against the cache
(the cache is not updated). Classifier-free guidance (scales != 1) uses two more contexts, kept
only when guidance is on: *text-unconditional* = every image, no instruction/thinking text;
*image-unconditional* = every text, no image (BAGEL's ``cfg_text`` / ``cfg_img`` contexts).

Every :class:`Context` can also run *uncached* (``Engine(cached=False)``): each query rebuilds
the whole pack and runs a full forward. It is the reference the cache is tested against and
the baseline of :func:`unibrain_cli.inference.bench.bench_impute_cache`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from unibrain_cli.config.components import FlowConfig, ModelConfig
from unibrain_cli.data import templates
from unibrain_cli.flow.sampler import cfg_active, sample
from unibrain_cli.inference.blocks import (
    EncodedImage,
    ImageView,
    TokenizerLike,
    add_image,
    check_image_size,
    encode_images,
    image_markers,
    latent_tokens_to_images,
    modality_slot,
    vit_side,
    wrap_text,
)
from unibrain_cli.model.bagel import UniBrainModel, sample_token
from unibrain_cli.model.fused import FUSED_SLOT, needs_fused
from unibrain_cli.model.kv_cache import KVCache
from unibrain_cli.model.packing import PackedSequence, SequenceBuilder
from unibrain_cli.model.vae import AutoEncoder

INPUT_VIEWS: tuple[ImageView, ...] = ("vae_clean", "vit")  # interleaved plans: clean VAE, then ViT
UNDERSTANDING_VIEWS: tuple[ImageView, ...] = ("vit",)  # understanding-only plans
ANSWER_PREFIX = "Impression:"
DIAGNOSIS_PREFIX = "Final Diagnosis:"


# ---------------------------------------------------------------------------------------------
# contexts
# ---------------------------------------------------------------------------------------------


@dataclass
class _Seg:
    """One recorded context segment: text ids, or views of one image."""

    ids: list[int] | None = None
    image: EncodedImage | None = None
    views: tuple[ImageView, ...] = ()


@dataclass
class Context:
    """A sequence under construction: its segments and, in cached mode, its KV cache.

    ``segments`` are always recorded (cheap: references to token tensors), so an uncached
    engine can rebuild the whole pack and a cached one can be checked against it.
    """

    cache: KVCache | None
    segments: list[_Seg] = field(default_factory=list)

    def fork(self) -> Context:
        """An independent continuation of this context (the cache shares tensors, copies nothing)."""
        return Context(self.cache.fork() if self.cache is not None else None, list(self.segments))

    @property
    def num_tokens(self) -> int:
        """Tokens in the context (cached keys, or recorded tokens when uncached)."""
        if self.cache is not None:
            return self.cache.length
        n = 0
        for s in self.segments:
            if s.ids is not None:
                n += len(s.ids)
            else:
                assert s.image is not None
                for v in s.views:
                    n += 2 + (s.image.vit_patches.shape[0] if v == "vit" else s.image.vae_tokens.shape[0])
        return n


@dataclass
class GuidedContexts:
    """The conditional context plus the guidance contexts that are switched on (else None)."""

    cond: Context
    text_uncond: Context | None = None
    img_uncond: Context | None = None

    def fork(self) -> GuidedContexts:
        return GuidedContexts(
            self.cond.fork(),
            self.text_uncond.fork() if self.text_uncond is not None else None,
            self.img_uncond.fork() if self.img_uncond is not None else None,
        )


# ---------------------------------------------------------------------------------------------
# engine
# ---------------------------------------------------------------------------------------------


class Engine:
    """Runs blocks of the interleaved protocol against contexts.

    Args:
        model: the unified model (eval mode).
        vae: its autoencoder.
        tokenizer: text tokenizer with bos/eos/image-marker ids.
        flow: sampler settings (``sample_steps``, ``sample_timestep_shift``, guidance).
        image_size: slice side S in pixels.
        max_text_tokens: truncation of one given text segment (``data.max_text_tokens``).
        cached: use the KV cache (default); False recomputes the whole context per query.
        progress: rich progress bars while sampling.
    """

    def __init__(
        self,
        model: UniBrainModel,
        vae: AutoEncoder,
        tokenizer: TokenizerLike,
        flow: FlowConfig,
        image_size: int,
        max_text_tokens: int = 256,
        cached: bool = True,
        progress: bool = False,
    ) -> None:
        check_image_size(model.config, image_size)
        self.model = model
        self.vae = vae
        self.tokenizer = tokenizer
        self.flow = flow
        self.image_size = image_size
        self.max_text_tokens = max_text_tokens
        self.cached = cached
        self.progress = progress
        self.markers = image_markers(tokenizer)

    # -- low level ------------------------------------------------------------------------------

    @property
    def cfg(self) -> ModelConfig:
        return self.model.config

    def new_context(self) -> Context:
        return Context(self.model.new_cache() if self.cached else None)

    def builder(self) -> SequenceBuilder:
        return self.model.builder(self.markers)

    def text_ids(self, text: str) -> list[int]:
        """A given text segment: ``[bos] + ids + [eos]``."""
        return wrap_text(self.tokenizer, text, self.max_text_tokens)

    def _add_seg(self, b: SequenceBuilder, seg: _Seg) -> None:
        if seg.ids is not None:
            b.add_text(seg.ids)
        else:
            assert seg.image is not None
            for view in seg.views:
                add_image(b, view, seg.image)

    def _pack(self, segments: Sequence[_Seg], tail: Callable[[SequenceBuilder], Any] | None = None) -> PackedSequence:
        b = self.builder()
        for seg in segments:
            self._add_seg(b, seg)
        if tail is not None:
            tail(b)
        return b.build(self.model.device)

    def _append(self, ctx: Context | None, segs: Sequence[_Seg]) -> None:
        if ctx is None or not segs:
            return
        if ctx.cache is not None:
            self.model.prefill(ctx.cache, self._pack(segs))
        ctx.segments.extend(segs)

    def add_ids(self, ctx: Context | None, ids: Sequence[int]) -> None:
        """Append a text split of raw ids (no-op for ``ctx=None``)."""
        self._append(ctx, [_Seg(ids=[int(i) for i in ids])])

    def add_text(self, ctx: Context | None, text: str) -> None:
        """Append a given text segment ``[bos] + text + [eos]``."""
        self.add_ids(ctx, self.text_ids(text))

    def add_fused_view(self, ctx: Context | None) -> None:
        """``model.fused_view``: append the fused view of the ViT views ``ctx`` holds (model/fused.py),
        unless it holds none or already ends its images with one. No-op when the model has none."""
        if ctx is None or self.model.fused_view is None:
            return
        if ctx.cache is not None:
            views = list(ctx.cache.views)
        else:
            views = [(s.image.modality, s.image.vit_patches) for s in ctx.segments
                     if s.image is not None and "vit" in s.views and s.image.modality >= 0]
        if not needs_fused(views):
            return
        self.add_images(ctx, [self.fused_image(views)], ("vit",))

    def fused_image(self, views: Sequence[tuple[int, Tensor]]) -> EncodedImage:
        """The fused view of slotted ViT views, as an image with only a ViT view (slot ``FUSED_SLOT``)."""
        n = vit_side(self.image_size, self.cfg.vit.patch_size) // self.cfg.vit.patch_size
        rows = self.model.fused_rows(views)
        return EncodedImage(rows.new_zeros(0, self.cfg.latent_patch_size**2 * self.cfg.vae.z_channels),
                            self.latent_grid, rows, (n, n), FUSED_SLOT)

    def ask(self, ctx: Context | None, question: str) -> None:
        """Append a question: the fused view first (:meth:`add_fused_view`), then the text."""
        self.add_fused_view(ctx)
        self.add_text(ctx, question)

    def add_images(self, ctx: Context | None, images: Sequence[EncodedImage], views: Sequence[ImageView] = INPUT_VIEWS) -> None:
        """Append images (each with ``views``, in order) as one block."""
        self._append(ctx, [_Seg(image=img, views=tuple(views)) for img in images])

    def encode(self, images: Tensor, modalities: Sequence[str | None] | None = None) -> list[EncodedImage]:
        """Slices [B, S, S] in [0, 1] -> both views of each (``modalities``: canonical name of each
        slice, read by ``model.aligned_context``)."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"slices must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
        return encode_images(self.vae, images, self.cfg, modalities)

    def decode(self, tokens: Sequence[Tensor], grid: tuple[int, int]) -> Tensor:
        """Latent tokens -> slices [B, S, S] in [0, 1]."""
        return latent_tokens_to_images(self.vae, tokens, grid, self.cfg)

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.image_size // (self.cfg.vae.downsample * self.cfg.latent_patch_size)
        return side, side

    # -- queries --------------------------------------------------------------------------------

    @torch.no_grad()
    def velocity(self, ctx: Context, x: Tensor, t: float, target: str | None = None) -> Tensor:
        """Velocity [n, latent_dim] (float32) of noisy latent tokens ``x`` at flow time ``t`` after
        ``ctx``; ``target``: the modality being generated (its aligned-context slot stays empty)."""
        grid = self.latent_grid
        xt = x.to(self.model.device)
        slot = modality_slot(target)

        def noisy(b: SequenceBuilder) -> None:
            b.add_vae_image(grid, noisy=True, timestep=float(t), latents=xt, modality=slot)

        if ctx.cache is not None:
            b = self.builder()
            noisy(b)
            return self.model.predict_velocity(ctx.cache, b.build(self.model.device)).float()
        out = self.model(self._pack(ctx.segments, noisy), logits_at="none", velocity_at="noisy")
        assert out.velocity is not None
        return out.velocity.float()

    @torch.no_grad()
    def next_logits(self, ctx: Context, ids: Sequence[int]) -> Tensor:
        """Logits [vocab] after ``ctx`` + ``ids`` (nothing is appended)."""
        seg = _Seg(ids=list(ids))
        if ctx.cache is not None:
            out = self.model.forward_cached(self._pack([seg]), ctx.cache, update=False, logits_at="last")
        else:
            out = self.model(self._pack([*ctx.segments, seg]), logits_at="last", velocity_at="none")
        assert out.logits is not None
        return out.logits[-1]

    @torch.no_grad()
    def generate(self, ctx: Context, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding after ``ctx`` + ``prompt_ids`` until eos or ``max_new_tokens``.

        The prompt and every generated token are appended to ``ctx``; a segment cut by the
        length bound is closed with an eos (so the context always holds whole segments).
        Returns the generated ids (eos included when generated).
        """
        eos = self.tokenizer.eos_id
        if ctx.cache is not None:
            new = self.model.generate_text(ctx.cache, list(prompt_ids), max_new_tokens, eos_id=eos)
        else:
            new = []
            for _ in range(max_new_tokens):
                tok = sample_token(self.next_logits(ctx, [*prompt_ids, *new]))
                new.append(tok)
                if tok == eos:
                    break
        ctx.segments.append(_Seg(ids=[*map(int, prompt_ids), *new]))
        if not new or new[-1] != eos:
            self.add_ids(ctx, [eos])
        return new

    @torch.no_grad()
    def score(self, ctx: Context, prompt_ids: Sequence[int], candidate_ids: Sequence[int]) -> Tensor:
        """Log-probabilities [len(candidate_ids)] of a candidate after ``ctx`` + prompt (ctx unchanged)."""
        if ctx.cache is not None:
            return self.model.score_text(ctx.cache, list(prompt_ids), list(candidate_ids))

        def tail(b: SequenceBuilder) -> None:
            b.add_text(list(prompt_ids))
            b.add_text(list(candidate_ids), loss=True)

        packed = self._pack(ctx.segments, tail)
        out = self.model(packed, logits_at="loss", velocity_at="none")
        assert out.logits is not None
        return F.log_softmax(out.logits.float(), dim=-1).gather(1, packed.ce_labels[:, None]).squeeze(1)

    def decode_text(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokenizer.decode(ids).split())

    # -- contexts with guidance -----------------------------------------------------------------

    def guidance(self) -> tuple[bool, bool]:
        """Whether text / image guidance is ever active with this sampler config."""
        f = self.flow
        return f.cfg_text_scale != 1.0, f.cfg_img_scale != 1.0

    def start(self, inputs: Sequence[EncodedImage], views: Sequence[ImageView] = INPUT_VIEWS) -> GuidedContexts:
        """Contexts holding the input images (and the guidance contexts that are on)."""
        need_text, need_img = self.guidance()
        ctx = GuidedContexts(self.new_context(), self.new_context() if need_text else None,
                             self.new_context() if need_img else None)
        self.add_images(ctx.cond, inputs, views)
        self.add_images(ctx.text_uncond, inputs, views)
        return ctx

    def sample_latents(self, ctx: GuidedContexts, noise: Tensor, steps: int | None = None,
                       target: str | None = None) -> Tensor:
        """Rectified-flow sampling of one image of modality ``target`` from ``noise`` [n, latent_dim]
        (t = 1) to t = 0."""
        f = self.flow

        def velocity_fn(x: Tensor, t: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
            need_text, need_img = cfg_active(t, f.cfg_text_scale, f.cfg_img_scale, tuple(f.cfg_interval))
            v_c = self.velocity(ctx.cond, x, t, target)
            v_t = self.velocity(ctx.text_uncond, x, t, target) if need_text and ctx.text_uncond is not None else None
            v_i = self.velocity(ctx.img_uncond, x, t, target) if need_img and ctx.img_uncond is not None else None
            return v_c, v_t, v_i

        return sample(
            velocity_fn, noise.to(self.model.device, torch.float32), steps=f.sample_steps if steps is None else steps,
            shift=f.sample_timestep_shift, text_scale=f.cfg_text_scale, img_scale=f.cfg_img_scale,
            interval=tuple(f.cfg_interval), renorm_type=f.cfg_renorm_type, renorm_min=f.cfg_renorm_min,
            progress=self.progress,
        )

    def noise(self, generator: torch.Generator) -> Tensor:
        """Gaussian noise [n_latent_tokens, latent_dim] (float32, CPU RNG: identical on every device)."""
        rows, cols = self.latent_grid
        return torch.randn(rows * cols, self.model.latent_dim, generator=generator)


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """Generated tail: the raw answer text and its parsed parts."""

    text: str
    impression: str
    diagnosis: str


@dataclass
class ChainResult:
    """Outcome of :func:`impute_chain` for one slice and one seed.

    Attributes:
        images: wanted modality -> generated slice [S, S] in [0, 1] (CPU float32).
        thinking: wanted modality -> the model's thinking text before generating it.
        answer: the generated impression/diagnosis (None when not asked).
        contexts: the final contexts (inputs, generated images and all text).
    """

    images: dict[str, Tensor]
    thinking: dict[str, str]
    answer: Answer | None
    contexts: GuidedContexts


def chain_seed_generator(seed: int) -> torch.Generator:
    """The noise RNG of one chain (targets draw from it in order)."""
    return torch.Generator().manual_seed(int(seed))


def generate_modality(
    engine: Engine,
    ctx: GuidedContexts,
    known: Sequence[str],
    target: str,
    generator: torch.Generator,
    thinking_tokens: int,
    brain: Tensor | None = None,
    steps: int | None = None,
) -> tuple[Tensor, str]:
    """One generation slot: instruction, thinking, sampled image, re-encoded image into the context.

    Returns (slice [S, S] in [0, 1] on CPU, thinking text). ``brain`` [S, S] zeroes the image
    outside the brain before it is re-encoded (the model learned backgrounds of 0).
    """
    instruction = engine.text_ids(templates.instruction_for(list(known), target))
    engine.add_ids(ctx.cond, instruction)
    engine.add_ids(ctx.img_uncond, instruction)
    bos = engine.tokenizer.bos_id
    thought: list[int] = []
    if thinking_tokens > 0:
        prompt = thinking_prompt(engine, known, target)
        thought = prompt[1:] + engine.generate(ctx.cond, prompt, thinking_tokens)
        closed = [bos, *thought] if thought and thought[-1] == engine.tokenizer.eos_id else [bos, *thought, engine.tokenizer.eos_id]
        engine.add_ids(ctx.img_uncond, closed)
    latents = engine.sample_latents(ctx, engine.noise(generator), steps, target)
    image = engine.decode([latents], engine.latent_grid)[0]
    if brain is not None:
        image = image * brain.to(image)
    enc = engine.encode(image[None], [target])[0]
    engine.add_images(ctx.cond, [enc])
    engine.add_images(ctx.text_uncond, [enc])
    text = engine.decode_text([i for i in thought if i != engine.tokenizer.eos_id])
    return image.float().cpu(), text


def thinking_prompt(engine: Engine, known: Sequence[str], target: str) -> list[int]:
    """The forced start of a thinking text before ``target``: ``[bos]``, followed with
    ``flow.thinking_plan = "forced"`` by the planning sentence of the ``known`` inputs and the
    target (:func:`templates.planning_sentence`, the data flow's first phrasing). The thinking
    text is this prompt (without bos) + what the model generates after it (at most the bound)."""
    prompt = [engine.tokenizer.bos_id]
    if engine.flow.thinking_plan == "forced":
        prompt += engine.tokenizer.encode(templates.planning_sentence(list(known), target))
    return prompt


def answer_prompt(engine: Engine) -> list[int]:
    """The forced start of every generated answer: ``[bos] "Impression:"``."""
    return [engine.tokenizer.bos_id, *engine.tokenizer.encode(ANSWER_PREFIX)]


def parse_first_answer(engine: Engine, new: Sequence[int]) -> tuple[Answer | None, str]:
    """(the answer, its impression) from the ids generated after :func:`answer_prompt`; the answer
    is None when it names no ``Final Diagnosis:`` (the caller then asks :func:`diagnosis_prompt`)."""
    text = ANSWER_PREFIX + engine.tokenizer.decode(list(new))
    parsed = templates.parse_answer(text)
    impression = parsed.impression or ""
    if parsed.diagnosis is None:
        return None, impression
    return Answer(templates.format_answer("both", impression, parsed.diagnosis), impression, parsed.diagnosis), impression


def diagnosis_prompt(engine: Engine, impression: str) -> list[int]:
    """The second try's forced prompt: ``[bos] "Impression: <imp>\nFinal Diagnosis:"``."""
    forced = templates.format_answer("both", impression, "").rstrip()
    return [engine.tokenizer.bos_id, *engine.tokenizer.encode(forced)]


def forced_answer(engine: Engine, impression: str, new: Sequence[int]) -> Answer:
    """The answer of the second try (``new``: the ids generated after :func:`diagnosis_prompt`)."""
    diagnosis = " ".join(engine.tokenizer.decode(list(new)).split())
    return Answer(templates.format_answer("both", impression, diagnosis), impression, diagnosis)


def diagnosis_tokens(max_tokens: int) -> int:
    """Bound of the second try's generated diagnosis."""
    return max(8, max_tokens // 4)


def generate_answer(engine: Engine, ctx: Context, question: str, max_tokens: int) -> Answer:
    """Ask ``question``, then generate ``Impression: ...`` and ``Final Diagnosis: ...``.

    The answer is generated after the forced prefix ``[bos] "Impression:"``. When the model
    does not produce ``Final Diagnosis:`` by itself, the answer is re-run from the question with
    the generated impression and ``"\nFinal Diagnosis:"`` forced, and the diagnosis generated.
    """
    engine.ask(ctx, question)
    before = ctx.fork()
    answer, impression = parse_first_answer(engine, engine.generate(ctx, answer_prompt(engine), max_tokens))
    if answer is not None:
        return answer
    ctx.cache, ctx.segments = before.cache, before.segments
    return forced_answer(engine, impression,
                         engine.generate(ctx, diagnosis_prompt(engine, impression), diagnosis_tokens(max_tokens)))


def impute_chain(
    engine: Engine,
    inputs: Mapping[str, Tensor],
    targets: Sequence[str],
    seed: int,
    thinking_tokens: int = 64,
    answer_tokens: int = 0,
    brain: Tensor | None = None,
    start: GuidedContexts | None = None,
    steps: int | None = None,
) -> ChainResult:
    """Impute ``targets`` (in order) for one slice and optionally answer the case.

    Args:
        engine: the engine.
        inputs: given modality -> slice [S, S] in [0, 1], in sequence order.
        targets: wanted modalities, in generation order.
        seed: noise seed of this chain.
        thinking_tokens: bound on each generated thinking text (0 = no thinking).
        answer_tokens: bound on the generated answer (0 = no question/answer tail).
        brain: optional [S, S] brain mask applied to generated slices.
        start: contexts already holding the inputs (``engine.start``), e.g. shared by an ensemble;
            they are forked, never modified.
        steps: Euler steps (default: the sampler config's).
    """
    if start is None:
        encoded = engine.encode(torch.stack([inputs[m].float() for m in inputs]), list(inputs))
        ctx = engine.start(encoded)
    else:
        ctx = start.fork()
    gen = chain_seed_generator(seed)
    known = list(inputs)
    images: dict[str, Tensor] = {}
    thinking: dict[str, str] = {}
    for target in targets:
        images[target], thinking[target] = generate_modality(engine, ctx, known, target, gen, thinking_tokens, brain, steps)
        known.append(target)
    answer = generate_answer(engine, ctx.cond, templates.both_question(), answer_tokens) if answer_tokens > 0 else None
    return ChainResult(images, thinking, answer, ctx)


def diagnosis_candidates(engine: Engine, classes: Sequence[str]) -> list[list[int]]:
    """Per class, the scored answer ids: ``"Final Diagnosis: <templates.diagnosis_phrase([c])>"`` + eos."""
    tok = engine.tokenizer
    return [[*tok.encode(templates.format_answer("diagnosis", diagnosis=templates.diagnosis_phrase([c]))), tok.eos_id]
            for c in classes]


def diagnosis_scores(engine: Engine, ctx: Context, classes: Sequence[str]) -> dict[str, float]:
    """Closed-set diagnosis: summed log-likelihood of each class's answer after the diagnosis question.

    The answers are :func:`diagnosis_candidates`, scored after ``ctx`` + the question + bos.
    ``ctx`` is not modified. Returns class -> log-likelihood.
    """
    q = ctx.fork()
    engine.ask(q, templates.diagnosis_question())
    bos = engine.tokenizer.bos_id
    return {c: float(engine.score(q, [bos], ids).sum())
            for c, ids in zip(classes, diagnosis_candidates(engine, classes), strict=True)}


def softmax_scores(scores: Mapping[str, float]) -> dict[str, float]:
    """Class -> probability from class -> log-likelihood."""
    names = list(scores)
    probs = torch.softmax(torch.tensor([scores[n] for n in names], dtype=torch.float64), dim=0)
    return {n: float(p) for n, p in zip(names, probs, strict=True)}
