"""
How much of one GRPO gradient is signal (not a paper stage; grpo.gradient_signal): for each teacher,
--snr_batches independent GRPO gradients of a fresh LoRA from the same base, no optimizer step; prints the
signal share kappa, its standard error and the batches needed for one gradient with SNR 1. A cheap pilot
before a long teacher run: a reward whose kappa is near 0 will not train in the iterations we can afford.

    python -m tools.grpo_snr [--teachers geneval pickscore] [--snr_batches 32] [--results_dir DIR]

Rows go into <results_dir>/grpo_snr.json beside the rows of earlier runs (a row is replaced only by a new run
of the same teacher), with a bar chart <results_dir>/grpo_snr.png; `--teachers brightness` measures the
control reward. Every other flag is train.py's (python -m tools.grpo_snr --help).
"""
import json
import os
import time

import torch
from tqdm import tqdm

from grpo import gradient_signal
from support import figures
from support.config import parse_config
from support.metrics import write_json
from support.resolve import load_model, prompt_pool
from support.teachers import new_grpo_lora, rewards_for
from train import grpo_gradient


def signal_share(cfg, name, pool):
    """The grpo_snr.json row of teacher `name`: kappa, se, batches for SNR 1, and what was measured."""
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
    return dict(kappa=sig.kappa.item(), se=sig.se.item(), batches_for_snr1=sig.batches_for_snr1.item(),
                samples_per_batch=cfg.prompts_per_iter * cfg.group_size, batches=cfg.snr_batches,
                seconds_per_batch=(time.time() - t0) / cfg.snr_batches, seed=cfg.seed, base=cfg.base)


def main(argv=None):
    cfg = parse_config(argv, __doc__)
    pool, path = prompt_pool(cfg.prompts, "train"), os.path.join(cfg.results_dir, "grpo_snr.json")
    for name in cfg.teachers:
        row = signal_share(cfg, name, pool)
        print(f"[{name}] kappa = {row['kappa']:.4f} ± {row['se']:.4f}: {row['batches_for_snr1']:.0f} batches of "
              f"{row['samples_per_batch']} samples for one gradient with SNR 1 ({row['seconds_per_batch']:.1f} s "
              f"per batch)")
        table = json.load(open(path)) if os.path.isfile(path) else {}   # other keys (earlier worlds) are kept
        table.setdefault("rows", {})[name] = row  # written after every teacher: an interrupted run keeps it
        write_json(path, table)
    rows, png = json.load(open(path))["rows"], os.path.splitext(path)[0] + ".png"
    figures.bar_chart({n: (r["kappa"], r["se"]) for n, r in rows.items()},
                      "kappa: signal share of one GRPO gradient (mean ± se over batches)", png)
    print("wrote", png)


if __name__ == "__main__":
    main()
