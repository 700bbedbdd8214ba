"""The unified model: config checks, embedding, packed-vs-single, backends, speed, golden values."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from unibrain_cli.config.components import ModelConfig
from unibrain_cli.config.validate import validate_model_config
from unibrain_cli.model.attention import flex_available
from unibrain_cli.model.bagel import UniBrainModel
from unibrain_cli.model.packing import PackedSequence

CFG = ModelConfig()
PATCH_DIM = CFG.vit.patch_size**2 * CFG.vit.num_channels


def _model(seed: int = 0) -> UniBrainModel:
    torch.manual_seed(seed)
    m = UniBrainModel(CFG)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "_moe_gen" in name or "llm2vae" in name:
                p.add_(torch.randn_like(p) * 0.05)
    return m


def _add_sample(b, g: torch.Generator, n_text: int = 5) -> None:  # noqa: ANN001
    b.add_text(torch.randint(3, 1000, (n_text,), generator=g).tolist())
    b.add_vae_image((2, 3), latents=torch.randn(6, 16, generator=g))
    b.add_vit_image((2, 2), patches=torch.randn(4, PATCH_DIM, generator=g))
    b.add_text(torch.randint(3, 1000, (3,), generator=g).tolist())
    b.add_vae_image((3, 2), noisy=True, timestep=0.4, latents=torch.randn(6, 16, generator=g))
    b.add_vae_image((3, 2), latents=torch.randn(6, 16, generator=g))
    b.add_text(torch.randint(3, 1000, (4,), generator=g).tolist(), loss=True)


def _pack(m: UniBrainModel, n_samples: int, seed: int = 0) -> PackedSequence:
    g = torch.Generator().manual_seed(seed)
    b = m.builder(image_markers=(1, 2))
    for i in range(n_samples):
        _add_sample(b, g, n_text=4 + i)
        b.next_sample()
    return b.build()


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (replace(CFG, llm=replace(CFG.llm, num_heads=3)), "llm.num_heads=3 does not divide llm.hidden_size"),
        (replace(CFG, llm=replace(CFG.llm, head_dim=16)), "llm.head_dim=16"),
        (replace(CFG, llm=replace(CFG.llm, num_kv_heads=3)), "llm.num_kv_heads=3"),
        (replace(CFG, max_latent_size=4), "max_latent_size=4"),
        (replace(CFG, vit_max_num_patch_per_side=8), "vit_max_num_patch_per_side=8"),
        (replace(CFG, attention_backend="magic"), "attention_backend"),
    ],
)
def test_invalid_config_names_the_field(cfg: ModelConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        validate_model_config(cfg)
    with pytest.raises(ValueError, match=field):
        UniBrainModel(cfg)


def test_fresh_model_layout() -> None:
    m = UniBrainModel(CFG)
    sd = m.state_dict()
    assert not any("pos_embed" in k for k in sd)  # recomputed tables are not saved
    assert {"vit_model.vision_model.post_layernorm.weight", "connector.fc1.weight", "vae2llm.weight",
            "llm2vae.bias", "time_embedder.mlp.2.weight", "language_model.lm_head.weight"} <= set(sd)
    assert not sd["llm2vae.weight"].any() and not sd["llm2vae.bias"].any()
    assert torch.equal(sd["language_model.model.layers.0.mlp_moe_gen.up_proj.weight"],
                       sd["language_model.model.layers.0.mlp.up_proj.weight"])
    assert m.latent_pos_embed.pos_embed.shape == (CFG.max_latent_size**2, CFG.llm.hidden_size)


def test_forward_outputs_and_tiny_speed() -> None:
    m = _model()
    p = _pack(m, 4)
    m(p).logits.sum().backward()  # warm-up
    m.zero_grad()
    t0 = time.perf_counter()
    out = m(p)
    loss = torch.nn.functional.cross_entropy(out.logits, p.ce_labels) + out.velocity.square().mean()
    loss.backward()
    elapsed = time.perf_counter() - t0
    assert out.logits.shape == (p.ce_indexes.numel(), CFG.llm.vocab_size)
    assert out.velocity.shape == (int(p.vae_noisy.sum()), 16)
    assert torch.equal(out.velocity_rows, p.noisy_vae_rows)
    assert m.vit_model.vision_model.embeddings.patch_embedding.weight.grad is not None
    assert m.time_embedder.mlp[0].weight.grad is not None
    assert elapsed < 1.0, f"tiny forward+backward took {elapsed:.2f}s"


def test_packed_batch_equals_samples_one_by_one() -> None:
    m = _model().eval()
    p = _pack(m, 3)
    with torch.no_grad():
        packed = m(p, logits_at="text", velocity_at="vae")
        g = torch.Generator().manual_seed(0)
        rows_logits, rows_vel = [], []
        for i in range(3):
            b = m.builder(image_markers=(1, 2))
            _add_sample(b, g, n_text=4 + i)
            single = m(b.build(), logits_at="text", velocity_at="vae")
            rows_logits.append(single.logits)
            rows_vel.append(single.velocity)
    torch.testing.assert_close(packed.logits, torch.cat(rows_logits), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.velocity, torch.cat(rows_vel), atol=1e-5, rtol=1e-5)


def test_attention_backends_agree_on_the_model() -> None:
    m = _model().eval()
    p = _pack(m, 2)
    with torch.no_grad():
        ref = m(p, logits_at="text", velocity_at="vae", backend="dense")
        backends = ["sdpa"] + (["flex"] if flex_available() else [])
        for backend in backends:
            out = m(p, logits_at="text", velocity_at="vae", backend=backend)
            torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=1e-4, msg=backend)
            torch.testing.assert_close(out.velocity, ref.velocity, atol=1e-4, rtol=1e-4, msg=backend)


def test_inputs_reach_the_right_outputs() -> None:
    m = _model().eval()
    p = _pack(m, 1)
    with torch.no_grad():
        base = m(p, logits_at="loss", velocity_at="noisy")
        later = m(p.with_vae_timesteps(p.vae_timesteps * 0.5), logits_at="loss", velocity_at="noisy")
    assert not torch.allclose(base.velocity, later.velocity)  # time embedding matters
    torch.testing.assert_close(base.logits, later.logits)  # only the noisy image's t changed
    with pytest.raises(ValueError, match="no vae_latents"):
        b = m.builder()
        b.add_vae_image((1, 1))
        m(b.build())


def test_golden_values() -> None:
    torch.manual_seed(1234)
    m = UniBrainModel(CFG).eval()
    with torch.no_grad():
        for p in m.llm2vae.parameters():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(7))
        out = m(_pack(m, 2, seed=5), logits_at="loss", velocity_at="noisy")
    logits = out.logits[:2, :4].flatten().tolist()
    velocity = out.velocity[:2, :3].flatten().tolist()
    torch.testing.assert_close(torch.tensor(logits), torch.tensor(GOLDEN_LOGITS), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(torch.tensor(velocity), torch.tensor(GOLDEN_VELOCITY), atol=1e-4, rtol=1e-3)


# Computed once from this seeded setup (torch 2.13 CPU, float32); a change means the model's maths,
# its init order or the packing changed.
GOLDEN_LOGITS = [-0.14234, 0.162119, -0.038025, -0.364464, -0.299237, 0.207207, -0.241749, -0.162221]
GOLDEN_VELOCITY = [0.05683, 0.24039, -0.246715, -0.019916, -0.295503, -0.115183]


# -- 2D image RoPE (model.image_rope = "2d") ------------------------------------------------------

CFG_2D = replace(CFG, image_rope="2d")


def _pair(cfg: ModelConfig) -> tuple[UniBrainModel, UniBrainModel]:
    """The same weights with 1D (BAGEL) and 2D image RoPE."""
    m1 = _model()
    m2 = UniBrainModel(cfg)
    m2.load_state_dict(m1.state_dict())
    return m1.eval(), m2.eval()


def test_2d_image_rope_leaves_text_alone_and_changes_images() -> None:
    m1, m2 = _pair(CFG_2D)
    b = m1.builder()
    b.add_text([5, 6, 7, 8])
    text_only = b.build()
    p = _pack(m1, 2)
    with torch.no_grad():
        torch.testing.assert_close(m2(text_only, logits_at="all").logits, m1(text_only, logits_at="all").logits)
        h1, h2 = m1(p, logits_at="none").hidden, m2(p, logits_at="none").hidden
    first_image = int(p.vae_indexes[0]) - 1  # the image's start marker shares its (full) split
    torch.testing.assert_close(h2[:first_image], h1[:first_image])  # text before any image: exact 1D RoPE
    assert (h2[first_image:] - h1[first_image:]).abs().max() > 1e-3


def test_image_grid_coordinates() -> None:
    m = UniBrainModel(CFG_2D)
    p = _pack(m, 1)
    grid = m.image_grid(p)
    assert grid.shape == (p.length, 2)
    assert torch.isnan(grid[p.text_indexes]).all()
    vae0 = grid[p.vae_indexes[:6]]  # the first latent image, grid (2, 3), row-major
    torch.testing.assert_close(vae0, torch.tensor([[0.25, 1 / 6], [0.25, 0.5], [0.25, 5 / 6],
                                                    [0.75, 1 / 6], [0.75, 0.5], [0.75, 5 / 6]]))
    vit = grid[p.vit_indexes]  # ViT grid (2, 2)
    torch.testing.assert_close(vit, torch.tensor([[0.25, 0.25], [0.25, 0.75], [0.75, 0.25], [0.75, 0.75]]))
    assert UniBrainModel(CFG).image_grid(p) is None


def test_2d_rope_aligns_position_matched_tokens_of_two_images() -> None:
    """The 2D slots of a query at (r, c) of one image and a key at (r, c) of another image have
    zero relative angle whatever the images' 1D positions; other grid cells do not."""
    m = UniBrainModel(CFG_2D)
    b = m.builder()
    b.add_vae_image((3, 3), latents=torch.zeros(9, 16))
    b.add_text([4, 5, 6, 7, 8])
    b.add_vae_image((3, 3), noisy=True, timestep=0.5, latents=torch.zeros(9, 16))
    p = b.build()
    rot = m.language_model.model.rotary_emb
    cos, sin = rot(p.position_ids, torch.float32, m.image_grid(p))
    angle = torch.atan2(sin, cos)
    k = CFG.llm.head_dim // 2
    slots = torch.arange(k - 2 * (CFG.llm.head_dim // 16), k)
    a, q = angle[p.vae_indexes[:9]][:, slots], angle[p.vae_indexes[9:]][:, slots]
    torch.testing.assert_close(q, a)  # same cell -> same 2D angles
    assert not torch.allclose(q[0], a[1])
    assert not torch.allclose(angle[p.vae_indexes[9:]][:, :4], angle[p.vae_indexes[:9]][:, :4])  # 1D part differs


def test_2d_rope_cache_matches_full_forward() -> None:
    _, m = _pair(CFG_2D)
    g = torch.Generator().manual_seed(3)
    z_in, z_noisy = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    b = m.builder()
    b.add_text([3, 4, 5])
    b.add_vae_image((2, 3), latents=z_in)
    b.add_text([6, 7])
    b.add_vae_image((2, 3), noisy=True, timestep=0.5, latents=z_noisy)
    with torch.no_grad():
        full = m(b.build(), logits_at="none", velocity_at="noisy").velocity
        cache = m.new_cache()
        for add in (lambda x: x.add_text([3, 4, 5]), lambda x: x.add_vae_image((2, 3), latents=z_in),
                    lambda x: x.add_text([6, 7])):
            blk = m.builder()
            add(blk)
            m.prefill(cache, blk.build())
        blk = m.builder()
        blk.add_vae_image((2, 3), noisy=True, timestep=0.5, latents=z_noisy)
        cached = m.predict_velocity(cache, blk.build())
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-4)


def test_image_rope_is_validated() -> None:
    with pytest.raises(ValueError, match="image_rope"):
        validate_model_config(replace(CFG, image_rope="3d"))
