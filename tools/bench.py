"""
Speed and peak memory of one Flow-OPD distillation iteration, as a ratio to its floor and against the released
code's loop structure: whether the one-backbone design costs time beyond the passes it must run, and what it saves.

One iteration = the student samples SDE trajectories (10 steps, CFG 4.5), then at each trained timestep and
micro-batch the routed teacher and the MAR anchor give velocities at the student's states (no grad, CFG), the
student's forward (CFG) and L = L_OPD + lambda*MAR (opd_loss.flow_opd_loss) are backpropagated, and the
optimizer steps. Each variant runs in its own fresh process, on the same model, sizes, steps and seeds:

  floor          time: the iteration's transformer passes alone (tools/floor.py: the same sampling forwards,
                 teacher and anchor no-grad forwards and student forward + backward, on tensors of the same shapes,
                 with no routing, adapter switches, loss or bookkeeping), run after every iteration of each
                 variant in its own process, so that a shared machine's load weighs on both alike; "x floor" is
                 the median of iteration / floor over the rounds. Memory: the backbone loaded, no iteration.
  ours           train.opd_iteration itself (the main job's code: one frozen transformer; the three routed
                 teachers, the MAR anchor and the student are adapters on it, switched per routed group), then
                 support.rollouts.optimizer_step, as train.stage_distill runs them.
  released       the released code's structure (tools/released.py): full transformer copies per teacher and
                 anchor, one teacher per iteration, an optimizer step per trained timestep.
  ours_compiled  ours with torch.compile(flow_opd_loss) (--skip_compile leaves it out).
Backbones (--config tiny, mid, sd35m), adapters and measures: tools/bench_kit.py.

Time: median over --iters timed rounds (iteration, then floor) after one warm-up round (which also holds
torch.compile's compile time).
Memory: CPU, the process's peak RSS (getrusage; it includes Python, torch, the VAE and the text encoder, hence
the floor's); CUDA, torch.cuda.max_memory_allocated() from once the variant's models are built. "weights" =
bytes of the distinct transformer parameters and buffers held.

Flags: Config's (--device, --seed, --base, --teacher_dir, --opd_prompts, --micro_batch, --train_timesteps,
--max_sequence_length, --gradient_checkpointing, ...) and bench's own (--help's last group). Not given:
--opd_prompts/--micro_batch are tiny 16/16 (Config's), mid 2/2, sd35m 4/2; --gradient_checkpointing is on for CUDA
only. --routes and --mar_anchor are fixed (geneval, ocr, pickscore; deqa); --compile is ours_compiled's job.

  python -m tools.bench                                  # tiny world model (checkpoints/base)
  python -m tools.bench --device cuda --config sd35m     # random SD3.5-M-sized transformer, 512 px, bf16
  python -m tools.bench --config mid --iters 2           # CPU: random 116M-parameter SD3, weights > activations
  python -m tools.bench --config sd35m --memory_plan     # SD3.5-M's memory from meta builds (tools/memory_plan.py)
  bash tools/gpu_check.sh                                # the CUDA checks (tools/gpu_check.py)
The report is markdown (--out appends it to a file); tools/BENCHMARKS.md holds the recorded runs.
"""
import dataclasses
import json
import os
import shlex
import statistics
import sys
import time

import torch

import train
from opd_loss import flow_opd_loss
from router import DEFAULT_TASK_WEIGHTS, route
from support import rollouts
from support.config import parse_args
from tools import gpu_check, memory_check, memory_plan
from tools.bench_kit import (ANCHOR, ROUTES, build_ours, draw, load_backbone, machine, peak_mib, spawn, sync,
                             time_core, weight_bytes)
from tools.floor import floor_inputs, floor_passes
from tools.released import build_released, released_iteration

CONFIG_DEFAULTS = {"tiny": {}, "mid": dict(opd_prompts=2, micro_batch=2), "sd35m": dict(opd_prompts=4, micro_batch=2)}
VARIANTS = ("floor", "ours", "released", "ours_compiled")


