"""Rectified-flow training objective (BAGEL convention).

Time t in [0, 1], t = 1 is pure noise: ``x_t = (1 - t) x0 + t eps``; the model predicts the
velocity ``v = eps - x0`` (so ``x0 = x_t - t v``). Training times are logit-normal
``t = sigmoid(N(mean, std))`` then shifted ``s t / (1 + (s - 1) t)`` (s > 1 pushes t to noise).
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """The timestep shift ``s t / (1 + (s - 1) t)``: maps [0, 1] onto itself, fixes 0 and 1."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    n: int,
    generator: torch.Generator | None = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw n training times: float32 [n] in (0, 1), ``shift(sigmoid(mean + std * N(0, 1)))``.

    The normal draws come from ``generator`` (on its device unless ``device`` is given).
    """
    if device is None:
        device = generator.device if generator is not None else "cpu"
    z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
    return shift_timesteps(torch.sigmoid(mean + std * z), shift)


def _broadcast_time(t: Tensor | float, like: Tensor) -> Tensor | float:
    """Give t (scalar, [N] or leading dims of ``like``) trailing singleton dims to broadcast."""
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    if t.shape != like.shape[: t.ndim]:
        raise ValueError(f"time shape {tuple(t.shape)} is not a prefix of data shape {tuple(like.shape)}")
    return t.reshape(*t.shape, *([1] * (like.ndim - t.ndim))).to(like.dtype)


def interpolate(x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
    """Noisy sample ``x_t = (1 - t) x0 + t eps``.

    Args:
        x0: clean data, e.g. latent tokens [N, D] or latents [B, C, h, w].
        eps: standard normal noise, same shape.
        t: scalar, or per-sample/per-token times whose shape is a prefix of x0's ([N] or [B]).
    """
    tb = _broadcast_time(t, x0)
    return (1.0 - tb) * x0 + tb * eps


def velocity_target(x0: Tensor, eps: Tensor) -> Tensor:
    """Regression target of the velocity head: ``eps - x0`` (same shape as x0)."""
    return eps - x0


def flow_loss(
    pred: Tensor, target: Tensor, weight: Tensor | None = None, num_tokens: float | Tensor | None = None
) -> Tensor:
    """MSE of the velocity on noisy tokens.

    Each token's squared error is averaged over its features; those per-token values are
    summed over tokens selected/weighted by ``weight`` and divided by ``num_tokens``.

    Args:
        pred, target: [N, D] (or [N, ...]) predictions and ``eps - x0`` targets.
        weight: optional [N] bool mask or float weights (noisy tokens = 1); None = all tokens.
        num_tokens: normaliser, e.g. the global count of noisy tokens across ranks/micro-batches;
            None uses ``weight.sum()`` (or N), i.e. the mean over noisy tokens.

    Returns:
        scalar loss (0 when no token is selected).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    per_token = (pred.float() - target.float()).pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    if weight is None:
        w = torch.ones_like(per_token)
    else:
        w = weight.to(per_token.dtype).reshape(-1)
        if w.numel() != per_token.numel():
            raise ValueError(f"weight has {w.numel()} entries for {per_token.numel()} tokens")
    total = (per_token * w).sum()
    if num_tokens is None:
        denom = w.sum()
    else:
        denom = torch.as_tensor(num_tokens, dtype=total.dtype, device=total.device)
    return total / denom.clamp_min(1e-12)  # no selected token: 0 / eps = 0
