"""
On-policy distillation loss for an SDE (flow) student against a teacher velocity field.
Flow-OPD paper §2.3 (Eq. "opd": reverse KL), §2.6 (dense KL reward = w(t)‖v_θ − v_target‖²),
§2.7 (advantage = raw reward, PPO-clipped surrogate), §8 (paper-vs-code); PAPER_NOTES.md §2 and §6.

Both policies are Gaussian steps with the same std = σ_t√|Δt| (same sampler, same noise level), so
  KL_t = KL(π_θ(·|x_t) ‖ π_T(·|x_t)) = ‖μ_θ − μ_T‖² / (2 std²) = w(t)·‖v_θ − v_T‖²   (sum over D elements)
is a closed-form function of the STATE x_t only. Three estimators of ∇ E[Σ_t KL_t], one option:

  "pathwise" (default)  loss = mean_i KL_t(μ_θ(x_t^i), sg μ_T) / D. Differentiates the closed-form KL at the
      student-visited states, holding the states fixed (GKD-style "direct distillation"). Lowest variance.
      This is what the released code effectively trains with (its reward is not detached) and what its
      later `reward_mode="gkd"` does openly.
  "logratio"            Tinker OPD: the action-dependent reward r = log π_T(x_next|x_t) − log π_old(x_next|x_t)
      (true, summed log-densities: r = −[‖x_next − μ_T‖² − ‖x_next − μ_old‖²]/(2 std²), E[r] = −KL_t) is
      detached and used as the advantage in the PPO surrogate with ρ = exp(log π_θ − log π_old) (summed).
      Unbiased for the reverse KL because E_x∼π[∇log π_θ(x)·(log π_θ − log π_T)(x)] = ∇KL (the extra
      E[∇log π_θ] term is 0). The summed log-prob is what makes it unbiased: a per-element mean would
      scale the score by 1/D while r stays summed. Loss divided by D (same scale as "pathwise").
  "released"            Flow-OPD code @434ab16, kept for faithfulness: A = clamp(−KL_code(θ), ±adv_clip)
      NOT detached, KL_code = mean_D((μ_θ − μ_T)²)/(2σ_t²) = KL_t·|Δt|/D (no Δt, PAPER_NOTES.md §6), PPO
      clip ε = 1e-4 on the mean-reduced log-prob ratio. Its gradient ≈ ∇KL_code: pathwise × |Δt|.

Why the paper's literal recipe cannot train (and why the released code trains anyway): the paper
detaches the reward r_t = −w(t)‖sg(v_θ) − v_T‖², which depends on x_t only. At discount 0 the policy
gradient is then E_{x_next∼π_θ}[∇log π_θ(x_next|x_t)]·r(x_t) = 0·r(x_t) = 0: a state-only reward is a
baseline, it carries no signal (Flow-Factory#166, miles#2362). The released code trains only because
its "reward" keeps the graph of μ_θ, so A itself is differentiated (a pathwise KL gradient); the
PPO clip of 1e-4 then bounds nothing, since the gradient does not flow through ρ alone.

The total loss (§2.8), written once, here: `flow_opd_loss` takes the student's, the routed teacher's and
the MAR anchor's velocities at the student's states, turns them into Gaussian-step means
(sde_sampler.step_mean) and returns
    L = L_OPD(μ_θ, μ_T) + λ·MAR(μ_θ, μ_anchor)              (mar.mar_loss; λ = cfg.mar_lambda)
It is pure tensor code, the "velocity-discrepancy core" that train.py compiles with torch.compile.

Inputs: per-step tensors (B, ...), one row per sampled step. old_logp is the MEAN-reduced
log π_old(x_next|x_t), exactly as sde_sampler.rollout stores it (Trajectory.logp); the summed one is D·mean,
so both conventions derive from it without a sum that could differ bitwise from the stored value (ρ is
exactly 1 on-policy).

Differences from the paper:
  1) Default estimator is "pathwise", not the detached-reward PG (which has zero expected gradient, above).
  2) Loss scale is per element (KL_sum / D), like flow_grpo's mean-reduced losses; the `kl` output is the
     exact summed KL for logging. The paper sums over elements and divides by 2σ_t²Δt (exact KL).
  3) The loss averages over steps and samples; the paper's J sums over t and averages over B×G.

Self-check: python opd_loss.py
"""
from typing import NamedTuple

