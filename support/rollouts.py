"""
What both trainers share: drawing prompts, encoding them, sampling SDE rollouts in micro-batches, choosing the
trained steps, and one optimizer step. The Flow-GRPO teachers and the Flow-OPD student
(both in train.py) are both on-policy: each iteration samples trajectories with the current adapter (§2.4's SDE
sampler, sde_sampler.rollout) and then differentiates the Gaussian-step means at the stored states.

Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO); a rollout runs t = 1 -> 0.
Departures: 1) the trained steps are a random subset of the first T - 1 (the paper trains all T; the last
step only adds a little noise to the final sample, and Flow-GRPO skips it too); 2) GenEval prompts are drawn
uniformly over their sub-tasks (`balance_tags`) in the miniature world; the paper's training file fixes its
own ratio (Position:Counting:Attribute:Colors:Two:Single = 7:5:3:1:1:0), which `--balance_tags false` keeps.
"""
import contextlib
from typing import NamedTuple

import numpy as np
import torch

from flow_matching import euler_sample
from router import sample_tasks
from sde_sampler import Trajectory, rollout, step_mean
from support import distributed


def draw_records(pool, task_weights, n, gen, balance_tags=True):
    """n records of pool ({task: records}): the task of each drawn by weight (router.sample_tasks, over the
    tasks the pool has), then, with balance_tags, a GenEval sub-task (metadata["tag"]) uniformly, then a prompt
    uniformly. Without balancing, a task's prompts are drawn uniformly, so its most numerous sub-task dominates."""
    weights = {t: w for t, w in task_weights.items() if t in pool}
    if not weights:
        raise SystemExit(f"no prompts for the tasks {sorted(task_weights)}: pass --prompts TASK=FILE for them")
    strata = {t: _strata(pool[t], balance_tags) for t in weights}  # grouped once per call, not per draw
    out = []
    for task in sample_tasks(weights, n, gen):
        groups = strata[task]
        records = groups[torch.randint(len(groups), (1,), generator=gen).item()] if len(groups) > 1 else groups[0]
        out.append(records[torch.randint(len(records), (1,), generator=gen).item()])
    return out


def _strata(records, balance_tags):
    """[records of one GenEval tag, ...] in sorted tag order, or [records] unbalanced or without tags."""
    tags = sorted({r.get("metadata", {}).get("tag") for r in records} - {None}) if balance_tags else []
    return [[r for r in records if r.get("metadata", {}).get("tag") == t] for t in tags] or [records]


def amp(cfg):
    """bf16/fp16 autocast of the model forwards on CUDA (mixed_precision); the Gaussian-step maths stays in
    fp32 (sde_sampler casts), since bf16 loses the sigma^2 dt terms and moves PPO ratios off 1."""
    if cfg.mixed_precision == "no" or not cfg.device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)


def guided_conds(model, prompts, guidance_scale):
    """(cond, uncond, guidance_scale): the arguments of model.velocity after (x, t)."""
    return model.encode_prompts(prompts), model.encode_prompts([""] * len(prompts)), guidance_scale


@torch.no_grad()
def micro_batch_conds(model, records, cfg):
    """guided_conds per micro-batch of records, encoded once per iteration (the text encoder is frozen) and
    reused at every trained step."""
    return [guided_conds(model, [r["prompt"] for r in records[i:i + cfg.micro_batch]], cfg.guidance_scale)
            for i in range(0, len(records), cfg.micro_batch)]


