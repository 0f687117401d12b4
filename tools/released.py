"""
The released Flow-OPD code's loop structure (PAPER_NOTES.md §6), re-implemented as tools/bench.py's one named
contrast to train.opd_iteration: what the one-backbone design saves is only measurable against it.

Where ours holds one frozen transformer with the teachers, the MAR anchor and the student as LoRA adapters and
routes per sample, the released structure holds
  - a separate full transformer per routed teacher (3) and another for the MAR anchor (1), each a copy.deepcopy
    holding only its own LoRA, unfused, as the released code's transformer + PeftModel copies are (fp32 unless
    --ref_dtype bf16); --released_fuse fuses each copy's LoRA into its weights instead, a faster-than-released
    variant for the sensitivity of the ratio;
  - the student as a LoRA on its own transformer (the backbone, the other adapters deleted);
and it trains with
  - one teacher per iteration (epoch-level routing: geneval:ocr:pickscore = 3:1:1 in turn, EPOCH_CYCLE);
  - an optimizer step after EVERY trained timestep (accumulating over micro-batches only).
The maths per micro-step is train.opd_iteration's (the same micro_steps, the same flow_opd_loss, the same
optimizer_step), so a difference in time or memory is the structure's.
"""
import copy

import torch

from support.rollouts import amp, micro_batch_conds, micro_steps, optimizer_step, sample_rollouts, trained_steps
from tools.bench_kit import ANCHOR, ROUTES, RandomTextSD3, build_ours, draw

EPOCH_CYCLE = ["geneval"] * 3 + ["ocr", "pickscore"]   # released: one dataset (and teacher) per epoch, 3:1:1


def reference_copy(model, name, dtype, fuse):
    """A full, separate transformer holding only adapter `name`: unfused (the released transformer + PeftModel)
    or fused into its weights with no PEFT layers left (fuse=True)."""
    t = copy.deepcopy(model.transformer)
    t.set_adapter(name)   # before deleting the others: deleting the active adapter is what PEFT warns about
    t.delete_adapters([a for a in t.peft_config if a != name])
    if fuse:
        t.fuse_lora(adapter_names=[name])
        t.unload_lora()
    ref = type(model)(t.to(dtype).requires_grad_(False).eval(), model.vae, model.encoder)
    ref.shift, ref.scheduler, ref.latent_side = model.shift, model.scheduler, model.latent_side
    if isinstance(model, RandomTextSD3):
        ref.tokens, ref.side = model.tokens, model.side
    return ref


def build_released(model, cfg, config, ref_dtype="fp32", fuse=False):
    """Turn the backbone into the released structure: the same adapters and seeds as ours (build_ours), each
    reference adapter moved into its own full copy. Returns ({adapter: source}, {task or "anchor": copy})."""
    sources = build_ours(model, cfg, config)
    dtype = torch.float32 if ref_dtype == "fp32" else torch.bfloat16
    refs = {name: reference_copy(model, name, dtype, fuse) for name in ROUTES}
    refs["anchor"] = reference_copy(model, ANCHOR, dtype, fuse)   # MAR: another full copy
    model.transformer.delete_adapters(ROUTES + [ANCHOR])          # the student is active: only its LoRA stays
    model.adapter("student")
    return sources, refs


def released_iteration(student, refs, cfg, gen, loss_fn, opt, params, it):
    """One released-structure iteration: the student's rollouts on iteration `it`'s one task, then per trained
    step the teacher's and the anchor's copies (no grad), the student's forward and loss, and an optimizer
    step. Returns the number of optimizer steps taken."""
    task = EPOCH_CYCLE[it % len(EPOCH_CYCLE)]
    records = draw(cfg, gen, {task: 1.0})
    teacher, anchor = refs[task], refs["anchor"]
    student.adapter("student")
    traj, _ = sample_rollouts(student, records, cfg, gen)
    conds = micro_batch_conds(student, records, cfg)
    steps = trained_steps(cfg, gen, window=0)
    for j in steps:
        for mb in micro_steps(traj, [j], conds, cfg.micro_batch):   # scale: a share of this step's samples
            with torch.no_grad(), amp(cfg):
                v_T = teacher.velocity(mb.x_t, mb.t, *mb.conds)
                v_A = anchor.velocity(mb.x_t, mb.t, *mb.conds)
            with amp(cfg):
                v_s = student.velocity(mb.x_t, mb.t, *mb.conds)
            loss, _, _ = loss_fn(x_t=mb.x_t, x_next=mb.x_next, t=mb.t, t_next=mb.t_next, std=mb.std,
                                 old_logp=mb.logp, v_student=v_s, v_teacher=v_T, v_anchor=v_A,
                                 noise_level=cfg.noise_level, estimator=cfg.estimator, mar_lambda=cfg.mar_lambda)
            (loss * mb.scale).backward()
        optimizer_step(params, opt)
    return len(steps)
