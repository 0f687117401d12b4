"""
Flow-OPD training, one plain loop per stage (Flow-OPD §2.1 pipeline):
  pretrain   the miniature world's base: autoencoder, then flow matching on noisy captions (§2.2)
  teachers   one Flow-GRPO LoRA expert per reward: geneval, ocr, pickscore, deqa (§2.1 stage 1, §4)
  grpo_mix   the GRPO-Mix baseline: one LoRA on all tasks, each prompt rewarded by its task + deqa (§4)
  grpo_snr   a diagnosis, not a paper stage: how much of one GRPO gradient per teacher is signal
             (grpo.gradient_signal over --snr_batches independent batches; RESULTS.md)
  distill    Flow-OPD: cold start (merge or SFT), then on-policy distillation from the routed teachers with
             the MAR anchor on every prompt (§2.5-2.8). The main job.
  all        the whole pipeline for one --seed, resumable: the stages above, the Flow-OPD variants and
             ablations, and the tables over the seeds run so far (results/main.json, results/ood.json)

Usage: python train.py --stage distill [--key value ...]   (every field of config.Config is a flag)
SD3.5-Medium: the same stages with --model PIPELINE --teacher NAME=PEFT --mar PEFT --prompts TASK=FILE
(README "Run on SD3.5-Medium"); several GPUs: torchrun --nproc_per_node=N train.py ... (distributed.py);
--checkpoint_every N writes checkpoint-N/ folders, --resume_from_checkpoint latest continues one.
Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO).
Departures: 1) teachers use Flow-GRPO-Fast (SDE on a 2-step early window, shared noise per group; README);
2) one optimizer step per iteration, so every PPO ratio is exactly 1 (released: 2 per epoch); 3) distill trains
`train_timesteps` random steps of the first T-1 per iteration (paper: all T); 4) per-sample routing.
"""
import contextlib
import dataclasses
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
from config import (adapter_folder, eval_settings, load_model, named_paths, parse_config, prompt_pool,
                    reward_registry)
import distributed
import models
import toy_world
from eval import evaluate, evaluate_cached, format_metrics, format_paired, paired_difference, scalars, write_json
from flow_matching import pretrain, pretrain_autoencoder, time_grid
from cold_start import merge_into, sft_cold_start
from grpo import gradient_signal, group_advantages, grpo_loss, zero_std_fraction
from mar import mar_loss
from opd_loss import opd_loss
from rewards import REWARDS, combined_reward
from router import DEFAULT_TASK_WEIGHTS, groups_by_teacher, mix_velocities, one_hot_weights, route, sample_tasks
from sde_sampler import Trajectory, gaussian_logprob, rollout, sde_step


def stage_pretrain(cfg):
    t0 = time.time()
    if cfg.init_from:
        model = models.load_world_model(cfg.init_from, cfg.device)
        models.trainable_positions(model.transformer)
    else:
        model = models.build_world_model(seed=cfg.seed).to(cfg.device)
    if cfg.ae_steps:
        pretrain_autoencoder(model, cfg.ae_steps, seed=cfg.seed)

    def snapshot(step):
        if step + cfg.step_offset in cfg.snapshots:
            model.save(f"{cfg.base}-{step + cfg.step_offset}")
    history = pretrain(model, cfg.pretrain_steps, batch_size=cfg.pretrain_batch, lr=cfg.pretrain_lr,
                       cfg_dropout=cfg.cfg_dropout, caption_noise=cfg.caption_noise, seed=cfg.seed,
                       dataset_size=cfg.pretrain_dataset, callback=snapshot)
    model.save(cfg.base)
    minutes = (time.time() - t0) / 60
    with open(os.path.join(cfg.base, "pretrain_log.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "minutes": minutes, "device": cfg.device,
                   "loss": history}, f)
    print(f"pretrained base saved to {cfg.base} in {minutes:.1f} min on {cfg.device}")
    if not cfg.eval_at_end:
        return
    base = models.load_world_model(cfg.base, cfg.device)
    print(format_metrics("base", evaluate(base, None, **eval_settings(cfg))))


