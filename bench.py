"""
Speed and peak memory of one Flow-OPD distillation iteration: our loop against the released loop structure.

One iteration = the student samples SDE trajectories (10 steps, CFG 4.5), then at each trained timestep and
micro-batch the routed teacher and the MAR anchor give velocities at the student's states (no grad, CFG), the
student's forward (CFG) and the pathwise-KL + lambda*MAR loss (opd_loss.flow_opd_loss) are backpropagated, and the
optimizer steps. Two loop structures, same model, data sizes, steps, seeds and loss maths:

  ours      ONE frozen transformer; the three routed teachers (geneval, ocr, pickscore), the MAR anchor (deqa)
            and the student are LoRA adapters on it, switched per routed group of samples (per-sample routing).
            The loop of train.opd_iteration, restated here from the same modules (rollouts, router,
            opd_loss; tests/test_bench.py checks it gives train.opd_iteration's gradients), then one clip +
            AdamW step per iteration, as train.stage_distill does.
  released  the loop structure of the released Flow-OPD code (PAPER_NOTES.md §6), re-implemented here: a
            separate full transformer per routed teacher (3) and another for the MAR anchor (1), each a
            copy.deepcopy holding only its own LoRA, unfused, as the released code's transformer + PeftModel
            copies are (fp32 unless --ref_dtype bf16), the student a LoRA on its own transformer; one teacher
            per iteration (epoch-level routing, geneval:ocr:pickscore = 3:1:1 in turn); optimizer step after
            EVERY trained timestep (accumulating over micro-batches only). --released_fuse fuses each copy's
            LoRA into its weights instead: a faster-than-released variant, for the sensitivity of the ratio.

Both hold four reference networks (3 teachers + anchor) and one student; "released" holds them as four full
copies, "ours" as four adapters. Adapters come from --teacher_dir when present (tiny only), otherwise they are
random LoRAs (rank 32, alpha 64, random lora_B so they are not the identity): this measures speed and memory,
not quality. Prompt lengths are fixed (padded), so drawing one task per iteration vs mixed tasks costs the same.

Memory: each variant runs in its own fresh subprocess. CPU: peak RSS of that process (getrusage ru_maxrss; it
includes Python, torch, the VAE and text encoder, so a "floor" subprocess that only loads the model is
reported too). CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats() once the variant's
models are built (the floor: once the backbone is). "weights" = bytes of unique transformer parameters and buffers held (deterministic).
Time: median over --iters timed iterations after one warm-up iteration (which also holds torch.compile's
compile time in the compile comparison).

  python bench.py                                   # tiny world model on CPU (checkpoints/base)
  python bench.py --device cuda --config sd35m      # random SD3.5-Medium-sized transformer, 512 px, bf16 autocast
  python bench.py --config mid --iters 2            # CPU: a random 116M-parameter SD3 transformer, where weights
                                                    # outweigh activations as they do at full size
  python bench.py --config sd35m --memory_plan      # SD3.5-M's memory at 512 px from meta builds (memory.py)
  bash scripts/gpu_check.sh                         # the CUDA checks: bench.py --gpu_check -> results/gpu_check.json
"""
import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

import memory
import models
import rollouts
from config import Config
from opd_loss import flow_opd_loss
from rollouts import draw_records, guided_conds, sample_rollouts, trained_steps
from router import DEFAULT_TASK_WEIGHTS, route, target_velocity
from world import toy_world

ROUTES, ANCHOR = ["geneval", "ocr", "pickscore"], "deqa"
EPOCH_CYCLE = ["geneval"] * 3 + ["ocr", "pickscore"]   # released: one dataset (and teacher) per epoch, 3:1:1
POOL = {t: toy_world.prompts(t, "train") for t in ROUTES}
# SD3.5-Medium transformer, as in stabilityai/stable-diffusion-3.5-medium transformer/config.json (diffusers
# SD3Transformer2DModel; 24 layers with dual attention in blocks 0-12, qk rms-norm). Run at 512 px = 64x64 latents.
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, pos_embed_max_size=384, qk_norm="rms_norm",
             dual_attention_layers=tuple(range(13)))
