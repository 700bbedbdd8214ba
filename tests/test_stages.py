"""The sa / unified / dhs training stages: materialised packs, trainability, DHS rollout, exports, resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from slices_helpers import write_slices

from unibrain_cli.config import load_recipe
from unibrain_cli.config.components import Recipe
from unibrain_cli.data.dataflow import SamplePlan, TextSegment, self_alignment_plan, understanding_plan
from unibrain_cli.data.tokenizer import TextTokenizer
from unibrain_cli.errors import UserError
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.checkpoint import from_pretrained
from unibrain_cli.model.embeddings import patch_tokens
from unibrain_cli.model.packing import TokenType
from unibrain_cli.training.materialize import (
    ImageItem,
    TextIds,
    TextItem,
    batched_patches,
    fill_pack,
    plan_items,
    similarity_transform,
    unpatch,
)
from unibrain_cli.training.model_init import bpe_tokenizer
from unibrain_cli.training.run import recipe_fingerprint, train
from unibrain_cli.training.stages import StageContext, stage_generator
from unibrain_cli.training.stages.dhs import DHSStage
from unibrain_cli.training.stages.sa import SAStage
from unibrain_cli.training.stages.und import UndStage
from unibrain_cli.training.stages.unified import UnifiedStage

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def recipe_with(*stages: dict, extra: tuple[str, ...] = ()) -> Recipe:
    items = ", ".join("{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in s.items()) + "}" for s in stages)
    return load_recipe("tiny", [f"train.stages=[{items}]", "train.log_every=1", "train.checkpoint_every=2", *extra])


VAE = {"name": "vae", "steps": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def slices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_slices(tmp_path_factory.mktemp("stage_slices") / "SLICES")


@pytest.fixture(scope="module")
def pipeline(slices: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """RUN of vae(1) -> sa(2) -> unified(2) -> dhs(2, 2 rollout steps) on the tiny recipe."""
    run = tmp_path_factory.mktemp("pipeline") / "RUN"
    recipe = recipe_with(VAE, {"name": "sa", "steps": 2, "lr": 1e-3}, {"name": "unified", "steps": 2, "lr": 1e-3},
                         {"name": "dhs", "steps": 2, "lr": 1e-3, "dhs_rollout_steps": 2})
    summary = train(recipe, slices, run)
    assert [summary.stages[n]["status"] for n in ("vae", "sa", "unified", "dhs")] == ["trained"] * 4
    return run


def copy_vae_run(pipeline: Path, dest: Path, recipe: Recipe | None = None) -> Path:
    """A run folder holding only the pipeline's finished vae stage (same model/data recipe, or
    ``recipe``'s when given: a model change the vae stage does not see)."""
    dest.mkdir(parents=True)
    shutil.copytree(pipeline / "vae", dest / "vae")
    info = json.loads((pipeline / "run.json").read_text())
    info["stages_done"], info["stages"] = ["vae"], {"vae": info["stages"]["vae"]}
    if recipe is not None:
        info["recipe_hash"], info["recipe"] = recipe_fingerprint(recipe)
    (dest / "run.json").write_text(json.dumps(info))
    return dest


def ctx_for(recipe: Recipe, index: int, slices: Path, run: Path) -> StageContext:
    names = [s.name for s in recipe.train.stages]
    inputs = {n: run / n / "final" for n in names[:index]}
    return StageContext(recipe, recipe.train.stages[index], index, slices, run, inputs)


# ---------------------------------------------------------------------------------------------
# pure helpers


def test_patches_round_trip_and_match_the_model_helpers() -> None:
    x = torch.randn(3, 4, 8, 8)
    tok = batched_patches(x, 2)
    assert tok.shape == (3, 16, 16)
    assert torch.equal(tok[1], patch_tokens(x[1], 2))
    assert torch.equal(unpatch(tok, 4, 8, 8, 2), x)


class _Tok:
    bos_id, eos_id = 1, 2

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) % 50 for c in text]


def test_text_ids_wrap_and_truncate_like_inference() -> None:
    from unibrain_cli.inference.blocks import wrap_text

    ids = TextIds(_Tok(), max_tokens=5)
    assert ids("ab") == (1, 10 + ord("a") % 50, 10 + ord("b") % 50, 2)
    assert len(ids("abcdefgh")) == 7 and ids("abcdefgh")[-1] == 2
    assert list(ids("abcdefgh")) == wrap_text(_Tok(), "abcdefgh", 5)
    with pytest.raises(ValueError, match="max_text_tokens"):
        TextIds(_Tok(), max_tokens=0)


def test_vit_and_vae_views_match_the_inference_helpers() -> None:
    from unibrain_cli.inference.blocks import image_to_vae_tokens, image_to_vit_patches
    from unibrain_cli.model.vae import AutoEncoder
    from unibrain_cli.training.materialize import latent_tokens, vit_tokens

    cfg = load_recipe("tiny").model
    vae = AutoEncoder(cfg.vae).eval()
    pixels = torch.rand(3, 32, 32)
    vit = vit_tokens(pixels, cfg.vit.patch_size, cfg.vit.num_channels, 32)
    lat = latent_tokens(vae, pixels, cfg)
    for i in range(3):
        assert torch.equal(vit[i], image_to_vit_patches(pixels[i], cfg)[0])
        assert torch.allclose(lat[i], image_to_vae_tokens(vae, pixels[i], cfg)[0], atol=1e-5)


def test_plan_items_assign_slots_and_generated_views() -> None:
    from unibrain_cli.data.dataflow import ImageSegment, TextSegment

    plan = SamplePlan(segments=(
        ImageSegment("t1", "vae_clean", False), ImageSegment("t1", "vit", False),
        TextSegment("go", False, "instruction"), TextSegment("think", True, "thinking"),
        ImageSegment("t2", "vae_noisy", True), ImageSegment("t2", "vae_clean", False), ImageSegment("t2", "vit", False),
        TextSegment("q", False, "question"), TextSegment("a", True, "answer"),
    ), task="impression", start_modalities=("t1",), targets=("t2",), understanding_only=False, thinking=True)
    where = {"t1": 7, "t2": 8}
    items, nxt = plan_items(plan, where.__getitem__, TextIds(_Tok(), 10), first_slot=3)
    assert nxt == 4
    imgs = [it for it in items if isinstance(it, ImageItem)]
    assert [(i.kind, i.noisy, i.image, i.slot) for i in imgs] == [
        ("vae", False, 7, -1), ("vit", False, 7, -1), ("vae", True, 8, 3), ("vae", False, 8, 3), ("vit", False, 8, 3)]
    assert [(i.role, i.loss) for i in items if isinstance(i, TextItem)] == [
        ("instruction", False), ("thinking", True), ("question", False), ("answer", True)]
    sa_items, _ = plan_items(self_alignment_plan("flair"), lambda m: 0, TextIds(_Tok(), 10), 0)
    assert [i.sa for i in sa_items if isinstance(i, ImageItem) and i.noisy] == [True]


def test_bpe_tokenizer_is_deterministic_and_sized(slices: Path) -> None:
    a, b = bpe_tokenizer(slices, 512), bpe_tokenizer(slices, 512)
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert a.vocab_size <= 512
    text = "Translate the given T1 image into the corresponding T2-weighted MRI."
    assert len(a.encode(text)) < len(text) / 2  # the template phrasings were learned
    assert a.decode(a.encode(text)) == text


# ---------------------------------------------------------------------------------------------
# materialised packs


