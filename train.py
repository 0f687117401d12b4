"""
Flow-OPD, the main job (§2.1's pipeline, stages 2-3; §2.5-2.8):

    python train.py --stage distill

load the routed teachers and the MAR anchor as adapters on one backbone -> cold start the student (merge the
teachers' LoRAs, or SFT on their samples; §3) -> every iteration: the student samples SDE rollouts -> each
prompt is routed to the teacher of its task -> teacher and anchor velocities at the student's own states ->
L = L_OPD + λ·MAR (opd_loss.flow_opd_loss) -> one optimizer step. Then the student is saved (PEFT and
diffusers LoRA formats) and scored beside its cold start and its teachers.

The same command line runs every other stage, whose loops live in their own files:
  pretrain   the miniature world's base                                  (world/pretrain.py)
  teachers   one Flow-GRPO LoRA expert per reward; grpo_mix, grpo_snr    (teachers.py)
  all        the whole pipeline for one --seed and the paper's tables    (pipeline.py)
Every field of config.Config is a flag (`--key value`). SD3.5-Medium: --model PIPELINE --teacher NAME=PEFT
--mar PEFT --prompts TASK=FILE (README "Run on SD3.5-Medium"); several GPUs: torchrun --nproc_per_node=N
train.py ... (distributed.py); --checkpoint_every N and --resume_from_checkpoint latest (checkpoint.py).
Time convention: t = sigma in [0, 1], t = 1 is noise (SD3 / Flow-GRPO).
Departures from the paper: 1) one optimizer step per iteration, so every PPO ratio is exactly 1 (released: 2
per epoch); 2) `train_timesteps` random steps of the first T-1 are trained per iteration (paper: all T);
3) per-sample routing (a batch mixes tasks; each teacher runs once on its own samples).
"""
import contextlib
import dataclasses
import json
import os
import time

import torch
from tqdm import tqdm

import checkpoint
import distributed
import pipeline
from cold_start import merge_into, sft_cold_start
from config import (adapter_folder, describe, eval_settings, load_model, named_paths, parse_config, probe_settings,
                    prompt_pool, reward_registry)
from eval import evaluate, evaluate_cached
from metrics import format_metrics, format_paired, paired_difference
from opd_loss import flow_opd_loss
from rewards import REWARDS, combined_reward
from rollouts import amp, draw_records, jsonl_logger, micro_batch_conds, optimizer_step, sample_rollouts, trainable, trained_steps
from router import DEFAULT_TASK_WEIGHTS, route, target_velocity
from teachers import log_probe, stage_grpo_mix, stage_grpo_snr, stage_teachers
from world.pretrain import stage_pretrain


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
    cold = evaluate_cached(model, "student", cold_path, **kw) if evaluating else None  # says how long it takes
    model.adapter("student")
    params = trainable(model, "student")
    opt = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4)
    ema = checkpoint.EMA(params, cfg.ema_decay) if cfg.ema_decay else None
    loss_fn = torch.compile(flow_opd_loss) if cfg.compile else flow_opd_loss  # the velocity-discrepancy core
    gen = torch.Generator().manual_seed(cfg.seed + rank)  # each process its own prompts and noise
    start = checkpoint.resume_training(cfg, run_dir, model, opt, ema, gen, rank) if cfg.resume_from_checkpoint else 0
    log = jsonl_logger(os.path.join(run_dir, "train_log.jsonl"), fresh=start == 0) if rank == 0 else None
    per_iter = cfg.opd_prompts * cfg.opd_group * world  # images the student samples per iteration
    probe = {**kw, **probe_settings(cfg)}  # --eval_every: the avg-vs-images curve (kw: --eval_prompts, rewards)
    weights = {t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if t in teachers}
    if rank == 0:
        anchor_name = anchor or ("base" if cfg.mar_anchor == "base" else "none")
        print(f"distill {name}: teachers {teachers}, MAR anchor {anchor_name}, "
              f"{cfg.opd_prompts} prompts x {cfg.opd_group} per iteration x {world} processes, "
              f"iterations {start}..{cfg.opd_iters}")
    if cfg.eval_every and start == 0 and rank == 0:
        log_probe(model, "student", probe, log, stage="distill_eval", iter=0, images=0)
    bar = tqdm(range(start, cfg.opd_iters), desc="distill", disable=rank != 0)
    for it in bar:
        drawn = sorted(draw_records(pool, weights, cfg.opd_prompts, gen, cfg.balance_tags), key=lambda r: r["task"])
        records = [r for r in drawn for _ in range(cfg.opd_group)]  # sorted: micro-batches share a teacher
        images, kl, mar = opd_iteration(model, records, route([r["task"] for r in records], teachers),
                                        anchor, cfg, loss_fn, gen, team=list(teachers.values()))
        optimizer_step(params, opt, ema)
        metrics = {"kl": kl, "mar": mar}
        if cfg.log_rewards:
            rewards = combined_reward(images, records, {"task": 1.0}, rewards_fns)
            metrics.update({f"reward/{t}": rewards[[k for k, r in enumerate(records) if r["task"] == t]].mean().item()
                            for t in sorted(weights)})  # nan for a task not drawn this iteration
        metrics = distributed.mean_over_processes(metrics)
        done = it + 1
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint.save_training_state(cfg, run_dir, done, model, opt, ema, gen, rank)
        if rank > 0:
            continue
        log(stage="distill", iter=it, **metrics)
        bar.set_postfix(kl=f"{metrics['kl']:.3g}", mar=f"{metrics['mar']:.3g}")  # the step KL and MAR terms
        if cfg.eval_every and done % cfg.eval_every == 0:
            log_probe(model, "student", probe, log, stage="distill_eval", iter=done, images=done * per_iter)
    if world > 1:
        print(f"rank {rank}: max parameter spread across processes {distributed.max_parameter_spread(params):.3g}",
              flush=True)
    if rank == 0:
        with ema.applied() if ema is not None else contextlib.nullcontext():
            finish_student(cfg, model, run_dir, teachers, cold, kw, evaluating, t0)
    distributed.barrier()


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
                              alpha=cfg.lora_alpha, guidance_scale=cfg.guidance_scale, seed=cfg.seed)
        print(f"cold start sft: final flow-matching loss {loss:.4f}")
    elif cfg.cold_start == "none":
        model.add_lora("student", cfg.lora_rank, cfg.lora_alpha)
    else:
        raise SystemExit(f"unknown --cold_start {cfg.cold_start!r}; choose merge, merge_average, sft or none")
    model.save_adapter("student", path)
    with open(routes_file, "w") as f:
        json.dump(built_from, f, indent=1)
    return path