SD35M_TOKENS, SD35M_LATENT = 333, 64   # 77 CLIP + 256 T5 prompt tokens; 512 px / 8
# A CPU-sized SD3 transformer (116M parameters, 443 MiB in fp32) at 16x16 latents with 32 prompt tokens: big
# enough that each reference copy outweighs the activations of an iteration, small enough for 2 CPU cores.
MID = dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=8, attention_head_dim=64,
           num_attention_heads=10, joint_attention_dim=640, caption_projection_dim=640, pooled_projection_dim=640,
           pos_embed_max_size=32, qk_norm="rms_norm")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--config", default="tiny", choices=["tiny", "mid", "sd35m"])
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per variant, after 1 warm-up")
    ap.add_argument("--prompts", type=int, default=None, help="samples per iteration (tiny 16, sd35m 4)")
    ap.add_argument("--micro_batch", type=int, default=None, help="tiny 16 (config.Config), sd35m 2")
    ap.add_argument("--train_timesteps", type=int, default=4, help="trained SDE steps per iteration (of 9)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--ref_dtype", default="fp32", choices=["fp32", "bf16"], help="released: reference copies")
    ap.add_argument("--released_fuse", action="store_true", help="released: fuse each copy's LoRA (faster)")
    ap.add_argument("--base", default="checkpoints/base")
    ap.add_argument("--teacher_dir", default="checkpoints/teachers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip_compile", action="store_true", help="skip the eager vs torch.compile(flow_opd_loss) part")
    ap.add_argument("--out", default="", help="also append the markdown report to this file")
    ap.add_argument("--gradient_checkpointing", default="auto", choices=["auto", "true", "false"],
                    help="on the student's forwards (auto: on for CUDA, off on the CPU)")
    ap.add_argument("--memory_plan", action="store_true", help="print the memory plan of one iteration (memory.py)"
                    " for --config sd35m at --micro_batch / --prompts, and exit")
    ap.add_argument("--t5_tokens", type=int, default=256, help="memory plan: T5 max_sequence_length")
    ap.add_argument("--budget_gb", type=float, default=24.0, help="memory plan: the GPU budget in GiB")
    ap.add_argument("--activation_check", action="store_true",
                    help="memory plan: also check the activation formula against a measured CPU peak (~1 min)")
    ap.add_argument("--gpu_check", action="store_true", help="the CUDA checks of scripts/gpu_check.sh")
    ap.add_argument("--out_json", default="", help="--gpu_check: write its numbers to this JSON file")
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)   # internal: run one variant, print JSON
    args = ap.parse_args(argv)
    args.prompts = args.prompts or {"tiny": 16, "mid": 2, "sd35m": 4}[args.config]
    args.micro_batch = args.micro_batch or {"tiny": 16, "mid": 2, "sd35m": 2}[args.config]
    return args


def make_cfg(args):
    return Config(device=args.device, seed=args.seed, num_steps=10, guidance_scale=4.5, noise_level=0.7,
                        opd_prompts=args.prompts, micro_batch=args.micro_batch, train_timesteps=args.train_timesteps,
                        routes=list(ROUTES), mar_anchor=ANCHOR, estimator="pathwise", compile=False)