@torch.no_grad()
def sample_rollouts(model, records, cfg, gen, sde_steps=None, share=1):
    """SDE trajectories of the active adapter for `records` (in micro-batches) and their decoded images, at
    --train_resolution (0: the model's, --resolution, which evaluation samples at). share > 1: each run of
    `share` consecutive records starts from the same initial noise x1."""
    sigmas = model.time_grid(cfg.num_steps).to(cfg.device)  # SD3.5: its scheduler's grid, as Flow-GRPO
    shape = model.latent_shape_at(cfg.train_resolution)
    x1_all = torch.randn(len(records) // share, *shape, generator=gen).repeat_interleave(share, 0)
    trajs = []
    for i in range(0, len(records), cfg.micro_batch):
        prompts = [r["prompt"] for r in records[i:i + cfg.micro_batch]]
        x1 = x1_all[i:i + cfg.micro_batch].to(cfg.device)
        v_fn = model.velocity_fn(prompts, cfg.guidance_scale)
        with amp(cfg):
            trajs.append(rollout(v_fn, x1, sigmas, cfg.noise_level, gen, sde_steps))
    per_sample = [torch.cat(f) for f in list(zip(*trajs))[:5]]  # x_t, x_next, mean, std, logp
    traj = Trajectory(*per_sample, trajs[0].t, trajs[0].t_next)
    return traj, model.decode(traj.x0).cpu()


class MicroStep(NamedTuple):
    """One micro-batch of samples at one trained step j of an iteration's rollouts (micro_steps)."""
    rows: slice            # the samples' positions in the iteration's records
    x_t: torch.Tensor      # (m, C, h, w) the stored states at step j
    t: torch.Tensor        # (m,) their time
    t_next: torch.Tensor   # (m,) the next time (t_next < t: sampling runs 1 -> 0)
    x_next: torch.Tensor   # (m, C, h, w) the stored next states (the sampled actions)
    std: torch.Tensor      # (m,) the Gaussian step's std at sampling
    logp: torch.Tensor     # (m,) its log-prob at sampling (the PPO ratio's denominator)
    conds: tuple           # guided_conds of these samples' prompts: model.velocity's arguments after (x, t)
    scale: float           # m / (N * len(steps)): this micro-step's share of the iteration's mean loss


def micro_steps(traj, steps, conds_mb, micro_batch):
    """Every (trained step j, micro-batch of micro_batch samples) of an iteration, steps outer: the one loop
    of both trainers (train.grpo_gradient, train.opd_iteration). Each yields a MicroStep whose loss, times
    .scale, is backpropagated, so the accumulated gradient is that of the mean loss over all N samples and
    trained steps, whatever the micro-batch size (memory, not maths). conds_mb: micro_batch_conds' list."""
    n = traj.x_t.shape[0]
    for j in steps:
        for i in range(0, n, micro_batch):
            idx = torch.arange(i, min(i + micro_batch, n))  # advanced indexing: contiguous copies of the states
            yield MicroStep(slice(i, i + len(idx)), traj.x_t[idx, j], traj.t[j].expand(len(idx)),
                            traj.t_next[j].expand(len(idx)), traj.x_next[idx, j], traj.std[idx, j],
                            traj.logp[idx, j], conds_mb[i // micro_batch], len(idx) / (n * len(steps)))


def policy_step_mean(model, mb, noise_level):
    """μ_θ (m, C, h, w) of the active adapter's Gaussian step at the micro-step's stored states, with
    guidance: sde_sampler.step_mean of its velocity."""
    return step_mean(mb.x_t, model.velocity(mb.x_t, mb.t, *mb.conds), mb.t, mb.t_next, noise_level)


def trained_steps(cfg, gen, window):
    """Step indices trained this iteration: a random subset of the first T - 1, or with sde_window a random
    window of consecutive steps within the first cfg.sde_window_range of the T steps (at least the window), the
    only SDE steps of the rollout."""
    if window:   # Config holds sde_window_range in (0, 1]
        starts = max(1, int(cfg.num_steps * cfg.sde_window_range) - window + 1)
        start = torch.randint(starts, (1,), generator=gen).item()
        return list(range(start, start + window))
    return torch.randperm(cfg.num_steps - 1, generator=gen)[:cfg.train_timesteps].tolist()


def trainable(model, name):
    """The adapter's parameters, kept in fp32 for AdamW when the backbone is loaded in bf16."""
    params = model.lora_parameters(name)
    for p in params:
        p.data = p.data.float()
    distributed.broadcast_parameters(params)
    return params


def loss_scaler(cfg):
    """--mixed_precision fp16: a torch.amp.GradScaler for the trained LoRA; else None (bf16 and fp32 need none).
    An fp16 backward flushes gradients below 6e-8 to zero, and a LoRA's, each a small share of a mean loss over
    many samples and steps, can vanish silently; the scaler multiplies the loss (2^16 at first) before backward,
    divides the fp32 gradients back before clipping, and skips a step whose gradients overflowed."""
    return torch.amp.GradScaler(torch.device(cfg.device).type) if cfg.mixed_precision == "fp16" else None


def scaled(loss, scaler=None):
    """The loss to backpropagate: times the fp16 loss scale (loss_scaler), or as it is without a scaler."""
    return loss if scaler is None else scaler.scale(loss)


def optimizer_step(params, opt, ema=None, scaler=None):
    """Average the LoRA gradients over processes (torchrun), clip, step, and update the EMA. With an fp16 loss
    scaler the gradients are unscaled before clipping, and a step they overflowed is skipped, the EMA's too."""
    distributed.average_gradients(params)
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    stepped = True
    if scaler is None:
        opt.step()
    else:
        scale = scaler.get_scale()
        scaler.step(opt)   # skipped when unscale_ found an inf or nan
        scaler.update()    # which halves the scale
        stepped = scaler.get_scale() >= scale
    opt.zero_grad(set_to_none=True)
    if ema is not None and stepped:
        ema.update()


# ---------------------------------------------------------------------------- evaluation's ODE samples
# Evaluation (eval.py), grids, infer.py and the SFT cold start draw deterministic ODE samples: image j of
# prompt i starts from noise seeded by (seed, i, j) only, so two models are compared on the same noise.
def noise_seed(seed, prompt_index, image_index):
    """A 64-bit generator seed from (seed, prompt, image) alone. SeedSequence mixes the three, so nearby
    settings share no noise (seed + i would give seed 1's prompt 0 the noise of seed 0's prompt 1)."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, np.uint64)[0])


def initial_noise(ids, shape, seed):
    """(len(ids), *shape) standard normal; row k depends only on (seed, *ids[k]), ids = [(prompt, image)]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, p, j)))
                        for p, j in ids])


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> uint8 (4x smaller on the host; what image files and reward servers get)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


