"""
Flow-GRPO objective: group-relative advantages, PPO-clipped surrogate, β-KL to a reference policy.
Flow-OPD paper §1 (Q1, the single-reward teachers) and §2.1 step 1; the Flow-GRPO recipe
(Liu et al. 2025) as read from flow_grpo / Flow-OPD code (PAPER_NOTES.md §6).

  A_i   = (r_i − mean_{j∈g(i)} r_j) / (std + eps)                     group-relative advantage
  ρ     = exp(log π_θ(x_next|x_t) − log π_old(x_next|x_t))            per-step policy ratio
  L_pg  = mean( max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) )                     PPO clipped surrogate (minimised)
  KL    = ‖μ_θ − μ_ref‖² / (2 std²),  std = σ_t √|Δt|                 exact Gaussian-step KL
  L     = L_pg + β·KL
  κ     = mean_{i≠j} <g_i, g_j> / mean_i ‖g_i‖²                      signal share of one batch gradient
                                                                      (a diagnosis, not in the paper)

Differences from the paper / released code:
  1) Groups are contiguous blocks of G samples (sample i belongs to group i // G); flow_grpo groups by
     the prompt *string* with a stat tracker. Same thing when each prompt appears once per batch.
  2) Default std="group" (per-group std, the GRPO definition). flow_grpo's SD3.5 configs use
     global_std=True (std over the whole batch); pass std="global" to reproduce them.
  3) The β-KL defaults to the exact Gaussian-step KL (with the Δt that flow_grpo omits, flow_grpo#78 and #22),
     averaged over elements (reduce="mean") so that β has a per-element scale like flow_grpo's.
     flow_grpo's Δt-less form mean((μ−μ_ref)²)/(2σ_t²) = exact_sum·|Δt|/D is reference_kl with σ_t =
     std/√|Δt| passed as std (the self-check compares the two).
  4) The log-prob reduction is the caller's choice: flow_grpo uses the per-element *mean* (ratios stay
     near 1, which is why its clip range is 1e-4); a *sum* gives the true density ratio.

Self-check: python grpo.py
"""
from typing import NamedTuple

import torch

from sde_sampler import gaussian_kl


def group_advantages(rewards, group_size: int, std: str = "group", eps: float = 1e-4):
    """A = (r − group mean) / (std + eps); rewards (N,) with N = P·G, groups contiguous.

    std="group": std of each group (population std, ddof=0, like np.std in flow_grpo);
    std="global": one std over the whole batch (flow_grpo `global_std=True`), which keeps low-spread
    groups from being blown up to unit scale. A zero-spread group gets A = 0/(0+eps) = 0, never nan.
    """
    N = rewards.shape[0]
    if N % group_size != 0:
        raise ValueError(f"{N} rewards do not split into groups of size {group_size}")
    r = rewards.float().view(N // group_size, group_size)          # (P, G)
    mean = r.mean(dim=1, keepdim=True)                               # (P, 1)
    if std == "group":
        s = r.std(dim=1, correction=0, keepdim=True)                 # (P, 1)
    elif std == "global":
        s = r.std(correction=0).expand(r.shape[0], 1)                # (P, 1)
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    return ((r - mean) / (s + eps)).view(N)                          # (N,)


def zero_std_fraction(rewards, group_size: int):
    """Share of groups whose rewards are all equal: their advantages are 0, they give no signal."""
    r = rewards.view(-1, group_size)                                 # (P, G)
    spread = r.max(dim=1).values - r.min(dim=1).values               # (P,)
    return (spread == 0).float().mean()                              # ()


class Surrogate(NamedTuple):
    loss: torch.Tensor        # () PPO loss, to minimise
    ratio: torch.Tensor       # broadcast shape of the inputs, detached
    clipfrac: torch.Tensor    # () share of ratios outside [1−ε, 1+ε]
    approx_kl: torch.Tensor   # () 0.5·mean((logp − old_logp)²), the usual PPO drift estimate


def clipped_surrogate(logp, old_logp, adv, clip_range: float) -> Surrogate:
    """PPO: mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))), ρ = exp(logp − old_logp).

    logp carries the gradient; old_logp is a constant (detached here); shapes broadcastable, e.g. (B,)
    or (B, T). adv is used as given: pass a detached advantage for a policy gradient (GRPO rewards have
    no graph anyway); only the "released" OPD estimator passes one that keeps its graph on purpose.
    Where the clipped branch wins (ρ out of range on the side that would increase the objective) the
    loss is flat in θ, so the gradient through ρ is exactly zero there.
    """
    old_logp = old_logp.detach()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio ** 2).mean()
    return Surrogate(loss, ratio.detach(), clipfrac, approx_kl)


