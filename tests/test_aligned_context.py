"""``model.aligned_context``: what reaches a noisy target through the aligned path, and what never does."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.modalities import MODALITIES
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.packing import PackedSequence

CFG = ModelConfig()
ON = replace(CFG, aligned_context="on")
GAIN = replace(ON, aligned_gain=10.0)  # the path's output ten times the projection's
DRAFT = replace(ON, aligned_draft=8)  # plus a draft network of width 8
RESID = replace(DRAFT, draft_residual=True)  # the flow runs to the residual from the draft
LATENT = replace(RESID, aligned_draft_resolution="latent")  # the draft's last layers on the latent grid
D = 16  # latent_patch_size**2 * vae.z_channels of the default config
GRID = (3, 2)
T1, T2, FLAIR = (MODALITIES.index(m) for m in ("t1", "t2", "flair"))


def _model(cfg: ModelConfig, seed: int = 0, trained: bool = True) -> UniBrainModel:
    torch.manual_seed(seed)
    m = UniBrainModel(cfg)
    if trained:  # move the zero-initialised heads so the paths carry signal
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "_moe_gen" in name or "llm2vae" in name or "aligned_context" in name:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def _lat(seed: int) -> torch.Tensor:
    return torch.randn(6, D, generator=torch.Generator().manual_seed(seed))


def _pack(m: UniBrainModel, lat: dict[str, torch.Tensor]) -> PackedSequence:
    """Sample 0: [t1 clean, text, noisy t2, t2 clean (its ground truth), flair clean (later)];
    sample 1: [flair clean, text, noisy t1]."""
    b = m.builder(image_markers=(1, 2))
    b.add_vae_image(GRID, latents=lat["a_t1"], modality=T1)
    b.add_text([5, 6, 7])
    b.add_vae_image(GRID, noisy=True, timestep=0.5, latents=lat["a_noise"], modality=T2)
    b.add_vae_image(GRID, latents=lat["a_t2"], modality=T2)
    b.add_vae_image(GRID, latents=lat["a_flair"], modality=FLAIR)
    b.next_sample()
    b.add_vae_image(GRID, latents=lat["b_flair"], modality=FLAIR)
    b.add_text([8, 9])
    b.add_vae_image(GRID, noisy=True, timestep=0.3, latents=lat["b_noise"], modality=T1)
    return b.build()


LATS = {k: _lat(i) for i, k in enumerate(["a_t1", "a_noise", "a_t2", "a_flair", "b_flair", "b_noise"])}


def _velocity(m: UniBrainModel, lat: dict[str, torch.Tensor]) -> torch.Tensor:
    out = m(_pack(m, lat), logits_at="none", velocity_at="noisy")
    assert out.velocity is not None
    return out.velocity  # [12, D]: sample 0's target rows, then sample 1's


def _packed_t1_then_t2_velocity(m: UniBrainModel) -> torch.Tensor:
    """Velocity of a noisy T2 after a clean T1 and text, all in one pack (the uncached reference)."""
    full = m.builder(image_markers=(1, 2))
    full.add_vae_image(GRID, latents=LATS["a_t1"], modality=T1)
    full.add_text([5, 6, 7])
    full.add_vae_image(GRID, noisy=True, timestep=0.5, latents=LATS["a_noise"], modality=T2)
    return m(full.build(), logits_at="none", velocity_at="noisy").velocity


def test_stack_holds_exactly_the_earlier_images_of_the_same_sample():
    m = _model(ON)
    assert m.aligned_context is not None
    stack = m.aligned_context.stack(_pack(m, LATS))
    w = D + 1
    a, b = stack[:6], stack[6:]
    assert torch.equal(a[:, T1 * w: T1 * w + D], LATS["a_t1"]) and bool((a[:, T1 * w + D] == 1).all())
    assert torch.equal(b[:, FLAIR * w: FLAIR * w + D], LATS["b_flair"]) and bool((b[:, FLAIR * w + D] == 1).all())
    a_other = torch.cat([a[:, :T1 * w], a[:, (T1 + 1) * w:]], dim=1)
    b_other = torch.cat([b[:, :FLAIR * w], b[:, (FLAIR + 1) * w:]], dim=1)
    assert not a_other.any() and not b_other.any()  # own slot, later images, other sample: empty


@pytest.mark.parametrize("cfg", [ON, GAIN, DRAFT, RESID, LATENT], ids=["gain1", "gain10", "draft", "residual", "latent"])
def test_an_earlier_context_image_changes_the_target_through_the_aligned_path(cfg):
    on = _model(cfg)
    changed = {**LATS, "a_t1": LATS["a_t1"] + 1.0}
    assert not torch.allclose(_velocity(on, LATS)[:6], _velocity(on, changed)[:6])
    # the aligned path alone: same weights with the path's output removed
    off = _model(cfg)
    off.set_aligned_context("off")
    off.config = CFG
    delta_on = _velocity(on, changed)[:6] - _velocity(on, LATS)[:6]
    delta_off = _velocity(off, changed)[:6] - _velocity(off, LATS)[:6]
    assert not torch.allclose(delta_on, delta_off, atol=1e-6)


@pytest.mark.parametrize("cfg", [ON, GAIN, DRAFT, RESID, LATENT], ids=["gain1", "gain10", "draft", "residual", "latent"])
def test_own_ground_truth_later_images_and_other_samples_never_reach_the_target(cfg):
    m = _model(cfg)
    base = _velocity(m, LATS)
    for key in ("a_t2", "a_flair", "b_flair"):
        moved = _velocity(m, {**LATS, key: LATS[key] * -3.0 + 2.0})
        assert torch.equal(moved[:6], base[:6]), key  # sample 0's target never sees them
    moved = _velocity(m, {**LATS, "a_t1": LATS["a_t1"] + 1.0})
    assert torch.equal(moved[6:], base[6:])  # nor does sample 1's see sample 0's input


def test_off_is_bit_identical_and_on_starts_as_off():
    torch.manual_seed(0)
    off = UniBrainModel(CFG).eval()
    torch.manual_seed(0)
    on = UniBrainModel(ON).eval()
    # same seed, same weights for everything BAGEL has; the aligned tensors start at zero
    on_state = on.state_dict()
    for k, v in off.state_dict().items():
        assert torch.equal(v, on_state[k]), k
    assert set(on_state) - set(off.state_dict()) == {"aligned_context.weight", "aligned_context.bias"}
    with torch.no_grad():
        for name, p in off.named_parameters():
            if "_moe_gen" in name or "llm2vae" in name:
                p.add_(0.05)
        on.load_state_dict({**off.state_dict(), "aligned_context.weight": on.aligned_context.weight,
                            "aligned_context.bias": on.aligned_context.bias})
    assert torch.equal(_velocity(off, LATS), _velocity(on, LATS))
    # switching it on after loading (a BAGEL folder) adds zeros: outputs unchanged
    off.set_aligned_context("on")
    assert off.aligned_context is not None and not off.aligned_context.weight.any()
    assert torch.equal(_velocity(off, LATS), _velocity(on, LATS))


@pytest.mark.parametrize("cfg", [ON, GAIN, DRAFT, RESID, LATENT], ids=["gain1", "gain10", "draft", "residual", "latent"])
def test_cached_query_sees_the_cached_images_and_equals_the_packed_forward(cfg):
    m = _model(cfg)
    v_full = _packed_t1_then_t2_velocity(m)

    cache = m.new_cache()
    ctx = m.builder(image_markers=(1, 2))
    ctx.add_vae_image(GRID, latents=LATS["a_t1"], modality=T1)
    ctx.add_text([5, 6, 7])
    m.prefill(cache, ctx.build())
    assert [(s, g) for s, g, _ in cache.images] == [(T1, GRID)]
    q = m.builder(image_markers=(1, 2))
    q.add_vae_image(GRID, noisy=True, timestep=0.5, latents=LATS["a_noise"], modality=T2)
    v_cached = m.predict_velocity(cache, q.build())
    torch.testing.assert_close(v_cached, v_full, rtol=1e-5, atol=1e-5)
    # the image-free (guidance) context has empty slots, and snapshots restore the slots
    snap = cache.snapshot()
    empty = m.new_cache()
    empty.restore(snap)
    assert len(empty.images) == 1
    bare = m.new_cache()
    t = m.builder(image_markers=(1, 2))
    t.add_text([5, 6, 7])
    m.prefill(bare, t.build())
    assert bare.images == ()


def test_window_stacks_each_positions_neighbourhood_zero_beyond_the_grid():
    """aligned_window = 3 on a 3x2 grid: slot features = the 3x3 neighbours of (row, col) in
    row-major offset order, zeros outside the grid, then the presence bit (checked by hand)."""
    m = _model(replace(ON, aligned_window=3))
    assert m.aligned_context is not None and m.aligned_context.slot_width == 9 * D + 1
    stack = m.aligned_context.stack(_pack(m, LATS))
    w = 9 * D + 1
    ctx = LATS["a_t1"].reshape(3, 2, D)
    for r in range(3):
        for c in range(2):
            row = stack[r * 2 + c, T1 * w: (T1 + 1) * w]
            for k, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                rr, cc = r + dy, c + dx
                want = ctx[rr, cc] if 0 <= rr < 3 and 0 <= cc < 2 else torch.zeros(D)
                assert torch.equal(row[k * D:(k + 1) * D], want), (r, c, dy, dx)
            assert row[-1] == 1
    # window 1 keeps the same-position layout of the trained `on` models
    one = _model(ON).aligned_context.stack(_pack(_model(ON), LATS))
    centre = stack.view(12, len(MODALITIES), w)[:, :, 4 * D:5 * D]
    torch.testing.assert_close(one.view(12, len(MODALITIES), D + 1)[:, :, :D], centre)


def test_window_must_be_odd():
    from unibrain_cli.config.validate import validate_model_config

    with pytest.raises(ValueError, match="aligned_window"):
        validate_model_config(replace(ON, aligned_window=2))


def test_an_untrained_path_takes_the_recipes_layout_and_a_trained_one_is_kept_or_refused():
    """After ``sa`` (which never trains the aligned path) a run may change its window or gain; a
    trained path of another layout would lose or rescale its weights, so it is refused."""
    torch.manual_seed(0)
    m = UniBrainModel(ON).eval()
    base = _velocity(m, LATS)
    m.set_aligned_context("on", window=3, gain=10.0)
    assert m.aligned_context is not None and (m.aligned_context.window, m.aligned_context.gain) == (3, 10.0)
    assert torch.equal(_velocity(m, LATS), base)  # still zero-initialised: same outputs
    trained = _model(ON)
    kept = trained.aligned_context
    trained.set_aligned_context("on", window=1, gain=1.0)
    assert trained.aligned_context is kept
    with pytest.raises(ValueError, match="is trained"):
        trained.set_aligned_context("on", window=3, gain=1.0)


def test_gain_scales_the_paths_output_and_is_part_of_its_layout():
    """aligned_gain k: the path's output is k times the projection's (so the velocity equals a gain-1
    model's whose projection is k times larger); a trained path keeps its gain."""
    m1 = _model(ON)
    m10 = _model(replace(ON, aligned_gain=10.0))
    assert m10.aligned_context is not None and m10.aligned_context.gain == 10.0
    pack = _pack(m1, LATS)
    torch.testing.assert_close(m10.aligned_context(pack), 10 * m1.aligned_context(pack))
    with torch.no_grad():
        m1.aligned_context.weight.mul_(10)
        m1.aligned_context.bias.mul_(10)
    torch.testing.assert_close(_velocity(m10, LATS), _velocity(m1, LATS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="is trained"):
        m10.set_aligned_context("on", window=1, gain=1.0)
    from unibrain_cli.config.validate import validate_model_config

    with pytest.raises(ValueError, match="aligned_gain"):
        validate_model_config(replace(ON, aligned_gain=0.0))


def test_adopting_a_trained_path_of_another_gain_is_one_user_error():
    """A run whose recipe changes the gain of a trained path (e.g. resuming ``dhs`` with another
    ``model.aligned_gain``) stops with one line saying which knobs to keep; an untrained one adopts it."""
    from unibrain_cli.errors import UserError
    from unibrain_cli.training.model_init import adopt_config

    with pytest.raises(UserError, match="aligned_gain"):
        adopt_config(_model(ON), GAIN)
    fresh = adopt_config(_model(ON, trained=False), GAIN)
    assert fresh.aligned_context is not None and fresh.aligned_context.gain == 10.0 and fresh.config == GAIN


def test_a_draft_starts_as_the_plain_path_and_draws_nothing_from_the_global_rng():
    torch.manual_seed(0)
    on = UniBrainModel(ON).eval()
    after_on = torch.rand(3)
    torch.manual_seed(0)
    drafted = UniBrainModel(DRAFT).eval()
    assert torch.equal(torch.rand(3), after_on)
    a, b = on.state_dict(), drafted.state_dict()
    assert {k for k in b if k not in a} == {k for k in b if k.startswith("aligned_context.draft.")}
    for k, v in a.items():
        if k != "aligned_context.weight":
            assert torch.equal(v, b[k]), k
    assert drafted.aligned_context.weight.shape[1] == a["aligned_context.weight"].shape[1] + D
    assert torch.equal(_velocity(on, LATS), _velocity(drafted, LATS))  # zero projection: the draft is not read


def test_the_projection_reads_each_targets_stack_and_its_draft():
    m = _model(DRAFT)
    aligned = m.aligned_context
    assert aligned is not None and aligned.draft is not None and aligned.draft_width == 8
    pack = _pack(m, LATS)
    stack, spans = aligned.stack_spans(pack)
    assert [(r, n, tuple(g), mod) for r, n, g, mod in spans] == [(0, 6, GRID, T2), (6, 6, GRID, T1)]
    rows = aligned.draft_rows(stack, spans)
    with torch.no_grad():
        want_a = aligned.draft(stack[:6][None], GRID, torch.tensor([T2]))[0]
        want_b = aligned.draft(stack[6:][None], GRID, torch.tensor([T1]))[0]
        torch.testing.assert_close(rows, torch.cat([want_a, want_b]))
        torch.testing.assert_close(aligned(pack), F.linear(torch.cat([stack, rows], 1), aligned.weight, aligned.bias))
    # the target slot is an input: the same stack drafts another image for another target
    with torch.no_grad():
        assert not torch.allclose(want_a, aligned.draft(stack[:6][None], GRID, torch.tensor([FLAIR]))[0])


def test_a_draft_is_part_of_the_paths_layout_and_needs_the_same_position_path():
    from unibrain_cli.config.validate import validate_model_config

    torch.manual_seed(0)
    m = UniBrainModel(ON).eval()
    m.set_aligned_context("on", draft=8)  # an untrained path (after sa) takes the run's draft
    assert m.aligned_context is not None and m.aligned_context.draft_width == 8
    with pytest.raises(ValueError, match="is trained"):
        _model(ON).set_aligned_context("on", draft=8)
    with pytest.raises(ValueError, match="aligned_draft"):
        validate_model_config(replace(CFG, aligned_draft=8))
    with pytest.raises(ValueError, match="aligned_draft"):
        validate_model_config(replace(ON, aligned_window=3, aligned_draft=8))


def test_a_recipe_with_a_draft_needs_draft_pairs():
    from unibrain_cli.config import load_recipe
    from unibrain_cli.config.loader import RecipeError

    with pytest.raises(RecipeError, match="draft_pairs"):
        load_recipe("tiny", ["model.aligned_context=on", "model.aligned_draft=8"])
    ok = load_recipe("tiny", ["model.aligned_context=on", "model.aligned_draft=8", "data.draft_pairs=4"])
    assert ok.model.aligned_draft == 8 and ok.data.draft_pairs == 4


def test_the_optimizer_trains_the_draft_at_its_own_learning_rate():
    from unibrain_cli.config.components import StageConfig
    from unibrain_cli.training.trainer import build_optimizer

    m = _model(DRAFT)
    opt = build_optimizer(m, StageConfig(lr=1e-3), (0.9, 0.95))
    draft = {id(p) for p in m.aligned_context.draft.parameters()}
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert len(lrs) == sum(1 for _ in m.parameters())
    assert all(lrs[i] == pytest.approx(3e-3) for i in draft)
    assert all(v == pytest.approx(1e-3) for i, v in lrs.items() if i not in draft)
    plain = build_optimizer(_model(ON), StageConfig(lr=1e-3), (0.9, 0.95))
    assert len(plain.param_groups) == 2  # models without a draft keep the two usual groups


def test_a_residual_flow_is_the_plain_flow_shifted_by_the_draft():
    """v_res(x_t) = v(x_t - (1 - t) d) - d with the same weights, d the target's detached draft:
    the network runs the straight path from noise to x0 - d, the caller still sees x-space."""
    resid = _model(RESID)
    plain = _model(DRAFT)
    plain.load_state_dict(resid.state_dict())
    pack = _pack(resid, LATS)
    _, d = resid.aligned_context.with_draft(pack)
    assert d is not None and d.shape == (12, D) and not d.requires_grad
    t = torch.tensor([0.5] * 6 + [0.3] * 6)[:, None]
    shifted = {**LATS, "a_noise": LATS["a_noise"] - (1 - t[:6]) * d[:6], "b_noise": LATS["b_noise"] - (1 - t[6:]) * d[6:]}
    torch.testing.assert_close(_velocity(resid, LATS), _velocity(plain, shifted) - d)
    # all VAE rows asked: the clean rows' outputs are untouched, the noisy ones shifted alike
    v_all = resid(pack, logits_at="none", velocity_at="vae").velocity
    p_all = plain(_pack(plain, shifted), logits_at="none", velocity_at="vae").velocity
    noisy = pack.noisy_vae_rows
    clean = torch.ones(len(v_all), dtype=torch.bool)
    clean[noisy] = False
    torch.testing.assert_close(v_all[noisy], p_all[noisy] - d)
    torch.testing.assert_close(v_all[clean], p_all[clean])


def test_an_untrained_residual_head_estimates_the_draft_itself():
    """A zero velocity head (llm2vae at init) under a residual flow gives v = -d for every target:
    the Euler sampler then moves each step by +dt * d, so a whole path from t = 1 to 0 adds the draft
    to the noise it started from."""
    torch.manual_seed(0)
    m = _model(RESID)
    with torch.no_grad():
        m.llm2vae.weight.zero_()
        m.llm2vae.bias.zero_()
    _, d = m.aligned_context.with_draft(_pack(m, LATS))
    torch.testing.assert_close(_velocity(m, LATS), -d)


def test_a_batched_residual_query_equals_the_packed_forward():
    from unibrain_cli.model.batch_cache import BatchKVCache

    m = _model(RESID)
    v_full = _packed_t1_then_t2_velocity(m)
    batch = BatchKVCache(m.num_layers, 2)
    for r in range(2):
        ctx = m.builder(image_markers=(1, 2))
        ctx.add_vae_image(GRID, latents=LATS["a_t1"] if r else LATS["b_flair"], modality=T1 if r else FLAIR)
        ctx.add_text([5, 6, 7])
        m.forward_batch(ctx.build(), batch, [r], update=True, logits_at="none")
    q = m.builder(image_markers=(1, 2))
    q.add_vae_image(GRID, noisy=True, timestep=0.5, latents=LATS["a_noise"], modality=T2)
    v = m.forward_batch(q.build(), batch, [1], update=False, logits_at="none", velocity_at="noisy").velocity
    torch.testing.assert_close(v, v_full, rtol=1e-5, atol=1e-5)


def test_a_residual_flow_needs_a_draft():
    from unibrain_cli.config.validate import validate_model_config

    with pytest.raises(ValueError, match="draft_residual"):
        validate_model_config(replace(ON, draft_residual=True))
    validate_model_config(RESID)


def test_a_latent_resolution_draft_is_convolutions_on_the_unpatchified_latents():
    """The reference written with the package's own (un)patchify: token-grid trunk, pixel shuffle,
    the slots' unpatchified latents + presence bits + one-hot upsampled, three convolutions, re-patched."""
    from unibrain_cli.model.aligned import AlignedDraft
    from unibrain_cli.model.embeddings import patchify_latent, unpatchify_latent

    s, d, p, width, grid = len(MODALITIES), D, 2, 8, (3, 2)
    net = AlignedDraft(s, d, width, "latent", patch=p)
    assert len(net.convs) == 5 and net.convs[-1].out_channels == d // (p * p)
    g = torch.Generator().manual_seed(7)
    stack = torch.randn(2, 6, s * (d + 1), generator=g)
    stack.view(2, 6, s, d + 1)[..., d] = (torch.rand(2, 1, s, generator=g) > 0.5).float()
    slots = torch.tensor([T2, -1])
    got = net(stack, grid, slots)
    assert got.shape == (2, 6, d)
    z = d // (p * p)
    with torch.no_grad():
        for i in range(2):
            onehot = torch.zeros(s)
            if slots[i] >= 0:
                onehot[slots[i]] = 1.0
            x = torch.cat([stack[i], onehot.expand(6, s)], 1).t().reshape(1, -1, *grid)
            h = F.pixel_shuffle(F.silu(net.convs[1](F.silu(net.convs[0](x)))), p)
            held = stack[i].view(6, s, d + 1)
            lat = torch.cat([unpatchify_latent(held[:, k, :d], z, grid[0] * p, grid[1] * p, p) for k in range(s)])
            bits = torch.cat([held[:, :, d], onehot.expand(6, s)], 1).t().reshape(-1, *grid)
            bits = F.interpolate(bits[None], scale_factor=p, mode="nearest")
            y = torch.cat([h, lat[None], bits], 1)
            y = net.convs[4](F.silu(net.convs[3](F.silu(net.convs[2](y)))))
            want, _ = patchify_latent(y[0], p, max_per_side=grid[0])
            torch.testing.assert_close(got[i], want)


def test_the_draft_computes_the_same_in_either_memory_format(monkeypatch):
    """Channels-last fine-grid convolutions (aligned.DRAFT_MEMORY_FORMAT, for speed) change the layout,
    not the function: outputs and every weight gradient match the contiguous run."""
    from unibrain_cli.model import aligned

    s, d, p, width, grid = len(MODALITIES), D, 2, 16, (4, 4)
    g = torch.Generator().manual_seed(3)
    stack = torch.randn(5, 16, s * (d + 1), generator=g)
    slots = torch.tensor([T2, -1, 0, 3, T2])
    runs = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        monkeypatch.setattr(aligned, "DRAFT_MEMORY_FORMAT", fmt)
        net = aligned.AlignedDraft(s, d, width, "latent", patch=p)
        out = net(stack, grid, slots)
        out.pow(2).sum().backward()
        runs.append((out.detach(), [c.weight.grad.clone() for c in net.convs]))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_draft_resolution_is_part_of_the_layout_and_validated():
    from unibrain_cli.config.validate import validate_model_config

    m = _model(LATENT)
    assert m.aligned_context.layout == (1, 1.0, 8, "latent")
    with pytest.raises(ValueError, match="tokens resolution"):
        m.set_aligned_context("on", draft=8, draft_resolution="tokens")  # trained: refused
    untrained = UniBrainModel(ON).eval()
    untrained.set_aligned_context("on", draft=8, draft_resolution="latent")
    assert untrained.aligned_context.draft_resolution == "latent"
    with pytest.raises(ValueError, match="aligned_draft_resolution"):
        validate_model_config(replace(LATENT, aligned_draft_resolution="pixels"))
    with pytest.raises(ValueError, match="multiple of"):
        validate_model_config(replace(LATENT, aligned_draft=6))
    validate_model_config(LATENT)
