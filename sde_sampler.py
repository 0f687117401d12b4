"""
Flow-GRPO's equal-marginal SDE as a per-step Gaussian policy, with log-probs, the per-step Gaussian KL
and a rollout that records every transition (Flow-OPD §2.4; used by GRPO, the OPD loss and MAR).

    dx_t = [v_θ + σ_t²/(2t)·(x_t + (1 - t)·v_θ)] dt + σ_t dw,      σ_t = a·sqrt(t / (1 - t)),  a = noise_level
    Euler–Maruyama:  π_θ(x_next | x_t) = N(μ_θ, σ_t²·|Δt|·I)
    μ_θ = x + [v + σ_t²/(2t)·(x + (1 - t)·v)]·Δt
        = x·(1 + σ_t²Δt/(2t)) + v·(1 + σ_t²(1 - t)/(2t))·Δt
        = x·(1 + σ_t²Δt/(2t)) + v·(1 + a²/2)·Δt        since σ_t²(1 - t)/(2t) = a²/2 (not at the t = 1 substitution)

Convention (as in flow_matching.py, SD3 / Flow-GRPO): t = sigma ∈ [0, 1], t = 1 is noise, t = 0 is data,
x_t = (1 - t)·x0 + t·ε, v = ε - x0, steps run t -> t_next < t so Δt = t_next - t < 0 and |Δt| = t - t_next.
(The paper's prose and facebookresearch/flow_matching use the opposite direction.)

All step arithmetic is fp32 (x, v, t are cast inside): the σ_t²Δt/(2t) terms and the log-prob differences are
small, bf16/fp16 rounds them away and the PPO ratio drifts from 1 (flow_grpo#204, GRPO-Guard).

Differences from the paper:
  1) σ_t is infinite at t = 1; like Flow-GRPO we put 1 - t_next (the schedule's sigmas[1] at the first
     step) in its denominator there. The paper never writes σ_t.
  2) gaussian_logprob(reduce="mean") averages over latent elements (Flow-GRPO's choice), so it is not the
     true log-likelihood; reduce="sum" gives the true one.
  3) The last step (t_next = 0) keeps std = σ_t·sqrt(t) > 0, as Flow-GRPO does: the final sample carries a
     little noise. Flow-GRPO trains only the first T - 1 steps (timestep_fraction 0.99) for this reason.

Self-check: python sde_sampler.py
"""
import math
from typing import Callable, Collection, NamedTuple, Optional

import torch

from flow_matching import Time, broadcast_t


class SDEStep(NamedTuple):
    x_next: torch.Tensor  # (B, C, H, W) fp32 sample of π(· | x)
    mean: torch.Tensor    # (B, C, H, W) fp32 μ_θ
    std: torch.Tensor     # (B, 1, 1, 1) fp32 σ_t·sqrt(|Δt|)


def sigma_t(t: Time, t_next: Time, noise_level: float) -> Time:
    """σ_t = a·sqrt(t / (1 - t)). At t = 1 (σ_t = ∞) the denominator becomes 1 - t_next, which is exactly
    Flow-GRPO's substitution of sigmas[1] at the first step. Float in -> float out, tensor in -> tensor out."""
    if not torch.is_tensor(t) and not torch.is_tensor(t_next):
        return noise_level * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
    t, t_next = torch.as_tensor(t), torch.as_tensor(t_next)
    denom = torch.where(t >= 1, 1 - t_next, 1 - t)  # never 0 for a valid step t > t_next
    return noise_level * torch.sqrt(t / denom)


def step_mean(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time, noise_level: float) -> torch.Tensor:
    """μ_θ = x + [v + σ_t²/(2t)·(x + (1 - t)·v)]·Δt, (B, C, H, W) fp32: the mean of the Gaussian step.
    Every loss that compares steps (GRPO's ratio, the OPD KL, MAR) differentiates this function."""
    x, v = x.float(), v.float()  # fp32: see module docstring
    t, t_next = broadcast_t(t, x), broadcast_t(t_next, x)  # (B, 1, 1, 1) each
    sig = sigma_t(t, t_next, noise_level)  # (B, 1, 1, 1)
    return x + (v + sig**2 / (2 * t) * (x + (1 - t) * v)) * (t_next - t)  # (B, C, H, W)


def step_std(x: torch.Tensor, t: Time, t_next: Time, noise_level: float) -> torch.Tensor:
    """std = σ_t·sqrt(|Δt|), (B, 1, 1, 1) fp32 (x gives the shape and device only)."""
    t, t_next = broadcast_t(t, x).float(), broadcast_t(t_next, x).float()
    return sigma_t(t, t_next, noise_level) * torch.sqrt(t - t_next)


