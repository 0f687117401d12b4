"""
Rectified-flow / flow-matching basics: interpolation, velocity target, SD3 timestep sampling,
sigma grid, the flow-matching loss, classifier-free guidance and the Euler ODE sampler
(Flow-OPD §2.2: x_t = (1 - t) x_0 + t x_1,  L_FM = E ‖v_θ(x_t, t) - (x_1 - x_0)‖²,  dx_t = v dt).

Convention (SD3 / diffusers / Flow-GRPO): t = sigma ∈ [0, 1], t = 1 is pure noise ε, t = 0 is data x0.
    x_t = (1 - t)·x0 + t·ε,   velocity v = dx_t/dt = ε - x0,
    sampling integrates t from 1 down to 0, so every Euler step has Δt = t_next - t < 0.
(The paper's prose and facebookresearch/flow_matching use the opposite direction: t = 1 is data there.)
Tensors are latents (B, C, H, W); any (B, ...) works and per-sample reductions run over all non-batch
dims. Time arguments `t` are (B,) tensors or Python floats and are broadcast to x inside.

Departure (sampling grid): `time_grid` is linspace(1, 0, T+1) then the SD3 shift, T steps with exact
endpoints; the miniature world samples on it. SD3 models sample on their diffusers scheduler's grid instead
(support/models.T2IModel.time_grid), which ends in a tiny last step. Why and how they differ: PAPER_NOTES.md §8.

Self-check: python flow_matching.py
"""
from typing import Callable, Optional, Union

import torch

Time = Union[torch.Tensor, float]


def broadcast_t(t: Time, x: torch.Tensor) -> torch.Tensor:
    """(B,) tensor or float -> (B, 1, ..., 1) tensor with x's dtype/device, ready to multiply x."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.expand(x.shape[0]).reshape(x.shape[0], *([1] * (x.dim() - 1)))  # (B, 1, 1, 1)


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: Time) -> torch.Tensor:
    """x_t = (1 - t)·x0 + t·ε  (the OT / rectified-flow path of §2.2)."""
    t = broadcast_t(t, x0)  # (B, 1, 1, 1)
    return (1 - t) * x0 + t * eps  # (B, C, H, W)


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """v = d x_t / dt = ε - x0, constant along the straight path."""
    return eps - x0  # (B, C, H, W)


def shift_sigmas(t: Time, shift: float) -> Time:
    """SD3 resolution shift  t' = shift·t / (1 + (shift - 1)·t); identity at shift = 1, keeps 0 and 1 fixed.
    shift > 1 spends more of the schedule near the noise end, which high-resolution images need."""
    return shift * t / (1 + (shift - 1) * t)


def sample_t(batch_size: int, generator: Optional[torch.Generator] = None, logit_mean: float = 0.0,
             logit_std: float = 1.0, shift: float = 1.0, device=None) -> torch.Tensor:
    """SD3 logit-normal training times: t = sigmoid(u), u ~ N(m, s²), then shifted. Returns (B,) in (0, 1).
    The logit-normal puts most weight on mid t, where the velocity is hardest to predict."""
    u = logit_mean + logit_std * torch.randn(batch_size, generator=generator, device=device)  # (B,)
    return shift_sigmas(torch.sigmoid(u), shift)  # (B,)


def time_grid(num_steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """(T+1,) float32 sigmas from exactly 1.0 down to exactly 0.0: linspace, then the SD3 shift.
    Step i goes from sigmas[i] to sigmas[i+1]. The world's grid; SD3 models use their scheduler's (PAPER_NOTES §8)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float32, device=device)  # (T+1,)
    return shift_sigmas(sigmas, shift)  # (T+1,); shift maps 1 -> 1 and 0 -> 0 exactly


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor,
                       reduce: str = "mean") -> torch.Tensor:
    """L_FM = ‖v_θ(x_t, t) - (ε - x0)‖², averaged over elements.
    reduce="mean" -> scalar; reduce="none" -> (B,) per-sample mean (for per-t diagnostics)."""
    err = (v_pred.float() - velocity_target(x0, eps).float()) ** 2  # (B, C, H, W); fp32 so bf16 models average stably
    per_sample = err.flatten(1).mean(dim=1)  # (B,)
    if reduce == "mean":
        return per_sample.mean()
    if reduce == "none":
        return per_sample
    raise ValueError(f"reduce must be 'mean' or 'none', got {reduce!r}")