# What each GRPO expert is rewarded with (rewards.combined_reward weights; "task" = the prompt's own
# task reward) and which prompts it trains on. The paper's DeQA teacher blends DeQA and PickScore 4:6
# on all three datasets; GRPO-Mix adds DeQA to the task reward 1:1 (the released config uses 0.8:0.2).
TEACHER_REWARDS = {"geneval": {"task": 1.0}, "ocr": {"task": 1.0}, "pickscore": {"task": 1.0},
                   "deqa": {"deqa": 0.4, "pickscore": 0.6}, "grpo_mix": {"task": 1.0, "deqa": 1.0}}
TEACHER_TASKS = {"geneval": {"geneval": 1}, "ocr": {"ocr": 1}, "pickscore": {"pickscore": 1},
                 "deqa": {t: 1 for t in toy_world.TASKS}, "grpo_mix": DEFAULT_TASK_WEIGHTS}


def draw_records(pool, task_weights, n, gen):
    """n records of pool ({task: records}), the task of each drawn by weight (router.sample_tasks, over the
    tasks the pool has), then a prompt uniformly."""
    weights = {t: w for t, w in task_weights.items() if t in pool}
    if not weights:
        raise SystemExit(f"no prompts for the tasks {sorted(task_weights)}: pass --prompts TASK=FILE for them")
    out = []
    for task in sample_tasks(weights, n, gen):
        out.append(pool[task][torch.randint(len(pool[task]), (1,), generator=gen).item()])
    return out


def amp(cfg):
    """bf16/fp16 autocast of the model forwards on CUDA (mixed_precision); the Gaussian-step maths stays in
    fp32 (sde_sampler casts), since bf16 loses the sigma^2 dt terms and moves PPO ratios off 1."""
    if cfg.mixed_precision == "no" or not cfg.device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)


def optimizer_step(params, opt, ema=None):
    """Average the LoRA gradients over processes (torchrun), clip, step, and update the EMA."""
    distributed.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()


def trainable(model, name):
    """The adapter's parameters, kept in fp32 for AdamW when the backbone is loaded in bf16."""
    params = model.lora_parameters(name)
    for p in params:
        p.data = p.data.float()
    distributed.broadcast_parameters(params)
    return params


