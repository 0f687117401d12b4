"""
The paper's two training stages (Flow-OPD §2.1): the Flow-GRPO teachers (stage 1, §4) and the Flow-OPD
student distilled from them (stages 2-3, §2.5-2.10). The main job:

    python train.py --stage distill

load the routed teachers and the MAR anchor as adapters on one backbone -> cold start the student (merge the
teachers' LoRAs, or SFT on their samples; §3) -> every iteration: the student samples SDE rollouts -> each
prompt is routed to the teacher of its task -> teacher and anchor velocities at the student's own states ->
L = L_OPD + λ·MAR (opd_loss.flow_opd_loss) -> one optimizer step. Then the student is saved (PEFT and
diffusers LoRA formats) and scored beside its cold start and its teachers.

    python train.py --stage teachers   [--teachers geneval ocr pickscore deqa]   one GRPO LoRA expert per reward
    python train.py --stage grpo_mix                                            the GRPO-Mix baseline

A teacher iteration: draw prompts, sample G SDE trajectories per prompt, reward the images, group-normalise
the rewards (grpo.py), accumulate the clipped policy gradient over the trained steps; one optimizer step.
Both loops walk the same micro-steps (support/rollouts.micro_steps). Every field of support/config.Config is
a flag (`python train.py --help`). SD3.5-Medium: --model PIPELINE --teacher NAME=PEFT --mar PEFT --prompts
TASK=FILE (README "Run on SD3.5-Medium"); several GPUs: torchrun --nproc_per_node=N train.py ...;
--checkpoint_every N and --resume_from_checkpoint latest (support/checkpoint.py).
Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO).
Departures from the paper: 1) one optimizer step per iteration, so every PPO ratio is exactly 1 (released: 2
per epoch): the GRPO clip of 1e-4 never acts; 2) a random subset of `train_timesteps` of the first T-1 steps
is trained per iteration (paper: all T); 3) per-sample routing (a batch mixes tasks; each teacher runs once
on its own samples); 4) the teachers are Flow-GRPO-Fast: SDE only on a window of `sde_window` early steps
(ODE elsewhere), a group's G samples share one initial noise and branch there, only the window is trained.
"""
import contextlib
import dataclasses
import json
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from cold_start import merge_into, sft_cold_start
from eval import evaluate, evaluate_cached, log_probe
from grpo import group_advantages, grpo_loss, zero_std_fraction
from opd_loss import flow_opd_loss
from rewards import REWARDS, combined_reward
from router import DEFAULT_TASK_WEIGHTS, QUALITY_TASK_WEIGHT, route, target_velocity
from sde_sampler import gaussian_logprob
from support import checkpoint, distributed
from support.config import describe, parse_config
from support.hub import split_revision
from support.metrics import format_metrics, format_paired, jsonl_logger, paired_difference, scalars, write_json
from support.provenance import made_here, run_sources, source, stamp, this_command, weights_sha256, write_model_card
from support.report import log_grid, tensorboard_log
from support.resolve import eval_settings, load_model, main_protocol, probe_settings, prompt_pool, reward_registry
from support.rollouts import (amp, draw_records, loss_scaler, micro_batch_conds, micro_steps, optimizer_step,
                              policy_step_mean, sample_rollouts, scaled, trainable, trained_steps)
from support.teachers import (TEACHER_TASKS, guidance_scales, load_teachers, new_grpo_lora, reward_weights,
                              rewards_for, rollout_styles, routed_pool)


# ------------------------------------------------------------------ stage 1: the Flow-GRPO teachers (§4)

