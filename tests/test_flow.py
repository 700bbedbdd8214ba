"""Rectified flow: training objective and the Euler sampler with guidance."""

from __future__ import annotations

import pytest
import torch

from unibrain_cli.config.components import FlowConfig
from unibrain_cli.flow.objective import (
    flow_loss,
    interpolate,
    sample_timesteps,
    shift_timesteps,
    velocity_target,
)
from unibrain_cli.flow.sampler import (
    apply_cfg,
    cfg_active,
    euler_step,
    sample,
    sample_from_config,
    timestep_schedule,
)

# ---------------------------------------------------------------------------------------------
# objective
# ---------------------------------------------------------------------------------------------


def test_sample_timesteps_golden_values() -> None:
    t = sample_timesteps(4, torch.Generator().manual_seed(0))
    # sigmoid of torch's seed-0 normals (1.5410, -0.2934, -2.1788, 0.5684)
    torch.testing.assert_close(t, torch.tensor([0.823609, 0.427165, 0.101671, 0.638401]), atol=1e-6, rtol=0)
    ts = sample_timesteps(4, torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(ts, torch.tensor([0.933368, 0.691082, 0.253473, 0.841181]), atol=1e-6, rtol=0)
    torch.testing.assert_close(ts, 3 * t / (1 + 2 * t))
    big = sample_timesteps(10_000, torch.Generator().manual_seed(1), mean=0.5, std=0.2)
    assert float(big.min()) > 0 and float(big.max()) < 1
    assert abs(float(torch.logit(big).mean()) - 0.5) < 0.01


def test_shift_fixes_endpoints_and_is_monotone() -> None:
    t = torch.linspace(0, 1, 11)
    s = shift_timesteps(t, 3.0)
    assert float(s[0]) == 0.0 and float(s[-1]) == 1.0
    assert bool((s[1:] > s[:-1]).all()) and bool((s >= t).all())
    with pytest.raises(ValueError):
        shift_timesteps(t, 0.0)


def test_interpolate_and_target() -> None:
    torch.manual_seed(0)
    x0, eps = torch.randn(5, 8), torch.randn(5, 8)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = interpolate(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[-1], eps[-1])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    # x0 is recovered from x_t and the exact velocity: x0 = x_t - t v
    torch.testing.assert_close(xt - t[:, None] * velocity_target(x0, eps), x0)
    img = interpolate(torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.tensor([0.2, 0.6]))
    assert img[0].unique().tolist() == pytest.approx([0.2]) and img[1].unique().tolist() == pytest.approx([0.6])
    with pytest.raises(ValueError, match="prefix"):
        interpolate(x0, eps, torch.zeros(4))


def test_flow_loss_mean_over_noisy_tokens() -> None:
    pred = torch.zeros(4, 2)
    target = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [100.0, 0.0]])
    mask = torch.tensor([True, True, True, False])
    assert float(flow_loss(pred, target, mask)) == pytest.approx((1 + 4 + 9) / 3)
    assert float(flow_loss(pred, target)) == pytest.approx((1 + 4 + 9 + 5000) / 4)
    # global normaliser (e.g. tokens over all ranks)
    assert float(flow_loss(pred, target, mask, num_tokens=7)) == pytest.approx(14 / 7)
    assert float(flow_loss(pred, target, torch.zeros(4, dtype=torch.bool))) == 0.0
    with pytest.raises(ValueError, match="shape"):
        flow_loss(pred, target[:3])


# ---------------------------------------------------------------------------------------------
# sampler
# ---------------------------------------------------------------------------------------------


