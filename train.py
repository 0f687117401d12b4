"""
Flow-OPD training, one plain loop per stage (Flow-OPD §2.1 pipeline):
  pretrain   the miniature world's base: autoencoder, then flow matching on noisy captions (§2.2)
  teachers   one Flow-GRPO LoRA expert per reward: geneval, ocr, pickscore, deqa (§2.1 stage 1, §4)
  grpo_mix   the GRPO-Mix baseline: one LoRA on all tasks, each prompt rewarded by its task + deqa (§4)
  distill    Flow-OPD: cold start (merge or SFT), then on-policy distillation from the routed teachers with
             the MAR anchor on every prompt (§2.5-2.8). The main job.

Usage: python train.py --stage distill [--key value ...]   (every Config field is a flag)
Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO).
Departures: 1) teachers use Flow-GRPO-Fast (SDE on a 2-step early window, shared noise per group; README);
2) one optimizer step per iteration, so every PPO ratio is exactly 1 (released: 2 per epoch); 3) distill trains
`train_timesteps` random steps of the first T-1 per iteration (paper: all T); 4) per-sample routing.
"""
import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

import models
import toy_world
from eval import evaluate, evaluate_cached, format_metrics
from flow_matching import pretrain, pretrain_autoencoder, time_grid
from cold_start import merge_into, sft_cold_start
from grpo import group_advantages, grpo_loss, zero_std_fraction
from mar import mar_loss
from opd_loss import opd_loss
from rewards import combined_reward
from router import DEFAULT_TASK_WEIGHTS, groups_by_teacher, route, sample_tasks
from sde_sampler import Trajectory, gaussian_logprob, rollout, sde_step


@dataclass
class Config:
    stage: str = "pretrain"          # which stage to run
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    out_dir: str = "checkpoints"     # committed world checkpoints live here
    base: str = "checkpoints/base"   # the pretrained base model folder
    # --- pretraining the world's base (§2.2) ---
    ae_steps: int = 1500             # autoencoder steps
    pretrain_steps: int = 6000       # flow-matching steps
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_dataset: int = 40_000   # images rendered and encoded once; captions are re-drawn every step
    caption_noise: float = 0.3       # share of corrupted captions (toy_world.corrupt_caption)
    cfg_dropout: float = 0.1         # share of empty captions, for classifier-free guidance
    snapshots: list = field(default_factory=list)  # extra pretrain steps at which to save base-STEP/
    init_from: str = ""              # continue pretraining a saved world model (then ae_steps may be 0)
    step_offset: int = 0             # steps already done by init_from, for snapshot names and logs
    eval_at_end: bool = True         # print the four scores on the test prompts after the stage
    # --- sampling (§2.4) ---
    num_steps: int = 10              # T: training SDE steps
    eval_steps: int = 40             # ODE steps for evaluation
    cfg_scale: float = 4.5           # classifier-free guidance scale (released code; paper silent)
    noise_level: float = 0.7         # a in sigma_t = a sqrt(t / (1 - t))
    eval_limit: int = 32             # prompts per task in end-of-stage evaluations (0 = all; eval.py: all)
    # --- GRPO teachers and GRPO-Mix (Flow-GRPO; §2.1, §4) ---
    teachers: list = field(default_factory=lambda: ["geneval", "ocr", "pickscore", "deqa"])
    teacher_dir: str = "checkpoints/teachers"
    grpo_iters: int = 150            # GRPO iterations per teacher (one optimizer step each)
    prompts_per_iter: int = 4        # prompts per iteration; each is sampled group_size times
    group_size: int = 8              # G: images per prompt, one advantage group
    micro_batch: int = 16            # samples per forward; independent of G (ECOSYSTEM asks #1-#3)
    train_timesteps: int = 4         # SDE steps trained per iteration, drawn from the first T - 1
    sde_window: int = 2              # >0: Flow-GRPO-Fast, SDE on this many consecutive early steps, ODE
                                     # elsewhere, and only those steps trained (sharper credit assignment)
    shared_noise: bool = True        # a group's G samples start from one x1 (branching at the SDE window)
    lora_rank: int = 32              # r (paper: 32)
    lora_alpha: int = 64             # alpha (paper: 64)
    lr: float = 5e-4                 # AdamW on the LoRA parameters (GRPO stages)
    clip_range: float = 1e-4         # PPO epsilon (Flow-GRPO default)
    beta: float = 0.0                # beta of the KL to the base; Flow-GRPO: 0.04 geneval/ocr, 0.01 pickscore
    adv_std: str = "group"           # advantage std: per "group" or "global" (flow_grpo global_std)
    # --- Flow-OPD (§2.5-2.8) ---
    routes: list = field(default_factory=lambda: ["geneval", "ocr", "pickscore"])  # tasks with a teacher
    cold_start: str = "merge"        # merge (exact mean dW) | merge_average (released A/B mean) | sft | none
    mar_anchor: str = "deqa"         # deqa (the paper's aesthetic teacher) | base (released default) | none
    mar_lambda: float = 0.02         # lambda = beta of MAR (paper 0.02; released 0.04)
    estimator: str = "pathwise"      # pathwise | logratio | released (opd_loss.py)
    opd_iters: int = 40              # distillation iterations (one optimizer step each)
    opd_prompts: int = 16            # prompts per iteration
    opd_group: int = 1               # samples per prompt (OPD needs no group baseline)
    opd_lr: float = 1e-3             # AdamW on the student LoRA
    eval_every: int = 0              # evaluate the student every N distill iterations (0: only at the end)
    checkpoint_every: int = 0        # save the student adapter to <student>/checkpoint-N every N iterations
    student_dir: str = "checkpoints/students"
    cold_start_dir: str = "checkpoints/cold_start"
    name: str = ""                   # student name (default: <cold_start> or <cold_start>_no_mar)
    compile: bool = torch.cuda.is_available()  # torch.compile the velocity-discrepancy core

    def __post_init__(self):
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if self.num_steps < 2 or self.eval_steps < 1:
            raise ValueError("num_steps must be >= 2 and eval_steps >= 1")