def guidance(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + w·(v_cond - v_uncond); w = 1 is plain conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """One Euler step of dx = v dt: x_next = x + v·(t_next - t), with t_next - t < 0 when sampling."""
    dt = broadcast_t(t_next, x) - broadcast_t(t, x)  # (B, 1, 1, 1); same expression as sde_step so noise 0 matches bitwise
    return x + v * dt


def euler_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x1: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the ODE from x1 ~ N(0, I) at sigmas[0] = 1 to x0 at sigmas[-1] = 0 with Euler steps.

    velocity_fn(x, t): x (B, ...), t (B,) -> v (B, ...). Prompt conditioning and CFG (see `guidance`) live
    inside velocity_fn, written by the caller. Grad mode is the caller's choice (no torch.no_grad here).
    """
    x, B = x1, x1.shape[0]
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i].expand(B), sigmas[i + 1].expand(B)  # (B,), (B,)
        x = euler_step(x, velocity_fn(x, t), t, t_next)  # (B, C, H, W)
    return x


if __name__ == "__main__":
    torch.manual_seed(0)
    ulp = torch.finfo(torch.float32).eps
    sig = time_grid(4, shift=3.0)
    print("time_grid(4, shift=3):", [round(s, 4) for s in sig.tolist()], "(expect [1, 0.9, 0.75, 0.5, 0])")
    assert sig[0] == 1 and sig[-1] == 0, "time_grid endpoints are not exactly 1 and 0"
    assert torch.allclose(sig, torch.tensor([1, 0.9, 0.75, 0.5, 0]), rtol=1e-6, atol=0), "time_grid(4, 3) is wrong"

    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ends = torch.equal(interpolate(x0, eps, 0.0), x0), torch.equal(interpolate(x0, eps, 1.0), eps)
    print("x_t endpoints exact:", *ends)
    assert all(ends), "interpolate is not exactly x0 at t = 0 and ε at t = 1"

    c = torch.randn(3, 4, 8, 8)
    x0_hat = euler_sample(lambda x, t: c, eps, time_grid(7, shift=3.0))
    err, tol = (x0_hat - (eps - c)).abs().max(), 7 * 4 * ulp * (eps.abs() + c.abs()).max()   # 7 steps' rounding
    print(f"constant field, Euler error |x0 - (x1 - c)|max = {err:.2e} (expect rounding only, < {tol:.1e})")
    assert err < tol, "Euler is not exact on a constant field"

    # Point-mass data x0*: the exact velocity is (x_t - x0*)/t, and Euler lands on x0* exactly at t = 0.
    x_star = torch.randn(1, 4, 8, 8)
    x0_hat = euler_sample(lambda x, t: (x - x_star) / broadcast_t(t, x), eps, time_grid(5))
    err, tol = (x0_hat - x_star).abs().max(), 4 * ulp * (eps.abs() + x_star.abs()).max()   # the last step's rounding
    print(f"point-mass field, |x0 - x0*|max = {err:.2e} (expect rounding only, < {tol:.1e})")
    assert err < tol, "Euler does not land on the point mass x0*"

    t = sample_t(100_000, torch.Generator().manual_seed(0))
    ts = sample_t(100_000, torch.Generator().manual_seed(0), shift=3.0)
    print(f"sample_t mean: shift 1 -> {t.mean():.4f} (expect 0.5 within 4 SE = {4 * t.std() / 100_000 ** 0.5:.4f}), "
          f"shift 3 -> {ts.mean():.4f} (expect every t moved towards the noise end)")
    assert (t.mean() - 0.5).abs() < 4 * t.std() / 100_000 ** 0.5, "sample_t(shift 1) mean is not 0.5 within 4 SE"
    assert (ts >= t).all() and ts.mean() > t.mean(), "the shift does not move times towards t = 1"
    fm = flow_matching_loss(velocity_target(x0, eps), x0, eps).item()
    print("FM loss of the exact velocity:", fm)
    assert fm == 0, "the FM loss of the exact velocity is not exactly 0"
