"""Embedding blocks: sin-cos tables, timestep features, connector, latent patch tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unibrain_cli.model.embeddings import (
    MLPconnector,
    PositionEmbedding,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    patchify_latent,
    timestep_embedding,
    unpatchify_latent,
)


def test_sincos_table_layout_matches_mae_formula() -> None:
    dim, side = 16, 5
    table = get_2d_sincos_pos_embed(dim, side)
    assert table.shape == (side * side, dim) and table.dtype == np.float32
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    row, col = 3, 1
    expected = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(table[row * side + col], expected, rtol=1e-6, atol=1e-7)
    # position (0, 0): sin parts 0, cos parts 1
    np.testing.assert_array_equal(table[0], np.tile(np.r_[np.zeros(quarter), np.ones(quarter)], 2))


def test_position_embedding_is_not_persistent_and_indexes_table() -> None:
    pe = PositionEmbedding(4, 8)
    assert "pos_embed" not in pe.state_dict()
    ids = torch.tensor([0, 5, 15])
    out = pe(ids)
    table = torch.from_numpy(get_2d_sincos_pos_embed(8, 4))
    torch.testing.assert_close(out, table[ids])
    with torch.device("meta"):
        meta = PositionEmbedding(4, 8)
    meta = meta.to_empty(device="cpu")
    meta.reset_table()
    torch.testing.assert_close(meta.pos_embed, table)


def test_timestep_embedding_has_no_x1000_and_cos_first() -> None:
    t = torch.tensor([0.0, 0.5, 1.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (3, 256)
    torch.testing.assert_close(emb[:, 0], torch.cos(t))  # lowest index: frequency 1
    torch.testing.assert_close(emb[:, 128], torch.sin(t))
    f1 = math.exp(-math.log(10000.0) / 128)
    torch.testing.assert_close(emb[2, 1], torch.tensor(math.cos(f1)))
    embedder = TimestepEmbedder(32)
    assert sorted(embedder.state_dict()) == ["mlp.0.bias", "mlp.0.weight", "mlp.2.bias", "mlp.2.weight"]
    assert embedder.mlp[0].in_features == 256
    assert embedder(t).shape == (3, 32)


def test_connector_keys_and_activation() -> None:
    torch.manual_seed(0)
    conn = MLPconnector(6, 10)
    assert sorted(conn.state_dict()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    x = torch.randn(4, 6)
    expected = conn.fc2(torch.nn.functional.gelu(conn.fc1(x), approximate="tanh"))
    torch.testing.assert_close(conn(x), expected)
    with pytest.raises(ValueError, match="unknown activation"):
        MLPconnector(2, 2, act="relu6")


def test_latent_patch_round_trip_and_bagel_order() -> None:
    torch.manual_seed(0)
    c, h, w, p = 4, 6, 8, 2
    z = torch.randn(c, h, w)
    tokens, pos = patchify_latent(z, p, max_per_side=10)
    assert tokens.shape == (h // p * w // p, p * p * c)
    # token (row 1, col 2), feature (kh=1, kw=0, ch=3) is z[3, 1*2+1, 2*2+0]
    assert tokens[1 * (w // p) + 2, (1 * p + 0) * c + 3] == z[3, 3, 4]
    assert pos.tolist()[:5] == [0, 1, 2, 3, 10]
    torch.testing.assert_close(unpatchify_latent(tokens, c, h, w, p), z, rtol=0, atol=0)
    _, pos_default = patchify_latent(z, p)
    assert pos_default.tolist() == list(range(12))
    with pytest.raises(ValueError, match="multiple"):
        patchify_latent(torch.zeros(4, 5, 4), 2)
