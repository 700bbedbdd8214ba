"""The interleaved imputation protocol for many slices (and ensemble seeds) at once.

:func:`impute_chains` runs exactly what :func:`unibrain_cli.inference.engine.impute_chain` runs
for one slice and one seed — inputs, then per target: instruction, greedy thinking, the image
sampled by rectified flow (with the guidance contexts that are on), the image re-encoded into
the context — for B rows together, over batched KV caches
(:class:`unibrain_cli.model.batch_cache.BatchKVCache`): one decoder forward per generated token
(rows that finished their text drop out) and one per Euler step for the whole batch; the VAE and
the ViT see the B images in one call. Row b draws its noise from ``chain_seed_generator(seeds[b])``
like the one-row chain, so a row's outputs equal the one-by-one outputs up to float rounding
(tests/test_batch_inference.py).

The optional answer (impression and diagnosis) is asked for single rows afterwards: a row of the
batch becomes an ordinary :class:`~unibrain_cli.model.kv_cache.KVCache` (:func:`row_context`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from unibrain_cli.data import templates
from unibrain_cli.flow.sampler import cfg_active, sample
from unibrain_cli.inference.blocks import EncodedImage, ImageView, add_image, modality_slot
from unibrain_cli.inference.engine import (
    INPUT_VIEWS,
    Answer,
    Context,
    Engine,
    answer_prompt,
    chain_seed_generator,
    diagnosis_candidates,
    diagnosis_prompt,
    diagnosis_tokens,
    forced_answer,
    parse_first_answer,
    thinking_prompt,
)
from unibrain_cli.model.batch_cache import BatchKVCache, BatchStep
from unibrain_cli.model.fused import needs_fused
from unibrain_cli.model.packing import PackedSequence


@dataclass
class BatchContexts:
    """The conditional rows plus the guidance contexts that are switched on (else None)."""

    cond: BatchKVCache
    text_uncond: BatchKVCache | None = None
    img_uncond: BatchKVCache | None = None


@dataclass
class BatchChainResult:
    """Outcome of :func:`impute_chains`.

    Attributes:
        images: wanted modality -> generated slices [B, S, S] in [0, 1] (CPU float32).
        thinking: per row, wanted modality -> its thinking text.
        contexts: the final batched contexts.
    """

    images: dict[str, Tensor]
    thinking: list[dict[str, str]]
    contexts: BatchContexts


# ---------------------------------------------------------------------------------------------
# blocks of B rows
# ---------------------------------------------------------------------------------------------


def _build(engine: Engine, per_row: Sequence[Sequence[object]]) -> PackedSequence:
    """A multi-sample pack: sample i = the items of row i (text id lists or (image, views) pairs)."""
    b = engine.builder()
    for items in per_row:
        for item in items:
            if isinstance(item, tuple):
                image, views = item
                for view in views:
                    add_image(b, view, image)
            else:
                b.add_text([int(i) for i in item])  # type: ignore[union-attr]
        b.next_sample()
    return b.build(engine.model.device)


def append_text(engine: Engine, cache: BatchKVCache | None, rows: Sequence[int], ids: Sequence[Sequence[int]]) -> None:
    """Append text ``ids[i]`` to row ``rows[i]`` (no-op for ``cache=None``)."""
    if cache is None or not rows:
        return
    engine.model.forward_batch(_build(engine, [[list(x)] for x in ids]), cache, rows, update=True, logits_at="none")


def append_images(engine: Engine, cache: BatchKVCache | None, rows: Sequence[int],
                  images: Sequence[Sequence[EncodedImage]], views: Sequence[ImageView] = INPUT_VIEWS) -> None:
    """Append images ``images[i]`` (each with ``views``) to row ``rows[i]``."""
    if cache is None or not rows:
        return
    per_row = [[(img, tuple(views)) for img in imgs] for imgs in images]
    engine.model.forward_batch(_build(engine, per_row), cache, rows, update=True, logits_at="none")


def append_fused(engine: Engine, cache: BatchKVCache | None, rows: Sequence[int]) -> None:
    """:meth:`Engine.add_fused_view` for every row of ``rows`` that needs one (``model.fused_view``)."""
    if cache is None or engine.model.fused_view is None:
        return
    need = [int(r) for r in rows if needs_fused(cache.views[int(r)])]
    if need:
        append_images(engine, cache, need, [[engine.fused_image(cache.views[r])] for r in need], ("vit",))


@torch.no_grad()
def generate_batch(engine: Engine, cache: BatchKVCache, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                   max_new_tokens: int) -> list[list[int]]:
    """Greedy decoding for every row after its own prompt (``prompts[i]`` for ``rows[i]``), as
    :meth:`Engine.generate` does per row.

    The prompt and each row's generated tokens are appended to its cache; a row cut by the bound
    is closed with an eos. Returns per row the generated ids (eos included when generated).
    """
    model, eos = engine.model, engine.tokenizer.eos_id
    rows = [int(r) for r in rows]
    if len(prompts) != len(rows):
        raise ValueError(f"{len(prompts)} prompts for {len(rows)} rows")
    if not rows:
        return []
    new: dict[int, list[int]] = {r: [] for r in rows}
    out = model.forward_batch(_build(engine, [[list(p)] for p in prompts]), cache, rows, update=True,
                              logits_at="last")
    active, logits = rows, out.logits
    for step in range(max_new_tokens):
        assert logits is not None
        tokens = [int(t) for t in logits.float().argmax(dim=-1).tolist()]
        going = []
        for r, tok in zip(active, tokens, strict=True):
            new[r].append(tok)
            if not (step == max_new_tokens - 1 or tok == eos):
                going.append(r)
        out = model.forward_batch(_build(engine, [[[t]] for t in tokens]), cache, active, update=True,
                                  logits_at="last" if going else "none")
        if not going:
            break
        assert out.logits is not None
        keep = [i for i, r in enumerate(active) if r in set(going)]
        active, logits = going, out.logits[keep]
    cut = [r for r in rows if not new[r] or new[r][-1] != eos]
    append_text(engine, cache, cut, [[eos]] * len(cut))
    return [new[r] for r in rows]


@torch.no_grad()
def sample_batch(engine: Engine, ctx: BatchContexts, noise: Tensor, steps: int | None = None,
                 target: str | None = None) -> Tensor:
    """Rectified-flow sampling of one image per row from ``noise`` [B, n, D] (t = 1) to t = 0."""
    f, model = engine.flow, engine.model
    rows = list(range(noise.shape[0]))
    grid, slot = engine.latent_grid, modality_slot(target)
    b = engine.builder()
    for lat in noise:  # the noisy block's layout, built once: each step swaps its latents and time
        b.add_vae_image(grid, noisy=True, timestep=1.0, latents=lat, modality=slot)
        b.next_sample()
    layout = b.build(model.device)
    plans: dict[int, BatchStep] = {}  # per context: its cache does not change while sampling

    def velocity(cache: BatchKVCache, x: Tensor, t: float) -> Tensor:
        block = layout.with_vae_latents(x.reshape(-1, x.shape[-1]).to(layout.vae_latents)) \
            .with_vae_timesteps(torch.full_like(layout.vae_timesteps, float(t)))
        if id(cache) not in plans:
            plans[id(cache)] = BatchStep.plan(cache, rows, block)
        step = plans[id(cache)]
        out = model.forward_batch(block, cache, rows, update=False, logits_at="none", velocity_at="noisy",
                                  step=step)
        assert out.velocity is not None
        return out.velocity.float().view(x.shape)

    def velocity_fn(x: Tensor, t: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
        need_text, need_img = cfg_active(t, f.cfg_text_scale, f.cfg_img_scale, tuple(f.cfg_interval))
        v_c = velocity(ctx.cond, x, t)
        v_t = velocity(ctx.text_uncond, x, t) if need_text and ctx.text_uncond is not None else None
        v_i = velocity(ctx.img_uncond, x, t) if need_img and ctx.img_uncond is not None else None
        return v_c, v_t, v_i

    return sample(
        velocity_fn, noise.to(model.device, torch.float32), steps=f.sample_steps if steps is None else steps,
        shift=f.sample_timestep_shift, text_scale=f.cfg_text_scale, img_scale=f.cfg_img_scale,
        interval=tuple(f.cfg_interval), renorm_type=f.cfg_renorm_type, renorm_min=f.cfg_renorm_min,
    )


# ---------------------------------------------------------------------------------------------
# the protocol
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def impute_chains(
    engine: Engine,
    inputs: Mapping[str, Tensor],
    targets: Sequence[str],
    seeds: Sequence[int],
    thinking_tokens: int = 64,
    brain: Tensor | None = None,
    steps: int | None = None,
) -> BatchChainResult:
    """Impute ``targets`` (in order) for B rows at once (see the module docstring).

    Args:
        engine: a cached engine.
        inputs: given modality -> slices [B, S, S] in [0, 1], in sequence order (row b = one slice).
        targets: wanted modalities, in generation order.
        seeds: noise seed of each row (B of them).
        thinking_tokens: bound on each generated thinking text (0 = no thinking).
        brain: optional [B, S, S] brain masks applied to the generated slices.
        steps: Euler steps (default: the sampler config's).
    """
    if not engine.cached:
        raise ValueError("batched imputation needs a cached engine")
    mods = list(inputs)
    batch = len(seeds)
    if any(v.shape[0] != batch for v in inputs.values()):
        raise ValueError(f"every input needs {batch} slices (one per seed)")
    model, tok = engine.model, engine.tokenizer
    rows = list(range(batch))
    stacked = torch.stack([inputs[m].float() for m in mods], dim=1).flatten(0, 1)  # [B*M, S, S], row-major
    encoded = engine.encode(stacked, mods * batch)
    per_row = [encoded[b * len(mods):(b + 1) * len(mods)] for b in rows]
    need_text, need_img = engine.guidance()
    ctx = BatchContexts(model.new_batch_cache(batch), model.new_batch_cache(batch) if need_text else None,
                        model.new_batch_cache(batch) if need_img else None)
    append_images(engine, ctx.cond, rows, per_row)
    append_images(engine, ctx.text_uncond, rows, per_row)
    gens = [chain_seed_generator(s) for s in seeds]
    known = list(mods)
    images: dict[str, Tensor] = {}
    thinking: list[dict[str, str]] = [{} for _ in rows]
    for target in targets:
        instruction = engine.text_ids(templates.instruction_for(list(known), target))
        append_text(engine, ctx.cond, rows, [instruction] * batch)
        append_text(engine, ctx.img_uncond, rows, [instruction] * batch)
        thoughts: list[list[int]] = [[] for _ in rows]
        if thinking_tokens > 0:
            prompt = thinking_prompt(engine, known, target)
            thoughts = [prompt[1:] + t for t in generate_batch(engine, ctx.cond, rows, [prompt] * batch, thinking_tokens)]
            closed = [[tok.bos_id, *t] if t and t[-1] == tok.eos_id else [tok.bos_id, *t, tok.eos_id] for t in thoughts]
            append_text(engine, ctx.img_uncond, rows, closed)
        noise = torch.stack([engine.noise(g) for g in gens])
        latents = sample_batch(engine, ctx, noise, steps, target)
        image = engine.decode(list(latents), engine.latent_grid)
        if brain is not None:
            image = image * brain.to(image)
        enc = engine.encode(image, [target] * batch)
        append_images(engine, ctx.cond, rows, [[e] for e in enc])
        append_images(engine, ctx.text_uncond, rows, [[e] for e in enc])
        images[target] = image.float().cpu()
        for b in rows:
            thinking[b][target] = engine.decode_text([i for i in thoughts[b] if i != tok.eos_id])
        known.append(target)
    return BatchChainResult(images, thinking, ctx)


@torch.no_grad()
def score_batch(engine: Engine, cache: BatchKVCache, rows: Sequence[int], prompt_ids: Sequence[int],
                candidates: Sequence[Sequence[int]]) -> Tensor:
    """Summed log-probabilities [len(rows), len(candidates)] of each candidate after each row's context
    + ``prompt_ids``, as :meth:`Engine.score` gives per row (the cache is not modified): one
    forward per candidate for all rows."""
    rows = [int(r) for r in rows]
    out = torch.zeros(len(rows), len(candidates))
    if not rows:
        return out
    for j, cand in enumerate(candidates):
        b = engine.builder()
        for _ in rows:
            b.add_text(list(prompt_ids))
            b.add_text(list(cand), loss=True)
            b.next_sample()
        block = b.build(engine.model.device)
        res = engine.model.forward_batch(block, cache, rows, update=False, logits_at="loss")
        assert res.logits is not None
        logp = torch.log_softmax(res.logits.float(), dim=-1).gather(1, block.ce_labels[:, None]).squeeze(1)
        out[:, j] = logp.view(len(rows), len(cand)).sum(dim=1).cpu()
    return out


def diagnosis_scores_batch(engine: Engine, cache: BatchKVCache, rows: Sequence[int],
                           classes: Sequence[str]) -> list[dict[str, float]]:
    """:func:`~unibrain_cli.inference.engine.diagnosis_scores` of every row (the cache gains only the
    fused view that the question follows, ``model.fused_view``)."""
    append_fused(engine, cache, rows)
    prompt = [*engine.text_ids(templates.diagnosis_question()), engine.tokenizer.bos_id]
    scores = score_batch(engine, cache, rows, prompt, diagnosis_candidates(engine, classes))
    return [{c: float(v) for c, v in zip(classes, row.tolist(), strict=True)} for row in scores]


@torch.no_grad()
def generate_answers(engine: Engine, cache: BatchKVCache, rows: Sequence[int], question: str,
                     max_tokens: int) -> list[Answer]:
    """:func:`~unibrain_cli.inference.engine.generate_answer` for every row (the rows are consumed):
    the question, the answer after ``[bos] "Impression:"``, and for the rows whose answer names no
    diagnosis the second try from the question with the impression and ``Final Diagnosis:`` forced."""
    rows = [int(r) for r in rows]
    append_fused(engine, cache, rows)
    append_text(engine, cache, rows, [engine.text_ids(question)] * len(rows))
    before = {r: (cache.lengths[r], cache.next_positions[r]) for r in rows}  # rows only grow: a length is a snapshot
    first = generate_batch(engine, cache, rows, [answer_prompt(engine)] * len(rows), max_tokens)
    answers: dict[int, Answer] = {}
    redo: dict[int, str] = {}
    for r, ids in zip(rows, first, strict=True):
        answer, impression = parse_first_answer(engine, ids)
        if answer is not None:
            answers[r] = answer
        else:
            redo[r] = impression
            cache.lengths[r], cache.next_positions[r] = before[r]
    if redo:
        again = generate_batch(engine, cache, list(redo), [diagnosis_prompt(engine, imp) for imp in redo.values()],
                               diagnosis_tokens(max_tokens))
        for (r, imp), ids in zip(redo.items(), again, strict=True):
            answers[r] = forced_answer(engine, imp, ids)
    return [answers[r] for r in rows]


def row_context(cache: BatchKVCache, row: int) -> Context:
    """Row ``row`` of a batched cache as an engine :class:`Context` (e.g. to ask for the answer)."""
    return Context(cache.row(row))
