"""
The Flow-GRPO teachers (Flow-OPD §2.1 stage 1, §4): one LoRA expert per reward, trained by the loop below on
grpo.py's pure functions (group advantages, the clipped surrogate, the β-KL). Also the GRPO-Mix baseline (one
LoRA on every task, each prompt rewarded by its task reward + deqa) and a diagnosis that is not a paper
stage: how much of one GRPO gradient is signal (`--stage grpo_snr`, grpo.gradient_signal).

    python train.py --stage teachers     [--teachers geneval ocr pickscore deqa]
    python train.py --stage grpo_mix
    python train.py --stage grpo_snr     [--teachers ...] [--snr_batches K]

One iteration: draw prompts, sample G SDE trajectories per prompt (rollout.sample_rollouts), reward the
images, group-normalise the rewards, and accumulate the clipped policy gradient of the adapter over the
trained steps; then one optimizer step.
Time convention: t = 1 is noise (SD3 / Flow-GRPO).
Departures from the paper: 1) Flow-GRPO-Fast: SDE only on a window of `sde_window` consecutive early steps
(ODE elsewhere) inside the first `sde_window_range` of the steps (the world: steps 0-1, where its styles are
decided), a group's G samples share one initial noise and branch there, and only the window is trained
(README); 2) one optimizer step per iteration, so every PPO ratio is exactly 1 (the released code
takes 2 per epoch): the clip of 1e-4 never acts, and the loss is a plain policy gradient.
"""
import dataclasses
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import distributed
import models
from config import eval_settings, load_model, probe_settings, prompt_pool, reward_registry
from eval import evaluate, evaluate_cached
from metrics import format_metrics, scalars, write_json
from grpo import gradient_signal, group_advantages, grpo_loss, zero_std_fraction
from rewards import REWARDS, combined_reward
from rollouts import (amp, draw_records, jsonl_logger, micro_batch_conds, optimizer_step, policy_step_mean,
                     sample_rollouts, trainable, trained_steps)
from router import DEFAULT_TASK_WEIGHTS
from sde_sampler import gaussian_logprob
from world import styles, toy_world

# What each GRPO expert is rewarded with (rewards.combined_reward weights; "task" = the prompt's own
# task reward) and which prompts it trains on. The paper's DeQA teacher blends DeQA and PickScore 4:6
# on all three datasets: its weights come from --deqa_teacher_weight (reward_weights; default 0.4).
# GRPO-Mix adds DeQA to the task reward 1:1 (the released config uses 0.8:0.2).
TEACHER_REWARDS = {"geneval": {"task": 1.0}, "ocr": {"task": 1.0}, "pickscore": {"task": 1.0},
                   "grpo_mix": {"task": 1.0, "deqa": 1.0}}
TEACHER_TASKS = {"geneval": {"geneval": 1}, "ocr": {"ocr": 1}, "pickscore": {"pickscore": 1},
                 "deqa": {t: 1 for t in toy_world.TASKS}, "grpo_mix": DEFAULT_TASK_WEIGHTS}

# A control, not a paper teacher: `--teachers brightness` rewards the mean pixel value on every prompt. The
# same GRPO code learns it within ten iterations, so a reward whose teacher does not learn is the reward's
# problem, not the loop's (RESULTS.md, "How much of a GRPO gradient is signal").
CONTROLS = ("brightness",)
TEACHER_REWARDS["brightness"] = {"task": 1.0}
TEACHER_TASKS["brightness"] = {t: 1 for t in toy_world.TASKS}


def brightness(images, prompts, metadata):
    """Mean pixel value in [0, 1] per image, (B,): the control reward."""
    return images.float().mean(dim=(1, 2, 3))


def reward_weights(name, cfg):
    """combined_reward's weights for teacher `name`: TEACHER_REWARDS, or for the deqa teacher the blend
    --deqa_teacher_weight w sets (w * deqa/5 + (1 - w) * pickscore; the paper's 0.4, 1.0 = deqa alone)."""
    if name != "deqa":
        return TEACHER_REWARDS[name]
    w = cfg.deqa_teacher_weight
    return {k: v for k, v in (("deqa", w), ("pickscore", 1 - w)) if v > 0}


def rewards_for(name, cfg):
    """The reward registry teacher `name` is trained with: the control's own for a control, else the world's
    (or the real backends the *_reward flags choose)."""
    if name in CONTROLS:
        return {t: brightness for t in toy_world.TASKS}  # TEACHER_REWARDS["brightness"] = each prompt's "task"
    return reward_registry(cfg)


def new_grpo_lora(model, name, cfg):
    """Add a fresh LoRA `name` (rank, alpha and targets from cfg), make it active, return its fp32 parameters."""
    targets = {"attention": models.LORA_TARGETS, "wide": models.LORA_TARGETS_WIDE}[cfg.lora_targets]
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha, targets)
    model.adapter(name)
    return trainable(model, name)


