"""
Exact-answer tests for sde_sampler.py (Flow-OPD §2.4, Flow-GRPO SDE step).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_sde_sampler.py
"""
import math

import pytest
import torch

from flow_matching import broadcast_t, euler_sample, euler_step, time_grid
from sde_sampler import (SDEStep, Trajectory, gaussian_kl, gaussian_logprob, rollout,
                         sde_step, sigma_t)

Normal = torch.distributions.Normal


def _xv(seed=0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_sigma_t_values_and_t1_substitution():
    assert sigma_t(0.5, 0.4, 0.7) == pytest.approx(0.7)
    assert sigma_t(0.8, 0.7, 0.5) == pytest.approx(0.5 * math.sqrt(0.8 / 0.2))
    assert sigma_t(1.0, 0.75, 0.7) == pytest.approx(1.4)  # 0.7·sqrt(1 / (1 - 0.75))
    t, tn = torch.tensor([1.0, 0.5]), torch.tensor([0.75, 0.4])
    s = sigma_t(t, tn, 0.7)
    assert torch.isfinite(s).all() and s.shape == (2,)
    torch.testing.assert_close(s, torch.tensor([1.4, 0.7]))
    assert torch.equal(sigma_t(t, tn, 0.0), torch.zeros(2))


@pytest.mark.parametrize("t,t_next", [(1.0, 0.9), (0.6, 0.5), (0.2, 0.0)])
def test_noise_level_zero_is_euler_exactly(t, t_next):
    x, v = _xv()
    s = sde_step(x, v, t, t_next, 0.0, generator=torch.Generator().manual_seed(1))
    assert isinstance(s, SDEStep)
    assert torch.equal(s.x_next, euler_step(x, v, t, t_next)) and torch.equal(s.mean, s.x_next)
    assert torch.equal(s.std, torch.zeros(3, 1, 1, 1))
    assert torch.isfinite(s.x_next).all()


def test_mean_closed_form():
    x, v = _xv()
    a = 0.7
    t, tn = torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    s = sde_step(x, v, t, tn, a, noise=torch.zeros_like(x))
    T, TN = broadcast_t(t, x), broadcast_t(tn, x)
    dt, sig = TN - T, a * torch.sqrt(T / (1 - T))
    expect = x * (1 + sig**2 * dt / (2 * T)) + v * (1 + a**2 / 2) * dt
    torch.testing.assert_close(s.mean, expect)
    torch.testing.assert_close(s.std, sig * torch.sqrt(T - TN))
    assert torch.equal(s.x_next, s.mean)  # zero noise
    assert (s.std[-1] > 0).all()  # the last step (t_next = 0) keeps noise, as in Flow-GRPO


def test_first_step_uses_t1_substitution():
    x, v = _xv()
    s = sde_step(x, v, 1.0, 0.75, 0.7, noise=torch.zeros_like(x))
    sig2 = 0.7**2 / 0.25
    torch.testing.assert_close(s.mean, x * (1 - sig2 * 0.25 / 2) - 0.25 * v)  # v-coefficient is plain Δt at t = 1
    torch.testing.assert_close(s.std, torch.full((3, 1, 1, 1), 1.4 * 0.5))
    assert torch.isfinite(s.mean).all()


def test_empirical_moments_match():
    x, v = _xv(shape=(1, 2, 3, 3))
    N = 20_000
    xb, vb = x.expand(N, -1, -1, -1), v.expand(N, -1, -1, -1)
    s = sde_step(xb, vb, 0.7, 0.6, 0.7, generator=torch.Generator().manual_seed(0))
    std = s.std[0].item()
    emp_mean, emp_std = s.x_next.mean(0), s.x_next.std(0)  # (2, 3, 3) each
    assert (emp_mean - s.mean[0]).abs().max() < 5 * std / math.sqrt(N)  # CLT, 18 elements at 5σ
    assert (emp_std / std - 1).abs().max() < 5 / math.sqrt(2 * N)


def test_fp32_output_for_bf16_inputs():
    x, v = _xv()
    s = sde_step(x.bfloat16(), v.bfloat16(), torch.tensor([1.0, 0.5, 0.3]).bfloat16(), 0.25, 0.7,
                 generator=torch.Generator().manual_seed(0))
    assert s.x_next.dtype == s.mean.dtype == s.std.dtype == torch.float32
    assert torch.isfinite(s.x_next).all() and torch.isfinite(s.std).all()
    assert gaussian_logprob(s.x_next.bfloat16(), s.mean, s.std).dtype == torch.float32


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_gaussian_logprob_matches_torch_normal(reduce):
    x, mean = _xv()
    std = torch.tensor([0.3, 1.0, 2.5])
    ref = Normal(mean, std.view(3, 1, 1, 1)).log_prob(x).flatten(1)
    ref = ref.sum(1) if reduce == "sum" else ref.mean(1)
    torch.testing.assert_close(gaussian_logprob(x, mean, std, reduce), ref)  # (B,) std
    torch.testing.assert_close(gaussian_logprob(x, mean, std.view(3, 1, 1, 1), reduce), ref)
    with pytest.raises(ValueError):
        gaussian_logprob(x, mean, std, reduce="none")


def test_gaussian_kl():
    mp, mq = _xv()
    std = torch.tensor([0.3, 1.0, 2.5])
    assert torch.equal(gaussian_kl(mp, mp, std), torch.zeros(3))
    expect = ((mp - mq) ** 2).flatten(1).sum(1) / (2 * std**2)
    torch.testing.assert_close(gaussian_kl(mp, mq, std), expect)
    torch.testing.assert_close(gaussian_kl(mp, mq, std, "mean"), expect / mp[0].numel())
    s4 = std.view(3, 1, 1, 1)
    ref = torch.distributions.kl_divergence(Normal(mp, s4), Normal(mq, s4)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mp, mq, s4), ref)
    one = torch.ones(1, 4)
    assert gaussian_kl(one, 0 * one, torch.tensor([0.5])).item() == 8.0  # 4 · 1 / (2 · 0.25)


