"""``model.fused_view``: one ViT image stacking the context's modality views before the question."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from slices_helpers import write_slices

from unibrain_cli.config import load_recipe
from unibrain_cli.data import templates
from unibrain_cli.inference.batched import append_images, diagnosis_scores_batch
from unibrain_cli.inference.bench import make_random_checkpoint
from unibrain_cli.inference.checkpoint import load_for_inference
from unibrain_cli.inference.engine import Engine, diagnosis_scores
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.fused import FUSED_SLOT, fuse_patches, fused_width, needs_fused
from unibrain_cli.model.packing import TokenType
from unibrain_cli.training.materialize import ImageItem, TextItem, fill_pack
from unibrain_cli.training.run import train
from unibrain_cli.training.stages import StageContext, stage_generator
from unibrain_cli.training.stages.dhs import DHSStage
from unibrain_cli.training.stages.und import UndStage
from unibrain_cli.training.stages.unified import UnifiedStage

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CLASSES = ("glioma", "stroke", "wmh")


def test_fused_rows_stack_each_slots_first_channel_with_presence_bits():
    p, c, tv = 2, 3, 5
    a = torch.randn(tv, p * p * c)
    b = torch.randn(tv, p * p * c)
    newer = torch.randn(tv, p * p * c)
    rows = fuse_patches([(0, a), (2, b), (FUSED_SLOT, torch.randn(tv, 99)), (2, newer)], c)
    assert rows.shape == (tv, fused_width(p)) == (tv, 6 * 4 + 6)
    assert torch.equal(rows[:, 0:4], a[:, ::c])  # (kh, kw, c) layout: channel 0 is every c-th feature
    assert torch.equal(rows[:, 8:12], newer[:, ::c])  # the latest view of a slot wins
    assert not rows[:, 4:8].any() and not rows[:, 12:24].any()
    assert rows[:, 24:].tolist() == [[1.0, 0.0, 1.0, 0.0, 0.0, 0.0]] * tv
    with pytest.raises(ValueError, match="at least one"):
        fuse_patches([(FUSED_SLOT, a)], c)
    assert needs_fused([(0, a)]) and not needs_fused([(0, a), (FUSED_SLOT, rows)]) and not needs_fused([])


def test_off_builds_nothing_and_on_draws_nothing_from_the_global_rng():
    cfg = load_recipe("tiny").model
    torch.manual_seed(0)
    off = UniBrainModel(cfg)
    torch.manual_seed(0)
    on = UniBrainModel(load_recipe("tiny", ["model.fused_view=on"]).model)
    a, b = off.state_dict(), on.state_dict()
    assert off.fused_view is None and not any(k.startswith("fused_view") for k in a)
    assert set(b) - set(a) == {"fused_view.proj.weight", "fused_view.proj.bias", "fused_view.presence"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    off.set_fused_view("on")  # added to a loaded model: the same weights as built with it
    assert all(torch.equal(v, b[k]) for k, v in off.state_dict().items())
    with pytest.raises(ValueError, match="'off' or 'on'"):
        off.set_fused_view("yes")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    b = load_for_inference(make_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model"))
    b.model.set_fused_view("on")
    return b


def _engine(bundle, cached: bool = True) -> Engine:
    return Engine(bundle.model, bundle.vae, bundle.tokenizer, bundle.recipe.flow, bundle.image_size,
                  bundle.recipe.data.max_text_tokens, cached=cached)


def _images(bundle, seed: int = 0) -> torch.Tensor:
    s = bundle.image_size
    return torch.rand(2, s, s, generator=torch.Generator().manual_seed(seed))


def test_the_question_follows_one_fused_view_of_the_contexts_vit_views(bundle):
    eng = _engine(bundle)
    imgs = eng.encode(_images(bundle), ["t1", "flair"])
    ctx = eng.new_context()
    eng.add_images(ctx, imgs, ("vae_clean", "vit"))
    eng.ask(ctx, templates.diagnosis_question())
    eng.ask(ctx, templates.diagnosis_question())  # nothing new to fuse: no second fused view
    fused = [s.image for s in ctx.segments if s.image is not None and s.image.modality == FUSED_SLOT]
    assert len(fused) == 1 and ctx.segments[-3].image is fused[0]
    assert ctx.segments[-2].ids is not None and ctx.segments[-1].ids is not None
    expected = fuse_patches([(0, imgs[0].vit_patches), (2, imgs[1].vit_patches)], bundle.model.config.vit.num_channels)
    assert torch.equal(fused[0].vit_patches, expected)
    assert [slot for slot, _ in ctx.cache.views] == [0, 2, FUSED_SLOT]
    # cached (views from the cache), uncached (views from the segments) and batched answers agree
    scores = []
    for cached in (True, False):
        e = _engine(bundle, cached)
        c = e.new_context()
        e.add_images(c, e.encode(_images(bundle), ["t1", "flair"]), ("vit",))
        scores.append(diagnosis_scores(e, c, CLASSES))
    cache = bundle.model.new_batch_cache(2)
    other = eng.encode(_images(bundle, 1), ["t1", "flair"])
    append_images(eng, cache, [0, 1], [eng.encode(_images(bundle), ["t1", "flair"]), other], ("vit",))
    batched = diagnosis_scores_batch(eng, cache, [0, 1], CLASSES)
    for c in CLASSES:
        assert scores[0][c] == pytest.approx(scores[1][c], abs=1e-4)
        assert batched[0][c] == pytest.approx(scores[0][c], abs=1e-4)
    assert batched[0] != batched[1]


def test_the_answer_reads_the_fused_view(bundle):
    """Zeroing the fused embedding's weights changes the diagnosis scores; with the model's fused view
    removed they equal BAGEL's protocol (no fused view at all)."""
    eng = _engine(bundle)
    ctx = eng.new_context()
    eng.add_images(ctx, eng.encode(_images(bundle), ["t1", "flair"]), ("vit",))
    with_view = diagnosis_scores(eng, ctx, CLASSES)
    module = bundle.model.fused_view
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    try:
        with torch.no_grad():
            module.proj.weight.zero_()
        assert diagnosis_scores(eng, ctx, CLASSES) != with_view
        bundle.model.fused_view = None
        plain = diagnosis_scores(eng, ctx, CLASSES)
        assert [s.image.modality for s in ctx.segments] == [0, 2]  # nothing was added to the context
        assert plain != with_view
    finally:
        bundle.model.fused_view = module
        module.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------