def reference_kl(mean, ref_mean, std, reduce: str = "mean"):
    """β-KL term KL(π_θ(·|x_t) ‖ π_ref(·|x_t)) = ‖μ − μ_ref‖²/(2 std²) per sample, (B,), summed
    (reduce="sum", the exact KL) or averaged over the D elements (reduce="mean", default). Not detached
    w.r.t. `mean`. flow_grpo's code divides by 2σ_t² instead of 2 std², i.e. computes exact·|Δt|/D, which
    down-weights the steps with small |Δt|; we keep the exact KL."""
    return gaussian_kl(mean, ref_mean.detach(), std, reduce=reduce)   # (B,), the reference is frozen


class GRPOLoss(NamedTuple):
    loss: torch.Tensor        # () L_pg + β·mean(KL)
    policy_loss: torch.Tensor  # () detached
    kl: torch.Tensor          # () detached mean reference KL (0 when β = 0 or no reference given)
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor


def grpo_loss(logp, old_logp, adv, clip_range: float, beta: float = 0.0, mean=None,
              ref_mean=None, std=None) -> GRPOLoss:
    """One Flow-GRPO step loss: clipped surrogate + β·reference KL (if beta > 0)."""
    pg = clipped_surrogate(logp, old_logp, adv, clip_range)
    loss, kl = pg.loss, torch.zeros(())
    if beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, ref_mean and std for the reference KL")
        kl_b = reference_kl(mean, ref_mean, std)   # (B,)
        loss = loss + beta * kl_b.mean()
        kl = kl_b.detach().mean()
    r = pg.ratio
    return GRPOLoss(loss, pg.loss.detach(), kl, r.mean(), r.min(), r.max(), pg.clipfrac, pg.approx_kl)


class GradientSignal(NamedTuple):
    kappa: torch.Tensor            # () expected cosine of two independent batch gradients, ≈ SNR²/(1 + SNR²)
    se: torch.Tensor               # () its jackknife standard error over the K batches
    batches_for_snr1: torch.Tensor  # () (1 − κ)/κ: batches to average for a gradient with SNR 1 (inf if κ ≤ 0)


def gradient_signal(grads) -> GradientSignal:
    """How much of a policy gradient is signal, from K ≥ 3 independent batch gradients g_k = s + n_k (K, P).

    κ = mean_{i≠j} <g_i, g_j> / mean_i ‖g_i‖² estimates ‖s‖² / E‖g‖² without bias in the numerator (the
    cross terms of independent noises average to 0). Averaging m batches gives SNR² = m·κ/(1 − κ), hence
    batches_for_snr1 = (1 − κ)/κ. While κ is small it grows about in proportion to the samples in a batch;
    no step size makes up for a small κ (Adam moves as far on noise as on signal), only more samples do.
    """
    g = torch.as_tensor(grads, dtype=torch.float64)                   # (K, P)
    K = g.shape[0]
    if K < 3:
        raise ValueError(f"gradient_signal needs at least 3 batch gradients, got {K}")
    gram = g @ g.T                                                   # (K, K)
    sq = gram.diagonal()                                             # (K,) ‖g_k‖²

    def kappa_of(keep):                                              # κ over the batches in `keep`
        G, d = gram[keep][:, keep], sq[keep]
        k = d.shape[0]
        return ((G.sum() - d.sum()) / (k * (k - 1))) / d.mean()

    kappa = kappa_of(torch.arange(K))
    loo = torch.stack([kappa_of(torch.cat([torch.arange(i), torch.arange(i + 1, K)])) for i in range(K)])  # (K,)
    se = ((K - 1) / K * ((loo - loo.mean()) ** 2).sum()).sqrt()      # jackknife
    need = (1 - kappa) / kappa if kappa > 0 else torch.tensor(float("inf"), dtype=torch.float64)
    return GradientSignal(kappa.float(), se.float(), need.float())