def _bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_config(argv=None):
    """Every Config field is a `--name value` flag; list fields take several values."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, list):
            ap.add_argument(f"--{f.name}", nargs="*", type=type(default[0]) if default else int, default=default)
        elif isinstance(default, bool):
            ap.add_argument(f"--{f.name}", type=_bool, default=default)
        else:
            ap.add_argument(f"--{f.name}", type=type(default), default=default)
    return Config(**vars(ap.parse_args(argv)))


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


def draw_records(task_weights, n, gen):
    """n train records, the task of each drawn by weight (router.sample_tasks), then a prompt uniformly."""
    out = []
    for task in sample_tasks(task_weights, n, gen):
        recs = toy_world.prompts(task, "train")
        out.append(recs[torch.randint(len(recs), (1,), generator=gen).item()])
    return out


@torch.no_grad()
def sample_rollouts(model, records, cfg, gen, sde_steps=None, share=1):
    """SDE trajectories of the active adapter for `records` (in micro-batches) and their decoded images.
    share > 1: each run of `share` consecutive records starts from the same initial noise x1."""
    sigmas = time_grid(cfg.num_steps).to(cfg.device)
    x1_all = torch.randn(len(records) // share, *model.latent_shape, generator=gen).repeat_interleave(share, 0)
    trajs = []
    for i in range(0, len(records), cfg.micro_batch):
        prompts = [r["prompt"] for r in records[i:i + cfg.micro_batch]]
        x1 = x1_all[i:i + cfg.micro_batch].to(cfg.device)
        v_fn = model.velocity_fn(prompts, cfg.cfg_scale)
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


def train_grpo(model, name, cfg, log):
    """Flow-GRPO on one LoRA adapter `name`: sample G SDE trajectories per prompt, reward the images,
    group-normalise, and take one clipped policy-gradient step over random trained timesteps."""
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha)
    model.adapter(name)
    params = model.lora_parameters(name)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.prompts_per_iter * cfg.group_size
    k = cfg.sde_window or min(cfg.train_timesteps, cfg.num_steps - 1)
    print(f"[{name}] GRPO: {cfg.prompts_per_iter} prompts x G={cfg.group_size} = {n} samples per iteration "
          f"in micro-batches of {cfg.micro_batch}; {k} of {cfg.num_steps} steps trained"
          f"{' (the SDE window)' if cfg.sde_window else ''}; 1 optimizer step per iteration "
          f"({-(-n // cfg.micro_batch) * k} accumulated micro-steps), {cfg.grpo_iters} iterations")
    for it in tqdm(range(cfg.grpo_iters), desc=name):
        prompts_rec = draw_records(TEACHER_TASKS[name], cfg.prompts_per_iter, gen)
        records = [r for r in prompts_rec for _ in range(cfg.group_size)]  # groups are contiguous
        steps = trained_steps(cfg, gen, cfg.sde_window)
        traj, images = sample_rollouts(model, records, cfg, gen, steps if cfg.sde_window else None,
                                       share=cfg.group_size if cfg.shared_noise else 1)
        rewards = combined_reward(images, records, TEACHER_REWARDS[name])
        adv = group_advantages(rewards, cfg.group_size, std=cfg.adv_std).to(cfg.device)  # (N,)
        stats, conds_mb = [], micro_batch_conds(model, records, cfg)
        for j in steps:
            for i in range(0, n, cfg.micro_batch):
                idx = torch.arange(i, min(i + cfg.micro_batch, n))
                conds = conds_mb[i // cfg.micro_batch]
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
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log(stage=name, iter=it, reward=rewards.mean().item(), zero_std_frac=zero_std_fraction(rewards, cfg.group_size).item(),
            ratio_min=min(s.ratio_min.item() for s in stats), ratio_max=max(s.ratio_max.item() for s in stats),
            clipfrac=float(np.mean([s.clipfrac.item() for s in stats])), kl=float(np.mean([s.kl.mean().item() for s in stats])))


def jsonl_logger(path):
    """log(**metrics) appends one JSON line to path, opening the file per line: nothing lost on a crash."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return lambda **metrics: _append(path, json.dumps(metrics) + "\n")