def grpo_gradient(model, name, cfg, pool, rewards_fns, gen, scaler=None):
    """One GRPO iteration up to the optimizer step: sample G SDE trajectories per prompt, reward them,
    group-normalise, and accumulate the clipped policy gradient of adapter `name` over the trained steps
    into .grad (through the fp16 loss scaler, if any). Returns (rewards (N,), per-micro-step GRPOLoss list,
    style shares of the rollouts: {"web", "blurred"} on the world's prompts (world/styles.py), else {})."""
    prompts_rec = draw_records(pool, TEACHER_TASKS[name], cfg.prompts_per_iter, gen, cfg.balance_tags)
    records = [r for r in prompts_rec for _ in range(cfg.group_size)]  # groups are contiguous
    steps = trained_steps(cfg, gen, cfg.sde_window)
    traj, images = sample_rollouts(model, records, cfg, gen, steps if cfg.sde_window else None,
                                   share=cfg.group_size if cfg.shared_noise else 1)
    rewards = combined_reward(images, records, reward_weights(name, cfg), rewards_fns)
    adv = group_advantages(rewards, cfg.group_size, std=cfg.adv_std).to(cfg.device)  # (N,)
    stats = []
    for mb in micro_steps(traj, steps, micro_batch_conds(model, records, cfg), cfg.micro_batch):
        with amp(cfg):
            mean = policy_step_mean(model, mb, cfg.noise_level)
            ref_mean = None
            if cfg.beta > 0:
                with torch.no_grad():
                    model.adapter(None)  # the reference policy: the base, adapters disabled
                    ref_mean = policy_step_mean(model, mb, cfg.noise_level)
                    model.adapter(name)
        logp = gaussian_logprob(mb.x_next, mean, mb.std)
        out = grpo_loss(logp, mb.logp, adv[mb.rows], cfg.clip_range, cfg.beta, mean, ref_mean, mb.std)
        scaled(out.loss * mb.scale, scaler).backward()
        stats.append(out)
    return rewards, stats, rollout_styles(images, records, rewards_fns)


