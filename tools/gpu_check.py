"""
The CUDA paths no CPU run exercises, in one go, so that one short GPU loan measures what the memory plan and the
CPU benchmarks can only predict (tools/BENCHMARKS.md, "GPU check"):
  1. flow_opd_loss (the velocity-discrepancy core) on bf16 velocities, eager against torch.compile, on SD3.5-M's
     latent shapes: relative differences of loss, KL and gradient, and ms per forward + backward;
  2. one distill iteration (after a warm-up one) of a random SD3.5-M-sized transformer at 512 px, micro-batch 2,
     for ours with and without gradient checkpointing, ours with the compiled core, and the released structure,
     each in a fresh process (tools/bench.py's variants), with peak torch.cuda.max_memory_allocated beside the
     memory plan's prediction for the same run (random prompt embeddings: no text encoders, no VAE), and each
     iteration's ratio to its floor (the same transformer passes alone, tools/floor.py).
It writes --out_json and prints a markdown table. It is tools/bench.py's --gpu_check (bench parses the flags and
calls run; this module imports no bench, so the import graph stays one-way):

  bash tools/gpu_check.sh                                           # the checks, into results/gpu_check.json
  python -m tools.bench --gpu_check --device cuda --config sd35m   # the same, by hand
"""
import json
import os
import sys
import time

import torch

from opd_loss import flow_opd_loss
from tools import bench_kit, memory_plan

# the runs: (name, bench variant, its extra flags); each runs in a fresh process
GPU_RUNS = [("ours", "ours", ["--gradient_checkpointing", "true"]),
            ("ours_no_checkpointing", "ours", ["--gradient_checkpointing", "false"]),
            ("released", "released", ["--gradient_checkpointing", "true"]),
            ("ours_compiled", "ours_compiled", ["--gradient_checkpointing", "true"])]
# the plan's rows a bench run holds (random prompt embeddings: no text encoders, no VAE, decode returns latents)
PREDICTED_ROWS = ("transformer (student backbone)", "reference transformers", "reference LoRAs", "student LoRA",
                  "student gradients", "AdamW state", "trajectories")


def core_check(cfg, compile_fn=torch.compile):
    """flow_opd_loss eager vs compile_fn(flow_opd_loss) on SD3.5-M latent shapes (micro-batch 2, 16 x 64 x 64),
    velocities in bf16 as autocast leaves them; the means are fp32 in both (sde_step casts), so they agree to
    float rounding. Returns each one's timing and values (bench_kit.time_core) and their relative differences."""
    shape = (2, 16, bench_kit.SD35M_LATENT, bench_kit.SD35M_LATENT)
    out = {name: bench_kit.time_core(core, shape, cfg, torch.bfloat16)
           for name, core in [("eager", flow_opd_loss), ("compiled", compile_fn(flow_opd_loss))]}
    e, c = out["eager"], out["compiled"]
    out["rel_diff"] = {k: abs(c[k] - e[k]) / max(abs(e[k]), 1e-30) for k in ("loss", "kl", "grad")}
    return out


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


def run(cfg, args, argv, runner=bench_kit.spawn):
    """The checks (module docstring) for bench's parsed command line argv (cfg, args: tools.bench.parse);
    `runner(variant, argv)` runs one bench variant (default: a fresh process). Returns the results, also written
    to --out_json."""
    cuda = cfg.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run it on "
                         "a machine with an NVIDIA GPU and a CUDA build of torch, or pass --device cpu to try "
                         "the check's code on a small config")
    t0 = time.time()
    res = dict(device=bench_kit.machine(cfg.device), torch=torch.__version__, config=args.config,
               micro_batch=cfg.micro_batch, prompts=cfg.opd_prompts, train_timesteps=cfg.train_timesteps, runs={},
               core=core_check(cfg, torch.compile if cuda else (lambda f: f)))
    res["core"]["compiled_is"] = "torch.compile" if cuda else "eager (no compile off CUDA: a dry run)"
    print(f"[gpu_check] flow_opd_loss eager vs compiled: {res['core']['rel_diff']}", file=sys.stderr)
    C = memory_plan.components(memory_plan.SD35M, pixels=8 * bench_kit.SD35M_LATENT,
                               t5_tokens=cfg.max_sequence_length, others=False)
    base = strip_flags([a for a in argv if a != "--gpu_check"], ("--out_json", "--gradient_checkpointing"))
    for name, variant, extra in GPU_RUNS:
        r = runner(variant, base + ["--iters", "1"] + extra)
        gc = extra[-1] == "true"
        col = 3 if variant == "released" else 2   # memory_plan.rows: (name, detail, ours, released, phase)
        predicted = sum(row[col] for row in memory_plan.rows(C, cfg.micro_batch, cfg.opd_prompts)
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


def format_gpu_check(res):
    c = res["core"]
    out = [f"## GPU check ({res['device']}, torch {res['torch']}, {res['config']}, micro-batch {res['micro_batch']}, "
           f"{res['prompts']} samples, {res['train_timesteps']} trained timesteps)", "",
           f"flow_opd_loss, bf16 velocities: eager {c['eager']['ms']:.2f} ms, torch.compile {c['compiled']['ms']:.2f} "
           f"ms per forward + backward (first compiled call {c['compiled']['first_call_s']:.1f} s); relative "
           f"differences " + ", ".join(f"{k} {v:.1e}" for k, v in c["rel_diff"].items()), "",
           "| run | s / iteration | x floor | warm-up (s) | peak allocated (MiB) | plan's prediction (MiB) | "
           "weights (MiB) |", "|---|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        if "error" in r:
            out.append(f"| {name} | **{r['error']}** | | | | {r['predicted_mib']:.0f} | |")
            continue
        out.append(f"| {name} | {r['median_s']:.2f} | {r['x_floor']:.2f} | {r['warmup_s']:.1f} | {r['peak_mib']:.0f} "
                   f"| {r['predicted_mib']:.0f} | {r['weights_mib']:.0f} |")
    return "\n".join(out) + "\n"