# training


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slices(tmp_path_factory.mktemp("fused_slices") / "SLICES")


def _recipe(*stages: str, extra: tuple[str, ...] = ()):
    items = ", ".join(stages)
    return load_recipe("tiny", [f"train.stages=[{items}]", "train.log_every=1", "train.checkpoint_every=2",
                                "model.fused_view=on", *extra])


VAE = '{name="vae", steps=1, batch_size=4}'


@pytest.fixture(scope="module")
def run(slices: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vae(1) -> unified(1) -> und(2) with the fused view on."""
    out = tmp_path_factory.mktemp("fused_run") / "RUN"
    recipe = _recipe(VAE, '{name="unified", steps=1}', '{name="und", steps=2, lr=1e-2}')
    summary = train(recipe, slices, out)
    assert all(summary.stages[n]["status"] == "trained" for n in ("vae", "unified", "und"))
    return out


def _ctx(recipe, index: int, slices: Path, run: Path) -> StageContext:
    names = [s.name for s in recipe.train.stages]
    return StageContext(recipe, recipe.train.stages[index], index, slices, run,
                        {n: run / n / "final" for n in names[:index]})


def test_packs_put_the_fused_view_right_before_the_first_question(run: Path, slices: Path):
    recipe = _recipe(VAE, '{name="unified", steps=1}')
    stage = UnifiedStage(_ctx(recipe, 1, slices, run))
    checked = 0
    for pos in range(3):
        batch = stage.next_batch(pos, stage_generator(pos, 1, 0))["batch"]
        for items in batch.samples:
            questions = [i for i, it in enumerate(items) if isinstance(it, TextItem) and it.role == "question"]
            fused = [i for i, it in enumerate(items) if isinstance(it, ImageItem) and it.parts]
            vit = [it for it in items[:questions[0]] if isinstance(it, ImageItem) and it.kind == "vit"
                   and not it.parts] if questions else []
            if not vit:
                assert not fused
                continue
            assert fused == [questions[0] - 1]
            parts = items[fused[0]].parts
            latest = {it.modality: (it.image, it.slot) for it in vit}
            assert sorted(parts) == sorted((m, pix, gen) for m, (pix, gen) in latest.items())
            checked += 1
        # the pack's fused rows are the stacked views, the rest its images' ViT inputs
        module = stage.build_model()
        lat, vit_in = module.encode_images(batch.pixels)
        packed = fill_pack(batch, lat, vit_in).packed
        spans = [s for s in packed.images if s.kind == "vit"]
        for i, parts in batch.fused:
            s = spans[i]
            assert s.modality == FUSED_SLOT
            got = packed.vit_patches[s.token_start:s.token_start + s.num_tokens]
            assert torch.equal(got, fuse_patches([(m, vit_in[pix]) for m, pix, _ in parts], 3))
        assert int((packed.token_types == TokenType.VIT).sum()) == packed.vit_patches.shape[0]
    assert checked >= 2


def test_und_trains_the_fused_view_and_dhs_shows_it_the_generated_images(run: Path, slices: Path):
    first = load_file(str(run / "unified" / "final" / "model.safetensors"))
    after = load_file(str(run / "und" / "final" / "model.safetensors"))
    for k in ("fused_view.proj.weight", "fused_view.presence"):
        assert not torch.equal(first[k], after[k]), k
    recipe = _recipe(VAE, '{name="unified", steps=1}', '{name="und", steps=1}',
                     '{name="dhs", steps=1, dhs_rollout_steps=1}')
    stage = DHSStage(_ctx(recipe, 3, slices, run))
    module = stage.build_model()
    for pos in range(60):
        batch = stage.next_batch(pos, stage_generator(pos, 3, 0))["batch"]
        gen = [(i, parts) for i, parts in batch.fused if any(g >= 0 for _, _, g in parts)]
        if gen:
            break
    else:
        raise AssertionError("no DHS batch whose fused view shows a generated target")
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        r = module.rollout(batch, lat, vit)
        packed = fill_pack(batch, lat, vit, r.gen_lat, r.gen_vit, r.states, ~batch.slot_sa).packed
    spans = [s for s in packed.images if s.kind == "vit"]
    i, parts = gen[0]
    got = packed.vit_patches[spans[i].token_start:spans[i].token_start + spans[i].num_tokens]
    want = fuse_patches([(m, r.gen_vit[g] if g >= 0 else vit[pix]) for m, pix, g in parts], 3)
    assert torch.equal(got, want)
    assert not torch.equal(got, fuse_patches([(m, vit[pix]) for m, pix, _ in parts], 3))


def test_und_stage_counts_the_fused_view_in_its_token_budget(run: Path, slices: Path):
    recipe = _recipe(VAE, '{name="unified", steps=1}', '{name="und", steps=1}')
    stage = UndStage(_ctx(recipe, 2, slices, run))
    geom = stage.geometry()
    chosen = stage.draw_pack(np.random.default_rng(0))
    samples, _, _ = stage.materialize(chosen)
    assert all(sum(isinstance(it, ImageItem) and bool(it.parts) for it in items) == 1 for items in samples)
    for (_, plan), items in zip(chosen, samples, strict=True):
        tokens = sum(len(it.ids) if isinstance(it, TextItem) else geom.vit_block_tokens for it in items)
        assert stage.token_count(plan) == tokens