def _expected_layout(items: list, geom) -> tuple[list[int], list[int], list[bool]]:
    """(loss target offsets, positions, noisy flags per token) of one sample walked by hand."""
    targets, positions, noisy = [], [], []
    pos = off = 0
    for it in items:
        if isinstance(it, TextItem):
            for j, _ in enumerate(it.ids):
                if it.loss and j > 0:
                    targets.append(off)
                positions.append(pos)
                noisy.append(False)
                pos, off = pos + 1, off + 1
        else:
            n = geom.vit_block_tokens if it.kind == "vit" else geom.vae_block_tokens
            positions += [pos] * n
            noisy += [it.noisy] * n
            off += n
            pos += 0 if it.noisy else 1
    return targets, positions, noisy


@pytest.mark.parametrize("stage_cls,draws", [(UnifiedStage, 1), (UnifiedStage, 3), (SAStage, 1), (DHSStage, 3)])
def test_materialised_packs_obey_split_position_and_loss_rules(stage_cls, draws, pipeline: Path, slices: Path) -> None:
    recipe = recipe_with(VAE, {"name": stage_cls.name, "steps": 1}, extra=(f"data.flow_draws={draws}",))
    stage = stage_cls(ctx_for(recipe, 1, slices, pipeline))
    geom = stage.geometry()
    batch = stage.next_batch(0, stage_generator(0, 1, 0))["batch"]
    again = stage.next_batch(0, stage_generator(0, 1, 0))["batch"]
    assert torch.equal(batch.noise, again.noise) and batch.descriptions == again.descriptions
    p = batch.packed
    assert p.length <= recipe.data.pack_tokens and p.num_samples == len(batch.samples) >= 2
    start = 0
    all_targets: list[int] = []
    for s, items in enumerate(batch.samples):
        targets, positions, noisy = _expected_layout(items, geom)
        n = p.sample_lens[s]
        assert p.position_ids[start:start + n].tolist() == positions
        all_targets += [start + t for t in targets]
        vae_rows = (p.token_types[start:start + n] == TokenType.VAE).nonzero().flatten()
        flags = torch.tensor(noisy)[vae_rows]
        sample_noisy = p.vae_noisy[(p.vae_indexes >= start) & (p.vae_indexes < start + n)]
        assert torch.equal(sample_noisy, flags)
        start += n
    # NTP loss covers exactly the thinking / answer tokens after their bos (incl. the eos), nothing else
    assert (p.ce_indexes + 1).tolist() == all_targets
    assert torch.equal(p.ce_labels, p.text_ids[torch.searchsorted(p.text_indexes, p.ce_indexes + 1)])
    roles = {it.role for items in batch.samples for it in items if isinstance(it, TextItem) and it.loss}
    assert roles <= {"thinking", "answer"}
    if stage_cls is SAStage:
        assert p.ce_indexes.numel() == 0 and bool(batch.slot_sa.all())
    # flow draws: `draws` consecutive noisy blocks per generated target in unified, one in dhs
    per_target = draws if stage_cls is UnifiedStage else 1
    for items in batch.samples:
        noisy_items = [it for it in items if isinstance(it, ImageItem) and it.noisy and not it.sa]
        mods = [it.modality for it in noisy_items]
        assert all(mods.count(m) == per_target for m in mods)
    # flow loss: noisy rows only, one flow time per noisy image, clean images at t = 0; noise splits hide
    assert int(p.vae_noisy.sum()) == batch.num_slots * geom.vae_image_tokens
    assert torch.equal(p.vae_timesteps[p.vae_noisy], batch.timesteps.repeat_interleave(geom.vae_image_tokens))
    assert float(p.vae_timesteps[~p.vae_noisy].abs().sum()) == 0.0
    noisy_splits = {img.split for img in p.images if img.noisy}
    assert {i for i, m in enumerate(p.split_modes) if m == "noise"} == noisy_splits
    # every image split is wrapped in the marker tokens
    tok = stage.tokenizer()
    for img in p.images:
        first = sum(p.split_lens[:img.split])
        last = first + p.split_lens[img.split] - 1
        assert p.token_types[first] == TokenType.TEXT and p.token_types[last] == TokenType.TEXT
    assert int((p.text_ids == tok.image_start_id).sum()) == len(p.images)
    # filled pack: noisy rows hold x_t, targets eps - x0
    module = stage.build_model()
    lat, vit = module.encode_images(batch.pixels)
    filled = fill_pack(batch, lat, vit)
    vae_spans = [img for img in p.images if img.kind == "vae"]
    noisy_src = batch.vae_src[[i for i, img in enumerate(vae_spans) if img.noisy]]
    x0 = lat[noisy_src]
    t = batch.timesteps[:, None, None]
    x_t = filled.packed.vae_latents[p.vae_noisy].reshape(x0.shape)
    assert torch.allclose(x_t, (1 - t) * x0 + t * batch.noise, atol=1e-6)
    assert torch.allclose(filled.target.reshape(x0.shape), batch.noise - x0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# end to end through the trainer


def test_pipeline_exports_load_with_from_pretrained(pipeline: Path) -> None:
    lines = [json.loads(x) for x in (pipeline / "metrics.jsonl").read_text().splitlines()]
    terms = {(x["stage"], x["step"]): x["terms"] for x in lines if x["kind"] == "train"}
    assert terms[("sa", 2)]["ntp"] == 0.0 and terms[("sa", 2)]["flow"] == 0.0 and terms[("sa", 2)]["sa"] > 0
    assert terms[("unified", 2)]["ntp"] > 0 and terms[("unified", 2)]["flow"] > 0
    assert all(terms[("dhs", 2)][k] > 0 for k in ("ntp", "flow", "sa"))
    vae_cfg = json.loads((pipeline / "vae" / "final" / "config.json").read_text())
    for name in ("sa", "unified", "dhs"):
        final = pipeline / name / "final"
        assert {"model.safetensors", "config.json", "ae.safetensors", "tokenizer.json"} <= {f.name for f in final.iterdir()}
        pre = from_pretrained(final)
        assert pre.extra["recipe"]["name"] == "tiny" and pre.extra["stage"] == name
        assert pre.extra["recipe"]["train"]["stages"][1]["name"] == "sa"
        assert pre.vae is not None and pre.vae.scale_factor == pytest.approx(vae_cfg["scale_factor"])
        assert pre.config.vae.shift_factor == pytest.approx(vae_cfg["shift_factor"])
        tok = TextTokenizer.load(pre.tokenizer_dir)
        assert tok.vocab_size <= pre.config.llm.vocab_size
    # each stage started from the previous one: sa froze the ViT, so the ViT of sa equals unified's start
    sa = load_file(str(pipeline / "sa" / "final" / "model.safetensors"))
    uni = load_file(str(pipeline / "unified" / "final" / "model.safetensors"))
    key = "language_model.model.layers.0.mlp.gate_proj.weight"
    assert not torch.equal(sa[key], uni[key])


def test_sa_trains_only_the_generation_expert(pipeline: Path, slices: Path, tmp_path: Path) -> None:
    run = copy_vae_run(pipeline, tmp_path / "RUN")
    recipe = recipe_with(VAE, {"name": "sa", "steps": 2, "lr": 1e-2, "ema_decay": 0.0})
    stage = SAStage(ctx_for(recipe, 1, slices, run))
    before = {k: v.clone() for k, v in stage.build_model().state_dict().items()}
    after: dict[str, torch.Tensor] = {}

    def grab(info) -> None:
        if info.step == 2:
            after.update({k: v.detach().clone() for k, v in info.model.state_dict().items()})

    train(recipe, slices, run, stage="sa", hooks=[grab])
    gen = ("_moe_gen", "model.vae2llm.", "model.llm2vae.", "model.time_embedder.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(g in k for g in gen) for k in changed)
    frozen = [k for k in before if k.startswith(("model.vit_model.", "model.connector.", "vae."))
              or (k.startswith("model.language_model.") and "_moe_gen" not in k)]
    assert all(torch.equal(before[k], after[k]) for k in frozen) and len(frozen) > 20
    assert any("layers.0.mlp_moe_gen" in k for k in changed) and any("llm2vae" in k for k in changed)
    assert any("q_proj_moe_gen" in k for k in changed)
    trainable = set(stage.trainable_modules(stage.build_model()))
    assert "model.language_model.model.norm_moe_gen" in trainable
    assert "model.language_model.model.layers.1.self_attn.k_norm_moe_gen" in trainable


def test_und_trains_only_the_understanding_side_on_understanding_packs(pipeline: Path, slices: Path,
                                                                          tmp_path: Path) -> None:
    """``und`` changes the ViT, the connector and the understanding expert (embedding, LM head
    included) and nothing of the generation side; every sample it draws is understanding-only, so
    its packs carry answers and no flow-loss token; ``dhs`` starts from its export."""
    from unibrain_cli.inference.checkpoint import resolve_checkpoint
    from unibrain_cli.training.model_init import load_bundle

    und = {"name": "und", "steps": 2, "lr": 1e-2, "ema_decay": 0.0}
    recipe = recipe_with(VAE, und, {"name": "dhs", "steps": 1, "dhs_rollout_steps": 2})
    run = copy_vae_run(pipeline, tmp_path / "RUN")
    stage = UndStage(ctx_for(recipe, 1, slices, run))
    before = {k: v.clone() for k, v in stage.build_model().state_dict().items()}
    rng = np.random.default_rng(0)
    plans = [p for _ in range(3) for _, p in stage.draw_pack(rng)]
    assert len(plans) > 3 and all(p.kind == "understanding" for p in plans)
    def answers(plan: SamplePlan) -> int:
        return sum(isinstance(s, TextSegment) and s.role == "answer" for s in plan.segments)

    # no findings question before the answer (the recipe's data flow would ask one): answers read the images
    assert all(answers(p) == 1 for p in plans)
    _, records = stage.dataset()
    assert any(answers(understanding_plan(r, rng, recipe.data)) == 2 for r in records for _ in range(5))
    counts = stage.loss_counts(stage.next_batch(0, stage_generator(0, 1, 0)))
    assert counts["ntp"] > 0 and counts["flow"] == 0 and counts["sa"] == 0
    summary = train(recipe, slices, run, stage="und")
    assert summary.stages["und"]["status"] == "trained"
    after = load_file(str(run / "und" / "final" / "model.safetensors"))
    changed = {k for k in after if not torch.equal(before["model." + k], after[k])}
    gen = ("_moe_gen", "vae2llm.", "llm2vae.", "time_embedder.", "aligned_context.")
    assert changed and not any(g in k for k in changed for g in gen)
    frozen = [k for k in after if any(g in k for g in gen)]
    assert len(frozen) > 20 and all(torch.equal(before["model." + k], after[k]) for k in frozen)
    for part in ("vit_model.", "connector.", "layers.0.mlp.", "layers.1.self_attn.q_proj.", "lm_head", "embed_tokens"):
        assert any(part in k for k in changed), part
    start = load_bundle(recipe, {"vae": run / "vae" / "final", "und": run / "und" / "final"}, slices).model
    assert all(torch.equal(v, after[k]) for k, v in start.state_dict().items())
    # a run that ends with `und` (the Table 3 variants) is served from it; `dhs` wins once it exists
    assert resolve_checkpoint(run) == run / "und" / "final"
    (run / "dhs" / "final").mkdir(parents=True)
    shutil.copy(run / "und" / "final" / "config.json", run / "dhs" / "final" / "config.json")
    shutil.copy(run / "und" / "final" / "model.safetensors", run / "dhs" / "final" / "model.safetensors")
    assert resolve_checkpoint(run) == run / "dhs" / "final"


def test_und_mirrors_whole_samples_with_understanding_flip_prob(pipeline: Path, slices: Path, tmp_path: Path) -> None:
    """``data.understanding_flip_prob`` = 1: every ``und`` sample is its slice's left-right mirror,
    all of its images flipped along the columns and "left" / "right" swapped in its text; 0 draws
    the same packs as before the knob existed (no extra random draw)."""
    und = {"name": "und", "steps": 1}
    run = copy_vae_run(pipeline, tmp_path / "RUN")
    base = UndStage(ctx_for(recipe_with(VAE, und), 1, slices, run))
    flipped = UndStage(ctx_for(recipe_with(VAE, und, extra=("data.understanding_flip_prob=1.0",)), 1, slices, run))
    _, records = base.dataset()
    # at 0 a draw is the record index and its understanding plan, nothing more taken from the stream
    drawn, replay = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(5):
        i, plan = base.draw_plan(drawn)
        j = int(replay.integers(len(records)))
        assert (i, plan) == (j, understanding_plan(records[j], replay, base.plan_config()))
    assert drawn.random() == replay.random()
    pack = flipped.draw_pack(np.random.default_rng(4))
    assert pack and all(p.meta.get("mirrored") for _, p in pack)
    _, stack = flipped.materialize(pack)[:2]
    _, plain_stack = base.materialize([(i, replace(p, meta={})) for i, p in pack])[:2]
    torch.testing.assert_close(stack, plain_stack.flip(-1), rtol=0, atol=0)


def test_und_transforms_whole_samples_with_understanding_affine(pipeline: Path, slices: Path, tmp_path: Path) -> None:
    """``data.understanding_rotate_deg`` / ``_shift_px`` / ``_scale``: every ``und`` sample carries one
    similarity transform within the bounds, applied to all of its images alike; the text is unchanged."""
    und = {"name": "und", "steps": 1}
    run = copy_vae_run(pipeline, tmp_path / "RUN")
    base = UndStage(ctx_for(recipe_with(VAE, und), 1, slices, run))
    moved = UndStage(ctx_for(recipe_with(VAE, und, extra=(
        "data.understanding_rotate_deg=20", "data.understanding_shift_px=3", "data.understanding_scale=0.2")),
        1, slices, run))
    pack = moved.draw_pack(np.random.default_rng(5))
    assert pack
    for i, plan in pack:
        angle, dy, dx, scale = plan.meta["affine"]
        assert abs(angle) <= 20 and abs(dy) <= 3 and abs(dx) <= 3 and 1 / 1.2 <= scale <= 1.2
        plain = replace(plan, meta={k: v for k, v in plan.meta.items() if k != "affine"})
        samples, stack = moved.materialize([(i, plan)])[:2]
        plain_samples, plain_stack = base.materialize([(i, plain)])[:2]
        assert samples == plain_samples
        torch.testing.assert_close(stack, similarity_transform(plain_stack, angle, (dy, dx), scale), rtol=0, atol=0)
        assert not torch.equal(stack, plain_stack)
    # no knob set: no "affine" entry
    assert all("affine" not in p.meta for _, p in base.draw_pack(np.random.default_rng(5)))


def test_similarity_transform_golden_cases() -> None:
    """90 degrees is numpy's counter-clockwise rot90 of the displayed slice, an integer shift moves
    the pixels with zeros coming in, a zoom by 2 about the centre halves a ramp's slope, every channel
    gets the same transform, and the identity returns its input."""
    x = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(similarity_transform(x, 90.0, (0.0, 0.0), 1.0), torch.rot90(x, 1, (-2, -1)),
                               rtol=0, atol=1e-5)
    shifted = torch.zeros_like(x)
    shifted[:, 2:, :7] = x[:, :6, 1:]
    torch.testing.assert_close(similarity_transform(x, 0.0, (2.0, -1.0), 1.0), shifted, rtol=0, atol=1e-5)
    # bilinear interpolation is exact on a ramp: scale 2 about the centre (3.5) halves its slope there
    ramp = torch.arange(8.0).expand(8, 8)
    zoom = similarity_transform(ramp, 0.0, (0.0, 0.0), 2.0)
    torch.testing.assert_close(zoom[2:6, 1:7], ((torch.arange(1.0, 7.0) - 3.5) / 2 + 3.5).expand(4, 6),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(similarity_transform(x[1], 30.0, (1.5, -0.5), 1.1),
                               similarity_transform(x, 30.0, (1.5, -0.5), 1.1)[1], rtol=0, atol=1e-6)
    assert similarity_transform(x, 0.0, (0.0, 0.0), 1.0) is x


def test_und_is_listed_between_unified_and_dhs() -> None:
    with pytest.raises(UserError, match="order vae -> sa -> draft -> unified -> und -> dhs"):
        recipe_with(VAE, {"name": "dhs", "steps": 1}, {"name": "und", "steps": 1})
    assert [s.name for s in recipe_with(VAE, {"name": "unified", "steps": 1}, {"name": "und", "steps": 1},
                                        {"name": "dhs", "steps": 1}).train.stages] == ["vae", "unified", "und", "dhs"]


DRAFT_SETS = ("model.aligned_context=on", "model.aligned_draft=8", "data.draft_pairs=4")


@pytest.mark.parametrize("extra", [(), DRAFT_SETS], ids=["plain", "draft"])
def test_unified_resume_two_plus_two_equals_four(extra, pipeline: Path, slices: Path, tmp_path: Path) -> None:
    recipe = recipe_with(VAE, {"name": "unified", "steps": 4, "lr": 1e-3}, extra=extra)
    straight = copy_vae_run(pipeline, tmp_path / "A", recipe)
    train(recipe, slices, straight, stage="unified")

    resumed = copy_vae_run(pipeline, tmp_path / "B", recipe)

    def stop(info) -> None:
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe, slices, resumed, stage="unified", hooks=[stop])
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    summary = train(recipe, slices, resumed, resume=True)
    assert summary.stages["unified"]["resumed_from"] == 2
    a = load_file(str(straight / "unified" / "final" / "model.safetensors"))
    b = load_file(str(resumed / "unified" / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(run: Path) -> list[float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [x["loss"] for x in lines if x["kind"] == "train" and x["stage"] == "unified"]

    assert losses(straight) == losses(resumed) and len(losses(straight)) == 4
    if extra:  # the draft network is trained on its pairs (its own loss term), from its fixed init
        from unibrain_cli.model.aligned import AlignedDraft

        terms = [json.loads(x)["terms"] for x in (straight / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["kind"] == "train"]
        assert all(t["draft"] > 0 for t in terms)
        init = AlignedDraft(len(MODALITIES), 16, 8).state_dict()
        assert all(not torch.equal(a[f"aligned_context.draft.{k}"], v) for k, v in init.items())


def test_draft_stage_trains_only_the_draft_and_unified_starts_from_it(pipeline: Path, slices: Path,
                                                                     tmp_path: Path) -> None:
    """The ``draft`` stage changes the draft network's weights and nothing else (the transformer is exported as
    initialised), lowers the draft's loss on fixed pairs, draws its pairs deterministically, and ``unified``
    starts from its export."""
    from unibrain_cli.training.model_init import load_bundle
    from unibrain_cli.training.stages.draft import DraftStage

    draft = {"name": "draft", "steps": 3, "lr": 1e-2, "batch_size": 6, "ema_decay": 0.0}
    recipe = recipe_with(VAE, draft, {"name": "unified", "steps": 1}, extra=DRAFT_SETS)
    run = copy_vae_run(pipeline, tmp_path / "RUN", recipe)
    stage = DraftStage(ctx_for(recipe, 1, slices, run))
    module = stage.build_model()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    batch = stage.next_batch(0, stage_generator(0, 1, 0))
    again = stage.next_batch(0, stage_generator(0, 1, 0))["draft"]
    assert batch["draft"].target.shape[0] == 6 and torch.equal(batch["draft"].stack, again.stack)
    assert stage.loss_counts(batch) == {"draft": 6 * stage.geometry().vae_image_tokens}
    with torch.no_grad():
        loss_before = float(module(None, draft=batch["draft"])["loss"])
    summary = train(recipe, slices, run, stage="draft")
    assert summary.stages["draft"]["status"] == "trained"
    after = load_file(str(run / "draft" / "final" / "model.safetensors"))
    changed = {k for k in after if not torch.equal(before["model." + k], after[k])}
    assert changed == {k for k in after if k.startswith("aligned_context.draft.")} and changed
    module.model.load_state_dict(after)
    with torch.no_grad():
        assert float(module(None, draft=batch["draft"])["loss"]) < loss_before
    terms = [json.loads(x)["terms"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x)["kind"] == "train" and json.loads(x)["stage"] == "draft"]
    assert len(terms) == 3 and all(t["draft"] > 0 for t in terms)
    start = load_bundle(recipe, {"vae": run / "vae" / "final", "draft": run / "draft" / "final"}, slices).model
    assert all(torch.equal(v, after[k]) for k, v in start.state_dict().items())


def test_draft_stage_errors(pipeline: Path, slices: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.aligned_draft"):
        train(recipe_with(VAE, {"name": "draft", "steps": 1}), slices, tmp_path / "R1")
    assert not (tmp_path / "R1").exists()
    with pytest.raises(UserError, match="order vae -> sa -> draft -> unified -> und -> dhs"):
        recipe_with(VAE, {"name": "unified", "steps": 1}, {"name": "draft", "steps": 1}, extra=DRAFT_SETS)


def test_draft_pairs_are_stacked_as_the_aligned_path_stacks_a_target(pipeline: Path, slices: Path) -> None:
    """The draft's training input for a pair equals what the aligned path stacks for a noisy target with the
    same earlier images (so the draft is trained on what it sees at inference); the bank holds each slice's
    latents as the autoencoder encodes it; the target is never in its own context; the packs are those of
    a run without a draft."""
    recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=DRAFT_SETS)
    stage = UnifiedStage(ctx_for(recipe, 1, slices, pipeline))
    module = stage.build_model()
    out = stage.next_batch(0, stage_generator(0, 1, 0))
    plain = UnifiedStage(ctx_for(recipe_with(VAE, {"name": "unified", "steps": 1}), 1, slices, pipeline))
    assert plain.next_batch(0, stage_generator(0, 1, 0))["batch"].descriptions == out["batch"].descriptions
    pairs = out["draft"]
    geom = stage.geometry()
    assert pairs.target.shape[0] == 4 and stage.loss_counts(out)["draft"] == 4 * geom.vae_image_tokens
    d, w = geom.latent_dim, geom.latent_dim + 1
    bits = pairs.stack[:, 0, d::w] == 1  # [B, S] presence bits
    assert not bits[torch.arange(4), pairs.target_slot].any() and bool((bits.sum(1) >= 1).all())
    idx, mods, bank = stage.draft_bank()
    ds, _ = stage.dataset()
    k = 0
    slot = MODALITIES.index(mods[k][0])
    with torch.no_grad():
        alone = module.encode_images(torch.from_numpy(ds.arrays(idx[k])["images"][slot][None]))[0][0]
    torch.testing.assert_close(bank[k, slot], alone, rtol=1e-5, atol=1e-5)
    aligned = module.model.aligned_context
    with torch.no_grad():
        est, target = module.draft_estimates(pairs)
        for j in range(4):
            b = module.model.builder(image_markers=(1, 2))
            for s_ in range(len(MODALITIES)):
                if bits[j, s_]:
                    b.add_vae_image(geom.latent_grid, latents=pairs.stack[j, :, s_ * w: s_ * w + d], modality=s_)
            b.add_vae_image(geom.latent_grid, noisy=True, timestep=0.5, latents=torch.zeros_like(target[j]),
                            modality=int(pairs.target_slot[j]))
            stack, spans = aligned.stack_spans(b.build())
            assert torch.equal(stack, pairs.stack[j])
            torch.testing.assert_close(aligned.draft_rows(stack, spans), est[j])
        loss = module.draft_loss(pairs)
    torch.testing.assert_close(loss, (est - target).pow(2).mean())


def test_model_stage_input_errors(pipeline: Path, slices: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="autoencoder"):
        train(recipe_with({"name": "unified", "steps": 1}), slices, tmp_path / "R1")
    with pytest.raises(UserError, match="not a model folder"):
        train(recipe_with({"name": "unified", "steps": 1}, extra=(f"train.init_from={json.dumps(str(tmp_path))}",)),
              slices, tmp_path / "R2")
    init = f"train.init_from={json.dumps(str(pipeline / 'unified' / 'final'))}"
    with pytest.raises(UserError, match="model.llm.num_layers: 2 != 3"):
        train(recipe_with({"name": "unified", "steps": 1}, extra=(init, "model.llm.num_layers=3")), slices,
              tmp_path / "R4")
    assert not (tmp_path / "R4").exists()  # refused before anything was written
    # init_from a save_pretrained folder: model, autoencoder and tokenizer come from it
    recipe = recipe_with({"name": "dhs", "steps": 1, "dhs_rollout_steps": 1},
                         extra=(f"train.init_from={json.dumps(str(pipeline / 'unified' / 'final'))}",))
    train(recipe, slices, tmp_path / "R3")
    assert (tmp_path / "R3" / "dhs" / "final" / "tokenizer.json").read_text() == \
        (pipeline / "unified" / "final" / "tokenizer.json").read_text()


# ---------------------------------------------------------------------------------------------
# DHS


def _dhs_batch(stage: DHSStage):
    """A micro-batch whose first sample generates a target and has NTP text after it."""
    for pos in range(40):
        batch = stage.next_batch(pos, stage_generator(pos, 3, 0))["batch"]
        for items in batch.samples:
            first = next((i for i, it in enumerate(items) if isinstance(it, ImageItem) and it.noisy and not it.sa), None)
            if first is not None and any(isinstance(it, TextItem) and it.loss for it in items[first:]):
                return batch
    raise AssertionError("no DHS batch with text after a generated image")


def _dhs_stage(pipeline: Path, slices: Path, steps: int) -> DHSStage:
    recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, {"name": "dhs", "steps": 1, "dhs_rollout_steps": steps})
    return DHSStage(ctx_for(recipe, 2, slices, pipeline))  # starts from the pipeline's unified export


def _after_generated(batch) -> torch.Tensor:
    """bool [N_ce]: the NTP target comes after a generated image of its sample."""
    p = batch.packed
    vae_spans = [img for img in p.images if img.kind == "vae"]
    first = {}
    for span, gen in zip(vae_spans, batch.vae_gen.tolist(), strict=True):
        if gen >= 0 and span.sample not in first:
            first[span.sample] = sum(p.split_lens[:span.split])
    target = p.ce_indexes + 1
    limit = torch.tensor([first.get(int(s), p.length) for s in p.sample_ids[target]])
    return target > limit


def test_dhs_text_loss_sees_generated_latents_never_ground_truth(pipeline: Path, slices: Path) -> None:
    stage = _dhs_stage(pipeline, slices, steps=2)
    module = stage.build_model()
    batch = _dhs_batch(stage)
    assert bool(batch.slot_sa.any()) and bool((batch.exit_steps[~batch.slot_sa] >= 0).all())

    def logits(lat, vit, gen_lat=None, gen_vit=None):
        packed = fill_pack(batch, lat, vit, gen_lat, gen_vit).packed
        return module.model(packed, logits_at="loss", velocity_at="none").logits

    after = _after_generated(batch)
    assert bool(after.any()) and bool((~after).any())
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        base = module.losses(batch, lat, vit)
        r = module.rollout(batch, lat, vit)
        gen_lat, gen_vit = r.gen_lat, r.gen_vit
        ref = logits(lat, vit, gen_lat, gen_vit)
        # perturbing the ground truth of generated targets (latents and ViT) changes neither the rollout nor
        # any text logit ...
        targets = sorted({it.image for items in batch.samples for it in items
                          if isinstance(it, ImageItem) and it.noisy and not it.sa})
        lat2, vit2 = lat.clone(), vit.clone()
        lat2[targets] += 3.0 * torch.randn_like(lat2[targets])
        vit2[targets] += 3.0 * torch.randn_like(vit2[targets])
        r2 = module.rollout(batch, lat2, vit2)
        gen_lat2, gen_vit2 = r2.gen_lat, r2.gen_vit
        assert torch.equal(gen_lat2, gen_lat) and torch.equal(gen_vit2, gen_vit)
        assert torch.equal(r2.states, r.states)
        assert torch.equal(logits(lat2, vit2, gen_lat2, gen_vit2), ref)
        moved = module.losses(batch, lat2, vit2)
        assert float(moved.ntp) == float(base.ntp)
        assert abs(float(moved.flow) - float(base.flow)) > 1e-3  # ... while their own flow loss sees them
        # the text after a generated image depends on the generated views; text before it does not
        other = logits(lat, vit, gen_lat + torch.randn_like(gen_lat), gen_vit + torch.randn_like(gen_vit))
        diff = (other - ref).abs().amax(dim=1)
        assert float(diff[after].min()) > 1e-5 and float(diff[~after].max()) == 0.0
        # and the unified (teacher-forced) context differs from the dynamic one
        teacher = logits(lat, vit)
        assert float((teacher - ref).abs().amax(dim=1)[after].min()) > 1e-5
    # gradients of the packed forward reach the understanding expert through the dynamic context
    module.train()
    out = module(batch)
    out["loss"].backward()
    grad = module.model.language_model.model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_dhs_cached_rollout_equals_packed_forward(pipeline: Path, slices: Path) -> None:
    """With one Euler step from t = 1 and exit step 0, the rollout's sample is eps - v(eps | cache); the packed
    training forward sees x_t = eps at t = 1 after the same dynamic context, so it predicts the same v."""
    stage = _dhs_stage(pipeline, slices, steps=1)
    module = stage.build_model()
    batch = _dhs_batch(stage)
    assert bool((batch.timesteps[~batch.slot_sa] == 1.0).all())
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        r = module.rollout(batch, lat, vit)
        sampled, gen_lat, gen_vit = r.sampled, r.gen_lat, r.gen_vit
        filled = fill_pack(batch, lat, vit, gen_lat, gen_vit, r.states, ~batch.slot_sa)
        v = module.model(filled.packed, logits_at="none", velocity_at="noisy").velocity
    v = v.reshape(batch.num_slots, -1, v.shape[-1])
    gen = ~batch.slot_sa
    assert int(gen.sum()) >= 1
    assert torch.allclose(batch.noise[gen] - v[gen], sampled[gen], atol=1e-4)
    assert torch.equal(r.states[gen], batch.noise[gen])  # the state at exit step 0 is the noise itself
    assert float(v[gen].abs().max()) > 1e-4  # a real prediction, not the zero-initialised head


def test_dhs_next_batch_is_deterministic(pipeline: Path, slices: Path) -> None:
    stage = _dhs_stage(pipeline, slices, steps=4)
    a = stage.next_batch(5, stage_generator(1, 3, 0))["batch"]
    b = stage.next_batch(5, stage_generator(1, 3, 0))["batch"]
    assert a.descriptions == b.descriptions and torch.equal(a.timesteps, b.timesteps)
    assert torch.equal(a.exit_steps, b.exit_steps) and torch.equal(a.pixels, b.pixels)
    from unibrain_cli.flow.sampler import timestep_schedule

    sched = timestep_schedule(4, load_recipe("tiny").flow.sample_timestep_shift)
    gen = ~a.slot_sa
    assert torch.equal(a.timesteps[gen], sched[a.exit_steps[gen]])
    assert bool((a.timesteps[gen] > 0).all()) and bool((a.exit_steps[gen] < 4).all())  # never t_n = 0
    assert bool((a.exit_steps[a.slot_sa] == -1).all()) and int(a.slot_sa.sum()) == 1
    assert np.isclose(float(a.timesteps.min()), float(a.timesteps.min()))


def _first_generation(batch):
    """(items, index) of the first non-SA generation slot of the first sample that has one."""
    for items in batch.samples:
        for i, it in enumerate(items):
            if isinstance(it, ImageItem) and it.noisy and not it.sa:
                return items, i
    raise AssertionError("no generation slot")


def test_dhs_exit_step_trains_on_the_rollout_state(pipeline: Path, slices: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Self-forcing: the packed forward's noisy split of a generated slot holds the state x_{t_k} an Euler
    rollout from the slot's noise reaches at its exit step k (recomputed here independently of
    ``DHSTrainModule.rollout``), at time t_k, and its target is ``(x_{t_k} - x0) / t_k``."""
    from unibrain_cli.flow.sampler import euler_step, timestep_schedule
    from unibrain_cli.training.materialize import add_items
    from unibrain_cli.training.stages import unified

    stage = _dhs_stage(pipeline, slices, steps=4)
    module = stage.build_model().eval()
    for pos in range(40):
        batch = stage.next_batch(pos, stage_generator(pos, 3, 0))["batch"]
        items, first = _first_generation(batch)
        slot = items[first].slot
        if int(batch.exit_steps[slot]) >= 1:
            break
    else:
        raise AssertionError("no batch whose first generation slot exits after step 0")
    k = int(batch.exit_steps[slot])
    ts = timestep_schedule(4, load_recipe("tiny").flow.sample_timestep_shift).tolist()
    model, geom = module.model, stage.geometry()
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        # independent rollout: ground-truth context (nothing generated before the first slot), Euler from eps
        b = model.builder(batch.markers)
        add_items(b, items[:first], geom, [], with_loss=False, vit_data=lambda it: vit[it.image],
                  vae_data=lambda it: lat[it.image])
        cache = model.new_cache()
        model.prefill(cache, b.build())
        x = batch.noise[slot].clone()
        for t, t_next in zip(ts[:k], ts[1:k + 1], strict=True):
            nb = model.builder(batch.markers)
            nb.add_vae_image(geom.latent_grid, noisy=True, timestep=t, latents=x)
            x = euler_step(x, model.predict_velocity(cache, nb.build()), t, t_next)
    x_tk = x
    # spy on the packed training forward's inputs and flow targets
    seen: dict = {}
    forward, pack_losses = model.forward, unified.pack_losses

    def spy_forward(packed, *args, **kw):
        seen["packed"] = packed
        return forward(packed, *args, **kw)

    def spy_losses(logits, labels, velocity, target, row_sa, norm=None):
        seen["target"] = target
        return pack_losses(logits, labels, velocity, target, row_sa, norm)

    monkeypatch.setattr(model, "forward", spy_forward)
    monkeypatch.setattr(unified, "pack_losses", spy_losses)
    with torch.no_grad():
        module(batch)
    packed, n, T = seen["packed"], batch.num_slots, lat.shape[1]
    noisy = packed.vae_latents[packed.noisy_vae_rows].reshape(n, T, -1)
    t_rows = packed.vae_timesteps[packed.noisy_vae_rows].reshape(n, T)
    assert torch.allclose(noisy[slot], x_tk, atol=1e-4)
    assert torch.allclose(t_rows[slot], torch.full((T,), ts[k]))
    x0 = lat[items[first].image]
    gt_mix = (1 - ts[k]) * x0 + ts[k] * batch.noise[slot]
    assert float((noisy[slot] - gt_mix).abs().max()) > 1e-3  # not the ground-truth mix any more
    target = seen["target"].reshape(n, T, -1)
    assert torch.allclose(target[slot], (x_tk - x0) / ts[k], atol=1e-4)
    # self-alignment slots keep the ground-truth path and target
    sa = int(batch.slot_sa.nonzero()[0])
    sa_x0 = lat[batch.vae_src[[i for i, img in enumerate(s for s in packed.images if s.kind == "vae")
                               if img.noisy][sa]]]
    t_sa = float(batch.timesteps[sa])
    assert torch.allclose(noisy[sa], (1 - t_sa) * sa_x0 + t_sa * batch.noise[sa], atol=1e-6)
    assert torch.allclose(target[sa], batch.noise[sa] - sa_x0, atol=1e-6)


def test_dhs_rollout_refuses_exit_times_off_the_schedule(pipeline: Path, slices: Path) -> None:
    import dataclasses

    stage = _dhs_stage(pipeline, slices, steps=2)
    module = stage.build_model()
    batch = _dhs_batch(stage)
    lat, vit = module.encode_images(batch.pixels)
    gen = int((~batch.slot_sa).nonzero()[0])
    bad = dataclasses.replace(batch, exit_steps=batch.exit_steps.clone())
    bad.exit_steps[gen] = 2  # t_2 = 0: not an exit step
    with pytest.raises(ValueError, match="not a step with t > 0"):
        module.rollout(bad, lat, vit)
    bad = dataclasses.replace(batch, timesteps=batch.timesteps.clone())
    bad.timesteps[gen] += 0.01
    with pytest.raises(ValueError, match="is not the rollout time"):
        module.rollout(bad, lat, vit)


def _count_layer_calls(module) -> dict[str, int]:
    calls = {"llm": 0, "vit": 0}
    for key, layer in (("llm", module.model.language_model.model.layers[0]),
                       ("vit", module.model.vit_model.vision_model.encoder.layers[0])):
        layer.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    return calls


def test_dhs_pads_the_rollout_with_dummy_passes(pipeline: Path, slices: Path) -> None:
    """The FSDP padding, forced on one process: with a synchronised pass count 3 above this rank's, the
    rollout runs 3 extra (dummy) passes, every pass runs the ViT then the decoder, and nothing changes."""
    stage = _dhs_stage(pipeline, slices, steps=2)
    module = stage.build_model().eval()
    batch = _dhs_batch(stage)
    calls = _count_layer_calls(module)
    own = module.planned_passes(batch)
    assert own >= 3  # at least one prefill and two Euler steps
    assert module._pass_target(own, torch.device("cpu")) is None  # no process group: no padding
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        plain = module.rollout(batch, lat, vit)
        plain_calls = dict(calls)
        base = module.losses(batch, lat, vit)
        assert plain.passes == own and plain_calls["llm"] == own
        module.sync_passes = lambda n: n + 3
        calls.update(llm=0, vit=0)
        padded = module.rollout(batch, lat, vit)
        assert padded.passes == own + 3
        assert calls["llm"] == own + 3 and calls["vit"] == own + 3  # uniform "ViT, then decoder" passes
        for name in ("sampled", "states", "gen_lat", "gen_vit"):
            assert torch.equal(getattr(padded, name), getattr(plain, name))
        calls.update(llm=0, vit=0)
        moved = module.losses(batch, lat, vit)
        assert calls["llm"] == own + 3 + 1  # ... plus the packed training forward
        for k in ("ntp", "flow", "sa"):
            assert torch.equal(getattr(moved, k), getattr(base, k))
        module.sync_passes = lambda n: n - 1
        with pytest.raises(RuntimeError, match="below this rank"):
            module.rollout(batch, lat, vit)


def test_geometry_of_the_bagel_recipe_resizes_the_vit_view() -> None:
    from unibrain_cli.training.materialize import ImageGeometry, vit_tokens

    recipe = load_recipe("bagel-7b")
    geom = ImageGeometry.from_config(recipe.model, recipe.data.image_size)
    assert geom.problems() == []
    assert geom.vit_size == 252 and geom.vit_grid == (18, 18) and geom.latent_grid == (16, 16)
    assert geom.vit_block_tokens == 18 * 18 + 2 and geom.latent_dim == 64
    tok = vit_tokens(torch.rand(2, 256, 256), 14, 3, geom.vit_size)
    assert tok.shape == (2, 324, 14 * 14 * 3) and float(tok.min()) >= -1.0 and float(tok.max()) <= 1.0
    tiny = load_recipe("tiny")
    assert ImageGeometry.from_config(tiny.model, 32).vit_size == 32
    assert ImageGeometry.from_config(tiny.model, 96).problems()  # 12 patches > table side 8


def test_dhs_aligned_slots_hold_the_generated_images(pipeline: Path, slices: Path) -> None:
    """With model.aligned_context on (added at zero to the pipeline's export), a later target's aligned slot of
    an earlier generated target holds the rollout's generated latent, never its ground truth; the cached
    rollout (slots from the cache) and the packed forward (slots from the pack) agree."""
    recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, {"name": "dhs", "steps": 1, "dhs_rollout_steps": 1},
                         extra=("model.aligned_context=on",))
    stage = DHSStage(ctx_for(recipe, 2, slices, pipeline))
    module = stage.build_model()
    aligned = module.model.aligned_context
    assert aligned is not None and not aligned.weight.any()  # added at zero to a model trained without it
    with torch.no_grad():
        aligned.weight.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
    batch = None
    for pos in range(80):
        cand = stage.next_batch(pos, stage_generator(pos, 3, 0))["batch"]
        if any(sum(isinstance(it, ImageItem) and it.noisy and not it.sa for it in items) >= 2 for items in cand.samples):
            batch = cand
            break
    assert batch is not None, "no DHS batch with two generated targets in one sample"
    with torch.no_grad():
        lat, vit = module.encode_images(batch.pixels)
        r = module.rollout(batch, lat, vit)
        filled = fill_pack(batch, lat, vit, r.gen_lat, r.gen_vit, r.states, ~batch.slot_sa)
        stack = aligned.stack(filled.packed).reshape(batch.num_slots, -1, aligned.weight.shape[1])
        v = module.model(filled.packed, logits_at="none", velocity_at="noisy").velocity
    d = aligned.latent_dim
    checked = 0
    for items in batch.samples:
        gens = [it for it in items if isinstance(it, ImageItem) and it.noisy and not it.sa]
        for first, later in zip(gens, gens[1:], strict=False):
            cols = slice(first.modality * (d + 1), first.modality * (d + 1) + d)
            assert torch.equal(stack[later.slot, :, cols], r.gen_lat[first.slot].to(stack.dtype))
            assert not torch.allclose(stack[later.slot, :, cols], lat[first.image].to(stack.dtype))
            checked += 1
    assert checked >= 1
    v = v.reshape(batch.num_slots, -1, v.shape[-1])
    gen = ~batch.slot_sa
    assert torch.allclose(batch.noise[gen] - v[gen], r.sampled[gen], atol=1e-4)


def test_draft_bank_is_reused_only_for_the_same_autoencoder_and_slices(pipeline: Path, slices: Path) -> None:
    """A second stage of the same recipe in the same process (``draft`` then ``unified``) reads the
    bank encoded by the first; another autoencoder weight or another flip setting encodes anew."""
    recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=DRAFT_SETS)
    first, second, changed = (UnifiedStage(ctx_for(recipe, 1, slices, pipeline)) for _ in range(3))
    first.build_model()
    bank = first.draft_bank()[2]
    second.build_model()
    assert second.draft_bank()[2] is bank
    module = changed.make_module(changed.load())
    with torch.no_grad():
        next(module.vae.parameters()).add_(0.05)
    other = changed.draft_bank()[2]
    assert other is not bank and other.shape == bank.shape and not torch.allclose(other, bank)
    flip = UnifiedStage(ctx_for(recipe_with(VAE, {"name": "unified", "steps": 1},
                                            extra=(*DRAFT_SETS, "data.draft_flip_prob=1.0")), 1, slices, pipeline))
    flip.build_model()
    assert flip.draft_bank()[2].shape[0] == 2 * bank.shape[0]


def test_mirrored_draft_pairs_come_from_the_mirrored_slices(pipeline: Path, slices: Path) -> None:
    """With ``data.draft_flip_prob`` the bank's second half holds each slice mirrored left-right and
    encoded as such; a probability of 1 draws every pair (target and stacked context) from it; the
    packs stay those of a run without a draft."""
    plain_recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=DRAFT_SETS)
    flip_recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=(*DRAFT_SETS, "data.draft_flip_prob=1.0"))
    plain, flip = (UnifiedStage(ctx_for(r, 1, slices, pipeline)) for r in (plain_recipe, flip_recipe))
    module = flip.build_model()
    plain.build_model()
    a, b = plain.next_batch(0, stage_generator(0, 1, 0)), flip.next_batch(0, stage_generator(0, 1, 0))
    assert a["batch"].descriptions == b["batch"].descriptions
    idx, mods, bank = flip.draft_bank()
    _, _, plain_bank = plain.draft_bank()
    n = len(idx)
    assert bank.shape[0] == 2 * n and torch.equal(bank[:n], plain_bank)
    ds, _ = flip.dataset()
    slot = MODALITIES.index(mods[0][0])
    image = torch.from_numpy(ds.arrays(idx[0])["images"][slot].copy())
    with torch.no_grad():
        mirrored = module.encode_images(image.flip(-1)[None])[0][0]
    torch.testing.assert_close(bank[n, slot], mirrored, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bank[n, slot], bank[0, slot], atol=1e-3)
    pairs = b["draft"]
    d, w = flip.geometry().latent_dim, flip.geometry().latent_dim + 1
    for j in range(pairs.target.shape[0]):
        t = int(pairs.target_slot[j])
        rows = [r for r in range(2 * n) if torch.equal(bank[r, t], pairs.target[j])]
        assert rows and all(r >= n for r in rows)
        inputs = [s_ for s_ in range(len(MODALITIES)) if bool(pairs.stack[j, 0, s_ * w + d] == 1)]
        assert inputs and t not in inputs
        assert any(all(torch.equal(pairs.stack[j, :, s_ * w: s_ * w + d], bank[r, s_]) for s_ in inputs)
                   for r in rows)


def test_draft_flip_prob_outside_zero_one_is_a_recipe_error() -> None:
    with pytest.raises(UserError, match="draft_flip_prob"):
        recipe_with(VAE, extra=(*DRAFT_SETS, "data.draft_flip_prob=1.5"))


def test_four_draft_views_hold_every_mirror_and_draw_only_mirrors_at_prob_one(pipeline: Path, slices: Path) -> None:
    """``data.draft_views = 4``: the bank holds each slice as is, mirrored left-right, up-down and
    both, each encoded as such (the first two views equal the two-view bank); with
    ``draft_flip_prob`` 1 every pair comes from the three mirrored views."""
    two = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=(*DRAFT_SETS, "data.draft_flip_prob=1.0"))
    four = recipe_with(VAE, {"name": "unified", "steps": 1},
                       extra=(*DRAFT_SETS, "data.draft_flip_prob=1.0", "data.draft_views=4"))
    st2, st4 = (UnifiedStage(ctx_for(r, 1, slices, pipeline)) for r in (two, four))
    module = st4.build_model()
    st2.build_model()
    idx, mods, bank = st4.draft_bank()
    _, _, bank2 = st2.draft_bank()
    n = len(idx)
    assert bank.shape[0] == 4 * n and torch.equal(bank[:2 * n], bank2)
    ds, _ = st4.dataset()
    slot = MODALITIES.index(mods[0][0])
    image = torch.from_numpy(ds.arrays(idx[0])["images"][slot].copy())
    for view, dims in ((2, (-2,)), (3, (-2, -1))):
        with torch.no_grad():
            want = module.encode_images(image.flip(dims)[None])[0][0]
        torch.testing.assert_close(bank[view * n, slot], want, rtol=1e-5, atol=1e-5)
    pairs = st4.next_batch(0, stage_generator(0, 1, 0))["draft"]
    views_used = set()
    for j in range(pairs.target.shape[0]):
        t = int(pairs.target_slot[j])
        rows = [r for r in range(4 * n) if torch.equal(bank[r, t], pairs.target[j])]
        assert rows and all(r >= n for r in rows)
        views_used.update(r // n for r in rows)
    assert views_used <= {1, 2, 3} and len(views_used) >= 2


def test_draft_views_other_than_two_or_four_are_a_recipe_error() -> None:
    with pytest.raises(UserError, match="draft_views"):
        recipe_with(VAE, extra=(*DRAFT_SETS, "data.draft_views=3"))


def test_resume_accepts_a_run_recorded_before_a_field_with_its_default_existed(tmp_path: Path) -> None:
    """A run whose run.json lacks a field a later version added is resumable when the recipe holds
    that field at its default (what the run was trained with), and refused when it does not."""
    from unibrain_cli.training.run import check_run_dir

    recipe = recipe_with(VAE)
    digest, parts = recipe_fingerprint(recipe)
    old_parts = json.loads(json.dumps(parts))
    del old_parts["data"]["draft_views"]  # as recorded before data.draft_views existed
    run = tmp_path / "RUN"
    run.mkdir()
    info = {"format": "unibrain-run/1", "recipe_hash": "0" * 64, "recipe": old_parts, "stages_done": [], "stages": {}}
    (run / "run.json").write_text(json.dumps(info))
    assert check_run_dir(run, recipe, resume=True, stage=None) == info
    with pytest.raises(UserError, match=r"data\.draft_views: '<absent>' -> 4"):
        check_run_dir(run, recipe_with(VAE, extra=("data.draft_views=4",)), resume=True, stage=None)
    old_parts["data"]["pack_tokens"] += 1  # a real difference is still refused
    (run / "run.json").write_text(json.dumps({**info, "recipe": old_parts}))
    with pytest.raises(UserError, match="pack_tokens"):
        check_run_dir(run, recipe, resume=True, stage=None)


def test_dhs_losses_are_the_same_without_encoding_the_images_shown_only_as_vit(pipeline: Path,
                                                                              slices: Path) -> None:
    """DHS encodes only a pack's latent images too: the rollout and the training forward read no other row."""
    recipe = recipe_with(VAE, {"name": "dhs", "steps": 1, "dhs_rollout_steps": 2},
                         extra=("data.understanding_only_prob=0.5",))
    stage = DHSStage(ctx_for(recipe, 1, slices, pipeline))
    module = stage.build_model()
    skipped = 0
    for seed in range(3):
        batch = stage.next_batch(0, stage_generator(seed, 1, 0))["batch"]
        skipped += batch.pixels.shape[0] - len(torch.unique(batch.vae_src))
        with torch.no_grad():
            full = module.losses(batch, *module.encode_images(batch.pixels))
            part = module.losses(batch, *module.encode_images(batch.pixels, batch.vae_src))
        for name in ("ntp", "flow", "sa"):
            assert torch.allclose(torch.as_tensor(getattr(part, name)), torch.as_tensor(getattr(full, name)),
                                  atol=1e-5), name
    assert skipped > 0


def test_packs_encode_only_the_images_shown_as_latents(pipeline: Path, slices: Path) -> None:
    """The unified module's latents of a pack's VAE spans equal the all-pixels encoding; images shown
    only as ViT views are not encoded (zero rows)."""
    recipe = recipe_with(VAE, {"name": "unified", "steps": 1}, extra=("data.understanding_only_prob=0.5",))
    stage = UnifiedStage(ctx_for(recipe, 1, slices, pipeline))
    module = stage.build_model()
    skipped = 0
    for seed in range(4):
        batch = stage.next_batch(0, stage_generator(seed, 1, 0))["batch"]
        full, vit_full = module.encode_images(batch.pixels)
        lat, vit = module.encode_images(batch.pixels, batch.vae_src)
        used = torch.unique(batch.vae_src)
        assert torch.equal(vit, vit_full)
        assert torch.allclose(lat[used], full[used], atol=1e-5)
        unused = [i for i in range(batch.pixels.shape[0]) if i not in set(used.tolist())]
        assert float(lat[unused].abs().sum()) == 0.0
        skipped += len(unused)
    assert skipped > 0
    # a pack of understanding-only samples still runs the encoder once (FSDP ranks stay in step)
    calls = []
    hook = module.vae.encoder.register_forward_hook(lambda *_: calls.append(1))
    lat, _ = module.encode_images(batch.pixels, batch.vae_src[:0])
    hook.remove()
    assert calls == [1] and lat.shape == full.shape and float(lat[1:].abs().sum()) == 0.0