def opd_iteration(model, records, routed, anchor, cfg, loss_fn, gen, team=None):
    """One Flow-OPD iteration up to the optimizer step (§2.10's loop): the student samples SDE trajectories;
    at each trained step, the routed teacher and the MAR anchor give their velocities at the student's own
    states (adapter switches on the one backbone, no grad), then the student's forward and the total loss
    L = L_OPD + λ·MAR (loss_fn: opd_loss.flow_opd_loss, maybe compiled) are backpropagated.
    team: every teacher adapter (soft routing mixes them all; default: those routed).
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
            x_t, t, t_next = traj.x_t[idx, j], traj.t[j].expand(len(idx)), traj.t_next[j].expand(len(idx))
            with torch.no_grad(), amp(cfg):
                v_T = target_velocity(model, x_t, t, conds, routed[i:i + cfg.micro_batch], team, cfg.soft_routing)
                v_A = None
                if cfg.mar_anchor != "none":
                    model.adapter(anchor)  # None = the base, adapters disabled
                    v_A = model.velocity(x_t, t, *conds)
            model.adapter("student")  # re-enables the student's gradients before its forward
            with amp(cfg):
                v_s = model.velocity(x_t, t, *conds)
            loss, kl, mar = loss_fn(x_t=x_t, x_next=traj.x_next[idx, j], t=t, t_next=t_next, std=traj.std[idx, j],
                                    old_logp=traj.logp[idx, j], v_student=v_s, v_teacher=v_T, v_anchor=v_A,
                                    noise_level=cfg.noise_level, estimator=cfg.estimator, mar_lambda=cfg.mar_lambda)
            (loss * len(idx) / (n * len(steps))).backward()
            kls.append(kl)
            mars.append(mar)
    return images, torch.cat(kls).mean().item(), torch.stack(mars).mean().item()


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
        # cached beside the saved adapter, so any two runs can later be compared paired (metrics.paired_difference)
        student = evaluate_cached(model, "student", os.path.join(path, "adapter"), **kw)
        print(format_metrics(f"flow_opd/{os.path.basename(path)}", student))
        print(format_paired("student - cold start", paired_difference(student, cold)))  # same prompts and noise
    print(f"total {(time.time() - t0) / 60:.1f} min")


def stage_world_base(cfg):
    """--stage pretrain: the world's base (world/pretrain.py), then its four scores on the test prompts."""
    stage_pretrain(cfg, report=lambda base: print(format_metrics("base", evaluate(base, None, **eval_settings(cfg)))))


STAGES = {"distill": stage_distill, "pretrain": stage_world_base, "teachers": stage_teachers,
          "grpo_mix": stage_grpo_mix, "grpo_snr": stage_grpo_snr,
          "all": lambda cfg: pipeline.stage_all(cfg, stage_distill)}


def main(argv=None):
    cfg = parse_config(argv, description=__doc__)
    if cfg.stage not in STAGES:
        raise SystemExit(f"unknown --stage {cfg.stage!r}; choose one of {sorted(STAGES)}")
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 alone prints
        print(describe(cfg), flush=True)
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 on Ampere+ GPUs; no effect on the CPU
    STAGES[cfg.stage](cfg)
    distributed.shutdown()  # torchrun: leave the process group cleanly (no-op in one process)


if __name__ == "__main__":
    main()
