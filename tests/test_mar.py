"""
Tests for mar.py (Manifold Anchor Regularization, Flow-OPD §2.8).
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_mar.py
"""

import torch

from mar import mar_loss
from sde_sampler import gaussian_kl


def _means(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g), torch.tensor([0.1, 0.2, 0.3])


def test_zero_for_equal_means():
    _, anchor, std = _means()
    assert torch.equal(mar_loss(anchor, anchor, std), torch.zeros(3))


def test_is_lambda_times_gaussian_kl_and_linear_in_lambda():
    s, anchor, std = _means(1)
    assert torch.allclose(mar_loss(s, anchor, std, lam=1.0, reduce="sum"), gaussian_kl(s, anchor, std))
    assert torch.allclose(mar_loss(s, anchor, std, lam=0.04), 2 * mar_loss(s, anchor, std, lam=0.02))
    assert torch.allclose(mar_loss(s, anchor, std, lam=1.0), gaussian_kl(s, anchor, std) / 32)   # per element


def test_gradient_flows_to_student_not_anchor():
    s, anchor, std = _means(2)
    s.requires_grad_(True), anchor.requires_grad_(True)
    mar_loss(s, anchor, std).mean().backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert anchor.grad is None