if __name__ == "__main__":
    import math

    torch.manual_seed(0)
    G = 4
    rewards = torch.tensor([1., 2., 3., 4., 5., 5., 5., 5., 0., 1., 0., 1.])   # group 2 has zero spread
    A = group_advantages(rewards, G)
    print("advantages", A.view(-1, G))
    means, zf = A.view(-1, G).mean(1), zero_std_fraction(rewards, G).item()
    print("group means", means, " zero_std_fraction", zf, "(expect 0, 0, 0 and 1/3)")
    assert means.abs().max() < 1e-6 and torch.equal(A[4:8], torch.zeros(4)), "advantages do not centre per group"
    assert abs(zf - 1 / 3) < 1e-7, "zero_std_fraction is not 1/3"
    logp = torch.randn(12, requires_grad=True)
    s = clipped_surrogate(logp, logp.detach(), A, 1e-4)
    print(f"ratio==1: loss {s.loss.item():.6f} vs -mean(A) {-A.mean().item():.6f}, clipfrac {s.clipfrac.item()}")
    assert abs(s.loss.item() + A.mean().item()) < 1e-6 and s.clipfrac == 0, "at ratio 1 the loss is not -mean(A)"
    m = torch.randn(2, 4, 8, 8)
    std = torch.full((2, 1, 1, 1), 0.3)
    m_ref = m + 0.1
    exact_sum, closed = reference_kl(m, m_ref, std, reduce="sum"), 0.01 * m[0].numel() / (2 * 0.09)
    print("exact KL (sum)", exact_sum, " closed form", closed)
    assert torch.allclose(exact_sum, torch.full((2,), closed), rtol=1e-5, atol=0), "KL != ‖Δμ‖²/(2 std²)"
    dt = -0.1   # flow_grpo's Δt-less KL divides by 2σ_t², σ_t = std/√|Δt|: exact·|Δt|/D
    no_dt, want = reference_kl(m, m_ref, std / abs(dt) ** 0.5), exact_sum * abs(dt) / m[0].numel()
    print("Δt-less form", no_dt, " = exact·|Δt|/D", want)
    assert torch.allclose(no_dt, want, rtol=1e-5, atol=0), "the Δt-less KL is not exact·|Δt|/D"
    # the clip acts on the ratio of MEAN-reduced log-probs: ε = 1e-4 allows a summed log-prob change of
    # about D·1e-4 before it binds (D = 256 here: 0.026 nats; the world's latents, D = 512: 0.05 nats;
    # SD3.5 at 512 px, D = 16·64·64 = 65,536: 6.6 nats)
    D = m[0].numel()
    for total in (0.02, 0.2):   # summed log-prob changes, in nats
        s = clipped_surrogate(torch.full((4,), total / D), torch.zeros(4), torch.ones(4), 1e-4)
        print(f"summed log-prob change {total} nats over D = {D}: ratio {s.ratio[0].item():.6f}, "
              f"clipfrac {s.clipfrac.item()} (expect {float(total > D * 1e-4)})")
        assert abs(s.ratio[0].item() - math.exp(total / D)) < 1e-6, "ratio != exp(summed change / D)"
        assert s.clipfrac == float(total > D * 1e-4), f"the clip does not bind at D·1e-4 nats ({total} nats)"
    sig = torch.randn(1000)
    sig = 0.2 * sig / sig.norm()                                      # ‖s‖² = 0.04, noise E‖n‖² = 1
    noisy = sig + torch.randn(64, 1000) / 1000 ** 0.5
    gs = gradient_signal(noisy)
    print("gradient_signal of s + n (expect kappa ≈ 0.04/1.04 = 0.038 within 4 SE):", gs)
    assert abs(gs.kappa - 0.04 / 1.04) < 4 * gs.se, "gradient_signal's kappa is not 0.04/1.04 within 4 SE"