def train_grpo(model, name, cfg, log, pool, rewards_fns, rank=0, run_dir=None):
    """Flow-GRPO on one LoRA adapter `name`: cfg.grpo_iters iterations of grpo_gradient + one optimizer step.
    pool: {task: train records}; rewards_fns: the reward registry. run_dir: where --checkpoint_every writes
    checkpoint-N/ and from where --resume_from_checkpoint latest continues (a fresh start if it holds none)."""
    params = new_grpo_lora(model, name, cfg)
    opt, scaler = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4), loss_scaler(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # rank > 0: other prompts and noise (distributed.py)
    start, record = 0, run_sources(cfg.base, model.schedule())   # what each checkpoint records and a resume checks
    if run_dir and cfg.resume_from_checkpoint and checkpoint.latest_checkpoint(run_dir):
        start = checkpoint.resume_training(cfg, run_dir, model, opt, None, gen, rank, name, record, scaler)
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
        probe_now(model, name, probe, log, stage=f"{name}_eval", iter=0, images=0)
    bar = tqdm(range(start, cfg.grpo_iters), desc=name, disable=rank != 0)
    for it in bar:
        rewards, stats, shares = grpo_gradient(model, name, cfg, pool, rewards_fns, gen, scaler)
        optimizer_step(params, opt, scaler=scaler)
        bar.set_postfix(reward=f"{rewards.mean().item():.3f}")
        if run_dir and cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0:
            checkpoint.save_training_state(cfg, run_dir, it + 1, model, opt, None, gen, rank, name, record, scaler)
        metrics = distributed.mean_over_processes(
            dict(reward=rewards.mean().item(), zero_std_frac=zero_std_fraction(rewards, cfg.group_size).item(),
                 clipfrac=float(np.mean([s.clipfrac.item() for s in stats])),
                 kl=float(np.mean([s.kl.mean().item() for s in stats])), **shares))
        if rank == 0:
            log(stage=name, iter=it, **metrics, ratio_min=min(s.ratio_min.item() for s in stats),
                ratio_max=max(s.ratio_max.item() for s in stats))
        if probing and (it + 1) % cfg.eval_every == 0:
            probe_now(model, name, probe, log, stage=f"{name}_eval", iter=it + 1,
                      images=(it + 1) * n * distributed.world_size())


def probe_now(model, adapter, probe, log, **fields):
    """--eval_every: log_probe's scores of `adapter` (fields: stage, iter, images), and with --report_to
    tensorboard its image grid (support/report.py)."""
    log_probe(model, adapter, probe, log, **fields)
    log_grid(log, model, probe, fields["stage"], fields["iter"])


def stage_teachers(cfg, names=None):
    """--stage teachers: train each missing teacher (skip those already saved) and print its scores.
    Checkpoints of an unfinished teacher go to <teacher_dir>/runs/<name>/checkpoint-N; with
    --resume_from_checkpoint latest each teacher continues from its own newest one."""
    if cfg.resume_from_checkpoint not in ("", "latest"):
        raise SystemExit("--stage teachers and grpo_mix resume each teacher from its own newest checkpoint: "
                         "pass --resume_from_checkpoint latest")
    rank, world, device = distributed.init(cfg.device)
    cfg = dataclasses.replace(cfg, device=device)
    log = jsonl_logger(os.path.join(cfg.teacher_dir, "train_log.jsonl"))
    log = tensorboard_log(log, cfg, os.path.join(cfg.teacher_dir, "tensorboard")) if rank == 0 else log
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
            stamp(path, **made_here(f"Flow-GRPO teacher {name}", cfg.seed, cfg.grpo_iters, {"base": source(cfg.base)}))
            minutes = (time.time() - t0) / 60
            log(stage=name, minutes=minutes, processes=world)
            print(f"[{name}] saved {path} after {minutes:.1f} min")
            if cfg.eval_at_end and not cfg.prompts:
                kw = eval_settings(cfg)
                scores = evaluate_cached(model, name, path, **kw)
                if main_protocol(kw):
                    stamp(path, scores=scalars(scores), protocol=kw)
                print(format_metrics(name, scores))
        distributed.barrier()


# ------------------------------------------------------- stages 2-3: cold start and Flow-OPD (§2.5-2.10)

def stage_distill(cfg):
    """--stage distill: the cold start, cfg.opd_iters Flow-OPD iterations, the student saved and scored."""
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
    pool, rewards_fns = routed_pool(prompt_pool(cfg.prompts, "train"), teachers), reward_registry(cfg)
    kw, evaluating = student_evaluation(cfg, rewards_fns, rank)
    cold = evaluate_cached(model, "student", cold_path, **kw) if evaluating else None  # says how long it takes
    if cold is not None and main_protocol(kw):   # the scores its provenance carries
        stamp(cold_path, scores=scalars(cold), protocol=kw)
    model.adapter("student")
    params = trainable(model, "student")
    opt, scaler = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4), loss_scaler(cfg)
    ema = checkpoint.EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    loss_fn = torch.compile(flow_opd_loss) if cfg.compile else flow_opd_loss  # the velocity-discrepancy core
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # each process its own prompts and noise
    record = run_sources(cfg.base, model.schedule(), sources)   # what each checkpoint records and a resume checks
    start = checkpoint.resume_training(cfg, run_dir, model, opt, ema, gen, rank, sources=record, scaler=scaler) \
        if cfg.resume_from_checkpoint else 0
    log = jsonl_logger(os.path.join(run_dir, "train_log.jsonl"), fresh=start == 0) if rank == 0 else None
    log = tensorboard_log(log, cfg, os.path.join(run_dir, "tensorboard"))   # --report_to; None stays None
    per_iter = cfg.opd_prompts * cfg.opd_group * world  # images the student samples per iteration
    probe = {**kw, **probe_settings(cfg)}  # --eval_every: the avg-vs-images curve (kw: --eval_prompts, rewards)
    weights = {**{t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if t in teachers},   # this order: sample_tasks'
               **{t: QUALITY_TASK_WEIGHT for t in teachers if t not in DEFAULT_TASK_WEIGHTS}}
    if rank == 0:
        anchor_name = anchor or ("base" if cfg.mar_anchor == "base" else "none")
        print(f"distill {name}: teachers {teachers}, MAR anchor {anchor_name}, "
              f"{cfg.opd_prompts} prompts x {cfg.opd_group} per iteration x {world} processes, "
              f"iterations {start}..{cfg.opd_iters}")
    if cfg.eval_every and start == 0 and rank == 0:
        probe_now(model, "student", probe, log, stage="distill_eval", iter=0, images=0)
    bar = tqdm(range(start, cfg.opd_iters), desc="distill", disable=rank != 0)
    for it in bar:
        drawn = sorted(draw_records(pool, weights, cfg.opd_prompts, gen, cfg.balance_tags), key=lambda r: r["task"])
        records = [r for r in drawn for _ in range(cfg.opd_group)]  # sorted: micro-batches share a teacher
        images, kl, mar = opd_iteration(model, records, route([r["task"] for r in records], teachers),
                                        anchor, cfg, loss_fn, gen, list(teachers.values()), scaler)
        optimizer_step(params, opt, ema, scaler)
        # every teacher's key on every process (nan where none was routed): mean_over_processes reduces one tensor
        metrics = {"kl": kl["all"], **{f"kl/{t}": kl.get(t, float("nan")) for t in teachers.values()}, "mar": mar}
        if cfg.log_rewards:
            rewards = combined_reward(images, records, {"task": 1.0}, rewards_fns)
            metrics.update({f"reward/{t}": rewards[[k for k, r in enumerate(records) if r["task"] == t]].mean().item()
                            for t in sorted(weights)})  # nan for a task not drawn this iteration
        metrics = distributed.mean_over_processes(metrics)
        done = it + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint.save_training_state(cfg, run_dir, done, model, opt, ema, gen, rank, "student", record, scaler)
        if rank > 0:
            continue
        log(stage="distill", iter=it, **metrics)
        bar.set_postfix(kl=f"{metrics['kl']:.3g}", mar=f"{metrics['mar']:.3g}")  # the step KL and MAR terms
        if cfg.eval_every and done % cfg.eval_every == 0:
            probe_now(model, "student", probe, log, stage="distill_eval", iter=done, images=done * per_iter)
    if world > 1:
        print(f"rank {rank}: max parameter spread across processes {distributed.max_parameter_spread(params):.3g}",
              flush=True)
    if rank == 0:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            finish_student(cfg, model, run_dir, teachers, sources, cold, kw, evaluating, t0)
    distributed.barrier()


