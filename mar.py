"""
Manifold Anchor Regularization (MAR), Flow-OPD paper §2.8:

  L_Total(θ) = L_Policy(θ) + λ · E_{c, t, x_t∼ρ_t^θ} [ w(t)·‖v_θ(x_t,t,c) − v_anchor(x_t,t,c)‖² ]
             = L_Policy(θ) + λ · E[ KL(π_θ(·|x_t) ‖ π_anchor(·|x_t)) ]       (w(t): opd_loss.kl_weight)

i.e. the same Gaussian-step KL as Flow-GRPO's β-KL to the reference policy, computed as
‖μ_θ − μ_anchor‖²/(2 std²). It applies to ALL prompts of every task ("full-data supervision") and is a
direct, differentiable regulariser: the gradient flows to the student, the frozen anchor is detached.

The anchor is chosen by the caller (`--mar_anchor`, support/config.py); the loss does not depend on it:
  "deqa": a frozen aesthetic teacher trained with Flow-GRPO on DeQA(+PickScore) — the paper's choice;
  "base": the pre-trained backbone with the LoRA adapters disabled — the released code's default
          (`train.mar_lora = ""`, `disable_adapter()`).

Differences from the paper:
  1) The anchor is configurable; the paper uses the DeQA teacher, the code the base model.
  2) Default λ = 0.02 (paper's "MAR KL ratio"); the released code uses β = 0.04.
  3) reduce="mean" (default) gives KL/D per element, the same scale as opd_loss's loss, so λ keeps its
     meaning as a relative weight; the code's form is KL·|Δt|/D (no Δt, PAPER_NOTES.md §6).

Self-check: python mar.py
"""
import torch

from sde_sampler import gaussian_kl

def mar_loss(mean_s, mean_anchor, std, lam: float = 0.02, reduce: str = "mean"):
    """λ·KL(student step ‖ anchor step) per sample, (B,); call .mean() to add it to the loss.
    mean_s (B, ...) carries the gradient; mean_anchor (B, ...) is detached; std σ_t√|Δt|, (B,) or
    broadcastable to mean_s."""
    return lam * gaussian_kl(mean_s, mean_anchor.detach(), std, reduce=reduce)   # (B,)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    mu_a = torch.randn(2, 4, 8, 8, generator=g)
    mu_s = (mu_a + 0.1).requires_grad_(True)
    std = torch.full((2,), 0.2)
    l, want = mar_loss(mu_s, mu_a, std), 0.02 * 0.01 / (2 * 0.04)   # fp32 μ_s − μ_a = 0.1 to ~1e-6 relative
    print("MAR (λ=0.02, per element):", l.tolist(), " expected", want)
    assert torch.allclose(l, torch.full((2,), want), rtol=1e-4, atol=0), "MAR != λ·‖Δμ‖²/(2 std²)/D"
    zero = mar_loss(mu_a, mu_a, std)
    print("equal means:", zero.tolist())
    assert torch.equal(zero, torch.zeros(2)), "MAR of equal means is not exactly 0"
    l.sum().backward()
    want = 0.02 * 0.1 / 0.04 / mu_a[0].numel()
    print("∂/∂μ_s element:", mu_s.grad[0, 0, 0, 0].item(), " expected", want)
    assert torch.allclose(mu_s.grad, torch.full_like(mu_s, want), rtol=1e-4, atol=0), "∂MAR/∂μ_s != λ·Δμ/(std²·D)"