import torch

from grpo import clipped_surrogate
from mar import mar_loss
from sde_sampler import gaussian_kl, gaussian_logprob, per_sample_std, sigma_t, step_mean

ESTIMATORS = ("pathwise", "logratio", "released")
DEFAULT_CLIP = {"pathwise": None, "logratio": 0.2, "released": 1e-4}   # Tinker PPO 0.2; flow_grpo 1e-4


def kl_weight(t, t_next, noise_level: float):
    """w(t) = (|Δt|/2)·(σ_t(1−t)/(2t) + 1/σ_t)², (B,) for t (B,). Step KL = w(t)·‖v_s − v_T‖².

    Derivation (§2.6): μ = x(1 + σ_t²Δt/(2t)) + v(1 + σ_t²(1−t)/(2t))Δt, so the x terms cancel:
      μ_s − μ_T = (v_s − v_T)(1 + σ_t²(1−t)/(2t))Δt,
      KL = ‖μ_s − μ_T‖²/(2σ_t²|Δt|) = (|Δt|/2)·((1 + σ_t²(1−t)/(2t))/σ_t)²·‖v_s − v_T‖²
         = (|Δt|/2)·(1/σ_t + σ_t(1−t)/(2t))²·‖v_s − v_T‖².
    """
    t = torch.as_tensor(t, dtype=torch.float32)
    t_next = torch.as_tensor(t_next, dtype=torch.float32)
    s = sigma_t(t, t_next, noise_level)                           # same σ_t as sde_step (incl. t = 1)
    return (t - t_next).abs() / 2 * (s * (1 - t) / (2 * t) + 1 / s) ** 2


class OPDLoss(NamedTuple):
    loss: torch.Tensor        # () scalar to minimise (scale: see module docstring)
    kl: torch.Tensor          # (B,) detached exact KL_t (sum over elements)
    ratio_mean: torch.Tensor  # () diagnostics of the ratio the estimator uses (summed for "pathwise"
    ratio_min: torch.Tensor   #    and "logratio", mean-reduced for "released"); nan when x_next or
    ratio_max: torch.Tensor   #    old_logp is not given
    clipfrac: torch.Tensor    # () nan for "pathwise" (nothing is clipped)
    approx_kl: torch.Tensor   # () 0.5·mean(log ρ²), the usual PPO drift estimate