@torch.no_grad()
def sample_rollouts(model, records, cfg, gen, sde_steps=None, share=1):
    """SDE trajectories of the active adapter for `records` (in micro-batches) and their decoded images.
    share > 1: each run of `share` consecutive records starts from the same initial noise x1."""
    sigmas = time_grid(cfg.num_steps, model.shift).to(cfg.device)  # SD3.5: its scheduler's shift, as Flow-GRPO
    x1_all = torch.randn(len(records) // share, *model.latent_shape, generator=gen).repeat_interleave(share, 0)
    trajs = []
    for i in range(0, len(records), cfg.micro_batch):
        prompts = [r["prompt"] for r in records[i:i + cfg.micro_batch]]
        x1 = x1_all[i:i + cfg.micro_batch].to(cfg.device)
        v_fn = model.velocity_fn(prompts, cfg.cfg_scale)
        with amp(cfg):
            trajs.append(rollout(v_fn, x1, sigmas, cfg.noise_level, gen, sde_steps))
    per_sample = [torch.cat(f) for f in list(zip(*trajs))[:5]]  # x_t, x_next, mean, std, logp
    traj = Trajectory(*per_sample, trajs[0].t, trajs[0].t_next)
    return traj, model.decode(traj.x0).cpu()


def policy_step_mean(model, traj, idx, j, conds, cfg):
    """Mean of the current policy's Gaussian step at the stored state x_t (idx samples, step j), with CFG."""
    t, t_next = traj.t[j].expand(len(idx)), traj.t_next[j].expand(len(idx))
    v = model.velocity(traj.x_t[idx, j], t, *conds)
    return sde_step(traj.x_t[idx, j], v, t, t_next, cfg.noise_level, noise=torch.zeros_like(v)).mean


def cfg_conds(model, prompts, cfg):
    """(cond, uncond, cfg_scale): the arguments of model.velocity after (x, t)."""
    return model.encode_prompts(prompts), model.encode_prompts([""] * len(prompts)), cfg.cfg_scale


@torch.no_grad()
def micro_batch_conds(model, records, cfg):
    """cfg_conds per micro-batch of records, encoded once per iteration (the text encoder is frozen) and
    reused at every trained step."""
    return [cfg_conds(model, [r["prompt"] for r in records[i:i + cfg.micro_batch]], cfg)
            for i in range(0, len(records), cfg.micro_batch)]


def trained_steps(cfg, gen, window):
    """Step indices trained this iteration: a random subset of the first T - 1 (the last step only adds a
    little noise to the final sample; Flow-GRPO skips it too), or with sde_window a random window of
    consecutive steps in the first half, the only SDE steps of the rollout."""
    if window:
        start = torch.randint(max(1, cfg.num_steps // 2 - window + 1), (1,), generator=gen).item()
        return list(range(start, start + window))
    return torch.randperm(cfg.num_steps - 1, generator=gen)[:cfg.train_timesteps].tolist()


def train_grpo(model, name, cfg, log, pool=None, rewards_fns=None, rank=0, run_dir=None):
    """Flow-GRPO on one LoRA adapter `name`: sample G SDE trajectories per prompt, reward the images,
    group-normalise, and take one clipped policy-gradient step over random trained timesteps.
    pool: {task: train records} (default: the world's); rewards_fns: the reward registry (default: the world's).
    run_dir: where --checkpoint_every writes checkpoint-N/ and from where --resume_from_checkpoint latest
    continues (a fresh start if it holds none yet)."""
    pool = pool or prompt_pool([], "train")
    params = new_grpo_lora(model, name, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # rank > 0: other prompts and noise (distributed.py)
    start = 0
    if run_dir and cfg.resume_from_checkpoint and checkpoint.latest_checkpoint(run_dir):
        start = resume(cfg, run_dir, model, opt, None, gen, rank, adapter=name)
    n = cfg.prompts_per_iter * cfg.group_size
    k = cfg.sde_window or min(cfg.train_timesteps, cfg.num_steps - 1)
    if rank == 0:
        print(f"[{name}] GRPO: {cfg.prompts_per_iter} prompts x G={cfg.group_size} = {n} samples per iteration "
              f"in micro-batches of {cfg.micro_batch}; {k} of {cfg.num_steps} steps trained"
              f"{' (the SDE window)' if cfg.sde_window else ''}; 1 optimizer step per iteration "
              f"({-(-n // cfg.micro_batch) * k} accumulated micro-steps), iterations {start}..{cfg.grpo_iters}")
    for it in tqdm(range(start, cfg.grpo_iters), desc=name, disable=rank != 0):
        rewards, stats = grpo_gradient(model, name, cfg, pool, rewards_fns or REWARDS, gen)
        optimizer_step(params, opt)
        if run_dir and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            save_training_state(cfg, run_dir, it + 1, model, opt, None, gen, rank, adapter=name)
        metrics = distributed.mean_over_processes(
            dict(reward=rewards.mean().item(), zero_std_frac=zero_std_fraction(rewards, cfg.group_size).item(),
                 clipfrac=float(np.mean([s.clipfrac.item() for s in stats])),
                 kl=float(np.mean([s.kl.mean().item() for s in stats]))))
        if rank == 0:
            log(stage=name, iter=it, **metrics, ratio_min=min(s.ratio_min.item() for s in stats),
                ratio_max=max(s.ratio_max.item() for s in stats))


def new_grpo_lora(model, name, cfg):
    """Add a fresh LoRA `name` (rank, alpha and targets from cfg), make it active, return its fp32 parameters."""
    targets = {"attention": models.LORA_TARGETS, "wide": models.LORA_TARGETS_WIDE}[cfg.lora_targets]
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha, targets)
    model.adapter(name)
    return trainable(model, name)


def grpo_gradient(model, name, cfg, pool, rewards_fns, gen):
    """One GRPO iteration up to the optimizer step: sample G SDE trajectories per prompt, reward them,
    group-normalise, and accumulate the clipped policy gradient of adapter `name` over the trained steps
    into .grad. Returns (rewards (N,), per-micro-step GRPOLoss list)."""
    n = cfg.prompts_per_iter * cfg.group_size
    prompts_rec = draw_records(pool, TEACHER_TASKS[name], cfg.prompts_per_iter, gen)
    records = [r for r in prompts_rec for _ in range(cfg.group_size)]  # groups are contiguous
    steps = trained_steps(cfg, gen, cfg.sde_window)
    traj, images = sample_rollouts(model, records, cfg, gen, steps if cfg.sde_window else None,
                                   share=cfg.group_size if cfg.shared_noise else 1)
    rewards = combined_reward(images, records, TEACHER_REWARDS[name], rewards_fns)
    adv = group_advantages(rewards, cfg.group_size, std=cfg.adv_std).to(cfg.device)  # (N,)
    stats, conds_mb = [], micro_batch_conds(model, records, cfg)
    for j in steps:
        for i in range(0, n, cfg.micro_batch):
            idx = torch.arange(i, min(i + cfg.micro_batch, n))
            conds = conds_mb[i // cfg.micro_batch]
            with amp(cfg):
                mean = policy_step_mean(model, traj, idx, j, conds, cfg)
                ref_mean = None
                if cfg.beta > 0:
                    with torch.no_grad():
                        model.adapter(None)
                        ref_mean = policy_step_mean(model, traj, idx, j, conds, cfg)
                        model.adapter(name)
            std = traj.std[idx, j]
            logp = gaussian_logprob(traj.x_next[idx, j], mean, std)
            out = grpo_loss(logp, traj.logp[idx, j], adv[idx], cfg.clip_range, cfg.beta, mean, ref_mean, std)
            (out.loss * len(idx) / (n * len(steps))).backward()
            stats.append(out)
    return rewards, stats


def stage_grpo_snr(cfg):
    """--stage grpo_snr: how much of each teacher's first policy gradient is signal (grpo.gradient_signal).
    cfg.snr_batches independent GRPO gradients of a fresh LoRA, no optimizer step; prints kappa, its standard
    error and the batches needed for one gradient with SNR 1, and writes them to <results_dir>/grpo_snr.json."""
    pool, rewards_fns, out = prompt_pool(cfg.prompts, "train"), reward_registry(cfg), {}
    for name in cfg.teachers:
        model = load_model(cfg)
        torch.manual_seed(cfg.seed)
        params, gen = new_grpo_lora(model, name, cfg), torch.Generator().manual_seed(cfg.seed)
        grads, t0 = [], time.time()
        for _ in tqdm(range(cfg.snr_batches), desc=f"{name} gradients"):
            grpo_gradient(model, name, cfg, pool, rewards_fns, gen)
            grads.append(torch.cat([p.grad.flatten() for p in params]))
            for p in params:
                p.grad = None
        sig = gradient_signal(torch.stack(grads))
        out[name] = dict(kappa=sig.kappa.item(), se=sig.se.item(), batches_for_snr1=sig.batches_for_snr1.item(),
                         samples_per_batch=cfg.prompts_per_iter * cfg.group_size,
                         seconds_per_batch=(time.time() - t0) / cfg.snr_batches)
        print(f"[{name}] kappa = {sig.kappa:.4f} ± {sig.se:.4f}: {sig.batches_for_snr1:.0f} batches of "
              f"{out[name]['samples_per_batch']} samples for one gradient with SNR 1 "
              f"({out[name]['seconds_per_batch']:.1f} s per batch)")
    write_json(os.path.join(cfg.results_dir, "grpo_snr.json"), dict(rows=out, meta=dataclasses.asdict(cfg)))


def jsonl_logger(path):
    """log(**metrics) appends one JSON line to path, opening the file per line: nothing lost on a crash."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return lambda **metrics: _append(path, json.dumps(metrics) + "\n")


def _append(path, line):
    with open(path, "a") as f:
        f.write(line)


def stage_teachers(cfg, names=None):
    """Train each missing teacher (skip those already saved) and print its scores beside the base's.
    Checkpoints of an unfinished teacher go to <teacher_dir>/runs/<name>/checkpoint-N; with
    --resume_from_checkpoint latest each teacher continues from its own newest one."""
    if cfg.resume_from_checkpoint not in ("", "latest"):
        raise SystemExit("--stage teachers and grpo_mix resume each teacher from its own newest checkpoint: "
                         "pass --resume_from_checkpoint latest")
    rank, world, device = distributed.init(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    log = jsonl_logger(os.path.join(cfg.teacher_dir, "train_log.jsonl"))
    pool, rewards_fns = prompt_pool(cfg.prompts, "train"), reward_registry(cfg)
    for name in names or cfg.teachers:
        path = os.path.join(cfg.teacher_dir, name)
        if os.path.isdir(path):
            print(f"[{name}] found {path}, skipping (delete it to retrain)")
            continue
        t0 = time.time()
        model = load_model(cfg)
        torch.manual_seed(cfg.seed)
        train_grpo(model, name, cfg, log, pool, rewards_fns, rank, os.path.join(cfg.teacher_dir, "runs", name))
        if rank == 0:
            model.save_adapter(name, path)
            minutes = (time.time() - t0) / 60
            log(stage=name, minutes=minutes, processes=world)
            print(f"[{name}] saved {path} after {minutes:.1f} min")
            if cfg.eval_at_end and not cfg.prompts:
                print(format_metrics(name, evaluate_cached(model, name, path, **eval_settings(cfg))))
        distributed.barrier()


# ----------------------------------------------------------------------------------------------------------
# Flow-OPD (§2.5-2.8): the velocity-discrepancy core, the teachers on one backbone, the cold start, the loop

def opd_core(x_t, x_next, v_s, v_T, v_A, t, t_next, std, old_logp, noise_level, estimator, lam):
    """The velocity-discrepancy core: Gaussian-step means of student, teacher and anchor at the student's
    states, the OPD estimator and MAR. Pure tensor code, so torch.compile can fuse it; the means are in
    fp32 (sde_step casts) because bf16 loses the small sigma^2 dt terms and the ratio leaves 1."""
    zero = torch.zeros_like(x_t)
    mean = lambda v: sde_step(x_t, v, t, t_next, noise_level, noise=zero).mean  # (B, C, h, w)
    mean_s = mean(v_s)
    out = opd_loss(estimator, mean_s, mean(v_T), std, x_next, old_logp, dt=(t_next - t))
    mar = mar_loss(mean_s, mean(v_A), std, lam).mean() if v_A is not None else torch.zeros(())
    return out.loss + mar, out.kl, mar.detach()


def load_teachers(model, cfg):
    """Load the routed teachers and the MAR anchor as adapters on the one backbone. Returns ({task: teacher
    adapter}, the anchor adapter or None for the base, {adapter: folder or hub id}). --teacher NAME=PATH_OR_ID
    gives them (SD3: the published PEFT teachers); without it the world's teachers in cfg.teacher_dir are
    used, and any that is missing is trained first, with a message. --mar is deqa, base, none, or a PATH_OR_ID."""
    anchor = {"deqa": "deqa", "base": None, "none": None}.get(cfg.mar_anchor, "anchor")
    if cfg.teacher:
        sources = named_paths(cfg.teacher)
    else:
        names = cfg.routes + (["deqa"] if anchor == "deqa" else [])
        missing = [n for n in names if not os.path.isdir(os.path.join(cfg.teacher_dir, n))]
        if missing:
            print(f"teachers {missing} not found in {cfg.teacher_dir}: training them now with `--stage teachers`")
            stage_teachers(dataclasses.replace(cfg, eval_at_end=False), names=missing)
        sources = {n: os.path.join(cfg.teacher_dir, n) for n in names}
    if anchor == "anchor":
        sources["anchor"] = cfg.mar_anchor
    elif anchor == "deqa" and "deqa" not in sources:
        raise SystemExit("--mar deqa needs a deqa teacher: add --teacher deqa=PATH_OR_ID, or pass "
                         "--mar PATH_OR_ID (e.g. the published DeQA teacher), --mar base or --mar none")
    unrouted = [n for n in sources if n not in cfg.routes and n not in ("deqa", "anchor")]
    if unrouted:
        raise SystemExit(f"teachers {unrouted} have no route: name teachers by task ({cfg.routes}) or set --routes")
    for name, spec in sources.items():
        try:
            model.load_adapter(adapter_folder(name, spec), name)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"teacher {name}: {e}") from None
    return {n: n for n in sources if n in cfg.routes}, anchor, sources


def make_student(model, cfg, teachers, sources):
    """The cold start (§3) as adapter "student": loaded from cfg.cold_start_dir if built before, else
    merged from the routed teachers, fitted to their samples (sft), or a fresh LoRA (none), and saved.
    routes.json records what it was built from (the base, and each teacher's source from load_teachers), so
    a cold start is never reused for other teachers or another model."""
    path = os.path.join(cfg.cold_start_dir, cfg.cold_start)
    names = list(teachers.values())
    built_from = {"base": cfg.base, "teachers": {n: sources[n] for n in names}}
    routes_file = os.path.join(path, "routes.json")
    if os.path.isdir(path) and os.path.isfile(routes_file) and json.load(open(routes_file)) == built_from:
        print(f"cold start: using {path} (delete it to rebuild, e.g. after retraining teachers)")
        model.load_adapter(path, "student")
        return path
    if os.path.isdir(path):
        print(f"cold start: {path} was built from another base or other teachers than {built_from}; rebuilding it")
    if cfg.cold_start in ("merge", "merge_average"):
        res = merge_into(model, "student", names, mode="delta" if cfg.cold_start == "merge" else "average")
        print(f"cold start {cfg.cold_start}: rank {res.rank}, alpha {res.alpha}, "
              f"max relative error vs mean dW {res.max_rel_error:.3g}")
    elif cfg.cold_start == "sft":
        loss = sft_cold_start(model, "student", teachers, prompt_pool(cfg.prompts, "train"), steps=cfg.sft_steps,
                              samples_per_teacher=cfg.sft_samples, rank=cfg.lora_rank,
                              alpha=cfg.lora_alpha, cfg_scale=cfg.cfg_scale, seed=cfg.seed)
        print(f"cold start sft: final flow-matching loss {loss:.4f}")
    elif cfg.cold_start == "none":
        model.add_lora("student", cfg.lora_rank, cfg.lora_alpha)
    else:
        raise SystemExit(f"unknown --cold_start {cfg.cold_start!r}; choose merge, merge_average, sft or none")
    model.save_adapter("student", path)
    with open(routes_file, "w") as f:
        json.dump(built_from, f, indent=1)
    return path


def teacher_velocity(model, x_t, t, conds, routed, team, cfg):
    """v_target at the student's states (§2.5). Hard routing: each sample's own teacher, each teacher run
    once on its own samples. Soft routing (soft_routing = eps > 0; the paper's open question): every
    teacher of `team` on every sample, mixed with alpha_k = (1 - eps) 1[k routed] + eps / K."""
    if cfg.soft_routing:
        vel = {}
        for teacher in team:
            model.adapter(teacher)
            vel[teacher] = model.velocity(x_t, t, *conds).float()
        alpha = (1 - cfg.soft_routing) * one_hot_weights(routed, team) + cfg.soft_routing / len(team)  # (B, K)
        return mix_velocities(vel, alpha.to(x_t.device))
    v_T = torch.empty_like(x_t)
    (c, pc), (u, pu) = conds[0], conds[1]
    for teacher, sub in groups_by_teacher(routed).items():
        model.adapter(teacher)
        v_T[sub] = model.velocity(x_t[sub], t[sub], (c[sub], pc[sub]), (u[sub], pu[sub]), cfg.cfg_scale).to(v_T.dtype)
    return v_T


def opd_iteration(model, records, routed, anchor, cfg, core, gen, team=None):
    """One Flow-OPD iteration up to the optimizer step (§2.10's loop): the student samples SDE trajectories;
    at each trained step, the routed teacher and the MAR anchor give their velocities at the student's own
    states (adapter switches on the one backbone, no grad), then the student's forward and the core's loss
    are backpropagated. team: every teacher adapter (soft routing mixes them all; default: those routed).
    Returns the decoded images and the mean step KL and MAR terms."""
    team = team or sorted(set(routed))
    model.adapter("student")
    traj, images = sample_rollouts(model, records, cfg, gen)
    steps = trained_steps(cfg, gen, window=0)  # every step is SDE here: the teacher supervises each one
    n, kls, mars, conds_mb = len(records), [], [], micro_batch_conds(model, records, cfg)
    for j in steps:
        for i in range(0, n, cfg.micro_batch):
            idx = torch.arange(i, min(i + cfg.micro_batch, n))
            conds = conds_mb[i // cfg.micro_batch]
            x_t, t = traj.x_t[idx, j], traj.t[j].expand(len(idx))
            with torch.no_grad(), amp(cfg):
                v_T = teacher_velocity(model, x_t, t, conds, routed[i:i + cfg.micro_batch], team, cfg)
                v_A = None
                if cfg.mar_anchor != "none":
                    model.adapter(anchor)  # None = the base, adapters disabled
                    v_A = model.velocity(x_t, t, *conds)
            model.adapter("student")  # re-enables the student's gradients before its forward
            with amp(cfg):
                v_s = model.velocity(x_t, t, *conds)
            loss, kl, mar = core(x_t, traj.x_next[idx, j], v_s, v_T, v_A, t, traj.t_next[j].expand(len(idx)),
                                 traj.std[idx, j], traj.logp[idx, j], cfg.noise_level, cfg.estimator, cfg.mar_lambda)
            (loss * len(idx) / (n * len(steps))).backward()
            kls.append(kl)
            mars.append(mar)
    return images, torch.cat(kls).mean().item(), torch.stack(mars).mean().item()


def stage_distill(cfg):
    t0 = time.time()
    rank, world, device = distributed.init(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    name = cfg.name or cfg.cold_start + ("" if cfg.mar_anchor != "none" else "_no_mar")
    run_dir = os.path.join(cfg.student_dir, name)
    model = load_model(cfg)
    teachers, anchor, sources = load_teachers(model, cfg)  # {task: adapter} (hard routing, §2.5); MAR anchor
    cold_path = make_student(model, cfg, teachers, sources) if rank == 0 else None
    distributed.barrier()
    if rank > 0:  # the cold start is built once, by rank 0, and loaded by the others
        model.load_adapter(os.path.join(cfg.cold_start_dir, cfg.cold_start), "student")
    pool, rewards_fns = prompt_pool(cfg.prompts, "train"), reward_registry(cfg)
    kw, evaluating = student_evaluation(cfg, rewards_fns, rank)
    cold = evaluate_cached(model, "student", cold_path, **kw) if evaluating else None
    model.adapter("student")
    params = trainable(model, "student")
    opt = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4)
    ema = checkpoint.EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    core = torch.compile(opd_core) if cfg.compile else opd_core
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # each process its own prompts and noise
    start = resume(cfg, run_dir, model, opt, ema, gen, rank) if cfg.resume_from_checkpoint else 0
    log = jsonl_logger(os.path.join(run_dir, "train_log.jsonl")) if rank == 0 else None
    weights = {t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if t in teachers}
    if rank == 0:
        anchor_name = anchor or ("base" if cfg.mar_anchor == "base" else "none")
        print(f"distill {name}: teachers {teachers}, MAR anchor {anchor_name}, "
              f"{cfg.opd_prompts} prompts x {cfg.opd_group} per iteration x {world} processes, "
              f"iterations {start}..{cfg.opd_iters}")
    for it in tqdm(range(start, cfg.opd_iters), desc="distill", disable=rank != 0):
        drawn = sorted(draw_records(pool, weights, cfg.opd_prompts, gen), key=lambda r: r["task"])
        records = [r for r in drawn for _ in range(cfg.opd_group)]  # sorted: micro-batches share a teacher
        images, kl, mar = opd_iteration(model, records, route([r["task"] for r in records], teachers),
                                        anchor, cfg, core, gen, team=list(teachers.values()))
        optimizer_step(params, opt, ema)
        metrics = {"kl": kl, "mar": mar}
        if cfg.log_rewards:
            rewards = combined_reward(images, records, {"task": 1.0}, rewards_fns)
            metrics.update({f"reward/{t}": rewards[[k for k, r in enumerate(records) if r["task"] == t]].mean().item()
                            for t in sorted(weights)})  # nan for a task not drawn this iteration
        metrics = distributed.mean_over_processes(metrics)
        done = it + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            save_training_state(cfg, run_dir, done, model, opt, ema, gen, rank)
        if rank > 0:
            continue
        log(stage="distill", iter=it, **metrics)
        if cfg.eval_every and done % cfg.eval_every == 0:
            scores = evaluate(model, "student", **kw)
            log(stage="distill_eval", iter=done, **{f"eval/{k}": v for k, v in scalars(scores).items()})
            model.adapter("student")
    if world > 1:
        print(f"rank {rank}: max parameter spread across processes {distributed.max_parameter_spread(params):.3g}",
              flush=True)
    if rank == 0:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            finish_student(cfg, model, run_dir, teachers, cold, kw, evaluating, t0)
    distributed.barrier()


def student_evaluation(cfg, rewards_fns, rank):
    """(evaluate() settings, whether to evaluate): the end-of-stage evaluation of the cold start, teachers and
    student, on --eval_prompts and the real-image rewards when given (such evaluations are not cached).
    Only rank 0 evaluates; with --prompts but no --eval_prompts there is nothing to evaluate on."""
    kw = eval_settings(cfg)
    if cfg.eval_prompts:
        kw["records"] = prompt_pool(cfg.eval_prompts, "test")
    if rewards_fns is not REWARDS:
        kw["rewards"] = rewards_fns
    evaluating = cfg.eval_at_end and rank == 0 and (not cfg.prompts or cfg.eval_prompts)
    if cfg.eval_at_end and rank == 0 and not evaluating:
        print("no --eval_prompts for the --prompts given: not evaluated")
    return kw, evaluating


def finish_student(cfg, model, path, teachers, cold, kw, evaluating, t0):
    """Save the student in PEFT and diffusers LoRA formats; print its scores beside the cold start's and
    the teachers'. The caller swaps in the EMA weights first, if any."""
    model.save_adapter("student", os.path.join(path, "adapter"))
    checkpoint.export_lora(model, "student", os.path.join(path, "export"))
    print(f"student saved to {path}/adapter (PEFT) and {path}/export (diffusers LoRA) after "
          f"{(time.time() - t0) / 60:.1f} min")
    if evaluating:
        print(format_metrics(f"cold start ({cfg.cold_start})", cold))
        for teacher in teachers.values():
            folder = os.path.join(cfg.teacher_dir, teacher)
            scores = evaluate(model, teacher, **kw) if cfg.teacher else evaluate_cached(model, teacher, folder, **kw)
            print(format_metrics(f"teacher/{teacher}", scores))
        student = evaluate(model, "student", **kw)
        print(format_metrics(f"flow_opd/{os.path.basename(path)}", student))
        print(format_paired("student - cold start", paired_difference(student, cold)))  # same prompts and noise
    print(f"total {(time.time() - t0) / 60:.1f} min")


def save_training_state(cfg, run_dir, step, model, opt, ema, gen, rank, adapter="student"):
    """checkpoint-<step>/ with the trained adapter, optimizer, EMA, RNG states (every process's sampling
    generator) and config, written atomically by rank 0."""
    states = distributed.gather_objects(gen.get_state())
    if rank == 0:
        gens = {f"sampling_rank{r}": torch.Generator().set_state(s) for r, s in enumerate(states)}
        checkpoint.save_checkpoint(run_dir, step, model, adapter, opt, dataclasses.asdict(cfg), ema, gens,
                                   keep=cfg.checkpoints_total_limit or None)


def resume(cfg, run_dir, model, opt, ema, gen, rank, adapter="student"):
    """Restore a checkpoint (--resume_from_checkpoint latest|PATH); returns the iteration to continue from."""
    try:
        path = checkpoint.resolve_resume(cfg.resume_from_checkpoint, run_dir)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    state = checkpoint.load_checkpoint(path, model, adapter, opt, ema, {f"sampling_rank{rank}": gen})
    if rank == 0:
        print(f"resumed from {path} at iteration {state['step']}")
    return state["step"]


def stage_all(cfg):
    """--stage all: the whole pipeline and the paper's tables (pipeline.py, imported here because it
    calls back into these stages)."""
    import pipeline
    pipeline.stage_all(cfg)


STAGES = {"all": stage_all, "pretrain": stage_pretrain, "teachers": stage_teachers, "distill": stage_distill,
          "grpo_mix": lambda cfg: stage_teachers(cfg, ["grpo_mix"]),  # one GRPO LoRA on the mixed rewards
          "grpo_snr": stage_grpo_snr}


def main(argv=None):
    cfg = parse_config(argv, description=__doc__)
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose one of {sorted(STAGES)}")
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs; no effect on the CPU
    STAGES[cfg.stage](cfg)


if __name__ == "__main__":
    main()
