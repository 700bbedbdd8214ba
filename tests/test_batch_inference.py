"""Batched inference (many slices / seeds at once) against the one-by-one path it must equal."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from unibrain_cli.data import templates
from unibrain_cli.inference.batched import (
    append_images,
    append_text,
    diagnosis_scores_batch,
    generate_answers,
    generate_batch,
    impute_chains,
    row_context,
)
from unibrain_cli.inference.bench import make_random_checkpoint
from unibrain_cli.inference.blocks import add_image
from unibrain_cli.inference.checkpoint import load_for_inference
from unibrain_cli.inference.engine import (
    Context,
    Engine,
    answer_prompt,
    diagnosis_scores,
    generate_answer,
    impute_chain,
    parse_first_answer,
    thinking_prompt,
)
from unibrain_cli.model.batch_cache import BatchKVCache

TOL = 2e-5


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    ckpt = make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")
    b = load_for_inference(ckpt)
    b.model.set_aligned_context("on")  # exercise the per-row aligned context too
    b.model.set_fused_view("on")  # and the fused view before every question
    with torch.no_grad():
        torch.nn.init.normal_(b.model.aligned_context.weight, std=0.05, generator=torch.Generator().manual_seed(1))
    return b


def engine(bundle, **flow) -> Engine:
    f = dataclasses.replace(bundle.recipe.flow, **flow) if flow else bundle.recipe.flow
    return Engine(bundle.model, bundle.vae, bundle.tokenizer, f, bundle.image_size, bundle.recipe.data.max_text_tokens)


def slices(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, size, size, generator=torch.Generator().manual_seed(seed))


def test_batched_forward_equals_one_row_forward_with_ragged_rows(bundle):
    """Rows with contexts of different lengths: text logits, velocities and the updated caches
    of one batched forward equal each row run on its own KVCache."""
    eng = engine(bundle)
    model = bundle.model
    imgs = eng.encode(slices(3, bundle.image_size), ["t1", "t2", "t1"])
    texts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    singles = [model.new_cache() for _ in range(3)]
    batch = BatchKVCache(model.num_layers, 3)
    for r, cache in enumerate(singles):
        b = eng.builder()
        for view in ("vae_clean", "vit"):
            add_image(b, view, imgs[r])
        b.add_text(texts[r])
        model.prefill(cache, b.build())
    append_images(eng, batch, [0, 1, 2], [[imgs[0]], [imgs[1]], [imgs[2]]])
    append_text(eng, batch, [0, 1, 2], texts)
    assert batch.lengths == [c.length for c in singles]
    assert batch.next_positions == [c.next_position for c in singles]
    # velocity queries of a subset of rows, in another order
    grid = eng.latent_grid
    x = torch.randn(2, grid[0] * grid[1], model.latent_dim, generator=torch.Generator().manual_seed(3))
    b = eng.builder()
    for lat in x:
        b.add_vae_image(grid, noisy=True, timestep=0.7, latents=lat, modality=1)
        b.next_sample()
    out = model.forward_batch(b.build(), batch, [2, 0], update=False, logits_at="none", velocity_at="noisy")
    for i, r in enumerate([2, 0]):
        b1 = eng.builder()
        b1.add_vae_image(grid, noisy=True, timestep=0.7, latents=x[i], modality=1)
        ref = model.predict_velocity(singles[r], b1.build())
        got = out.velocity.view(2, -1, model.latent_dim)[i]
        torch.testing.assert_close(got, ref, atol=TOL, rtol=1e-4)
    assert batch.lengths == [c.length for c in singles]  # a query leaves the cache unchanged
    # one more text token per row: logits and cached keys
    out = model.forward_batch(_text_pack(eng, [[3], [4], [5]]), batch, [0, 1, 2], update=True,
                              logits_at="last")
    for r in range(3):
        ref = model.forward_cached(_text_pack(eng, [[3 + r]]), singles[r], update=True, logits_at="last")
        torch.testing.assert_close(out.logits[r], ref.logits[-1], atol=TOL, rtol=1e-4)
        row = batch.row(r)
        assert row.length == singles[r].length and row.next_position == singles[r].next_position
        for (k, v), (k1, v1) in zip(row.layers, singles[r].layers, strict=True):
            torch.testing.assert_close(k, k1, atol=TOL, rtol=1e-4)
            torch.testing.assert_close(v, v1, atol=TOL, rtol=1e-4)
        assert [s for s, _, _ in row.images] == [s for s, _, _ in singles[r].images]


def _text_pack(eng, ids):
    b = eng.builder()
    for x in ids:
        b.add_text(x)
        b.next_sample()
    return b.build()


@pytest.mark.parametrize(("guided", "plan"), [(False, "generated"), (True, "generated"), (True, "forced")])
def test_batched_chains_equal_one_by_one(bundle, guided, plan):
    """Three slices x two seeds in one batch == each (slice, seed) chain alone: images, thinking,
    and the answer asked from a batch row (also with the forced planning sentence)."""
    flow = {"cfg_text_scale": 2.0, "cfg_img_scale": 1.5, "cfg_renorm_type": "global"} if guided else {}
    flow["thinking_plan"] = plan
    eng = engine(bundle, **flow)
    size = bundle.image_size
    t1, t2 = slices(3, size, 1), slices(3, size, 2)
    brain = (slices(3, size, 3) > 0.2).float()
    seeds = [7, 8]
    rows = [(i, s) for i in range(3) for s in seeds]
    inputs = {"t1": torch.stack([t1[i] for i, _ in rows]), "t2": torch.stack([t2[i] for i, _ in rows])}
    res = impute_chains(eng, inputs, ["flair", "t1ce"], [s for _, s in rows], thinking_tokens=6,
                        brain=torch.stack([brain[i] for i, _ in rows]), steps=3)
    for b, (i, s) in enumerate(rows):
        one = impute_chain(eng, {"t1": t1[i], "t2": t2[i]}, ["flair", "t1ce"], seed=s, thinking_tokens=6,
                           brain=brain[i], steps=3)
        for m in ("flair", "t1ce"):
            torch.testing.assert_close(res.images[m][b], one.images[m], atol=1e-4, rtol=1e-4)
        assert res.thinking[b] == one.thinking
    ans = generate_answer(eng, row_context(res.contexts.cond, 0), templates.both_question(), 8)
    one = impute_chain(eng, {"t1": t1[0], "t2": t2[0]}, ["flair", "t1ce"], seed=7, thinking_tokens=6,
                       answer_tokens=8, brain=brain[0], steps=3)
    assert ans == one.answer


class _EosAt:
    """The bundle's tokenizer with another eos id (so that greedy rows stop at different steps)."""

    def __init__(self, tok, eos_id: int) -> None:
        self._tok, self.eos_id = tok, eos_id

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_batched_greedy_text_rows_stop_at_their_own_eos(bundle):
    """Rows that reach eos at different steps (and rows cut by the bound) end with the same
    tokens and the same caches as one-row generation."""
    eng = engine(bundle)
    model = bundle.model
    prompts = [[5, 6], [7], [8, 9, 10, 11]]
    free = []
    for p in prompts:  # what each row generates without an early stop
        c = Context(model.new_cache())
        eng.add_ids(c, p)
        free.append(eng.generate(c, [eng.tokenizer.bos_id], 10))
    eos = free[1][3]  # row 1 stops at step 4; the others stop where this id occurs, or run to the bound
    eng.tokenizer = _EosAt(bundle.tokenizer, eos)
    singles, batch = [], BatchKVCache(model.num_layers, 3)
    append_text(eng, batch, [0, 1, 2], prompts)
    got = generate_batch(eng, batch, [0, 1, 2], [[eng.tokenizer.bos_id]] * 3, 10)
    for r, p in enumerate(prompts):
        c = Context(model.new_cache())
        eng.add_ids(c, p)
        want = eng.generate(c, [eng.tokenizer.bos_id], 10)
        singles.append(c.cache)
        assert got[r] == want
        assert batch.lengths[r] == c.cache.length and batch.next_positions[r] == c.cache.next_position
        for (k, _), (k1, _) in zip(batch.row(r).layers, c.cache.layers, strict=True):
            torch.testing.assert_close(k, k1, atol=TOL, rtol=1e-4)
    expected = [f.index(eos) + 1 if eos in f else 10 for f in free]
    assert [len(g) for g in got] == expected and expected[1] == 4
    assert 10 in expected  # some row is cut by the bound while another stopped early