class RandomTextSD3(models.T2IModel):
    """An SD3 transformer behind T2IModel's velocity interface with random prompt embeddings in place of the
    text encoders (sd35m: (B, 333, 4096) + pooled (B, 2048)), and no VAE (decode returns the latents).
    load_backbone sets `tokens` (prompt length) and `side` (latent side) for the chosen config."""

    @property
    def latent_shape(self):
        return (self.transformer.config.in_channels, self.side, self.side)

    def encode_prompts(self, prompts):
        dev, n, c = self.transformer.device, len(prompts), self.transformer.config
        kw = dict(device=dev, dtype=self.transformer.dtype, generator=torch.Generator(device=dev).manual_seed(n))
        return torch.randn(n, self.tokens, c.joint_attention_dim, **kw), torch.randn(n, c.pooled_projection_dim, **kw)

    def velocity(self, *a, **kw):   # fp32 out: router.target_velocity scatters bf16 teacher velocities into an fp32
        return super().velocity(*a, **kw).float()   # buffer (v_T[sub] = ...), which fails for bf16 models

    def decode(self, latents):
        return latents


def load_backbone(args):
    if args.config == "tiny":
        return models.load_world_model(args.base, args.device)
    from diffusers import SD3Transformer2DModel
    config, tokens, side, dtype = {"sd35m": (SD35M, SD35M_TOKENS, SD35M_LATENT, torch.bfloat16),
                                   "mid": (MID, 32, 16, torch.float32)}[args.config]
    torch.manual_seed(args.seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # build straight in bf16 (sd35m): no transient fp32 copy on the GPU
    try:
        with torch.device(args.device):
            transformer = SD3Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(default)
    model = RandomTextSD3(transformer.to(dtype), None, None).requires_grad_(False).eval()
    model.tokens, model.side = tokens, side
    return model


def attach_lora(model, name, seed, cfg, args):
    """Load adapter `name` from --teacher_dir (tiny), else a random LoRA with non-zero lora_B. Returns its source."""
    path = os.path.join(args.teacher_dir, name)
    if args.config == "tiny" and os.path.isdir(path) and name != "student":
        model.load_adapter(path, name)
        return path
    model.add_lora(name, cfg.lora_rank, cfg.lora_alpha)
    g = torch.Generator().manual_seed(seed)   # both factors seeded here: PEFT's own init uses the global RNG
    with torch.no_grad():
        for n, p in model.transformer.named_parameters():
            if f".{name}." in n and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "lora_B" in n else 1 / cfg.lora_rank))
    return "random"


def build_ours(model, cfg, args):
    sources = {name: attach_lora(model, name, 100 + k, cfg, args) for k, name in enumerate(ROUTES + [ANCHOR])}
    attach_lora(model, "student", 99, cfg, args)
    model.adapter("student")
    return sources


def reference_copy(model, name, dtype, fuse):
    """A full, separate transformer holding only adapter `name`: unfused (the released transformer + PeftModel)
    or fused into its weights with no PEFT layers left (fuse=True)."""
    t = copy.deepcopy(model.transformer)
    t.delete_adapters([a for a in t.peft_config if a != name])
    t.set_adapter(name)
    if fuse:
        t.fuse_lora(adapter_names=[name])
        t.unload_lora()
    ref = type(model)(t.to(dtype).requires_grad_(False).eval(), model.vae, model.encoder)
    ref.shift, ref.scheduler, ref.latent_side = model.shift, model.scheduler, model.latent_side
    if isinstance(model, RandomTextSD3):
        ref.tokens, ref.side = model.tokens, model.side
    return ref


def build_released(model, cfg, args):
    sources = build_ours(model, cfg, args)                    # the same adapters, seeds and student
    dtype = torch.float32 if args.ref_dtype == "fp32" else torch.bfloat16
    refs = {name: reference_copy(model, name, dtype, args.released_fuse) for name in ROUTES}
    refs["anchor"] = reference_copy(model, ANCHOR, dtype, args.released_fuse)  # MAR: another full copy
    model.transformer.delete_adapters(ROUTES + [ANCHOR])      # the student transformer keeps only its LoRA
    model.adapter("student")
    return sources, refs