def make_student(model, cfg, teachers, sources):
    """The cold start (§3) as adapter "student": loaded from cfg.cold_start_dir if built before, else
    merged from the routed teachers, fitted to their samples (sft), or a fresh LoRA (none), and saved.
    Its provenance.json records what it was built from (the base and each teacher: source and sha256), so a
    cold start is never reused for other teachers, retrained ones, or another model."""
    path = os.path.join(cfg.cold_start_dir, cfg.cold_start)
    names = list(teachers.values())
    built_from = {"base": source(cfg.base), **{n: sources[n] for n in names}}
    made = os.path.join(path, "provenance.json")
    record = json.load(open(made)) if os.path.isfile(made) else {}
    same = lambda a: {n: s["sha256"] or s["path"] for n, s in a.items()}   # by weights; a hub id by its name
    if os.path.isdir(path) and same(record.get("built_from", {})) == same(built_from) and \
            record.get("weights_sha256") == weights_sha256(path):
        print(f"cold start: using {path} (delete it to rebuild)")
        model.load_adapter(path, "student")
        return path
    if os.path.isdir(path):
        print(f"cold start: {path} was built from other weights than {built_from} (or has no provenance.json); "
              f"rebuilding it")
    if cfg.cold_start in ("merge", "merge_average"):
        res = merge_into(model, "student", names, mode="delta" if cfg.cold_start == "merge" else "average")
        print(f"cold start {cfg.cold_start}: rank {res.rank}, alpha {res.alpha}, "
              f"max relative error vs mean dW {res.max_rel_error:.3g}")
    elif cfg.cold_start == "sft":
        loss = sft_cold_start(model, "student", teachers, prompt_pool(cfg.prompts, "train"), steps=cfg.sft_steps,
                              samples_per_teacher=cfg.sft_samples, rank=cfg.lora_rank,
                              alpha=cfg.lora_alpha, guidance_scale=cfg.guidance_scale, seed=cfg.seed,
                              latent_shape=model.latent_shape_at(cfg.train_resolution), guidance=guidance_scales(cfg),
                              autocast=lambda: amp(cfg), scaler=loss_scaler(cfg))
        print(f"cold start sft: final flow-matching loss {loss:.4f}")
    else:  # "none" (Config checked the choice)
        model.add_lora("student", cfg.lora_rank, cfg.lora_alpha)
    model.save_adapter("student", path)
    stamp(path, **made_here(f"cold start {cfg.cold_start}", cfg.seed, cfg.sft_steps if cfg.cold_start == "sft" else 0,
                            built_from))
    return path


def opd_iteration(model, records, routed, anchor, cfg, loss_fn, gen, team=None, scaler=None):
    """One Flow-OPD iteration up to the optimizer step (§2.10's loop): the student samples SDE trajectories;
    at each trained step, the routed teacher and the MAR anchor give their velocities at the student's own
    states (adapter switches on the one backbone, no grad), then the student's forward and the total loss
    L = L_OPD + λ·MAR (loss_fn: opd_loss.flow_opd_loss, maybe compiled) are backpropagated.
    team: every teacher adapter (soft routing mixes them all; default: those routed); scaler: rollouts.loss_scaler's.
    Returns the decoded images, the mean step KL ({"all": over every sample, TEACHER: over the samples routed
    to it}, the signal that tells a teacher behaving unlike the others) and the mean MAR term."""
    team, scales = team or sorted(set(routed)), guidance_scales(cfg)   # --teacher_guidance: per-teacher CFG
    model.adapter("student")
    traj, images = sample_rollouts(model, records, cfg, gen)
    steps = trained_steps(cfg, gen, window=0)  # every step is SDE here: the teacher supervises each one
    kls, mars, by = [], [], []
    for mb in micro_steps(traj, steps, micro_batch_conds(model, records, cfg), cfg.micro_batch):
        with torch.no_grad(), amp(cfg):
            v_T = target_velocity(model, mb.x_t, mb.t, mb.conds, routed[mb.rows], team, cfg.soft_routing, scales)
            v_A = None
            if cfg.mar_anchor != "none":
                model.adapter(anchor)  # None = the base, adapters disabled
                v_A = model.velocity(mb.x_t, mb.t, *mb.conds)
        model.adapter("student")  # re-enables the student's gradients before its forward
        with amp(cfg):
            v_s = model.velocity(mb.x_t, mb.t, *mb.conds)
        loss, kl, mar = loss_fn(x_t=mb.x_t, x_next=mb.x_next, t=mb.t, t_next=mb.t_next, std=mb.std,
                                old_logp=mb.logp, v_student=v_s, v_teacher=v_T, v_anchor=v_A,
                                noise_level=cfg.noise_level, estimator=cfg.estimator, mar_lambda=cfg.mar_lambda)
        scaled(loss * mb.scale, scaler).backward()
        kls.append(kl)
        mars.append(mar)
        by.extend(routed[mb.rows])   # the teacher of each KL entry
    kls = torch.cat(kls)   # (samples x trained steps,)
    per_teacher = {t: kls[[k for k, b in enumerate(by) if b == t]].mean().item() for t in sorted(set(by))}
    return images, {"all": kls.mean().item(), **per_teacher}, torch.stack(mars).mean().item()


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