def test_batched_closed_set_scores_and_answers_equal_one_by_one(bundle):
    """The closed-set class scores and the generated answers (first try, and the second try with
    the diagnosis forced for rows whose answer names none) of a batch equal each row alone."""
    eng = engine(bundle)
    model = bundle.model
    imgs = eng.encode(slices(3, bundle.image_size, 5), ["t1", "t2", "flair"])
    texts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    batch = BatchKVCache(model.num_layers, 3)
    append_images(eng, batch, [0, 1, 2], [[imgs[0]], [imgs[1]], [imgs[2]]])
    append_text(eng, batch, [0, 1, 2], texts)
    singles = [row_context(batch, r) for r in range(3)]
    probes = [c.fork() for c in singles]
    classes = ["glioma", "stroke", "wmh"]
    got = diagnosis_scores_batch(eng, batch, [2, 0, 1], classes)
    for i, r in enumerate([2, 0, 1]):
        want = diagnosis_scores(eng, singles[r], classes)
        assert got[i].keys() == want.keys()
        for c in classes:
            assert got[i][c] == pytest.approx(want[c], abs=1e-3)
    answers = generate_answers(eng, batch, [1, 2, 0], templates.both_question(), 12)
    for i, r in enumerate([1, 2, 0]):
        assert answers[i] == generate_answer(eng, singles[r], templates.both_question(), 12)
    # the random model names no diagnosis in 12 tokens: the rows took the second try
    for probe in probes:
        eng.add_text(probe, templates.both_question())
        first, _ = parse_first_answer(eng, eng.generate(probe, answer_prompt(eng), 12))
        assert first is None
    assert batch.lengths == [c.cache.length for c in singles]
    assert batch.next_positions == [c.cache.next_position for c in singles]