def _append(path, line):
    with open(path, "a") as f:
        f.write(line)


def stage_teachers(cfg, names=None):
    """Train each missing teacher (skip those already saved) and print its scores beside the base's."""
    log = jsonl_logger(os.path.join(cfg.teacher_dir, "train_log.jsonl"))
    for name in names or cfg.teachers:
        path = os.path.join(cfg.teacher_dir, name)
        if os.path.isdir(path):
            print(f"[{name}] found {path}, skipping (delete it to retrain)")
            continue
        t0 = time.time()
        model = models.load_world_model(cfg.base, cfg.device)
        torch.manual_seed(cfg.seed)
        train_grpo(model, name, cfg, log)
        model.save_adapter(name, path)
        minutes = (time.time() - t0) / 60
        log(stage=name, minutes=minutes)
        print(f"[{name}] saved {path} after {minutes:.1f} min")
        if cfg.eval_at_end:
            print(format_metrics(name, evaluate_cached(model, name, path, **eval_settings(cfg))))


def eval_settings(cfg):
    return dict(limit=cfg.eval_limit or None, steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed)


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


def load_teachers(model, cfg, names):
    """Load the teacher adapters `names` from cfg.teacher_dir; train (with a message) any that is missing."""
    missing = [n for n in names if not os.path.isdir(os.path.join(cfg.teacher_dir, n))]
    if missing:
        print(f"teachers {missing} not found in {cfg.teacher_dir}: training them now with `--stage teachers`")
        stage_teachers(dataclasses.replace(cfg, eval_at_end=False), names=missing)
    for n in names:
        model.load_adapter(os.path.join(cfg.teacher_dir, n), n)


def make_student(model, cfg, teachers):
    """The cold start (§3) as adapter "student": loaded from cfg.cold_start_dir if built before, else
    merged from the routed teachers, fitted to their samples (sft), or a fresh LoRA (none), and saved."""
    path = os.path.join(cfg.cold_start_dir, cfg.cold_start)
    routes_file = os.path.join(path, "routes.json")
    if os.path.isdir(path) and os.path.isfile(routes_file) and json.load(open(routes_file)) == teachers:
        print(f"cold start: using {path} (delete it to rebuild, e.g. after retraining teachers)")
        model.load_adapter(path, "student")
        return path
    if os.path.isdir(path):
        print(f"cold start: {path} was built from other teachers than {teachers}; rebuilding it")
    if cfg.cold_start in ("merge", "merge_average"):
        res = merge_into(model, "student", teachers, mode="delta" if cfg.cold_start == "merge" else "average")
        print(f"cold start {cfg.cold_start}: rank {res.rank}, alpha {res.alpha}, "
              f"max relative error vs mean dW {res.max_rel_error:.3g}")
    elif cfg.cold_start == "sft":
        loss = sft_cold_start(model, "student", {t: t for t in cfg.routes}, rank=cfg.lora_rank,
                              alpha=cfg.lora_alpha, cfg_scale=cfg.cfg_scale, seed=cfg.seed)
        print(f"cold start sft: final flow-matching loss {loss:.4f}")
    elif cfg.cold_start == "none":
        model.add_lora("student", cfg.lora_rank, cfg.lora_alpha)
    else:
        raise SystemExit(f"unknown --cold_start {cfg.cold_start!r}; choose merge, merge_average, sft or none")
    model.save_adapter("student", path)
    with open(routes_file, "w") as f:
        json.dump(teachers, f)
    return path


