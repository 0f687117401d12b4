"""
Why does one OPD estimator lower the KL to the teachers and another not? A measurement, not a training run:
from the committed merged cold start, the three estimators of opd_loss.py each take K AdamW steps on the
same prompts and noise (train.opd_iteration, the main job's iteration), and before every step we record
the gradient's norm and its cosine with the pathwise gradient on the same batch, and the mean step KL of
that batch (the student's own rollouts, so KL after step k is measured at the states the student then
visits). AdamW divides each coordinate by its running scale, so a gradient that is the pathwise one times a
constant (the released estimator's |Δt|) takes the same steps; what changes the steps is direction and noise.

    python -m tools.estimator_step [--steps 5] [--prompts 16]

Prints one line per estimator and step, and writes results/estimator_step.json.
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from support.config import Config, load_model, prompt_pool  # noqa: E402
from support.metrics import write_json  # noqa: E402
from support.rollouts import draw_records, trainable  # noqa: E402
from router import DEFAULT_TASK_WEIGHTS, route  # noqa: E402
from opd_loss import flow_opd_loss  # noqa: E402
import train  # noqa: E402


def flat_grad(params):
    return torch.cat([p.grad.flatten() for p in params])


def run(estimator, steps, prompts, seed=0):
    cfg = dataclasses.replace(Config(), estimator=estimator, opd_prompts=prompts, compile=False)
    model = load_model(cfg)
    teachers, anchor, _ = train.load_teachers(model, cfg)
    model.load_adapter(os.path.join(cfg.cold_start_dir, "merge"), "student")
    params = trainable(model, "student")
    opt = torch.optim.AdamW(params, lr=cfg.opd_lr, weight_decay=1e-4)
    pool = prompt_pool([], "train")
    weights = {t: w for t, w in DEFAULT_TASK_WEIGHTS.items() if t in teachers}
    rows = []
    for k in range(steps + 1):
        gen = torch.Generator().manual_seed(seed + k)   # step k: the same prompts and noise for every estimator
        records = sorted(draw_records(pool, weights, prompts, gen, cfg.balance_tags), key=lambda r: r["task"])
        state = gen.get_state()
        grads = {}
        for est in dict.fromkeys(("pathwise", estimator)):   # the pathwise gradient on this batch too
            gen.set_state(state)
            for p in params:
                p.grad = None
            _, kl, _ = train.opd_iteration(model, records, route([r["task"] for r in records], teachers), anchor,
                                           dataclasses.replace(cfg, estimator=est), flow_opd_loss, gen,
                                           team=list(teachers.values()))
            grads[est] = flat_grad(params)
        g, p_ = grads[estimator], grads["pathwise"]
        row = dict(estimator=estimator, step=k, kl=kl, grad_norm=g.norm().item(),
                   cos_with_pathwise=torch.nn.functional.cosine_similarity(g, p_, dim=0).item(),
                   norm_ratio_to_pathwise=(g.norm() / p_.norm()).item())
        print(json.dumps(row), flush=True)
        rows.append(row)
        if k < steps:   # step with this estimator's gradient (the last loop's .grad is the pathwise one)
            for p, gp in zip(params, torch.split(g, [q.numel() for q in params])):
                p.grad = gp.view_as(p).clone()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--out", default="results/estimator_step.json")
    args = ap.parse_args()
    out = {est: run(est, args.steps, args.prompts) for est in ("pathwise", "released", "logratio")}
    write_json(args.out, {"rows": out, "settings": vars(args)})
    print("wrote", args.out)