def bench_flags(group):
    """bench's own flags, beside Config's (support.config.parse_args's `extra`)."""
    group.add_argument("--config", default="tiny", choices=tuple(CONFIG_DEFAULTS),
                       help="the backbone: tiny (--base), mid or sd35m (random SD3s; tools/bench_kit.py)")
    group.add_argument("--iters", type=int, default=3,
                       help="timed rounds (iteration + floor) per variant, after 1 warm-up")
    group.add_argument("--threads", type=int, default=0, help="torch threads per variant (0: torch's default)")
    group.add_argument("--ref_dtype", default="fp32", choices=("fp32", "bf16"),
                       help="released: the dtype of the reference copies (the released code keeps fp32)")
    group.add_argument("--released_fuse", action="store_true",
                       help="released: fuse each copy's LoRA into its weights (faster than released)")
    group.add_argument("--skip_compile", action="store_true", help="leave out the ours_compiled variant")
    group.add_argument("--out", default="", help="also append the markdown report to this file")
    group.add_argument("--memory_plan", action="store_true",
                       help="print the memory plan of one --config sd35m iteration at --micro_batch, --opd_prompts "
                            "and --max_sequence_length (tools/memory_plan.py), and exit")
    group.add_argument("--budget_gb", type=float, default=24.0, help="--memory_plan: the GPU budget in GiB")
    group.add_argument("--activation_check", action="store_true",
                       help="--memory_plan: also measure the activation formula on the CPU (tools/memory_check.py, "
                            "1-3 min)")
    group.add_argument("--gpu_check", action="store_true", help="the CUDA checks of tools/gpu_check.sh")
    group.add_argument("--out_json", default="", help="--gpu_check: write its numbers to this JSON file")
    group.add_argument("--variant", default="", choices=("",) + VARIANTS,
                       help="internal: run this one variant here and print its result as a BENCH_RESULT JSON line "
                            "(the report runs each in a fresh process)")


def parse(argv=None):
    """(Config, bench's own flags) from the one command line (support.config.parse_args), with the per-config
    and per-device defaults of flags not given (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_args(argv, __doc__, extra=bench_flags)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    fill = {k: v for k, v in CONFIG_DEFAULTS[args.config].items() if f"--{k}" not in given}
    if "--gradient_checkpointing" not in given:   # the activations of a full-size student need it on a GPU
        fill["gradient_checkpointing"] = cfg.device.startswith("cuda")
    return dataclasses.replace(cfg, routes=list(ROUTES), mar_anchor=ANCHOR, **fill), args


def ours_iteration(model, cfg, gen, loss_fn, opt, params, it):
    """train.stage_distill's iteration: records drawn and routed per sample, train.opd_iteration (the main
    job's own code, not a copy), then its optimizer step. Returns the optimizer steps taken."""
    records = draw(cfg, gen, {t: DEFAULT_TASK_WEIGHTS[t] for t in ROUTES})
    routed = route([r["task"] for r in records], {t: t for t in ROUTES})
    train.opd_iteration(model, records, routed, ANCHOR, cfg, loss_fn, gen, team=ROUTES)
    rollouts.optimizer_step(params, opt)
    return 1