def opd_iteration(model, records, routed, anchor, cfg, core, gen):
    """One Flow-OPD iteration up to the optimizer step (§2.10's loop): the student samples SDE trajectories;
    at each trained step, the routed teacher and the MAR anchor give their velocities at the student's own
    states (adapter switches on the one backbone, no grad), then the student's forward and the core's loss
    are backpropagated. Returns the decoded images and the mean step KL and MAR terms."""
    model.adapter("student")
    traj, images = sample_rollouts(model, records, cfg, gen)
    steps = trained_steps(cfg, gen, window=0)  # every step is SDE here: the teacher supervises each one
    n, kls, mars, conds_mb = len(records), [], [], micro_batch_conds(model, records, cfg)
    for j in steps:
        for i in range(0, n, cfg.micro_batch):
            idx = torch.arange(i, min(i + cfg.micro_batch, n))
            conds = conds_mb[i // cfg.micro_batch]
            x_t, t = traj.x_t[idx, j], traj.t[j].expand(len(idx))
            with torch.no_grad():
                v_T = torch.empty_like(x_t)
                for teacher, sub in groups_by_teacher(routed[i:i + cfg.micro_batch]).items():
                    model.adapter(teacher)
                    (c, pc), (u, pu) = conds[0], conds[1]
                    v = model.velocity(x_t[sub], t[sub], (c[sub], pc[sub]), (u[sub], pu[sub]), cfg.cfg_scale)
                    v_T[sub] = v.to(v_T.dtype)
                v_A = None
                if cfg.mar_anchor != "none":
                    model.adapter(anchor)  # None = the base, adapters disabled
                    v_A = model.velocity(x_t, t, *conds)
            model.adapter("student")  # re-enables the student's gradients before its forward
            v_s = model.velocity(x_t, t, *conds)
            loss, kl, mar = core(x_t, traj.x_next[idx, j], v_s, v_T, v_A, t, traj.t_next[j].expand(len(idx)),
                                 traj.std[idx, j], traj.logp[idx, j], cfg.noise_level, cfg.estimator, cfg.mar_lambda)
            (loss * len(idx) / (n * len(steps))).backward()
            kls.append(kl)
            mars.append(mar)
    return images, torch.cat(kls).mean().item(), torch.stack(mars).mean().item()


def stage_distill(cfg):
    t0 = time.time()
    name = cfg.name or cfg.cold_start + ("" if cfg.mar_anchor != "none" else "_no_mar")
    model = models.load_world_model(cfg.base, cfg.device)
    anchor = {"deqa": "deqa", "base": None, "none": None}[cfg.mar_anchor]
    load_teachers(model, cfg, cfg.routes + ([anchor] if anchor else []))
    teachers = {task: task for task in cfg.routes}  # task -> teacher adapter (hard routing, §2.5)
    cold_path = make_student(model, cfg, list(teachers.values()))
    kw = eval_settings(cfg)
    cold = evaluate_cached(model, "student", cold_path, **kw) if cfg.eval_at_end else None
    model.adapter("student")
    params = model.lora_parameters("student")
    opt = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4)
    core = torch.compile(opd_core) if cfg.compile else opd_core
    gen = torch.Generator().manual_seed(cfg.seed)
    log = jsonl_logger(os.path.join(cfg.student_dir, name, "train_log.jsonl"))
    weights = {t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if t in teachers}
    for it in tqdm(range(cfg.opd_iters), desc="distill"):
        drawn = sorted(draw_records(weights, cfg.opd_prompts, gen), key=lambda r: r["task"])
        records = [r for r in drawn for _ in range(cfg.opd_group)]  # sorted: micro-batches share a teacher
        images, kl, mar = opd_iteration(model, records, route([r["task"] for r in records], teachers),
                                        anchor, cfg, core, gen)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rewards = combined_reward(images, records, {"task": 1.0})
        log(stage="distill", iter=it, kl=kl, mar=mar,
            **{f"reward/{t}": rewards[[k for k, r in enumerate(records) if r["task"] == t]].mean().item()
               for t in sorted(set(r["task"] for r in records))})
        done = it + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            model.save_adapter("student", os.path.join(cfg.student_dir, name, f"checkpoint-{done}"))
        if cfg.eval_every and done % cfg.eval_every == 0:
            log(stage="distill_eval", iter=done, **{f"eval/{k}": v for k, v in evaluate(model, "student", **kw).items()})
            model.adapter("student")
    path = os.path.join(cfg.student_dir, name)
    model.save_adapter("student", os.path.join(path, "adapter"))
    print(f"student saved to {path}/adapter after {(time.time() - t0) / 60:.1f} min")
    if cfg.eval_at_end:
        print(format_metrics(f"cold start ({cfg.cold_start})", cold))
        for teacher in teachers.values():
            folder = os.path.join(cfg.teacher_dir, teacher)
            print(format_metrics(f"teacher/{teacher}", evaluate_cached(model, teacher, folder, **kw)))
        print(format_metrics(f"flow_opd/{name}", evaluate(model, "student", **kw)))
    print(f"total {(time.time() - t0) / 60:.1f} min")


STAGES = {"pretrain": stage_pretrain, "teachers": stage_teachers, "distill": stage_distill,
          "grpo_mix": lambda cfg: stage_teachers(cfg, ["grpo_mix"])}  # one GRPO LoRA on the mixed rewards


def main(argv=None):
    cfg = parse_config(argv)
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose one of {sorted(STAGES)}")
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs; no effect on the CPU
    STAGES[cfg.stage](cfg)


if __name__ == "__main__":
    main()
