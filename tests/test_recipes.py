"""Strict recipe loading: round trips, unknown keys, wrong types, overrides, cross-field checks."""

from __future__ import annotations

from dataclasses import replace

import pytest
import tomllib

from unibrain_cli.config import (
    Recipe,
    RecipeError,
    dumps_toml,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
    save_resolved,
)
from unibrain_cli.config.components import StageConfig


@pytest.mark.parametrize("name", ["tiny", "small", "bagel-7b"])
def test_shipped_recipes_round_trip(name, tmp_path):
    recipe = load_recipe(f"recipes/{name}.toml")
    assert recipe.name == name
    path = save_resolved(recipe, tmp_path)
    assert load_recipe(path) == recipe
    assert recipe_from_dict(tomllib.loads(dumps_toml(recipe_to_dict(recipe)))) == recipe


def test_bagel_recipe_has_the_paper_shapes_and_schedule():
    r = load_recipe("bagel-7b")
    llm = r.model.llm
    assert (llm.hidden_size, llm.intermediate_size, llm.num_layers, llm.num_heads, llm.num_kv_heads,
            llm.head_dim, llm.vocab_size) == (3584, 18944, 28, 28, 4, 128, 152064)
    assert (r.model.vit.patch_size, r.model.vit.hidden_size, r.model.vit.num_layers) == (14, 1152, 26)
    assert (r.model.vae.ch, r.model.vae.ch_mult, r.model.vae.z_channels) == (128, (1, 2, 4, 4), 16)
    stages = {s.name: (s.steps, s.lr) for s in r.train.stages}
    assert stages == {"sa": (2000, 4e-5), "unified": (2000, 2e-5), "dhs": (200, 2e-5)}
    assert r.data.pack_tokens == 13408


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_unknown_nested_key_names_dotted_path_and_file(tmp_path):
    p = write(tmp_path, "[model.llm]\nhiden_size = 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(p)
    assert "model.llm.hiden_size" in str(err.value) and str(p) in str(err.value)


def test_unknown_key_inside_stage_list(tmp_path):
    p = write(tmp_path, "[[train.stages]]\nname = 'sa'\nstep = 3\n")
    with pytest.raises(RecipeError, match=r"train\.stages\[0\]\.step"):
        load_recipe(p)


@pytest.mark.parametrize(
    "text, path, expected",
    [
        ("[model.llm]\nhidden_size = 'x'\n", "model.llm.hidden_size", "integer"),
        ("[model.llm]\nhidden_size = 1.5\n", "model.llm.hidden_size", "integer"),
        ("[model.llm]\nqk_norm = 1\n", "model.llm.qk_norm", "true or false"),
        ("[model]\nattention_backend = 'cuda'\n", "model.attention_backend", "'sdpa'"),
        ("[model.vae]\nch_mult = 3\n", "model.vae.ch_mult", "array"),
        ("[flow]\ncfg_interval = [0.1]\n", "flow.cfg_interval", "2 items"),
        ("model = 3\n", "model", "table"),
    ],
)
def test_wrong_types_are_refused(tmp_path, text, path, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe(write(tmp_path, text))
    assert f"'{path}'" in str(err.value) and expected in str(err.value)


def test_ints_are_accepted_for_floats(tmp_path):
    r = load_recipe(write(tmp_path, "[flow]\nsample_timestep_shift = 2\n"))
    assert r.flow.sample_timestep_shift == 2.0 and isinstance(r.flow.sample_timestep_shift, float)


def test_overrides_apply_with_toml_typing():
    r = load_recipe("tiny", ["train.seed=7", "model.llm.num_layers=3", "flow.cfg_interval=[0.2, 0.9]",
                             "model.attention_backend=flex", "train.stages.1.lr=0.5"])
    assert r.train.seed == 7 and r.model.llm.num_layers == 3
    assert r.flow.cfg_interval == (0.2, 0.9) and r.model.attention_backend == "flex"
    assert r.train.stages[1].lr == 0.5


def test_override_errors_name_the_flag():
    with pytest.raises(RecipeError, match="--set"):
        load_recipe("tiny", ["train.seed"])
    with pytest.raises(RecipeError, match="train.stages.9"):
        load_recipe("tiny", ["train.stages.9.lr=1"])


def test_stage_order_is_checked(tmp_path):
    p = write(tmp_path, "[[train.stages]]\nname = 'dhs'\n[[train.stages]]\nname = 'sa'\n")
    with pytest.raises(RecipeError, match="train.stages"):
        load_recipe(p)


def test_inconsistent_model_shapes_name_the_field():
    with pytest.raises(RecipeError, match="model.llm.num_kv_heads"):
        load_recipe("tiny", ["model.llm.num_kv_heads=3"])
    with pytest.raises(RecipeError, match="model.max_latent_size"):
        load_recipe("tiny", ["data.image_size=256"])
    for name in ("canonical_order_prob", "understanding_flip_prob", "draft_flip_prob"):
        with pytest.raises(RecipeError, match=rf"'data\.{name}' must be a probability in \[0, 1\], got -0\.5"):
            load_recipe("tiny", [f"data.{name}=-0.5"])
    for item, message in (("understanding_rotate_deg=90", "below 90, got 90"),
                          ("understanding_shift_px=-1", "below 16, got -1"),
                          ("understanding_scale=0.5", "below 0.5, got 0.5")):
        with pytest.raises(RecipeError, match=rf"'data\.{item.split('=')[0]}' must be >= 0 and {message}"):
            load_recipe("small", [f"data.{item}"])


def test_defaults_are_frozen():
    r = Recipe()
    with pytest.raises(AttributeError):
        r.name = "x"  # type: ignore[misc]
    assert replace(r.train.stages[0], steps=3) == StageConfig(steps=3)


def test_ablation_recipes_match_small_except_the_stages():
    """Table 3 compares variants at the same model, data and transformer-stage budget as `small`; the
    variants that generate also get `small`'s draft stage (the understanding-only A never reads the draft), and
    every variant gets `small`'s understanding stage `und` (outside the budget, like the draft)."""
    small = load_recipe("small")
    extra = ("vae", "draft", "und")
    budget = sum(s.steps for s in small.train.stages if s.name not in extra)
    draft = next(s for s in small.train.stages if s.name == "draft")
    und = next(s for s in small.train.stages if s.name == "und")
    expected = {"A": ["vae", "unified", "und"], "B": ["vae", "draft", "unified", "und"],
                "C": ["vae", "sa", "draft", "unified", "und"]}
    for variant, names in expected.items():
        r = load_recipe(f"recipes/ablation-{variant}.toml")
        assert [s.name for s in r.train.stages] == names
        assert r.model == small.model and r.flow == small.flow
        assert replace(r.data, understanding_only_prob=small.data.understanding_only_prob) == small.data
        assert r.data.understanding_only_prob == (1.0 if variant == "A" else small.data.understanding_only_prob)
        assert sum(s.steps for s in r.train.stages if s.name not in extra) == budget
        assert r.train.stages[0] == small.train.stages[0] and r.train.stages[-1] == und
        assert all(s == draft for s in r.train.stages if s.name == "draft")


def test_the_benchmarks_previous_small_is_a_valid_recipe():
    """`make bench` (flow_signal_small) and the README's before/after rebuild the previous `small` as
    `small` + SMALL_BEFORE overrides: they must stay loadable as `small` gains knobs."""
    from unibrain_cli.training.bench import SMALL_BEFORE

    r = load_recipe("small", SMALL_BEFORE)
    assert r.model.aligned_context == "off" and r.model.aligned_draft == 0 and r.data.pack_tokens == 1280
    assert r.data.draft_flip_prob == 0.0 and r.train.stages[0].name == "vae" and r.train.stages[0].recon_loss == "l1"
    assert not r.model.draft_residual