def opt_step(opt, params):
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def distill_losses(student, records, cfg, gen, loss_fn, velocities, step_end=None):
    """The distillation loop both structures share: the student's rollout, then at each trained step and
    micro-batch the target and anchor velocities (velocities(x_t, t, conds, lo, hi) -> (v_T, v_A), no grad),
    the student's forward and the total loss, backpropagated; step_end() after each trained step (the
    released structure's optimizer step). Returns the number of trained steps."""
    traj, _ = sample_rollouts(student, records, cfg, gen)
    steps, n = trained_steps(cfg, gen, window=0), len(records)
    for j in steps:
        for i in range(0, n, cfg.micro_batch):
            idx = torch.arange(i, min(i + cfg.micro_batch, n))
            conds = guided_conds(student, [r["prompt"] for r in records[i:i + cfg.micro_batch]], cfg.guidance_scale)
            x_t, t, t_next = traj.x_t[idx, j], traj.t[j].expand(len(idx)), traj.t_next[j].expand(len(idx))
            with torch.no_grad():
                v_T, v_A = velocities(x_t, t, conds, i, i + cfg.micro_batch)
            student.adapter("student")
            v_s = student.velocity(x_t, t, *conds)
            loss, _, _ = loss_fn(x_t=x_t, x_next=traj.x_next[idx, j], t=t, t_next=t_next, std=traj.std[idx, j],
                                 old_logp=traj.logp[idx, j], v_student=v_s, v_teacher=v_T, v_anchor=v_A,
                                 noise_level=cfg.noise_level, estimator=cfg.estimator, mar_lambda=cfg.mar_lambda)
            (loss * len(idx) / (n * (1 if step_end else len(steps)))).backward()
        if step_end:
            step_end()
    return len(steps)


def iter_ours(model, cfg, gen, loss_fn, opt, params, it):
    """One backbone: teachers and anchor are adapters, routed per sample, one optimizer step per iteration."""
    weights = {t: DEFAULT_TASK_WEIGHTS[t] for t in ROUTES}
    records = sorted(draw_records(POOL, weights, cfg.opd_prompts, gen), key=lambda r: r["task"])
    routed = route([r["task"] for r in records], {t: t for t in ROUTES})

    def velocities(x_t, t, conds, lo, hi):
        v_T = target_velocity(model, x_t, t, conds, routed[lo:hi], ROUTES)
        model.adapter(ANCHOR)
        return v_T, model.velocity(x_t, t, *conds)
    model.adapter("student")
    distill_losses(model, records, cfg, gen, loss_fn, velocities)
    opt_step(opt, params)
    return 1


def iter_released(student, refs, cfg, gen, loss_fn, opt, params, it):
    """Full copies: one teacher per iteration (epoch routing), an optimizer step after every trained step."""
    task = EPOCH_CYCLE[it % len(EPOCH_CYCLE)]
    records = draw_records(POOL, {task: 1.0}, cfg.opd_prompts, gen)
    teacher, anchor = refs[task], refs["anchor"]
    return distill_losses(student, records, cfg, gen, loss_fn,
                          lambda x_t, t, conds, lo, hi: (teacher.velocity(x_t, t, *conds), anchor.velocity(x_t, t, *conds)),
                          step_end=lambda: opt_step(opt, params))


def weight_bytes(*transformers):
    seen = {}
    for t in transformers:
        for x in list(t.parameters()) + list(t.buffers()):
            seen[x.data_ptr()] = x.numel() * x.element_size()
    return sum(seen.values())