def test_schedule_endpoints_and_shift_formula() -> None:
    ts = timestep_schedule(4, 1.0)
    torch.testing.assert_close(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    ts3 = timestep_schedule(4, 3.0)
    torch.testing.assert_close(ts3, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    assert float(ts3[0]) == 1.0 and float(ts3[-1]) == 0.0
    assert timestep_schedule(10, 3.0).shape == (11,)
    with pytest.raises(ValueError):
        timestep_schedule(0, 1.0)


def test_euler_step_formula() -> None:
    x, v = torch.tensor([1.0, 2.0]), torch.tensor([4.0, -2.0])
    torch.testing.assert_close(euler_step(x, v, 0.75, 0.5), torch.tensor([0.0, 2.5]))


def test_constant_velocity_reaches_analytic_endpoint() -> None:
    torch.manual_seed(0)
    x1, v = torch.randn(6, 4), torch.randn(6, 4)
    out = sample(lambda x, t: (v, None, None), x1, steps=7, shift=3.0)
    torch.testing.assert_close(out, x1 - v, rtol=0, atol=1e-6)


def test_straight_line_field_lands_exactly_on_target() -> None:
    torch.manual_seed(0)
    target, x1 = torch.randn(3, 8), torch.randn(3, 8)
    seen: list[float] = []

    def field(x: torch.Tensor, t: float):
        seen.append(t)
        # on the straight path from target, (x - x0) / t is the exact velocity eps - x0
        torch.testing.assert_close(x, (1 - t) * target + t * x1, rtol=1e-5, atol=1e-5)
        return (x - target) / t, None, None

    for steps in (1, 3, 10):
        seen.clear()
        out = sample(field, x1, steps=steps, shift=3.0)
        torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
        assert seen == pytest.approx(timestep_schedule(steps, 3.0)[:-1].tolist())


def test_cfg_scale_one_equals_conditional() -> None:
    torch.manual_seed(0)
    vc, vt, vi = torch.randn(3, 5, 4).unbind(0)
    assert torch.equal(apply_cfg(vc, vt, vi, 0.5, 1.0, 1.0), vc)
    assert torch.equal(apply_cfg(vc, None, None, 0.5, 1.0, 1.0), vc)
    # outside the interval guidance is off whatever the scales
    assert torch.equal(apply_cfg(vc, vt, vi, 0.1, 4.0, 2.0, interval=(0.4, 1.0)), vc)
    assert cfg_active(0.1, 4.0, 2.0, (0.4, 1.0)) == (False, False)
    assert cfg_active(1.0, 4.0, 1.0, (0.4, 1.0)) == (True, False)
    with pytest.raises(ValueError, match="v_text_uncond is None"):
        apply_cfg(vc, None, vi, 0.5, 4.0, 2.0)


def test_cfg_formula_without_renorm() -> None:
    torch.manual_seed(0)
    vc, vt, vi = torch.randn(3, 5, 4).unbind(0)
    text = vt + 4.0 * (vc - vt)
    torch.testing.assert_close(apply_cfg(vc, vt, vi, 0.5, 4.0, 2.0, renorm_type="none"), vi + 2.0 * (text - vi))
    torch.testing.assert_close(apply_cfg(vc, vt, None, 0.5, 4.0, 1.0, renorm_type="none"), text)
    torch.testing.assert_close(apply_cfg(vc, None, vi, 0.5, 1.0, 2.0, renorm_type="none"), vi + 2.0 * (vc - vi))


def test_renorm_bounds_the_norm() -> None:
    torch.manual_seed(0)
    vc, vt, vi = torch.randn(3, 5, 4).unbind(0)
    raw = apply_cfg(vc, vt, vi, 0.5, 4.0, 2.0, renorm_type="none")
    assert float(raw.norm()) > float(vc.norm())
    g = apply_cfg(vc, vt, vi, 0.5, 4.0, 2.0, renorm_type="global")
    torch.testing.assert_close(g.norm(), vc.norm())  # rescaled down to |v_cond|
    torch.testing.assert_close(g / g.norm(), raw / raw.norm())  # direction kept
    ch = apply_cfg(vc, vt, vi, 0.5, 4.0, 2.0, renorm_type="channel")
    assert bool((ch.norm(dim=-1) <= vc.norm(dim=-1) * (1 + 1e-5)).all())
    # renorm_min floors the scale
    floored = apply_cfg(vc, vt, vi, 0.5, 4.0, 2.0, renorm_type="global", renorm_min=1.0)
    torch.testing.assert_close(floored, raw)
    tc = apply_cfg(vc, vt, None, 0.5, 4.0, 1.0, renorm_type="text_channel")
    assert bool((tc.norm(dim=-1) <= vc.norm(dim=-1) * (1 + 1e-5)).all())


def test_sample_with_guidance_and_config() -> None:
    torch.manual_seed(0)
    x1 = torch.randn(4, 3)
    calls: list[tuple[float, bool]] = []

    def field(x: torch.Tensor, t: float):
        need_text, _ = cfg_active(t, 3.0, 1.0, (0.5, 1.0))
        calls.append((t, need_text))
        return torch.ones_like(x), (torch.zeros_like(x) if need_text else None), None

    cfg = FlowConfig(sample_steps=4, sample_timestep_shift=1.0, cfg_text_scale=3.0, cfg_interval=(0.5, 1.0),
                     cfg_renorm_type="none")
    out = sample_from_config(field, x1, cfg)
    # t = 1, 0.75 guided (v = 3), t = 0.5 (not > 0.5) and 0.25 unguided (v = 1): total 0.25*(3+3+1+1)
    torch.testing.assert_close(out, x1 - 2.0)
    assert calls == [(1.0, True), (0.75, True), (0.5, False), (0.25, False)]
