"""
Exact-answer tests for grpo.py (Flow-GRPO advantages, clipped surrogate, reference KL).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_grpo.py
"""

import pytest
import torch

from grpo import (clipped_surrogate, gradient_signal, group_advantages, grpo_loss, reference_kl,
                  zero_std_fraction)


def _rewards(P=5, G=6, seed=0):
    return torch.randn(P * G, generator=torch.Generator().manual_seed(seed))


def test_group_advantages_zero_mean_unit_std_per_group():
    A = group_advantages(_rewards(), 6).view(5, 6)
    assert torch.allclose(A.mean(1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(A.std(1, correction=0), torch.ones(5), atol=1e-3)  # eps shrinks it slightly


def test_group_advantages_global_std():
    r = _rewards()
    A = group_advantages(r, 6, std="global").view(5, 6)
    expect = (r.view(5, 6) - r.view(5, 6).mean(1, keepdim=True)) / (r.std(correction=0) + 1e-4)
    assert torch.allclose(A.mean(1), torch.zeros(5), atol=1e-6)
    assert torch.allclose(A, expect, atol=1e-6)


@pytest.mark.parametrize("std", ["group", "global"])
def test_zero_std_group_gives_zero_advantage_not_nan(std):
    r = torch.tensor([1., 1., 1., 1., 0., 1., 2., 3.])
    A = group_advantages(r, 4, std=std)
    assert torch.isfinite(A).all()
    assert torch.equal(A[:4], torch.zeros(4))
    assert zero_std_fraction(r, 4).item() == 0.5


def test_bad_group_size_and_std_option_raise():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(7), 3)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 3, std="batch")


def test_ratio_exactly_one_and_loss_is_minus_mean_adv():
    logp = torch.randn(8, 3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    adv = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))        # broadcast over T = 3
    s = clipped_surrogate(logp, logp.detach().clone(), adv, 1e-4)
    assert torch.equal(s.ratio, torch.ones(8, 3))
    assert torch.allclose(s.loss, -adv.expand(8, 3).mean())
    assert s.clipfrac.item() == 0.0 and s.approx_kl.item() == 0.0
    assert not s.ratio.requires_grad


def test_gradient_zero_when_clipped_nonzero_inside():
    eps = 0.2
    old = torch.zeros(4)
    logp = torch.tensor([0.5, 0.05, -0.5, 0.5], requires_grad=True)  # ρ: out(>), in, out(<), out(>)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    s = clipped_surrogate(logp, old, adv, eps)
    s.loss.backward()
    g = logp.grad
    assert g[0] == 0 and g[2] == 0                    # clipped on the side that would help: flat
    assert torch.isclose(g[1], -adv[1] * torch.exp(logp[1].detach()) / 4)
    assert g[3] != 0                                  # A < 0, ρ > 1+ε: the pessimistic branch is unclipped
    assert s.clipfrac.item() == 0.75


def test_reference_kl_zero_and_closed_form():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(3, 4, 5, 5, generator=g, requires_grad=True)
    ref = torch.randn(3, 4, 5, 5, generator=g)
    std = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    D = 100
    assert torch.equal(reference_kl(ref, ref, std), torch.zeros(3))
    exact = reference_kl(mean, ref, std, reduce="sum")
    closed = ((mean - ref) ** 2).flatten(1).sum(1) / (2 * std.flatten() ** 2)
    assert torch.allclose(exact, closed, rtol=1e-5)
    assert torch.allclose(reference_kl(mean, ref, std), closed / D, rtol=1e-5)
    ref.requires_grad_(True)
    exact = reference_kl(mean, ref, std)
    exact.sum().backward()
    assert mean.grad.abs().sum() > 0 and ref.grad is None


def test_grpo_loss_combines_surrogate_and_beta_kl():
    g = torch.Generator().manual_seed(4)
    mean, ref = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    std = torch.full((4, 1, 1, 1), 0.5)
    logp = torch.randn(4, generator=g)
    adv = torch.randn(4, generator=g)
    out = grpo_loss(logp, logp, adv, 1e-4, beta=0.04, mean=mean, ref_mean=ref, std=std)
    kl = reference_kl(mean, ref, std).mean()
    assert torch.allclose(out.loss, -adv.mean() + 0.04 * kl)
    assert torch.allclose(out.kl, kl) and out.ratio_min == 1 and out.ratio_max == 1
    assert grpo_loss(logp, logp, adv, 1e-4).kl == 0


def test_gradient_signal_exact_cases_and_known_snr():
    g = torch.randn(1, 50).expand(4, 50)                               # four identical batch gradients
    sig = gradient_signal(g)
    assert sig.kappa.item() == pytest.approx(1.0, abs=1e-6) and sig.batches_for_snr1.item() == pytest.approx(0.0, abs=1e-5)
    orth = torch.eye(5)                                                # pairwise orthogonal: no shared signal
    assert gradient_signal(orth).kappa.item() == 0.0 and gradient_signal(orth).batches_for_snr1.item() == float("inf")
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2000, generator=gen)
    s = 0.3 * s / s.norm()                                             # ‖s‖² = 0.09, E‖n‖² = 1: kappa = 0.09/1.09
    noisy = s + torch.randn(100, 2000, generator=gen) / 2000 ** 0.5
    sig = gradient_signal(noisy)
    assert abs(sig.kappa.item() - 0.09 / 1.09) < 3 * sig.se.item() and sig.se.item() < 0.02
    pure = gradient_signal(torch.randn(100, 2000, generator=gen))
    assert abs(pure.kappa.item()) < 3 * pure.se.item()
    with pytest.raises(ValueError, match="at least 3"):
        gradient_signal(torch.randn(2, 10))
