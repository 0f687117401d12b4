"""
The measured side of the memory plan: the activation formula of tools/memory_plan.py against what a real forward +
backward holds, so that the plan's SD3.5-Medium figures rest on a check rather than on the formula alone.

Two measurements of the student's forward + backward on a scaled-down SD3.5 (CHECK: 4 blocks of width 256, dual
attention in two, SD3.5-M's 512 px token counts, fp32, rank-32 LoRA):
  saved_bytes   the distinct storages autograd saves for backward (saved-tensor hooks), which equal the fp32
                formula exactly (tests/test_bench.py checks this on small SD3 configs);
  peak RSS      the process's peak resident memory above its RSS just before the forward, in a fresh process per
                case (with and without gradient checkpointing): a peak only means something for one run alone.
The fresh process is this module run as a command, its result one JSON line on stdout:

  python -m tools.memory_check --checkpointing false --text_tokens 333 --batch 4 --rank 32

activation_check() starts it with MALLOC_MMAP_THRESHOLD_=65536, so that glibc hands freed blocks back to the OS and
RSS follows the live tensors. `python -m tools.bench --config sd35m --memory_plan --activation_check` prints the
comparison (format_check) below the plan.
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from support import models
from tools.memory_plan import CLIP_TOKENS, MiB, backward_working_bytes, model_saved_bytes, module_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A scaled-down SD3.5 (4 blocks of width 256, dual attention in two) at SD3.5-M's 512 px token counts (1024 image
# + 333 text), fp32: the CPU can run its forward + backward at micro-batch 2 in seconds.
CHECK = dict(sample_size=64, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
             num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256, pooled_projection_dim=64,
             pos_embed_max_size=32, qk_norm="rms_norm", dual_attention_layers=(0, 1))


def saved_bytes(fn, module):
    """Run fn() and return (its result, bytes of the distinct storages autograd saved for backward, other than
    `module`'s parameters and buffers): the measured counterpart of memory_plan.model_saved_bytes."""
    weights = {x.untyped_storage().data_ptr() for x in list(module.parameters()) + list(module.buffers())}
    seen = {}

    def pack(x):
        key = x.untyped_storage().data_ptr()
        if key not in weights:
            seen[key] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(seen.values())


def rss_bytes():
    """Resident set size now, from /proc/self/statm (pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # KiB on Linux


def check_worker(config, n_txt, batch, rank, checkpointing):
    """The student's forward + backward of a random fp32 SD3 with a rank-`rank` LoRA on random inputs (run in a
    fresh process: main); returns the measured peak RSS above the pre-forward RSS, the graph's saved bytes, and
    the plan's prediction of both."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    t = SD3Transformer2DModel(**config).requires_grad_(False)
    m = models.T2IModel(t, None, None)
    m.add_lora("student", rank, 2 * rank)
    for p in m.lora_parameters("student"):
        p.requires_grad_(True)
    if checkpointing:
        t.enable_gradient_checkpointing()
    side = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], side, side)
    ctx = torch.randn(batch, n_txt, config["joint_attention_dim"])
    pooled = torch.randn(batch, config["pooled_projection_dim"])
    forward = lambda: t(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled,
                        timestep=torch.full((batch,), 500.0), return_dict=False)[0]
    base_peak = peak_rss_bytes()
    before = rss_bytes()
    out, graph = saved_bytes(forward, t)
    out.float().square().mean().backward()
    peak = peak_rss_bytes()
    n_img = (side // config["patch_size"]) ** 2
    D = config["num_attention_heads"] * config["attention_head_dim"]
    saved, _ = model_saved_bytes(config, n_img, n_txt, rank, False, checkpointing)
    return dict(checkpointing=checkpointing, measured_peak=peak - before, pre_forward_peak_above=base_peak - before,
                graph_saved=graph, predicted_saved=batch * saved,
                predicted_backward=batch * backward_working_bytes(n_img, n_txt, D, False),
                weights=module_bytes(t), threads=torch.get_num_threads())


def activation_check(n_txt=CLIP_TOKENS + 256, micro_batch=2, rank=32):
    """Predicted vs measured activation memory of CHECK's forward + backward (batch 2 x micro_batch: CFG's two
    halves), without and with gradient checkpointing, each in a fresh `python -m tools.memory_check` process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    results = []
    for gc in (False, True):
        cmd = [sys.executable, "-m", "tools.memory_check", "--checkpointing", str(gc).lower(), "--text_tokens",
               str(n_txt), "--batch", str(2 * micro_batch), "--rank", str(rank)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if p.returncode or not p.stdout.strip():
            raise RuntimeError(f"activation check (checkpointing={gc}) failed: {p.stderr.strip()[-500:]}")
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
    return results


def format_check(results):
    m = lambda b: f"{b / MiB:.0f}"
    out = ["Activation formula vs a measured CPU peak (tools/memory_check.CHECK: 4 blocks of width 256, dual "
           "attention in 2, 1024 image + 333 text tokens, batch 4, fp32, LoRA r32):", "",
           "| gradient checkpointing | saved, formula (MiB) | saved, autograd graph (MiB) | formula + backward "
           "working set (MiB) | measured peak RSS above pre-forward (MiB) | predicted / measured |",
           "|---|---|---|---|---|---|"]
    for r in results:
        pred = r["predicted_saved"] + r["predicted_backward"]
        graph = "- (inside checkpoints)" if r["checkpointing"] else m(r["graph_saved"])
        out.append(f"| {'on' if r['checkpointing'] else 'off'} | {m(r['predicted_saved'])} | {graph} "
                   f"| {m(pred)} | {m(r['measured_peak'])} | {pred / r['measured_peak']:.2f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpointing", choices=("true", "false"), default="false",
                    help="gradient checkpointing on the transformer's blocks")
    ap.add_argument("--text_tokens", type=int, default=CLIP_TOKENS + 256, help="prompt tokens (77 CLIP + T5)")
    ap.add_argument("--batch", type=int, default=4, help="transformer batch (CFG: 2 x micro-batch)")
    ap.add_argument("--rank", type=int, default=32, help="the student LoRA's rank (alpha = 2 x rank)")
    args = ap.parse_args(argv)
    print(json.dumps(check_worker(CHECK, args.text_tokens, args.batch, args.rank, args.checkpointing == "true")))


if __name__ == "__main__":
    main()
