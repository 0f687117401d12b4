"""
Tests for opd_loss.py: w(t) identity, exact pathwise gradient, Monte-Carlo checks that the log-ratio
policy gradient is unbiased, that a detached state-only reward carries no signal, and that the
released (non-detached) form follows the pathwise gradient. Tiny tensors, fixed seeds, CPU.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_opd_loss.py
"""

import pytest
import torch

from grpo import clipped_surrogate
from opd_loss import ESTIMATORS, flow_opd_loss, kl_weight, opd_loss
from sde_sampler import gaussian_kl, gaussian_logprob, sde_step

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
        adv = -gaussian_kl(step.mean, mean_T, step.std).detach()
        logp = gaussian_logprob(x_next, step.mean, step.std, reduce="mean")
        loss = clipped_surrogate(D * logp, D * old, adv, 0.2).loss / D
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
def test_gaussian_kl_equals_kl_weight_times_velocity_l2(a):
    g = torch.Generator().manual_seed(6)
    B = 16
    t = 0.02 + 0.96 * torch.rand(B, generator=g)
    t_next = t * torch.rand(B, generator=g)                             # 0 <= t_next < t
    x = torch.randn(B, 3, 4, 4, generator=g)
    v_s, v_T = torch.randn(B, 3, 4, 4, generator=g), torch.randn(B, 3, 4, 4, generator=g)
    st_s, st_T = sde_step(x, v_s, t, t_next, a), sde_step(x, v_T, t, t_next, a)
    lhs = gaussian_kl(st_s.mean, st_T.mean, st_s.std)
    rhs = kl_weight(t, t_next, a) * ((v_s - v_T) ** 2).flatten(1).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-3)


def test_logratio_mc_gradient_approaches_pathwise():
    path = _mc_grad("pathwise", 10)               # exact: the state is the same for every sample
    e_small, e_big = _rel(_mc_grad("logratio", 200), path), _rel(_mc_grad("logratio", 20_000), path)
    assert e_big < 0.08 and e_big < e_small, (e_small, e_big)


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


def test_total_loss_is_opd_plus_lambda_mar_and_mar_off_is_opd():
    """flow_opd_loss = opd_loss on the step means + λ·mar_loss; v_anchor=None drops MAR exactly."""
    g = torch.Generator().manual_seed(8)
    B = 3
    x = torch.randn(B, 2, 2, 2, generator=g)
    v_s, v_T, v_A = (torch.randn(B, 2, 2, 2, generator=g) for _ in range(3))
    t, t_next = torch.full((B,), 0.6), torch.full((B,), 0.5)
    st = sde_step(x, v_s, t, t_next, A_NOISE, generator=g)
    old = gaussian_logprob(st.x_next, st.mean, st.std)
    kw = dict(x_t=x, x_next=st.x_next, t=t, t_next=t_next, std=st.std.flatten(), old_logp=old, v_student=v_s,
              v_teacher=v_T, noise_level=A_NOISE, estimator="pathwise", mar_lambda=0.02)
    loss, kl, mar = flow_opd_loss(v_anchor=v_A, **kw)
    mean = lambda v: sde_step(x, v, t, t_next, A_NOISE, noise=torch.zeros_like(v)).mean  # noqa: E731
    want_kl = gaussian_kl(mean(v_s), mean(v_T), st.std)
    want_mar = 0.02 * gaussian_kl(mean(v_s), mean(v_A), st.std, reduce="mean").mean()
    assert torch.allclose(kl, want_kl, rtol=1e-5)
    assert torch.allclose(mar, want_mar, rtol=1e-5)
    assert torch.allclose(loss, want_kl.mean() / x[0].numel() + want_mar, rtol=1e-5)
    loss0, _, mar0 = flow_opd_loss(v_anchor=None, **kw)
    assert mar0 == 0 and torch.allclose(loss0, want_kl.mean() / x[0].numel(), rtol=1e-5)


def test_bad_options_raise():
    m = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        opd_loss("gkd", m, m, torch.ones(2))
    with pytest.raises(ValueError):
        opd_loss("logratio", m, m, torch.ones(2))                       # needs x_next and old_logp
    with pytest.raises(ValueError):
        opd_loss("released", m, m, torch.ones(2), m, torch.zeros(2))   # needs dt