def test_batched_answers_mix_first_and_second_tries(bundle, monkeypatch):
    """Rows whose first answer counts as complete keep it while the others are rolled back for
    the second try: every row still equals its one-row answer and cache."""
    import unibrain_cli.inference.batched as batched_mod
    import unibrain_cli.inference.engine as engine_mod

    real = engine_mod.parse_first_answer

    def parse(eng, new):  # a first answer "names a diagnosis" when its fourth id is 2 mod 8
        answer, imp = real(eng, new)
        if len(new) > 3 and new[3] % 8 == 2:
            return engine_mod.Answer(f"first {list(new)}", imp, "x"), imp
        return answer, imp

    monkeypatch.setattr(engine_mod, "parse_first_answer", parse)
    monkeypatch.setattr(batched_mod, "parse_first_answer", parse)
    eng = engine(bundle)
    imgs = eng.encode(slices(4, bundle.image_size, 9), ["t1", "t2", "flair", "t1"])
    batch = BatchKVCache(bundle.model.num_layers, 4)
    append_images(eng, batch, [0, 1, 2, 3], [[i] for i in imgs])
    append_text(eng, batch, [0, 1, 2, 3], [[5, 6], [7], [8, 9, 10], [11, 12, 13, 14]])
    singles = [row_context(batch, r) for r in range(4)]
    answers = generate_answers(eng, batch, [0, 1, 2, 3], templates.both_question(), 10)
    for r in range(4):
        assert answers[r] == generate_answer(eng, singles[r], templates.both_question(), 10)
        assert batch.lengths[r] == singles[r].cache.length
    firsts = [a.text.startswith("first") for a in answers]
    assert any(firsts) and not all(firsts)


def test_forced_plan_opens_every_thinking_and_reaches_the_image(bundle):
    """flow.thinking_plan = "forced": each thinking text starts with the data flow's planning sentence for the
    known inputs and that target, followed by at most the bound of generated tokens; the image is sampled
    after it (so it differs from the generated plan's); "generated" prompts with bos alone."""
    size = bundle.image_size
    t1 = slices(1, size, 4)[0]
    gen, forced = engine(bundle), engine(bundle, thinking_plan="forced")
    assert thinking_prompt(gen, ["t1"], "t2") == [bundle.tokenizer.bos_id]
    a = impute_chain(gen, {"t1": t1}, ["t2", "flair"], seed=3, thinking_tokens=5, steps=2)
    b = impute_chain(forced, {"t1": t1}, ["t2", "flair"], seed=3, thinking_tokens=5, steps=2)
    for known, target in ((["t1"], "t2"), (["t1", "t2"], "flair")):
        plan = templates.planning_sentence(known, target)
        prompt = thinking_prompt(forced, known, target)
        assert prompt[0] == bundle.tokenizer.bos_id and bundle.tokenizer.decode(prompt[1:]) == plan
        assert b.thinking[target].startswith(plan) and not a.thinking[target].startswith(plan)
        rest = b.thinking[target][len(plan):]
        assert len(bundle.tokenizer.encode(rest)) <= 5 + 1  # the bound, +1 for a token split at the seam
    assert not torch.allclose(a.images["t2"], b.images["t2"])
