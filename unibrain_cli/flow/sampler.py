"""Stateless Euler sampler for rectified flow with BAGEL's classifier-free guidance.

Time convention (the only one in this package): t in [0, 1], t = 1 is pure noise,
``x_t = (1 - t) x0 + t eps``; the model's velocity predicts ``eps - x0``, so one Euler step
from t to t' < t is ``x - (t - t') v`` and ``x0 = x_t - t v``.

Guidance (BAGEL ``_forward_flow``): with the conditional velocity ``v_c``, the velocity with
the text context dropped ``v_t`` and the one with the image context dropped ``v_i``:

    v_text = v_t + text_scale * (v_c - v_t)
    v      = v_i + img_scale * (v_text - v_i)

then ``renorm`` rescales v by ``clamp(|v_c| / |v|, renorm_min, 1)`` (``global``: norms over
one image — the whole tensor [n, D], or each [n, D] of a batch [B, n, D]; ``channel``: per token over the last dim;
``text_channel``: only the text-guided part, per token, before image guidance). Guidance acts
only while ``interval[0] < t <= interval[1]``. Unlike BAGEL, image guidance also works with
text guidance off (BAGEL nests it inside the text branch); with ``text_scale > 1`` they agree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from unibrain_cli.config.components import FlowConfig
from unibrain_cli.flow.objective import shift_timesteps

RenormType = Literal["none", "global", "channel", "text_channel"]
VelocityFn = Callable[[Tensor, float], tuple[Tensor, Tensor | None, Tensor | None]]


def timestep_schedule(steps: int, shift: float = 1.0) -> Tensor:
    """float32 [steps + 1] sampling times from exactly 1 down to exactly 0.

    ``linspace(1, 0, steps + 1)`` mapped by the shift ``s t / (1 + (s - 1) t)`` (s > 1 spends
    more steps near the noise end).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def euler_step(x: Tensor, v: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """One Euler step of dx/dt = v from t to t_next (< t): ``x - (t - t_next) v``."""
    return x - (t - t_next) * v


def cfg_active(
    t: float, text_scale: float, img_scale: float, interval: tuple[float, float] = (0.0, 1.0)
) -> tuple[bool, bool]:
    """Which unconditional velocities the guidance needs at time t: (text, image).

    Velocity functions call this to skip forward passes whose result would be unused.
    """
    inside = interval[0] < t <= interval[1]
    return inside and text_scale != 1.0, inside and img_scale != 1.0


def _norm(v: Tensor, per_channel: bool) -> Tensor:
    if per_channel:
        return torch.linalg.vector_norm(v.float(), dim=-1, keepdim=True)
    if v.dim() == 3:  # a batch of images [B, n, D]: one norm per image
        return torch.linalg.vector_norm(v.float(), dim=(1, 2), keepdim=True)
    return torch.linalg.vector_norm(v.float())


def _renorm(v_ref: Tensor, v: Tensor, per_channel: bool, renorm_min: float) -> Tensor:
    """Scale v by ``clamp(|v_ref| / |v|, renorm_min, 1)`` (norm over all or the last dim)."""
    scale = (_norm(v_ref, per_channel) / (_norm(v, per_channel) + 1e-8)).clamp(min=renorm_min, max=1.0)
    return v * scale.to(v.dtype)


def apply_cfg(
    v_cond: Tensor,
    v_text_uncond: Tensor | None,
    v_img_uncond: Tensor | None,
    t: float,
    text_scale: float = 1.0,
    img_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
) -> Tensor:
    """Guided velocity (see the module docstring); returns v_cond when no guidance is active.

    Raises:
        ValueError: a guidance term is active at t but its unconditional velocity is None.
    """
    need_text, need_img = cfg_active(t, text_scale, img_scale, interval)
    if not (need_text or need_img):
        return v_cond
    if need_text and v_text_uncond is None:
        raise ValueError(f"text guidance (scale {text_scale}) is active at t={t:.4f} but v_text_uncond is None")
    if need_img and v_img_uncond is None:
        raise ValueError(f"image guidance (scale {img_scale}) is active at t={t:.4f} but v_img_uncond is None")
    v_text = v_cond
    if need_text:
        assert v_text_uncond is not None
        v_text = v_text_uncond + text_scale * (v_cond - v_text_uncond)
        if renorm_type == "text_channel":
            v_text = _renorm(v_cond, v_text, per_channel=True, renorm_min=renorm_min)
    v = v_text
    if need_img:
        assert v_img_uncond is not None
        v = v_img_uncond + img_scale * (v_text - v_img_uncond)
    if renorm_type in ("global", "channel"):
        v = _renorm(v_cond, v, per_channel=renorm_type == "channel", renorm_min=renorm_min)
    elif renorm_type not in ("none", "text_channel"):
        raise ValueError(f"unknown renorm type {renorm_type!r}")
    return v


def sample(
    velocity_fn: VelocityFn,
    x_init: Tensor,
    steps: int,
    shift: float = 1.0,
    text_scale: float = 1.0,
    img_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    renorm_type: RenormType = "global",
    renorm_min: float = 0.0,
    progress: bool = False,
) -> Tensor:
    """Integrate from noise (t = 1) to data (t = 0) with Euler steps and guidance.

    Args:
        velocity_fn: ``(x_t, t) -> (v_cond, v_text_uncond | None, v_img_uncond | None)``, each
            shaped like x_t; use :func:`cfg_active` to know which unconditional terms are needed.
        x_init: noise at t = 1, e.g. latent tokens [N, D].
        steps: number of Euler steps; shift: schedule shift (see :func:`timestep_schedule`).
        text_scale, img_scale, interval, renorm_type, renorm_min: guidance (:func:`apply_cfg`).
        progress: show a rich progress bar.

    Returns:
        x at t = 0, same shape as x_init. Gradients flow if the caller enables them.
    """
    ts = timestep_schedule(steps, shift).tolist()
    x = x_init
    bar = None
    if progress:
        from unibrain_cli.io.console import progress_bar

        bar = progress_bar(transient=True)
        bar.start()
        task = bar.add_task("sampling", total=steps)
    try:
        for t, t_next in zip(ts[:-1], ts[1:], strict=True):
            v_cond, v_text, v_img = velocity_fn(x, t)
            v = apply_cfg(v_cond, v_text, v_img, t, text_scale, img_scale, interval, renorm_type, renorm_min)
            x = euler_step(x, v, t, t_next)
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    return x


def sample_from_config(
    velocity_fn: VelocityFn, x_init: Tensor, cfg: FlowConfig, steps: int | None = None, progress: bool = False
) -> Tensor:
    """:func:`sample` with the sampling fields of a FlowConfig (``steps`` overrides ``sample_steps``)."""
    return sample(
        velocity_fn,
        x_init,
        steps=cfg.sample_steps if steps is None else steps,
        shift=cfg.sample_timestep_shift,
        text_scale=cfg.cfg_text_scale,
        img_scale=cfg.cfg_img_scale,
        interval=tuple(cfg.cfg_interval),
        renorm_type=cfg.cfg_renorm_type,
        renorm_min=cfg.cfg_renorm_min,
        progress=progress,
    )