def timed(fn, device):
    """(fn(), its wall-clock seconds, the GPU's queued work included)."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_variant(cfg, args):
    """Build args.variant and time 1 + --iters rounds of one iteration followed by the floor's passes on the same
    model (tools/floor.py), so that load on a shared machine weighs on both alike; returns the results (run in a
    fresh process: spawn). The floor variant only loads the backbone: the memory floor."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = cfg.device.startswith("cuda")
    torch.manual_seed(cfg.seed)
    model = load_backbone(cfg, args.config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = dict(variant=args.variant, threads=torch.get_num_threads(), checkpointing=cfg.gradient_checkpointing,
               peak_mib=peak_mib(cuda), weights_mib=weight_bytes(model.transformer) / 2**20)
    if args.variant == "floor":
        return res
    refs = {}
    if args.variant == "released":
        res["sources"], refs = build_released(model, cfg, args.config, args.ref_dtype, args.released_fuse)
    else:
        res["sources"] = build_ours(model, cfg, args.config)
    if cuda:   # the iteration's peak, not the transient of building fp32 copies from the bf16 backbone
        sync(cfg.device)
        torch.cuda.reset_peak_memory_stats()
    params = rollouts.trainable(model, "student")   # fp32 on a bf16 backbone, as train.stage_distill holds it
    opt = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4)
    core = torch.compile(flow_opd_loss) if args.variant == "ours_compiled" else flow_opd_loss
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = {t: DEFAULT_TASK_WEIGHTS[t] for t in ROUTES}
    inputs = floor_inputs(model, draw(cfg, torch.Generator().manual_seed(cfg.seed + 1), weights), cfg)
    teachers = len(ROUTES) if cfg.soft_routing else 1   # soft routing runs every teacher on every sample
    if args.variant == "released":
        step = lambda it: released_iteration(model, refs, cfg, gen, core, opt, params, it)   # noqa: E731
    else:
        step = lambda it: ours_iteration(model, cfg, gen, core, opt, params, it)   # noqa: E731
    times, floors = [], []
    for it in range(1 + args.iters):
        opt_steps, t = timed(lambda: step(it), cfg.device)
        res["passes"], f = timed(lambda: floor_passes(model, inputs, cfg, teachers), cfg.device)
        opt.zero_grad(set_to_none=True)   # the floor's gradients must not reach the next optimizer step
        times.append(t)
        floors.append(f)
    res.update(warmup_s=times[0], times_s=times[1:], median_s=statistics.median(times[1:]), opt_steps=opt_steps,
               floor_times_s=floors[1:], floor_s=statistics.median(floors[1:]),
               x_floor=statistics.median(t / f for t, f in zip(times[1:], floors[1:])))
    if args.variant.startswith("ours"):
        res["core_ms"] = time_core(core, (cfg.micro_batch, *model.latent_shape), cfg)["ms"]
    res.update(peak_mib=peak_mib(cuda), weights_mib=weight_bytes(model.transformer, *(
        m.transformer for m in refs.values())) / 2**20)
    return res