def sde_step(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time, noise_level: float,
             noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> SDEStep:
    """One Euler–Maruyama step of the SDE above, t ∈ (0, 1] -> t_next ∈ [0, t): x_next = μ_θ + std·noise.
    Returns fp32 SDEStep. noise_level = 0 gives exactly euler_step(x, v, t, t_next) with std 0 (σ_t = 0 kills
    the correction)."""
    mean, std = step_mean(x, v, t, t_next, noise_level), step_std(x, t, t_next, noise_level)
    if noise is None:
        # drawn on the generator's own device (a CPU generator gives the same stream on any device)
        gen_device = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)
    return SDEStep(x_next=mean + std * noise.float(), mean=mean, std=std)


def per_sample_std(std, x: torch.Tensor) -> torch.Tensor:
    """std as fp32 on x's device, ready to broadcast against x (B, ...): a (B,) std (e.g. Trajectory.std[:, i])
    becomes (B, 1, ..., 1); any other shape broadcastable to x (scalar, (B, 1, 1, 1), ...) is kept as is.
    The one std convention of the step log-prob and KL here, of opd_loss and (through gaussian_kl) of mar."""
    std = torch.as_tensor(std, device=x.device).float()
    return std.reshape(-1, *([1] * (x.dim() - 1))) if std.dim() == 1 else std


def _reduce(per_elem: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "sum":
        return per_elem.flatten(1).sum(dim=1)  # (B,)
    if reduce == "mean":
        return per_elem.flatten(1).mean(dim=1)  # (B,)
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """log N(x; mean, std²·I) per sample, (B,), in fp32. Needs std > 0.

    "sum": the true log-density over all non-batch dims.
    "mean": averaged over the D elements (Flow-GRPO). With D ≈ 10^4–10^5 latent elements a summed log-ratio
    moves by thousands of nats for a tiny parameter change, exp() overflows and PPO ratios are never near 1.
    Dividing by D acts like a per-element temperature: ratios stay near 1 and clip ranges stay meaningful,
    at the cost of no longer being the true likelihood.
    """
    x, mean = x.float(), mean.float()
    std = per_sample_std(std, x)  # (B, 1, 1, 1)
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)  # (B, C, H, W)
    return _reduce(logp, reduce)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """KL(N(μ_p, std²I) ‖ N(μ_q, std²I)) = ‖μ_p - μ_q‖² / (2·std²), per sample (B,), fp32. Needs std > 0.
    "sum" is the exact KL; "mean" averages over elements. Shared by GRPO's β-KL, the OPD loss and MAR.
    flow_grpo's code uses mean((μ_p - μ_q)²)/(2·σ_t²) without |Δt|, i.e. the exact KL × |Δt| / D."""
    mean_p, mean_q = mean_p.float(), mean_q.float()
    std = per_sample_std(std, mean_p)  # (B, 1, 1, 1)
    return _reduce((mean_p - mean_q) ** 2 / (2 * std**2), reduce)  # (B,)


class Trajectory(NamedTuple):
    x_t: torch.Tensor     # (B, T, C, H, W) state before each step (x_t[:, 0] = x1)
    x_next: torch.Tensor  # (B, T, C, H, W) state after each step (x_next[:, i] = x_t[:, i + 1])
    mean: torch.Tensor    # (B, T, C, H, W) μ_θ of each step
    std: torch.Tensor     # (B, T) σ_t·sqrt(|Δt|); 0 on ODE steps
    logp: torch.Tensor    # (B, T) mean-reduced log π(x_next | x_t); 0 on ODE steps
    t: torch.Tensor       # (T,) sigmas[:-1]
    t_next: torch.Tensor  # (T,) sigmas[1:]

    @property
    def x0(self) -> torch.Tensor:
        return self.x_next[:, -1]  # (B, C, H, W) the final sample