def time_core(loss_fn, cfg, model, device, reps=20):
    """Forward + backward of the velocity-discrepancy core alone on one micro-batch of random states."""
    g = torch.Generator().manual_seed(0)
    B, shape = cfg.micro_batch, (cfg.micro_batch, *model.latent_shape)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    x, xn, vT, vA = r(*shape), r(*shape), r(*shape), r(*shape)
    t, tn, std, lp = torch.full((B,), 0.5, device=device), torch.full((B,), 0.4, device=device), r(B).abs(), r(B)
    times = []
    for k in range(reps + 2):
        vs = r(*shape).requires_grad_(True)
        sync(device)
        t0 = time.perf_counter()
        loss_fn(x_t=x, x_next=xn, t=t, t_next=tn, std=std, old_logp=lp, v_student=vs, v_teacher=vT, v_anchor=vA,
                noise_level=cfg.noise_level, estimator=cfg.estimator, mar_lambda=cfg.mar_lambda)[0].backward()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[2:])


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def run_variant(args):
    """Build one variant, time 1 + iters iterations, return a dict of results (run in a fresh process)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(args.seed)   # also seeds the CUDA RNG used just below
    if cuda:   # rollouts.sample_rollouts hands its CPU generator to sde_step's torch.randn(device=cuda), which
        from sde_sampler import rollout   # raises; draw the SDE noise from the seeded global CUDA RNG instead
        rollouts.rollout = lambda v, x1, sig, a, gen=None, steps=None: rollout(v, x1, sig, a, None, steps)
    cfg = make_cfg(args)
    model = load_backbone(args)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = dict(variant=args.variant, threads=torch.get_num_threads(), checkpointing=checkpointing(args))
    if args.variant == "floor":
        return dict(res, peak_mib=peak_mib(cuda), weights_mib=weight_bytes(model.transformer) / 2**20)
    refs = {}
    if args.variant == "released":
        res["sources"], refs = build_released(model, cfg, args)
        step = lambda it: iter_released(model, refs, cfg, gen, core, opt, params, it)
    else:
        res["sources"] = build_ours(model, cfg, args)
        step = lambda it: iter_ours(model, cfg, gen, core, opt, params, it)
    if cuda:   # the iteration's peak, not the transient of building fp32 copies from the bf16 backbone
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if checkpointing(args):   # on the student's grad-enabled forwards only (diffusers skips it under no_grad)
        model.transformer.enable_gradient_checkpointing()
    params = rollouts.trainable(model, "student")   # fp32 on a bf16 backbone, as train.stage_distill holds it
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    core = torch.compile(flow_opd_loss) if args.variant == "ours_compiled" else flow_opd_loss
    gen = torch.Generator().manual_seed(args.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    times, opt_steps = [], 0
    with amp:
        for it in range(1 + args.iters):
            sync(args.device)
            t0 = time.perf_counter()
            opt_steps = step(it)
            sync(args.device)
            times.append(time.perf_counter() - t0)
        if args.variant != "released":
            res["core_ms"] = time_core(core, cfg, model, args.device)
    res.update(warmup_s=times[0], times_s=times[1:], median_s=statistics.median(times[1:]), opt_steps=opt_steps,
               peak_mib=peak_mib(cuda), weights_mib=weight_bytes(model.transformer, *(m.transformer for m in
                                                                                        refs.values())) / 2**20)
    return res


def checkpointing(args):
    return args.gradient_checkpointing == "true" or (args.gradient_checkpointing == "auto"
                                                      and args.device.startswith("cuda"))


def peak_mib(cuda):
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def spawn(variant, argv):
    """Run one variant in a fresh interpreter; its last stdout line is 'BENCH_RESULT {json}'."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--variant", variant],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT "):])
    return dict(variant=variant, error=f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or ["?"])[-1])


def machine(args):
    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cuda (unavailable)"
    else:
        name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                    platform.processor()) + f", {os.cpu_count()} logical CPUs"
    return name