def report(cfg, args, argv, results, load):
    """The markdown report of one bench run: the variants' table, the ratios to the floor, released / ours.
    load: the machine's 1-min load average at the start and at the end of the run."""
    R = {r["variant"]: r for r in results}
    mem = "peak CUDA allocated" if cfg.device.startswith("cuda") else "peak RSS"
    holds = {"floor": "the backbone loaded, no iteration (the memory floor)",
             "ours": "1 transformer + 4 LoRA (3 teachers, anchor) + student LoRA; train.opd_iteration",
             "released": f"student transformer + LoRA, 4 full {args.ref_dtype} copies (3 teachers, anchor), "
                         f"LoRA {'fused' if args.released_fuse else 'unfused (PeftModel-like)'}",
             "ours_compiled": "as ours, torch.compile(flow_opd_loss)"}
    src = next((r["sources"] for r in results if "sources" in r), {})
    threads = next((r["threads"] for r in results if "threads" in r), "?")
    passes = next((r["passes"] for r in results if "passes" in r), "?")
    out = [f"## Flow-OPD distill iteration: ratio to the floor, ours vs released ({args.config}, {cfg.device})", "",
           f"- command: `{' '.join(shlex.quote(a) for a in ['python', '-m', 'tools.bench', *argv])}`",
           f"- machine: {machine(cfg.device)}; torch {torch.__version__}; torch threads {threads}; 1-min load "
           f"average {load[0]:.2f} at the start, {load[1]:.2f} at the end (above ~1 per core, other work skews times)",
           f"- per iteration: {cfg.opd_prompts * cfg.opd_group} samples, micro-batch {cfg.micro_batch}, "
           f"{cfg.num_steps} SDE steps, {cfg.train_timesteps} trained timesteps, CFG {cfg.guidance_scale:g} "
           f"(student, teachers, anchor), gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, "
           f"seed {cfg.seed}",
           "- adapters: " + ", ".join(f"{k}={v}" for k, v in src.items()) + "; student = random LoRA r32",
           f"- floor: the iteration's {passes} transformer forwards (and the student's backwards) alone "
           f"(tools/floor.py), run after each iteration in the variant's own process; x floor = the median over the "
           f"timed rounds of iteration / floor",
           f"- time: median of {args.iters} rounds after 1 warm-up; memory: one fresh process per variant", "",
           f"| variant | holds | opt steps/iter | s/iter (median) | floor s/iter | x floor | timed iters (s) | "
           f"warm-up (s) | {mem} (MiB) | transformer weights (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for v, r in R.items():
        if "error" in r:
            out.append(f"| {v} | {holds[v]} | | **{r['error']}** | | | | | | |")
            continue
        f = lambda k, d=3: f"{r[k]:.{d}f}" if k in r else "-"   # noqa: E731
        ts = ", ".join(f"{x:.2f}" for x in r.get("times_s", [])) or "-"
        out.append(f"| {v} | {holds[v]} | {r.get('opt_steps', '-')} | {f('median_s')} | {f('floor_s')} | "
                   f"{f('x_floor', 2)} | {ts} | {f('warmup_s', 2)} | {r['peak_mib']:.0f} | {r['weights_mib']:.1f} |")
    o, rel, fl, c = (R.get(v, {}) for v in ("ours", "released", "floor", "ours_compiled"))
    ratios = [f"{name} {'**' * (v == 'ours')}{R[v]['x_floor']:.2f}x{'**' * (v == 'ours')}"
              for v, name in [("ours", "ours"), ("released", "released"), ("ours_compiled", "ours compiled")]
              if "x_floor" in R.get(v, {})]
    if ratios:
        out += ["", "**ratio to the floor** (one iteration / its transformer passes alone): " + ", ".join(ratios)]
    if "median_s" in o and "median_s" in rel:
        out += ["", f"**released / ours**: time {rel['median_s'] / o['median_s']:.2f}x, "
                f"{mem} {rel['peak_mib'] / o['peak_mib']:.2f}x, transformer weights "
                f"{rel['weights_mib'] / o['weights_mib']:.2f}x"]
        if "peak_mib" in fl:
            out[-1] += (f"; above the floor's memory ({fl['peak_mib']:.0f} MiB): "
                        f"{(rel['peak_mib'] - fl['peak_mib']) / max(o['peak_mib'] - fl['peak_mib'], 1e-9):.2f}x")
    if "median_s" in c and "median_s" in o:
        out += ["", "| flow_opd_loss | warm-up iter (s) | s/iter (median, warm) | core fwd+bwd (ms/call) |",
                "|---|---|---|---|",
                f"| eager | {o['warmup_s']:.2f} | {o['median_s']:.3f} | {o['core_ms']:.2f} |",
                f"| torch.compile | {c['warmup_s']:.2f} | {c['median_s']:.3f} | {c['core_ms']:.2f} |", "",
                f"compile cost ~ {c['warmup_s'] - o['warmup_s']:.1f} s (warm-up difference); warm iteration "
                f"eager/compiled {o['median_s'] / c['median_s']:.2f}x, core alone {o['core_ms'] / c['core_ms']:.2f}x"]
    return "\n".join(out) + "\n"


def plan(cfg, args):
    """--memory_plan: the plan's tables for SD3.5-M, with --activation_check the CPU measurement below them."""
    if args.config != "sd35m":
        raise SystemExit("--memory_plan plans SD3.5-Medium: add --config sd35m")
    text = memory_plan.report(cfg.micro_batch, cfg.opd_prompts, cfg.max_sequence_length, args.budget_gb)
    if args.activation_check:
        text += "\n\n" + memory_check.format_check(memory_check.activation_check(micro_batch=2))
    print(text)
    return text


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse(argv)
    if args.memory_plan:
        return plan(cfg, args)
    if args.gpu_check:
        return gpu_check.run(cfg, args, argv)
    if args.variant:
        try:
            res = run_variant(cfg, args)
        except torch.OutOfMemoryError as e:   # the released structure at SD3.5-M size may not fit
            res = dict(variant=args.variant, error=f"OOM ({str(e).splitlines()[0][:120]})")
        print("BENCH_RESULT " + json.dumps(res))
        return res
    load = os.getloadavg()[0]   # other work on the machine skews CPU timings: reported
    results = []
    for v in VARIANTS[:3] if args.skip_compile else VARIANTS:
        t0 = time.time()
        results.append(spawn(v, argv))
        print(f"[bench] {v} done in {time.time() - t0:.0f} s", file=sys.stderr)
    text = report(cfg, args, argv, results, (load, os.getloadavg()[0]))
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    main()
