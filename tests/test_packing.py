"""Packed-sequence builder: positions, routing indexes, loss masks, mask metadata."""

from __future__ import annotations

import pytest
import torch

from unibrain_cli.model.attention import dense_mask
from unibrain_cli.model.packing import SequenceBuilder, TokenType, grid_position_ids


def _interleaved(markers: tuple[int, int] | None = (900, 901)) -> SequenceBuilder:
    b = SequenceBuilder(vit_side=8, latent_side=4, image_markers=markers)
    b.add_text([1, 2, 3])  # positions 0 1 2
    b.add_vae_image((2, 2), noisy=False)  # position 3
    b.add_vit_image((2, 3))  # position 4
    b.add_text([4, 5], loss=False)  # 5 6
    b.add_vae_image((2, 2), noisy=True, timestep=0.25)  # 7, no advance
    b.add_vae_image((2, 2), noisy=False)  # 7 again
    b.add_text([6, 7], loss=True)  # 8 9
    return b


def test_positions_follow_the_bagel_rules() -> None:
    p = _interleaved().build()
    expected = [0, 1, 2] + [3] * 6 + [4] * 8 + [5, 6] + [7] * 6 + [7] * 6 + [8, 9]
    assert p.position_ids.tolist() == expected
    assert p.split_modes == ["causal", "full", "full", "causal", "noise", "full", "causal"]
    assert p.split_lens == [3, 6, 8, 2, 6, 6, 2]
    assert p.sample_next_positions == [10]


def test_token_types_and_routing_indexes() -> None:
    p = _interleaved().build()
    types = p.token_types
    assert (types[p.text_indexes] == TokenType.TEXT).all()
    assert (types[p.vit_indexes] == TokenType.VIT).all()
    assert (types[p.vae_indexes] == TokenType.VAE).all()
    assert p.text_indexes.numel() + p.vit_indexes.numel() + p.vae_indexes.numel() == p.length
    # markers are text tokens inside the image splits, routed to the understanding expert
    assert p.text_ids.tolist().count(900) == 4 and p.text_ids.tolist().count(901) == 4
    und = set(p.und_indexes.tolist())
    assert und.isdisjoint(p.gen_indexes.tolist()) and len(und) + p.gen_indexes.numel() == p.length
    assert p.vit_seqlens == [6]
    assert p.vit_position_ids.tolist() == [0, 1, 2, 8, 9, 10]
    assert p.vae_position_ids.tolist()[:4] == [0, 1, 4, 5]


def test_flow_and_ntp_loss_masks() -> None:
    p = _interleaved().build()
    assert p.vae_noisy.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert p.vae_timesteps.tolist() == [0.0] * 4 + [0.25] * 4 + [0.0] * 4
    assert p.noisy_vae_rows.tolist() == [4, 5, 6, 7]
    # targets 6, 7 predicted from the clean image's end marker and from token 6
    n = p.length
    assert p.ce_indexes.tolist() == [n - 3, n - 2]
    assert p.ce_labels.tolist() == [6, 7]
    assert p.text_ids[p.text_indexes.tolist().index(n - 3)].item() == 901


def test_loss_text_after_unmarked_image_is_rejected() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    b.add_vae_image((1, 1))
    with pytest.raises(ValueError, match="predictor"):
        b.add_text([3], loss=True)
    b2 = SequenceBuilder(vit_side=8, latent_side=4, image_markers=(9, 10))
    b2.add_vae_image((1, 1), noisy=True, timestep=0.5)
    with pytest.raises(ValueError, match="noise split"):
        b2.add_text([3], loss=True)


def test_loss_text_opening_a_sample_drops_its_first_target() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    b.add_text([5, 6, 7], loss=True)
    p = b.build()
    assert p.ce_indexes.tolist() == [0, 1] and p.ce_labels.tolist() == [6, 7]


def test_samples_restart_positions_and_are_isolated() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    b.add_text([1, 2])
    b.add_vae_image((1, 2))
    b.next_sample()
    b.add_text([3, 4, 5])
    p = b.build()
    assert p.position_ids.tolist() == [0, 1, 2, 2, 0, 1, 2]
    assert p.sample_ids.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert p.sample_lens == [4, 3]
    m = dense_mask(p.mask_info())
    assert not m[4:, :4].any() and not m[:4, 4:].any()


def test_image_data_is_concatenated_and_checked() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    b.add_vae_image((1, 2), latents=torch.ones(2, 16))
    b.add_vae_image((1, 1), noisy=True, timestep=1.0, latents=torch.zeros(1, 16))
    p = b.build()
    assert p.vae_latents is not None and p.vae_latents.shape == (3, 16)
    with pytest.raises(ValueError, match="has 4 tokens"):
        b.add_vae_image((2, 2), latents=torch.ones(3, 16))
    with pytest.raises(ValueError, match="every image or for none"):
        b2 = SequenceBuilder(vit_side=8, latent_side=4)
        b2.add_vae_image((1, 1), latents=torch.ones(1, 16))
        b2.add_vae_image((1, 1))
        b2.build()


def test_builder_validation() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    with pytest.raises(ValueError, match="exceeds the position table side 4"):
        b.add_vae_image((5, 1))
    with pytest.raises(ValueError, match="needs its timestep"):
        b.add_vae_image((1, 1), noisy=True)
    with pytest.raises(ValueError, match="empty"):
        b.next_sample()
    with pytest.raises(ValueError, match="at least one token"):
        b.add_text([])
    assert grid_position_ids((2, 2), 5).tolist() == [0, 1, 5, 6]


def test_with_vae_latents_and_to() -> None:
    b = SequenceBuilder(vit_side=8, latent_side=4)
    b.add_vae_image((1, 2), noisy=True, timestep=0.5)
    p = b.build()
    q = p.with_vae_latents(torch.randn(2, 16)).to("cpu")
    assert q.vae_latents is not None and q.vae_latents.shape == (2, 16) and p.vae_latents is None
    with pytest.raises(ValueError, match="expected 2 latent tokens"):
        p.with_vae_latents(torch.randn(3, 16))
