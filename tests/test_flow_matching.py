"""
Exact-answer tests for flow_matching.py (Flow-OPD §2.2).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_flow_matching.py
"""

import pytest
import torch

from flow_matching import (broadcast_t, guidance, euler_sample, euler_step, flow_matching_loss,
                           interpolate, sample_t, shift_sigmas, time_grid, velocity_target)


def _pair(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_interpolate_endpoints_exact():
    x0, eps = _pair()
    assert torch.equal(interpolate(x0, eps, 0.0), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, eps, 1.0), eps)  # t = 1 is noise
    t = torch.tensor([0.0, 1.0, 0.0])
    out = interpolate(x0, eps, t)
    assert torch.equal(out[0], x0[0]) and torch.equal(out[1], eps[1]) and torch.equal(out[2], x0[2])


def test_time_derivative_of_path_is_velocity_target():
    x0, eps = _pair(shape=(3, 2, 4))  # any (B, ...) shape
    t = torch.tensor([0.1, 0.5, 0.9])
    _, dxdt = torch.autograd.functional.jvp(lambda s: interpolate(x0, eps, s), (t,), (torch.ones(3),))
    torch.testing.assert_close(dxdt, velocity_target(x0, eps), rtol=0, atol=1e-6)


def test_broadcast_t_shape_and_bad_shape():
    x = torch.zeros(3, 4, 5, 5)
    assert broadcast_t(0.3, x).shape == (3, 1, 1, 1)
    assert broadcast_t(torch.rand(3), x).shape == (3, 1, 1, 1)
    with pytest.raises(RuntimeError):
        broadcast_t(torch.rand(2), x)  # wrong batch size fails loudly


def test_shift_sigmas():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_sigmas(t, 1.0), t)
    s = shift_sigmas(t, 3.0)
    assert s[0] == 0.0 and s[-1] == 1.0 and (s >= t).all()
    assert abs(shift_sigmas(0.5, 3.0) - 0.75) < 1e-12  # 3·0.5 / (1 + 2·0.5)


@pytest.mark.parametrize("T,shift", [(1, 1.0), (4, 1.0), (10, 3.0), (28, 3.0)])
def test_time_grid_endpoints_monotone(T, shift):
    s = time_grid(T, shift)
    assert s.shape == (T + 1,) and s.dtype == torch.float32
    assert s[0].item() == 1.0 and s[-1].item() == 0.0
    assert (s[1:] < s[:-1]).all()


def test_time_grid_values():
    # Same as diffusers FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(sigmas=linspace(1, 1/4, 4)).
    torch.testing.assert_close(time_grid(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_sample_t_range_and_shift():
    t = sample_t(20_000, torch.Generator().manual_seed(0))
    ts = sample_t(20_000, torch.Generator().manual_seed(0), shift=3.0)
    assert t.shape == (20_000,)
    assert ((t > 0) & (t < 1)).all() and ((ts > 0) & (ts < 1)).all()
    assert abs(t.mean().item() - 0.5) < 0.01  # logit-normal(0, 1) is symmetric about 0.5
    assert (ts >= t).all() and ts.mean() > t.mean() + 0.1
    torch.testing.assert_close(ts, shift_sigmas(t, 3.0))


def test_flow_matching_loss():
    x0, eps = _pair()
    v = velocity_target(x0, eps)
    assert flow_matching_loss(v, x0, eps).item() == 0.0
    per = flow_matching_loss(v + 2.0, x0, eps, reduce="none")
    assert per.shape == (3,)
    torch.testing.assert_close(per, torch.full((3,), 4.0))
    torch.testing.assert_close(flow_matching_loss(v + 2.0, x0, eps), torch.tensor(4.0))
    with pytest.raises(ValueError):
        flow_matching_loss(v, x0, eps, reduce="sum")


def test_guidance():
    u, c = _pair()
    assert torch.equal(guidance(u, c, 0.0), u)
    torch.testing.assert_close(guidance(u, c, 1.0), c)  # u + (c - u) is c up to one rounding
    torch.testing.assert_close(guidance(u, c, 4.5), u + 4.5 * (c - u))


def test_euler_step():
    x, v = _pair()
    torch.testing.assert_close(euler_step(x, v, 0.75, 0.5), x - 0.25 * v)


@pytest.mark.parametrize("T,shift", [(1, 1.0), (3, 1.0), (10, 3.0)])
def test_constant_velocity_euler_exact(T, shift):
    x1, c = _pair()
    x0 = euler_sample(lambda x, t: c, x1, time_grid(T, shift))
    torch.testing.assert_close(x0, x1 - c, rtol=0, atol=2e-6)


def test_euler_sample_passes_batch_t():
    seen = []

    def vel(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x1, _ = _pair()
    euler_sample(vel, x1, time_grid(4))
    assert len(seen) == 4 and all(t.shape == (3,) for t in seen)
    assert torch.equal(torch.stack([t[0] for t in seen]), time_grid(4)[:-1])