def to_float(images):
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float() / 255


@torch.no_grad()
def sample_uint8(model, prompts, noise_ids=None, steps=40, guidance_scale=4.5, seed=0, batch_size=16, shift=None):
    """ODE samples (B, 3, H, W) uint8 on the host for a list of prompts with the currently active adapter, on
    the model's time grid (shift: model.shift unless given; the world 1, SD3.5 3). noise_ids[k] = (prompt index,
    image index) of sample k (default (k, 0)); at most batch_size samples are drawn at a time and the VAE
    decodes model.decode_batch of them at a time."""
    dev = model.transformer.device
    noise_ids = noise_ids or [(k, 0) for k in range(len(prompts))]
    sigmas = model.time_grid(steps, shift).to(dev)  # SD3: its scheduler's grid (models.T2IModel.time_grid)
    images = []
    for i in range(0, len(prompts), batch_size):
        x1 = initial_noise(noise_ids[i:i + batch_size], model.latent_shape, seed).to(dev)
        v_fn = model.velocity_fn(prompts[i:i + batch_size], guidance_scale)
        images.append(to_uint8(model.decode(euler_sample(v_fn, x1, sigmas))).cpu())
    return torch.cat(images)


def sample_images(model, prompts, steps=40, guidance_scale=4.5, seed=0, batch_size=16, shift=None):
    """sample_uint8 as floats in [0, 1], one image per prompt (sample k: noise (seed, k, 0)); for grids and
    small draws."""
    return to_float(sample_uint8(model, prompts, None, steps, guidance_scale, seed, batch_size, shift))