def grpo_gradient(model, name, cfg, pool, rewards_fns, gen):
    """One GRPO iteration up to the optimizer step: sample G SDE trajectories per prompt, reward them,
    group-normalise, and accumulate the clipped policy gradient of adapter `name` over the trained steps
    into .grad. Returns (rewards (N,), per-micro-step GRPOLoss list, style shares of the rollouts: {"web",
    "blurred"} on the world's prompts (world/styles.py), else {})."""
    n = cfg.prompts_per_iter * cfg.group_size
    prompts_rec = draw_records(pool, TEACHER_TASKS[name], cfg.prompts_per_iter, gen, cfg.balance_tags)
    records = [r for r in prompts_rec for _ in range(cfg.group_size)]  # groups are contiguous
    steps = trained_steps(cfg, gen, cfg.sde_window)
    traj, images = sample_rollouts(model, records, cfg, gen, steps if cfg.sde_window else None,
                                   share=cfg.group_size if cfg.shared_noise else 1)
    rewards = combined_reward(images, records, reward_weights(name, cfg), rewards_fns)
    adv = group_advantages(rewards, cfg.group_size, std=cfg.adv_std).to(cfg.device)  # (N,)
    stats, conds_mb = [], micro_batch_conds(model, records, cfg)
    for j in steps:
        for i in range(0, n, cfg.micro_batch):
            idx = torch.arange(i, min(i + cfg.micro_batch, n))
            conds = conds_mb[i // cfg.micro_batch]
            with amp(cfg):
                mean = policy_step_mean(model, traj, idx, j, conds, cfg.noise_level)
                ref_mean = None
                if cfg.beta > 0:
                    with torch.no_grad():
                        model.adapter(None)  # the reference policy: the base, adapters disabled
                        ref_mean = policy_step_mean(model, traj, idx, j, conds, cfg.noise_level)
                        model.adapter(name)
            std = traj.std[idx, j]
            logp = gaussian_logprob(traj.x_next[idx, j], mean, std)
            out = grpo_loss(logp, traj.logp[idx, j], adv[idx], cfg.clip_range, cfg.beta, mean, ref_mean, std)
            (out.loss * len(idx) / (n * len(steps))).backward()
            stats.append(out)
    return rewards, stats, rollout_styles(images, records, rewards_fns)


def log_probe(model, adapter, probe, log, **fields):
    """--eval_every during training: evaluate(model, adapter, **probe) and log its scalars as eval/<metric>
    beside `fields` (stage, iter, images sampled so far); the adapter stays the active one."""
    scores = evaluate(model, adapter, **probe)
    log(**fields, **{f"eval/{k}": v for k, v in scalars(scores).items()})
    model.adapter(adapter)  # evaluate ran it without gradients; training goes on with them


def rollout_styles(images, records, rewards_fns):
    """{"web": share, "blurred": share} of the world's web and low-quality styles among rollout images (the
    headroom a teacher can learn, world/styles.py); {} when the rewards or prompts are not the world's."""
    if rewards_fns is not REWARDS or any(r["task"] not in toy_world.TASKS for r in records):
        return {}
    web = [styles.web_style(task, images[[i for i, r in enumerate(records) if r["task"] == task]],
                            [r for r in records if r["task"] == task]) for task in {r["task"] for r in records}]
    return {"web": torch.cat(web).mean().item(), "blurred": styles.blurred(images).mean().item()}


def train_grpo(model, name, cfg, log, pool=None, rewards_fns=None, rank=0, run_dir=None):
    """Flow-GRPO on one LoRA adapter `name`: cfg.grpo_iters iterations of grpo_gradient + one optimizer step.
    pool: {task: train records} (default: the world's); rewards_fns: the reward registry (default: the world's).
    run_dir: where --checkpoint_every writes checkpoint-N/ and from where --resume_from_checkpoint latest
    continues (a fresh start if it holds none yet)."""
    pool = pool or prompt_pool([], "train")
    params = new_grpo_lora(model, name, cfg)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # rank > 0: other prompts and noise (distributed.py)
    start = 0
    if run_dir and cfg.resume_from_checkpoint and checkpoint.latest_checkpoint(run_dir):
        start = checkpoint.resume_training(cfg, run_dir, model, opt, None, gen, rank, adapter=name)
    n = cfg.prompts_per_iter * cfg.group_size
    k = cfg.sde_window or min(cfg.train_timesteps, cfg.num_steps - 1)
    if rank == 0:
        print(f"[{name}] GRPO: {cfg.prompts_per_iter} prompts x G={cfg.group_size} = {n} samples per iteration "
              f"in micro-batches of {cfg.micro_batch}; {k} of {cfg.num_steps} steps trained"
              f"{' (the SDE window)' if cfg.sde_window else ''}; 1 optimizer step per iteration "
              f"({-(-n // cfg.micro_batch) * k} accumulated micro-steps), iterations {start}..{cfg.grpo_iters}")
    # --eval_every: a probe evaluation on the world's test prompts (a --prompts run has no such set)
    probing, probe = cfg.eval_every and rank == 0 and not cfg.prompts, probe_settings(cfg)
    if probing and start == 0:
        log_probe(model, name, probe, log, stage=f"{name}_eval", iter=0, images=0)
    bar = tqdm(range(start, cfg.grpo_iters), desc=name, disable=rank != 0)
    for it in bar:
        rewards, stats, shares = grpo_gradient(model, name, cfg, pool, rewards_fns or REWARDS, gen)
        optimizer_step(params, opt)
        bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
        if run_dir and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            checkpoint.save_training_state(cfg, run_dir, it + 1, model, opt, None, gen, rank, adapter=name)
        metrics = distributed.mean_over_processes(
            dict(reward=rewards.mean().item(), zero_std_frac=zero_std_fraction(rewards, cfg.group_size).item(),
                 clipfrac=float(np.mean([s.clipfrac.item() for s in stats])),
                 kl=float(np.mean([s.kl.mean().item() for s in stats])), **shares))
        if rank == 0:
            log(stage=name, iter=it, **metrics, ratio_min=min(s.ratio_min.item() for s in stats),
                ratio_max=max(s.ratio_max.item() for s in stats))
        if probing and (it + 1) % cfg.eval_every == 0:
            log_probe(model, name, probe, log, stage=f"{name}_eval", iter=it + 1,
                      images=(it + 1) * n * distributed.world_size())


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
    pool = prompt_pool(cfg.prompts, "train")
    for name in names or cfg.teachers:
        path = os.path.join(cfg.teacher_dir, name)
        if os.path.isdir(path):
            print(f"[{name}] found {path}, skipping (delete it to retrain)")
            continue
        t0 = time.time()
        model = load_model(cfg)
        torch.manual_seed(cfg.seed)
        train_grpo(model, name, cfg, log, pool, rewards_for(name, cfg), rank,
                   os.path.join(cfg.teacher_dir, "runs", name))
        if rank == 0:
            model.save_adapter(name, path)
            minutes = (time.time() - t0) / 60
            log(stage=name, minutes=minutes, processes=world)
            print(f"[{name}] saved {path} after {minutes:.1f} min")
            if cfg.eval_at_end and not cfg.prompts:
                print(format_metrics(name, evaluate_cached(model, name, path, **eval_settings(cfg))))
        distributed.barrier()


def stage_grpo_mix(cfg):
    """--stage grpo_mix: one GRPO LoRA on all tasks, rewarded by each prompt's task reward + deqa."""
    stage_teachers(cfg, ["grpo_mix"])


def stage_grpo_snr(cfg):
    """--stage grpo_snr: how much of each teacher's first policy gradient is signal (grpo.gradient_signal).
    cfg.snr_batches independent GRPO gradients of a fresh LoRA, no optimizer step; prints kappa, its standard
    error and the batches needed for one gradient with SNR 1. Rows go into <results_dir>/grpo_snr.json beside
    the rows of earlier runs (a row is replaced only by a new run of the same teacher); `--teachers brightness`
    measures the control."""
    pool, path = prompt_pool(cfg.prompts, "train"), os.path.join(cfg.results_dir, "grpo_snr.json")
    for name in cfg.teachers:
        model = load_model(cfg)
        torch.manual_seed(cfg.seed)
        params, gen = new_grpo_lora(model, name, cfg), torch.Generator().manual_seed(cfg.seed)
        grads, t0 = [], time.time()
        for _ in tqdm(range(cfg.snr_batches), desc=f"{name} gradients"):
            grpo_gradient(model, name, cfg, pool, rewards_for(name, cfg), gen)
            grads.append(torch.cat([p.grad.flatten() for p in params]))
            for p in params:
                p.grad = None
        sig = gradient_signal(torch.stack(grads))
        row = dict(kappa=sig.kappa.item(), se=sig.se.item(), batches_for_snr1=sig.batches_for_snr1.item(),
                   samples_per_batch=cfg.prompts_per_iter * cfg.group_size, batches=cfg.snr_batches,
                   seconds_per_batch=(time.time() - t0) / cfg.snr_batches, seed=cfg.seed, base=cfg.base)
        print(f"[{name}] kappa = {sig.kappa:.4f} ± {sig.se:.4f}: {sig.batches_for_snr1:.0f} batches of "
              f"{row['samples_per_batch']} samples for one gradient with SNR 1 ({row['seconds_per_batch']:.1f} s "
              f"per batch)")
        table = json.load(open(path)) if os.path.isfile(path) else {}   # other keys (earlier worlds) are kept
        table.setdefault("rows", {})[name] = row  # written after every teacher: an interrupted run keeps it
        write_json(path, table)
    kappa_chart(path)


def kappa_chart(path):
    """<path minus .json>.png: kappa of every row in the grpo_snr.json at path, with ±1 se whiskers."""
    import plots
    rows = json.load(open(path))["rows"]
    png = os.path.splitext(path)[0] + ".png"
    plots.bar_chart({n: (r["kappa"], r["se"]) for n, r in rows.items()},
                    "kappa: signal share of one GRPO gradient (mean ± se over batches)", png)
    print("wrote", png)
