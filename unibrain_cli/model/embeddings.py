"""Small embedding blocks shared by the unified model (BAGEL conventions).

- ``get_2d_sincos_pos_embed``: fixed 2D sin-cos table (MAE / BAGEL layout).
- ``PositionEmbedding``: that table as a non-persistent buffer, indexed by flattened
  position ids ``row * side + col``.
- ``TimestepEmbedder``: 256-dim sinusoidal features of the flow time t in [0, 1]
  (no x1000 scaling, as BAGEL) -> Linear -> SiLU -> Linear.
- ``MLPconnector``: ViT width -> LLM width adapter (``fc1``, activation, ``fc2``).
- ``patchify_latent`` / ``unpatchify_latent``: VAE latent <-> p x p patch tokens, features
  ordered (kh, kw, c) exactly as BAGEL's ``einsum("chpwq->hwpqc")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# 2D sin-cos tables
# ---------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sin-cos features of positions.

    Args:
        embed_dim: output width D (even).
        pos: positions, any shape (flattened to M values).

    Returns:
        float64 array [M, D]: ``[sin(pos * w_k), cos(pos * w_k)]`` with
        ``w_k = 10000 ** (-k / (D/2))``, k = 0 .. D/2 - 1.
    """
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position table of a square grid (MAE / BAGEL convention).

    Row ``r * grid_size + c`` holds the features of grid cell (row r, column c). The first
    ``embed_dim // 2`` features encode the column, the last half the row (MAE's
    ``np.meshgrid(grid_w, grid_h)`` ordering, kept bit-for-bit).

    Args:
        embed_dim: table width D (divisible by 4).
        grid_size: side of the square grid.

    Returns:
        float32 array [grid_size * grid_size, embed_dim].
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # [2, H, W]; grid[0] = column index
    emb_a = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_b = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_a, emb_b], axis=1).astype(np.float32)


class PositionEmbedding(nn.Module):
    """Fixed 2D sin-cos position table, looked up by flattened position id.

    The table is a NON-persistent buffer ``pos_embed`` [side * side, hidden]: it never enters
    a state_dict (BAGEL recomputes it). After building on the meta device and
    ``to_empty``, call :meth:`reset_table` to fill it.
    """

    def __init__(self, max_num_patch_per_side: int, hidden_size: int) -> None:
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.hidden_size = hidden_size
        self.register_buffer(
            "pos_embed", torch.empty(max_num_patch_per_side**2, hidden_size), persistent=False
        )
        self.reset_table()

    @torch.no_grad()
    def reset_table(self) -> None:
        """(Re)compute the sin-cos table in place (no-op on the meta device)."""
        if self.pos_embed.is_meta:
            return
        table = get_2d_sincos_pos_embed(self.hidden_size, self.max_num_patch_per_side)
        self.pos_embed.copy_(torch.from_numpy(table))

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids: long [...], values row * side + col -> embeddings [..., hidden]."""
        return self.pos_embed[position_ids]


# ---------------------------------------------------------------------------------------------
# Timestep embedding
# ---------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t (BAGEL/DiT layout ``[cos(t f_k), sin(t f_k)]``).

    Args:
        t: [N] times (flow time in [0, 1]; used as is, no x1000).
        dim: feature width.
        max_period: lowest frequency is ``1 / max_period``.

    Returns:
        float32 [N, dim] (an odd ``dim`` gets a zero last column).
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.reshape(-1, 1).float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> [N, hidden] (sinusoidal features -> Linear -> SiLU -> Linear)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: Tensor) -> Tensor:
        """t: [N] in [0, 1] -> [N, hidden] in the MLP's dtype."""
        t_freq = timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


# ---------------------------------------------------------------------------------------------
# Connector
# ---------------------------------------------------------------------------------------------

_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


class MLPconnector(nn.Module):
    """Two-layer MLP ``fc2(act(fc1(x)))``: [..., in_dim] -> [..., out_dim] (BAGEL's connector)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh") -> None:
        super().__init__()
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(_ACTIVATIONS)}")
        self.act_name = act
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_ACTIVATIONS[self.act_name](self.fc1(x)))


# ---------------------------------------------------------------------------------------------
# Patch tokens
# ---------------------------------------------------------------------------------------------


def flattened_position_ids(rows: int, cols: int, max_per_side: int, device: torch.device | None = None) -> Tensor:
    """Position ids ``row * max_per_side + col`` of a rows x cols patch grid, row-major: long [rows*cols]."""
    if rows > max_per_side or cols > max_per_side:
        raise ValueError(f"patch grid {rows}x{cols} exceeds the position table side {max_per_side}")
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    return (r[:, None] * max_per_side + c[None, :]).reshape(-1)


def patch_tokens(x: Tensor, p: int) -> Tensor:
    """[C, H, W] -> [(H/p) * (W/p), p * p * C], features ordered (kh, kw, c).

    H and W must be multiples of p. Equals BAGEL's ``einsum("chpwq->hwpqc")``.
    """
    c, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"spatial size {h}x{w} is not a multiple of the patch size {p}")
    x = x.reshape(c, h // p, p, w // p, p)
    return torch.einsum("chpwq->hwpqc", x).reshape(-1, p * p * c)


def patchify_latent(z: Tensor, p: int, max_per_side: int | None = None) -> tuple[Tensor, Tensor]:
    """Cut a VAE latent into p x p patch tokens.

    Args:
        z: latent [C, h, w] (h, w multiples of p).
        p: latent patch size (BAGEL: 2).
        max_per_side: side of the latent position table (``ModelConfig.max_latent_size``);
            None uses the grid's own width ``w // p``.

    Returns:
        tokens [(h/p) * (w/p), p * p * C] ordered (kh, kw, c), and long position ids
        [(h/p) * (w/p)] = ``row * max_per_side + col``.
    """
    _, h, w = z.shape
    tokens = patch_tokens(z, p)
    side = w // p if max_per_side is None else max_per_side
    return tokens, flattened_position_ids(h // p, w // p, side, device=z.device)


def unpatchify_latent(tokens: Tensor, c: int, h: int, w: int, p: int) -> Tensor:
    """Inverse of :func:`patchify_latent`.

    Args:
        tokens: [(h/p) * (w/p), p * p * c].
        c: latent channels; h, w: latent spatial size (NOT the token grid); p: patch size.

    Returns:
        latent [c, h, w].
    """
    gh, gw = h // p, w // p
    if tokens.shape != (gh * gw, p * p * c):
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not fit a {c}x{h}x{w} latent with patch {p}")
    x = tokens.reshape(gh, gw, p, p, c)
    return torch.einsum("hwpqc->chpwq", x).reshape(c, h, w)