def report(args, argv, results, load):
    R = {r["variant"]: r for r in results}
    mem = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    holds = {"floor": "the backbone model only, no iteration (memory floor)",
             "ours": "1 transformer + 4 LoRA (3 teachers, anchor) + student LoRA",
             "released": f"student transformer + LoRA, 4 full {args.ref_dtype} copies (3 teachers, anchor), "
                         f"LoRA {'fused' if args.released_fuse else 'unfused (PeftModel-like)'}",
             "ours_compiled": "as ours, torch.compile(flow_opd_loss)"}
    src = next((r["sources"] for r in results if "sources" in r), {})
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    out = [f"## Flow-OPD distill iteration: ours vs released loop structure ({args.config}, {args.device})", "",
           f"- command: `{' '.join(shlex.quote(a) for a in ['python', 'bench.py', *argv])}`",
           f"- machine: {machine(args)}; torch {torch.__version__}; torch threads {threads}; "
           f"1-min load average at start {load:.2f}",
           f"- per iteration: {args.prompts} samples, micro-batch {args.micro_batch}, 10 SDE steps, "
           f"{args.train_timesteps} trained timesteps, CFG 4.5 (student, teachers, anchor), seed {args.seed}",
           "- adapters: " + ", ".join(f"{k}={v}" for k, v in src.items()) + "; student = random LoRA r32",
           f"- time: median of {args.iters} iterations after 1 warm-up; memory: one fresh process per variant", "",
           f"| variant | holds | opt steps/iter | s/iter (median) | timed iters (s) | warm-up (s) | {mem} (MiB) "
           f"| transformer weights (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for v, r in R.items():
        if "error" in r:
            out.append(f"| {v} | {holds[v]} | | **{r['error']}** | | | | |")
            continue
        ts = ", ".join(f"{x:.2f}" for x in r.get("times_s", []))
        med, warm = (f"{r[k]:.3f}" if k in r else "-" for k in ("median_s", "warmup_s"))
        out.append(f"| {v} | {holds[v]} | {r.get('opt_steps', '-')} | {med} | {ts or '-'} | {warm} | "
                   f"{r['peak_mib']:.0f} | {r['weights_mib']:.1f} |")
    o, rel, fl = R.get("ours", {}), R.get("released", {}), R.get("floor", {})
    if "median_s" in o and "median_s" in rel:
        out += ["", f"**released / ours**: time {rel['median_s'] / o['median_s']:.2f}x, "
                f"{mem} {rel['peak_mib'] / o['peak_mib']:.2f}x, transformer weights "
                f"{rel['weights_mib'] / o['weights_mib']:.2f}x"]
        if "peak_mib" in fl:
            out[-1] += (f"; above the floor ({fl['peak_mib']:.0f} MiB): "
                        f"{(rel['peak_mib'] - fl['peak_mib']) / max(o['peak_mib'] - fl['peak_mib'], 1e-9):.2f}x")
    c = R.get("ours_compiled", {})
    if "median_s" in c and "median_s" in o:
        out += ["", "| flow_opd_loss | warm-up iter (s) | s/iter (median, warm) | core fwd+bwd (ms/call) |",
                "|---|---|---|---|",
                f"| eager | {o['warmup_s']:.2f} | {o['median_s']:.3f} | {o['core_ms']:.2f} |",
                f"| torch.compile | {c['warmup_s']:.2f} | {c['median_s']:.3f} | {c['core_ms']:.2f} |", "",
                f"compile cost ~ {c['warmup_s'] - o['warmup_s']:.1f} s (warm-up difference); warm iteration "
                f"eager/compiled {o['median_s'] / c['median_s']:.2f}x, core alone {o['core_ms'] / c['core_ms']:.2f}x"]
    elif "error" in c:
        out += ["", f"torch.compile(flow_opd_loss): {c['error']}"]
    return "\n".join(out) + "\n"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.memory_plan:
        return memory_plan(args)
    if args.gpu_check:
        return gpu_check(args, argv)
    if args.variant:
        try:
            res = run_variant(args)
        except torch.OutOfMemoryError as e:   # the released structure at SD3.5-M size may not fit
            res = dict(variant=args.variant, error=f"OOM ({str(e).splitlines()[0][:120]})")
        print("BENCH_RESULT " + json.dumps(res))
        return res
    load = os.getloadavg()[0]   # other work on the machine skews CPU timings: reported
    variants = ["floor", "ours", "released"] + ([] if args.skip_compile else ["ours_compiled"])
    results = []
    for v in variants:
        t0 = time.time()
        results.append(spawn(v, argv))
        print(f"[bench] {v} done in {time.time() - t0:.0f} s", file=sys.stderr)
    text = report(args, argv, results, load)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return results


# ------------------------------------------------------------------------------------------------------
# The memory plan (memory.py) and the GPU check (scripts/gpu_check.sh)

def memory_plan(args):
    """Print the memory table of one sd35m distill iteration; with --activation_check, the CPU check too."""
    if args.config != "sd35m":
        raise SystemExit("--memory_plan plans SD3.5-Medium: add --config sd35m")
    C = memory.components(SD35M, pixels=8 * SD35M_LATENT, t5_tokens=args.t5_tokens)
    text = [f"## Memory plan: one distill iteration of SD3.5-Medium at {C['pixels']} px (micro-batch "
            f"{args.micro_batch}, {args.prompts} samples, T5 max_sequence_length {args.t5_tokens})", "",
            memory.format_plan(C, args.micro_batch, args.prompts, args.budget_gb)]
    if args.activation_check:
        text += ["", "Activation formula vs a measured CPU peak (memory.CHECK: 4 blocks of width 256, dual "
                 "attention in 2, 1024 image + 333 text tokens, batch 4, fp32, LoRA r32):", "",
                 memory.format_check(memory.activation_check(micro_batch=2))]
    print("\n".join(text))
    return C


def core_check(device, compile_fn=torch.compile, reps=20):
    """opd_loss.flow_opd_loss on `device`: eager vs torch.compile on SD3.5-M latent shapes (micro-batch 2, 16x64x64), with the
    velocities in bf16 as autocast leaves them; the means are fp32 in both (sde_step casts), so they agree to
    float rounding. Returns the relative differences and the ms per forward + backward."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 16, SD35M_LATENT, SD35M_LATENT)
    r = lambda *s: torch.randn(*s, generator=g).to(device)
    x, xn, vT, vA, vs0 = r(*shape), r(*shape), r(*shape).bfloat16(), r(*shape).bfloat16(), r(*shape).bfloat16()
    t, tn = torch.full((2,), 0.5, device=device), torch.full((2,), 0.4, device=device)
    std, lp = r(2).abs() + 0.1, r(2)
    out = {}
    for name, core in [("eager", flow_opd_loss), ("compiled", compile_fn(flow_opd_loss))]:
        times = []
        for k in range(reps + 2):
            vs = vs0.clone().requires_grad_(True)
            sync(device)
            t0 = time.perf_counter()
            loss, kl, mar = core(x_t=x, x_next=xn, t=t, t_next=tn, std=std, old_logp=lp, v_student=vs, v_teacher=vT,
                                 v_anchor=vA, noise_level=0.7, estimator="pathwise", mar_lambda=0.02)
            loss.backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        out[name] = dict(loss=loss.item(), kl=kl.float().mean().item(), grad=vs.grad.float().norm().item(),
                         ms=1e3 * statistics.median(times[2:]), first_call_s=times[0])
    e, c = out["eager"], out["compiled"]
    out["rel_diff"] = {k: abs(c[k] - e[k]) / max(abs(e[k]), 1e-30) for k in ("loss", "kl", "grad")}
    return out


# the runs of the GPU check: (name, bench.py arguments); each runs in a fresh process
GPU_RUNS = [("ours", "ours", ["--gradient_checkpointing", "true"]),
            ("ours_no_checkpointing", "ours", ["--gradient_checkpointing", "false"]),
            ("released", "released", ["--gradient_checkpointing", "true"]),
            ("ours_compiled", "ours_compiled", ["--gradient_checkpointing", "true"])]


def gpu_check(args, argv, runner=spawn):
    """The CUDA paths no CPU run exercises, in one go: bf16 autocast and torch.compile of flow_opd_loss, then one
    distill iteration (after a warm-up one) of a random SD3.5-M-sized transformer at 512 px, micro-batch 2, for
    ours (with and without gradient checkpointing, and with the compiled core) and the released structure, with
    peak torch.cuda.max_memory_allocated beside the memory plan's prediction for the same run (random prompt
    embeddings: no text encoders, no VAE). Writes --out_json; `runner` runs one variant (a fresh process)."""
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on "
                         "a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu to try "
                         "the check's code on a small config")
    t0 = time.time()
    res = dict(device=machine(args), torch=torch.__version__, config=args.config, micro_batch=args.micro_batch,
               prompts=args.prompts, train_timesteps=args.train_timesteps, runs={},
               core=core_check(args.device, torch.compile if cuda else (lambda f: f)))
    res["core"]["compiled_is"] = "torch.compile" if cuda else "eager (no compile off CUDA: a dry run)"
    print(f"[gpu_check] flow_opd_loss eager vs compiled: {res['core']['rel_diff']}", file=sys.stderr)
    C = memory.components(SD35M, pixels=8 * SD35M_LATENT, t5_tokens=SD35M_TOKENS - memory.CLIP_TOKENS,
                          others=False)
    base = [a for a in argv if a not in ("--gpu_check",)]
    base = strip_flags(base, ("--out_json", "--gradient_checkpointing"))
    for name, variant, extra in GPU_RUNS:
        r = runner(variant, base + ["--iters", "1"] + extra)
        gc = extra[-1] == "true"
        structure = "released" if variant == "released" else "ours"
        predicted = sum(row[2 if structure == "ours" else 3] for row in memory.rows(C, args.micro_batch,
                                                                                      args.prompts)
                        if row[0] in PREDICTED_ROWS or row[4] in ("train", "train:gc" if gc else "train:nogc"))
        r["predicted_mib"] = predicted / 2**20
        res["runs"][name] = r
        print(f"[gpu_check] {name}: {json.dumps(r)[:300]} ({time.time() - t0:.0f} s)", file=sys.stderr)
    res["wall_s"] = time.time() - t0
    if args.out_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(res, f, indent=1)
    print(format_gpu_check(res))
    return res


# the plan's rows a bench run holds (random prompt embeddings: no text encoders, no VAE, decode returns latents)
PREDICTED_ROWS = ("transformer (student backbone)", "reference transformers", "reference LoRAs", "student LoRA",
                  "student gradients", "AdamW state", "trajectories")


def strip_flags(argv, flags):
    """argv without the given `--flag value` pairs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        else:
            out.append(a)
    return out


def format_gpu_check(res):
    c = res["core"]
    out = [f"## GPU check ({res['device']}, torch {res['torch']}, {res['config']}, micro-batch {res['micro_batch']}, "
           f"{res['prompts']} samples, {res['train_timesteps']} trained timesteps)", "",
           f"flow_opd_loss, bf16 velocities: eager {c['eager']['ms']:.2f} ms, torch.compile {c['compiled']['ms']:.2f} ms "
           f"per forward + backward (first compiled call {c['compiled']['first_call_s']:.1f} s); relative "
           f"differences " + ", ".join(f"{k} {v:.1e}" for k, v in c["rel_diff"].items()), "",
           "| run | s / iteration | warm-up (s) | peak allocated (MiB) | plan's prediction (MiB) | weights (MiB) |",
           "|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        if "error" in r:
            out.append(f"| {name} | **{r['error']}** | | | {r['predicted_mib']:.0f} | |")
            continue
        out.append(f"| {name} | {r['median_s']:.2f} | {r['warmup_s']:.1f} | {r['peak_mib']:.0f} | "
                   f"{r['predicted_mib']:.0f} | {r['weights_mib']:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