def finish_student(cfg, model, path, teachers, sources, cold, kw, evaluating, t0):
    """Save the student in PEFT and diffusers LoRA formats, stamped with what it was made from (sources: the
    teachers' and anchor's, load_teachers); print its scores beside the cold start's and the teachers'. The
    caller swaps in the EMA weights first, if any."""
    adapter, cold_path = os.path.join(path, "adapter"), os.path.join(cfg.cold_start_dir, cfg.cold_start)
    lora = model.transformer.peft_config["student"]   # PEFT's fields: adapter_config.json names the base
    lora.base_model_name_or_path, lora.revision = split_revision(cfg.base)
    model.save_adapter("student", adapter)
    record = stamp(adapter, **made_here("Flow-OPD student", cfg.seed, cfg.opd_iters, {
        "base": source(cfg.base), "cold_start": source(cold_path), **sources}))
    checkpoint.export_lora(model, "student", os.path.join(path, "export"))
    cards = [adapter, os.path.join(path, "export")]   # README.md, the model card; with the scores once evaluated
    write_model_card(cards, record, describe(cfg))
    print(f"student saved to {path}/adapter (PEFT) and {path}/export (diffusers LoRA) after "
          f"{(time.time() - t0) / 60:.1f} min")
    if evaluating:
        rows, folders = {f"cold start ({cfg.cold_start})": cold}, {f"cold start ({cfg.cold_start})": cold_path}
        for teacher in teachers.values():
            folder = os.path.join(cfg.teacher_dir, teacher)
            rows[f"teacher/{teacher}"] = evaluate(model, teacher, **kw) if cfg.teacher else \
                evaluate_cached(model, teacher, folder, **kw)
            folders[f"teacher/{teacher}"] = sources[teacher]["path"]
        # cached beside the saved adapter, so any two runs can later be compared paired (metrics.paired_difference)
        name = f"flow_opd/{os.path.basename(path)}"
        rows[name], folders[name] = evaluate_cached(model, "student", adapter, **kw), adapter
        if main_protocol(kw):
            stamp(adapter, scores=scalars(rows[name]), protocol=kw)
        write_model_card(cards, record, describe(cfg), scalars(rows[name]))
        paired = paired_difference(rows[name], cold)   # same prompts and noise
        for row, scores in rows.items():
            print(format_metrics(row, scores))
        print(format_paired("student - cold start", paired))
        write_json(os.path.join(path, "scores.json"), {
            "command": this_command(), "minutes": (time.time() - t0) / 60, "rows": {r: scalars(m) for r, m in rows.items()},
            "paired": paired, "models": {r: source(f)["sha256"] for r, f in folders.items()}})
    print(f"total {(time.time() - t0) / 60:.1f} min")


STAGES = {"distill": stage_distill, "teachers": stage_teachers,
          "grpo_mix": lambda cfg: stage_teachers(cfg, ["grpo_mix"])}  # one LoRA on all tasks, task reward + deqa


def main(argv=None):
    cfg = parse_config(argv, description=__doc__)
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 alone prints
        print(describe(cfg), flush=True)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs; no effect on the CPU
    STAGES[cfg.stage](cfg)
    distributed.shutdown()  # torchrun: leave the process group cleanly (no-op in one process)


if __name__ == "__main__":
    main()