def rollout(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x1: torch.Tensor,
            sigmas: torch.Tensor, noise_level: float, generator: Optional[torch.Generator] = None,
            sde_steps: Optional[Collection[int]] = None) -> Trajectory:
    """Sample x1 -> x0 over the T = len(sigmas) - 1 steps of `sigmas` (1 -> 0) and record every transition.

    velocity_fn(x, t): x (B, ...) fp32, t (B,) -> v (B, ...); conditioning and CFG live inside it (cast x to
    the model's dtype there). sde_steps: step indices that use noise_level; the others are ODE steps
    (noise_level 0, std 0; their logp is meaningless and is stored as 0). Default: every step is SDE.
    Noise is drawn on every step, ODE ones included, so the generator stream does not depend on sde_steps.
    Nothing is detached and grad mode is the caller's choice. States after the first are fp32.
    Trajectory.logp is the sampling ("old") log-prob: it has no gradient w.r.t. θ even with grad on, because
    x_next - mean = std·noise; a policy gradient must recompute gaussian_logprob(x_next.detach(), μ_θ, std).
    """
    x, B = x1.float(), x1.shape[0]
    xs, nexts, means, stds, logps = [], [], [], [], []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i].expand(B), sigmas[i + 1].expand(B)  # (B,), (B,)
        a = noise_level if sde_steps is None or i in sde_steps else 0.0
        step = sde_step(x, velocity_fn(x, t), t, t_next, a, generator=generator)
        logp = gaussian_logprob(step.x_next, step.mean, step.std) if a > 0 else x.new_zeros(B)  # (B,)
        xs.append(x), nexts.append(step.x_next), means.append(step.mean)
        stds.append(step.std.reshape(B)), logps.append(logp)
        x = step.x_next
    return Trajectory(x_t=torch.stack(xs, 1), x_next=torch.stack(nexts, 1), mean=torch.stack(means, 1),
                      std=torch.stack(stds, 1), logp=torch.stack(logps, 1), t=sigmas[:-1], t_next=sigmas[1:])


if __name__ == "__main__":
    from flow_matching import euler_sample, euler_step, time_grid

    g = torch.Generator().manual_seed(0)
    s1, s2 = sigma_t(0.5, 0.4, 0.7), sigma_t(1.0, 0.75, 0.7)
    print(f"sigma_t(0.5, 0.4, 0.7) = {s1:.4f} (expect 0.7)")
    print(f"sigma_t(1.0, 0.75, 0.7) = {s2:.4f} (expect 1.4, the t = 1 substitution)")
    assert math.isclose(s1, 0.7, rel_tol=1e-12) and math.isclose(s2, 1.4, rel_tol=1e-12), "sigma_t is wrong"

    x, v = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    ode = sde_step(x, v, 0.6, 0.5, 0.0, generator=g)
    same = torch.equal(ode.x_next, euler_step(x, v, 0.6, 0.5))
    print("noise 0 == Euler:", same, " std:", ode.std.flatten().tolist())
    assert same and (ode.std == 0).all(), "sde_step at noise 0 is not exactly euler_step with std 0"

    xb = x[:1].expand(20_000, -1, -1, -1)  # many samples of one transition
    s = sde_step(xb, v[:1].expand_as(xb), 0.6, 0.5, 0.7, generator=g)
    std, emp = s.std[0].item(), (s.x_next - s.mean).std().item()
    se = std / (2 * s.mean.numel()) ** 0.5   # standard error of a sample std
    print(f"std = {std:.5f}, empirical std = {emp:.5f} (expect equal within 4 SE = {4 * se:.5f})")
    assert abs(emp - std) < 4 * se, "the SDE step's noise does not have std σ_t·sqrt(|Δt|)"
    lp = gaussian_logprob(s.x_next, s.mean, s.std, "sum")[:8]
    ref = torch.distributions.Normal(s.mean[:8], s.std[:8]).log_prob(s.x_next[:8]).flatten(1).sum(1)
    print(f"logprob vs torch Normal, max |diff| = {(lp - ref).abs().max():.2e}")
    assert torch.allclose(lp, ref, rtol=1e-6, atol=0), "gaussian_logprob(sum) != torch's Normal log-density"

    x_star = torch.randn(1, 4, 8, 8, generator=g)  # point-mass data: exact velocity (x - x0*)/t
    vel = lambda x, t: (x - x_star) / broadcast_t(t, x)
    x1, sig = torch.randn(2, 4, 8, 8, generator=g), time_grid(10, shift=3.0)
    ode_traj = rollout(vel, x1, sig, 0.0)
    same = torch.equal(ode_traj.x0, euler_sample(vel, x1, sig))
    print("rollout(noise 0).x0 == euler_sample:", same)
    assert same, "rollout at noise 0 is not exactly euler_sample"
    traj = rollout(vel, x1, sig, 0.7, generator=g)
    shapes = tuple(traj.x_t.shape), tuple(traj.std.shape), tuple(traj.logp.shape)
    print("SDE rollout shapes:", *shapes)
    assert shapes == ((2, 10, 4, 8, 8), (2, 10), (2, 10)), "Trajectory shapes are not (B, T, ...), (B, T), (B, T)"
    rms, last = (traj.x0 - x_star).pow(2).mean().sqrt().item(), traj.std[0, -1].item()
    print(f"SDE rollout |x0 - x0*| rms = {rms:.4f} (expect about the last-step std {last:.4f}: Difference 3)")
    assert 0.8 * last < rms < 1.5 * last, "the SDE sample does not end about one last-step std from x0*"
