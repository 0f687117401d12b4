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

Differences from the paper:
  1) time_grid is linspace(1, 0, T+1) then shifted, i.e. what diffusers' FlowMatchEulerDiscreteScheduler
     gives for `set_timesteps(sigmas=linspace(1, 1/T, T))`. Its *default* SD3 grid (used by Flow-GRPO)
     instead ends the linspace at sigma_min = 1e-3 before appending 0, so its last step is tiny.

Self-check: python flow_matching.py
"""
from typing import Callable, Optional, Union

import numpy as np
import torch
from tqdm import tqdm

import toy_world

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
    Step i goes from sigmas[i] to sigmas[i+1]."""
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


def cfg(v_uncond: torch.Tensor, v_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v = v_uncond + w·(v_cond - v_uncond); w = 1 is plain conditional."""
    return v_uncond + scale * (v_cond - v_uncond)


def euler_step(x: torch.Tensor, v: torch.Tensor, t: Time, t_next: Time) -> torch.Tensor:
    """One Euler step of dx = v dt: x_next = x + v·(t_next - t), with t_next - t < 0 when sampling."""
    dt = broadcast_t(t_next, x) - broadcast_t(t, x)  # (B, 1, 1, 1); same expression as sde_step so noise 0 matches bitwise
    return x + v * dt


def euler_sample(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 x1: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Integrate the ODE from x1 ~ N(0, I) at sigmas[0] = 1 to x0 at sigmas[-1] = 0 with Euler steps.

    velocity_fn(x, t): x (B, ...), t (B,) -> v (B, ...). Prompt conditioning and CFG (see `cfg`) live
    inside velocity_fn, written by the caller. Grad mode is the caller's choice (no torch.no_grad here).
    """
    x, B = x1, x1.shape[0]
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i].expand(B), sigmas[i + 1].expand(B)  # (B,), (B,)
        x = euler_step(x, velocity_fn(x, t), t, t_next)  # (B, C, H, W)
    return x


# ---------------------------------------------------------------------------------------------
# Pretraining the miniature world's base: L_FM on (caption, image) pairs with noisy captions.
# ---------------------------------------------------------------------------------------------
def pretrain(model, steps, batch_size=64, lr=1e-3, warmup=200, cfg_dropout=0.1, caption_noise=0.3,
             dataset_size=40_000, seed=0, log_every=100, callback=None):
    """Train `model.transformer` and its text encoder by flow matching on the world (its autoencoder must be
    trained already). Images are rendered and encoded once (`dataset_size`); captions are re-drawn each time,
    so the caption noise is fresh. A share `cfg_dropout` of captions is emptied to learn the unconditional
    field that classifier-free guidance needs. Returns the list of (step, loss)."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    dev = model.transformer.device
    records, latents = [], []
    with torch.no_grad():
        for _ in tqdm(range(0, dataset_size, 500), desc="render+encode", leave=False):
            recs = [_random_record(rng) for _ in range(500)]
            images = toy_world.to_tensor([toy_world.render(r, rng) for r in recs])
            latents.append(model.encode_images(images.to(dev)))
            records += recs
    latents = torch.cat(latents)  # (N, C, h, w)
    params = [p for m in (model.transformer, model.encoder) for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    history, pbar = [], tqdm(range(steps), desc="pretrain")
    for step in pbar:
        idx = torch.randint(len(records), (batch_size,), generator=gen)
        captions = [_caption(records[i], rng, caption_noise, cfg_dropout) for i in idx.tolist()]
        x0 = latents[idx.to(dev)]  # (B, C, h, w)
        eps = torch.randn(x0.shape, generator=gen).to(dev)  # drawn on the CPU: same stream on any device
        t = sample_t(batch_size, gen).to(dev)  # (B,)
        v = model.velocity(interpolate(x0, eps, t), t, model.encode_prompts(captions))
        loss = flow_matching_loss(v, x0, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            history.append((step, loss.item()))
            pbar.set_postfix(loss=f"{loss.item():.4f}")
        if callback is not None:
            callback(step + 1)  # e.g. save intermediate checkpoints
    for p in params:
        p.requires_grad_(False)
    return history


def pretrain_autoencoder(model, steps, batch_size=64, lr=1e-3, kl_weight=1e-6, seed=0):
    """Fit the world's KL autoencoder to fresh renderings (MSE + a small KL, as SD3's VAE is nearly
    deterministic), then set SD3's latent normalisation: shift_factor = mean, scaling_factor = 1 / std."""
    rng = np.random.default_rng(seed)
    dev = model.vae.device
    vae = model.vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    pbar = tqdm(range(steps), desc="autoencoder")
    for step in pbar:
        x = _render_batch(batch_size, rng).to(dev) * 2 - 1  # (B, 3, 32, 32) in [-1, 1]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = (recon - x).pow(2).mean() + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            pbar.set_postfix(mse=f"{(recon - x).pow(2).mean().item():.5f}")
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        z = vae.encode(_render_batch(1024, rng).to(dev) * 2 - 1).latent_dist.mean
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())
    return loss.item()


def _render_batch(n, rng):
    recs = [toy_world.prompts(toy_world.TASKS[rng.integers(len(toy_world.TASKS))], "train") for _ in range(n)]
    return toy_world.to_tensor([toy_world.render(r[rng.integers(len(r))], rng) for r in recs])


def _random_record(rng):
    return toy_world.random_record(rng)   # uniform over tasks, then over GenEval's sub-tasks


def _caption(record, rng, caption_noise, cfg_dropout):
    u = rng.uniform()
    if u < cfg_dropout:
        return ""
    return toy_world.corrupt_caption(record, rng) if u < cfg_dropout + caption_noise else record["prompt"]


if __name__ == "__main__":
    torch.manual_seed(0)
    sig = time_grid(4, shift=3.0)
    print("time_grid(4, shift=3):", [round(s, 4) for s in sig.tolist()], "(expect [1, 0.9, 0.75, 0.5, 0])")

    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    print("x_t endpoints exact:", torch.equal(interpolate(x0, eps, 0.0), x0), torch.equal(interpolate(x0, eps, 1.0), eps))

    c = torch.randn(3, 4, 8, 8)
    x0_hat = euler_sample(lambda x, t: c, eps, time_grid(7, shift=3.0))
    print(f"constant field, Euler error |x0 - (x1 - c)|max = {(x0_hat - (eps - c)).abs().max():.2e}")

    # Point-mass data x0*: the exact velocity is (x_t - x0*)/t, and Euler lands on x0* exactly at t = 0.
    x_star = torch.randn(1, 4, 8, 8)
    x0_hat = euler_sample(lambda x, t: (x - x_star) / broadcast_t(t, x), eps, time_grid(5))
    print(f"point-mass field, |x0 - x0*|max = {(x0_hat - x_star).abs().max():.2e}")

    t = sample_t(100_000, torch.Generator().manual_seed(0))
    ts = sample_t(100_000, torch.Generator().manual_seed(0), shift=3.0)
    print(f"sample_t mean: shift 1 -> {t.mean():.4f} (expect 0.5), shift 3 -> {ts.mean():.4f}")
    print("FM loss of the exact velocity:", flow_matching_loss(velocity_target(x0, eps), x0, eps).item())