def _vel():
    x_star = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(7))
    return lambda x, t: (x - x_star) / broadcast_t(t, x) + 0.1 * x


def test_rollout_shapes_and_records():
    x1, _ = _xv()
    sig = time_grid(6, shift=3.0)
    tr = rollout(_vel(), x1, sig, 0.7, generator=torch.Generator().manual_seed(0))
    assert isinstance(tr, Trajectory)
    assert tr.x_t.shape == tr.x_next.shape == tr.mean.shape == (3, 6, 4, 5, 5)
    assert tr.std.shape == tr.logp.shape == (3, 6)
    assert torch.equal(tr.t, sig[:-1]) and torch.equal(tr.t_next, sig[1:])
    assert torch.equal(tr.x_t[:, 0], x1) and torch.equal(tr.x_t[:, 1:], tr.x_next[:, :-1])
    assert torch.equal(tr.x0, tr.x_next[:, -1])
    assert (tr.std > 0).all()
    for i in range(6):
        lp = gaussian_logprob(tr.x_next[:, i], tr.mean[:, i], tr.std[:, i])
        torch.testing.assert_close(tr.logp[:, i], lp, rtol=0, atol=0)


def test_rollout_noise_zero_equals_euler_sample():
    x1, _ = _xv()
    sig = time_grid(8, shift=3.0)
    tr = rollout(_vel(), x1, sig, 0.0)
    assert torch.equal(tr.x0, euler_sample(_vel(), x1, sig))
    assert torch.equal(tr.std, torch.zeros(3, 8)) and torch.equal(tr.logp, torch.zeros(3, 8))


def test_rollout_sde_steps_subset_and_grad():
    x1, _ = _xv()
    w = torch.tensor(0.1, requires_grad=True)
    tr = rollout(lambda x, t: w * x, x1, time_grid(5), 0.7, torch.Generator().manual_seed(0), sde_steps={1, 3})
    assert (tr.std[:, [0, 2, 4]] == 0).all() and (tr.std[:, [1, 3]] > 0).all()
    assert (tr.logp[:, [0, 2, 4]] == 0).all() and torch.isfinite(tr.logp).all()
    tr.x0.sum().backward()  # nothing detached: gradients flow through the whole chain
    assert w.grad is not None and w.grad != 0


def test_recorded_logp_has_no_grad_through_its_own_sample():
    # x_next - mean = std·noise does not depend on θ, so a policy-gradient loss must recompute
    # gaussian_logprob(x_next.detach(), new_mean, std) rather than use Trajectory.logp.
    x1, _ = _xv()
    w = torch.tensor(0.1, requires_grad=True)
    tr = rollout(lambda x, t: w * x, x1, time_grid(3), 0.7, torch.Generator().manual_seed(0))
    (g,) = torch.autograd.grad(tr.logp.sum(), w, allow_unused=True)
    assert g is None or g.abs().item() < 1e-6