def opd_loss(estimator: str, mean_s, mean_T, std, x_next=None, old_logp=None, *, clip_range=None,
             dt=None, adv_clip: float = 5.0) -> OPDLoss:
    """OPD loss of one batch of student steps. mean_s (B, ...) carries the gradient (μ_θ from
    step_mean with the student velocity); mean_T is the routed teacher's μ (detached here); std is
    σ_t√|Δt|, (B,) or broadcastable; x_next the sampled next latent; old_logp (B,) the mean-reduced
    log π_old(x_next|x_t); dt = t_next − t (float or (B,)), needed by "released" only.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    clip_range = DEFAULT_CLIP[estimator] if clip_range is None else clip_range
    B, D = mean_s.shape[0], mean_s[0].numel()
    m_T, s = mean_T.detach(), per_sample_std(std, mean_s)                      # s (B, 1, ..., 1) fp32
    kl = gaussian_kl(mean_s, m_T, s)                                           # (B,) exact, grad to μ_θ

    log_ratio = None                                                           # (B,) mean-reduced
    if x_next is not None and old_logp is not None:
        x = x_next.detach()
        logp = gaussian_logprob(x, mean_s, s, reduce="mean")                   # (B,) grad to μ_θ
        log_ratio = logp - old_logp.detach()
    elif estimator != "pathwise":
        raise ValueError(f"estimator={estimator!r} needs x_next and old_logp (mean-reduced)")

    nan = torch.full((), float("nan"))
    if estimator == "pathwise":
        loss = kl.mean() / D
        if log_ratio is None:
            return OPDLoss(loss, kl.detach(), nan, nan, nan, nan, nan)
        r = torch.exp(D * log_ratio.detach())                                  # true density ratio
        return OPDLoss(loss, kl.detach(), r.mean(), r.min(), r.max(), nan,
                       0.5 * (D * log_ratio.detach()).pow(2).mean())

    if estimator == "logratio":
        with torch.no_grad():
            logp_T = gaussian_logprob(x, m_T, s, reduce="mean")                # (B,)
            adv = D * (logp_T - old_logp)                                      # (B,) summed log-ratio r
        # summed log-probs: ρ = exp(D·Δlogp_mean); logp = D·(...) keeps ∇ = ∇log π_sum
        pg = clipped_surrogate(D * log_ratio, torch.zeros_like(log_ratio), adv, clip_range)
        loss = pg.loss / D
    else:  # "released": advantage keeps the graph of μ_θ (no detach), mean-reduced ratio
        if dt is None:
            raise ValueError("estimator='released' needs dt = t_next − t (its KL has no Δt: KL·|Δt|/D)")
        abs_dt = torch.broadcast_to(torch.as_tensor(dt, dtype=torch.float32).abs().reshape(-1), (B,))
        kl_code = kl / D * abs_dt                                              # (B,) = mean/(2σ_t²)
        adv = torch.clamp(-kl_code, -adv_clip, adv_clip)
        pg = clipped_surrogate(log_ratio, torch.zeros_like(log_ratio), adv, clip_range)
        loss = pg.loss
    rho = pg.ratio
    return OPDLoss(loss, kl.detach(), rho.mean(), rho.min(), rho.max(), pg.clipfrac, pg.approx_kl)


def flow_opd_loss(*, x_t, x_next, t, t_next, std, old_logp, v_student, v_teacher, v_anchor, noise_level: float,
                  estimator: str, mar_lambda: float):
    """L = L_OPD + λ·MAR at the student's states (§2.7-2.8), the one place the total loss is written.
    x_t, x_next (B, C, h, w); t, t_next, std, old_logp (B,); v_student (B, C, h, w) carries the gradient;
    v_teacher (the routed teacher's) and v_anchor (the MAR anchor's, or None for no MAR) are detached.
    The means are fp32 (step_mean casts): bf16 loses the small σ_t²Δt terms and the ratio leaves 1.
    Returns (loss (), KL_t per sample (B,) detached, the MAR term () detached)."""
    mean = lambda v: step_mean(x_t, v, t, t_next, noise_level)  # noqa: E731  (B, C, h, w)
    mean_s = mean(v_student)
    opd = opd_loss(estimator, mean_s, mean(v_teacher), std, x_next, old_logp, dt=t_next - t)
    mar = mar_loss(mean_s, mean(v_anchor), std, mar_lambda).mean() if v_anchor is not None else torch.zeros(())
    return opd.loss + mar, opd.kl, mar.detach()


if __name__ == "__main__":
    from sde_sampler import sde_step

    g = torch.Generator().manual_seed(0)
    a, B = 0.7, 4
    x, v_T = torch.randn(B, 2, 2, 2, generator=g), torch.randn(B, 2, 2, 2, generator=g)
    v_s = v_T + 0.3 * torch.randn(B, 2, 2, 2, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    t_next = t - 0.1 * t
    st_s, st_T = sde_step(x, v_s, t, t_next, a), sde_step(x, v_T, t, t_next, a)
    lhs = gaussian_kl(st_s.mean, st_T.mean, st_s.std)
    rhs = kl_weight(t, t_next, a) * (v_s - v_T).pow(2).flatten(1).sum(1)
    rel = ((lhs - rhs).abs() / rhs).max().item()
    print("gaussian_kl  ", lhs)
    print("w(t)·‖Δv‖²   ", rhs, " max rel err", rel)
    # fp32: the two means' cancelling x_t terms cost tens of ulps (5e-6 here, < 3e-5 over 200 seeds)
    assert rel < 5e-5, f"KL != w(t)·‖Δv‖²: max rel err {rel:.2e} (want < 5e-5)"
    eq = opd_loss("pathwise", st_T.mean, st_T.mean, st_T.std).kl
    print("KL of equal policies:", eq.tolist())
    assert torch.equal(eq, torch.zeros(B)), "KL of equal policies is not exactly 0"

    # Monte-Carlo: one state, N samples; gradient of each estimator w.r.t. the student velocity, one copy of
    # v per sample so that N·v.grad[i] is sample i's gradient and their spread gives the standard error
    N, x1, vT1 = 20_000, x[:1].expand(20_000, -1, -1, -1), v_T[:1].expand(20_000, -1, -1, -1)
    grads, ses = {}, {}
    for est in ESTIMATORS:
        v = v_s[:1].expand_as(x1).clone().requires_grad_(True)
        step = sde_step(x1, v, 0.6, 0.5, a, generator=torch.Generator().manual_seed(1))
        mT = sde_step(x1, vT1, 0.6, 0.5, a).mean
        old = gaussian_logprob(step.x_next.detach(), step.mean.detach(), step.std, reduce="mean")
        opd_loss(est, step.mean, mT, step.std, step.x_next, old, dt=-0.1).loss.backward()
        per = N * v.grad.flatten(1)                                       # (N, D) per-sample gradients
        grads[est], ses[est] = per.mean(0), (per.std(0) / N ** 0.5).norm()
    p = grads["pathwise"]
    for est, gr in grads.items():
        scale = 0.1 if est == "released" else 1.0   # released ≈ |Δt| × pathwise
        err, tol = (gr - scale * p).norm() / (scale * p.norm()), 4 * ses[est] / (scale * p.norm()) + 1e-6
        print(f"{est:9s} MC grad (N={N}) rel. err vs pathwise (×{scale}): {err:.4f} (4 SE: {tol:.4f})")
        assert err < tol, f"{est}: MC gradient is not {scale} × pathwise within 4 standard errors"

    # w(t) on the 10 training steps of the world's grid (shift 1) and of SD3.5's (shift 3). The two terms
    # of w are σ_t(1−t)/(2t) and 1/σ_t; with σ_t² = a²t/(1−t) their ratio is a²/2 at every t < 1, so
    # w(t) = (|Δt|/2)·((1−t)/t)·(a/2 + 1/a)²: a multiplies every step's weight by the same factor and moves
    # no weight between steps (`python -m support.figures DIR` draws w(t) against t).
    from flow_matching import time_grid
    for shift in (1.0, 3.0):
        grid = time_grid(10, shift)
        w = kl_weight(grid[:-1], grid[1:], a)
        print(f"w(t), 10 steps, shift {shift:g}: " + ", ".join(f"{t:.2f}: {v:.3g}" for t, v in zip(grid[:-1], w)))
        tt, dt = grid[1:-1], grid[1:-1] - grid[2:]                        # the steps with t < 1
        assert torch.allclose(w[1:], dt / 2 * (1 - tt) / tt * (a / 2 + 1 / a) ** 2, rtol=1e-5, atol=0), \
            f"w(t) != (|Δt|/2)·((1−t)/t)·(a/2 + 1/a)² on the shift-{shift:g} grid"
    s = sigma_t(torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.4, 0.0]), a)
    ratio = (s * (1 - torch.tensor([0.9, 0.5, 0.1])) / (2 * torch.tensor([0.9, 0.5, 0.1]))) * s
    print(f"σ_t(1−t)/(2t) over 1/σ_t at t = 0.9, 0.5, 0.1: {ratio.tolist()} (a²/2 = {a * a / 2:.3f})")
    assert torch.allclose(ratio, torch.full((3,), a * a / 2), rtol=1e-5, atol=0), "term ratio of w(t) is not a²/2"
