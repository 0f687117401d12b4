"""
Tests for opd_loss.py: w(t) identity, exact pathwise gradient, Monte-Carlo checks that the log-ratio
policy gradient is unbiased, that a detached state-only reward carries no signal, and that the
released (non-detached) form follows the pathwise gradient. Tiny tensors, fixed seeds, CPU.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_opd_loss.py
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from grpo import clipped_surrogate  # noqa: E402
from opd_loss import ESTIMATORS, kl_weight, opd_loss, step_kl  # noqa: E402
from sde_sampler import gaussian_logprob, sde_step  # noqa: E402

A_NOISE, T, T_NEXT = 0.7, 0.6, 0.5
SHAPE = (1, 2, 2, 2)  # D = 8


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, v_T = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    return x, v_T, v_T + 0.5 * torch.randn(SHAPE, generator=g)


def _mc_grad(kind, N, seed=1):
    """Gradient w.r.t. the student velocity θ = v_s of one estimator, averaged over N on-policy samples
    of one state. x_next ~ π_θold with θold = θ (detached); log π_θ(x_next) recomputed with grad."""
    x, v_T, v_s0 = _state()
    v = v_s0.clone().requires_grad_(True)
    xN = x.expand(N, -1, -1, -1)
    step = sde_step(xN, v.expand(N, -1, -1, -1), T, T_NEXT, A_NOISE,
                    generator=torch.Generator().manual_seed(seed))
    mean_T = sde_step(xN, v_T.expand(N, -1, -1, -1), T, T_NEXT, A_NOISE).mean
    x_next = step.x_next.detach()
    old = gaussian_logprob(x_next, step.mean.detach(), step.std, reduce="mean")
    if kind == "detached_state_reward":  # the paper's literal recipe: r = −sg(KL_t(x_t)), summed ratio
        D = x[0].numel()
        adv = -step_kl(step.mean, mean_T, step.std).detach()
        logp = gaussian_logprob(x_next, step.mean, step.std, reduce="mean")
        loss = clipped_surrogate(D * logp, D * old, adv, 0.2).loss / D
    elif kind == "logratio_baseline":
        loss = opd_loss("logratio", step.mean, mean_T, step.std, x_next, old, baseline=True).loss
    else:
        loss = opd_loss(kind, step.mean, mean_T, step.std, x_next, old, dt=T_NEXT - T).loss
    loss.backward()
    return v.grad.flatten()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_pathwise_gradient_equals_analytic_kl_gradient():
    g = torch.Generator().manual_seed(5)
    mean_s = torch.randn(3, 2, 4, 4, generator=g, requires_grad=True)
    mean_T = torch.randn(3, 2, 4, 4, generator=g)
    std = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1, 1)
    out = opd_loss("pathwise", mean_s, mean_T, std)
    (g1,) = torch.autograd.grad(out.loss, mean_s)
    analytic = ((mean_s - mean_T) ** 2 / (2 * std ** 2)).flatten(1).sum(1).mean() / 32   # KL / D
    (g2,) = torch.autograd.grad(analytic, mean_s)
    assert torch.allclose(g1, g2, rtol=1e-5, atol=1e-8)
    kl_sum = ((mean_s - mean_T) ** 2 / (2 * std ** 2)).flatten(1).sum(1).detach()
    assert torch.allclose(out.kl, kl_sum, rtol=1e-5)                      # exact summed KL, (B,)
    assert out.kl.shape == (3,) and not out.kl.requires_grad


def test_pathwise_gradient_wrt_velocity_is_w_t_velocity_mse():
    x, v_T, v_s = _state(2)
    v = v_s.clone().requires_grad_(True)
    st_s, st_T = sde_step(x, v, T, T_NEXT, A_NOISE), sde_step(x, v_T, T, T_NEXT, A_NOISE)
    (g1,) = torch.autograd.grad(opd_loss("pathwise", st_s.mean, st_T.mean, st_s.std).loss, v)
    ref = kl_weight(torch.tensor([T]), torch.tensor([T_NEXT]), A_NOISE) * ((v - v_T) ** 2).sum() / 8
    (g2,) = torch.autograd.grad(ref.sum(), v)
    assert torch.allclose(g1, g2, rtol=1e-4)


@pytest.mark.parametrize("a", [0.3, 0.7])
def test_step_kl_equals_kl_weight_times_velocity_l2(a):
    g = torch.Generator().manual_seed(6)
    B = 16
    t = 0.02 + 0.96 * torch.rand(B, generator=g)
    t_next = t * torch.rand(B, generator=g)                             # 0 <= t_next < t
    x = torch.randn(B, 3, 4, 4, generator=g)
    v_s, v_T = torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 3, 4, 4, generator=g)
    st_s, st_T = sde_step(x, v_s, t, t_next, a), sde_step(x, v_T, t, t_next, a)
    lhs = step_kl(st_s.mean, st_T.mean, st_s.std)
    rhs = kl_weight(t, t_next, a) * ((v_s - v_T) ** 2).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-3)


def test_logratio_mc_gradient_approaches_pathwise():
    path = _mc_grad("pathwise", 10)               # exact: the state is the same for every sample
    e_small, e_big = _rel(_mc_grad("logratio", 200), path), _rel(_mc_grad("logratio", 20_000), path)
    assert e_big < 0.08 and e_big < e_small, (e_small, e_big)
    assert _rel(_mc_grad("logratio_baseline", 20_000), path) < 0.08


def test_detached_state_only_reward_has_zero_mean_gradient():
    path = _mc_grad("pathwise", 10)
    g = _mc_grad("detached_state_reward", 20_000)
    assert g.norm() / path.norm() < 0.05


def test_released_gradient_follows_pathwise():
    path = _mc_grad("pathwise", 10)
    one = _mc_grad("released", 1)
    assert torch.nn.functional.cosine_similarity(one, path, dim=0) > 0.9
    many = _mc_grad("released", 20_000)
    assert _rel(many / abs(T_NEXT - T), path) < 0.02    # released ≈ |Δt| × pathwise at ρ = 1


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_equal_policies_zero_kl_and_unit_ratio(estimator):
    g = torch.Generator().manual_seed(7)
    mean = torch.randn(4, 2, 3, 3, generator=g)
    std = torch.full((4,), 0.3)
    x_next = mean + 0.3 * torch.randn(4, 2, 3, 3, generator=g)
    old = gaussian_logprob(x_next, mean, std, reduce="mean")
    out = opd_loss(estimator, mean.clone().requires_grad_(True), mean, std, x_next, old, dt=-0.1)
    assert torch.equal(out.kl, torch.zeros(4))
    assert out.ratio_min == 1 and out.ratio_max == 1


def test_trajectory_inputs_and_reward_to_go():
    g = torch.Generator().manual_seed(8)
    B, Tn = 3, 2
    mean_s = torch.randn(B, Tn, 2, 2, generator=g, requires_grad=True)
    mean_T = torch.randn(B, Tn, 2, 2, generator=g)
    std = torch.full((B, Tn), 0.4)                                    # like Trajectory.std
    x_next = mean_s.detach() + 0.4 * torch.randn(B, Tn, 2, 2, generator=g)
    old = gaussian_logprob(x_next.flatten(0, 1), mean_s.detach().flatten(0, 1), std.flatten(), "mean").view(B, Tn)
    traj = opd_loss("pathwise", mean_s, mean_T, std, batch_dims=2)
    flat = opd_loss("pathwise", mean_s.flatten(0, 1), mean_T.flatten(0, 1), std.flatten())
    assert traj.kl.shape == (B, Tn) and torch.allclose(traj.loss, flat.loss)
    # with one step, reward-to-go is the per-step reward
    one = opd_loss("logratio", mean_s[:, :1], mean_T[:, :1], std[:, :1], x_next[:, :1], old[:, :1],
                   reward_to_go=True, batch_dims=2)
    step = opd_loss("logratio", mean_s[:, 0], mean_T[:, 0], std[:, 0], x_next[:, 0], old[:, 0])
    assert torch.allclose(one.loss, step.loss)
    # with two steps, step 0's advantage is r_0 + r_1 (ρ = 1, so loss = −mean(A)/D)
    rtg = opd_loss("logratio", mean_s, mean_T, std, x_next, old, reward_to_go=True, batch_dims=2)
    D = 4
    r = D * (gaussian_logprob(x_next.flatten(0, 1), mean_T.flatten(0, 1), std.flatten(), "mean").view(B, Tn) - old)
    adv = torch.stack([r[:, 0] + r[:, 1], r[:, 1]], 1)
    assert torch.allclose(rtg.loss, -adv.mean() / D, rtol=1e-5)


def test_bad_options_raise():
    m = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        opd_loss("gkd", m, m, torch.ones(2))
    with pytest.raises(ValueError):
        opd_loss("logratio", m, m, torch.ones(2))                       # needs x_next and old_logp
    with pytest.raises(ValueError):
        opd_loss("pathwise", m, m, torch.ones(2), reward_to_go=True)
    with pytest.raises(ValueError):
        opd_loss("released", m, m, torch.ones(2), m, torch.zeros(2))   # needs dt
