"""
Why does one OPD estimator lower the KL to the teachers and another not? A measurement, not a training run:
from the committed merged cold start, the three estimators of opd_loss.py each take K AdamW steps on the
same prompts and noise (train.opd_iteration, the main job's iteration), and before every step we record
the gradient's norm and its cosine with the pathwise gradient on the same batch, and the mean step KL of
that batch (the student's own rollouts, so KL after step k is measured at the states the student then
visits). AdamW divides each coordinate by its running scale, so a gradient that is the pathwise one times a
constant (the released estimator's |Δt|) takes the same steps; what changes the steps is direction and noise.

    python -m tools.estimator_step [--steps 5] [--opd_prompts 16]

Prints one line per estimator and step, and writes results/estimator_step.json.
"""
import dataclasses
import json
import os

import torch

import train
from opd_loss import flow_opd_loss
from router import DEFAULT_TASK_WEIGHTS, route
from support.config import parse_args
from support.metrics import write_json
from support.resolve import load_model, prompt_pool
from support.rollouts import draw_records, trainable
from support.teachers import load_teachers


def flat_grad(params):
    return torch.cat([p.grad.flatten() for p in params])


def run(cfg, estimator, steps):
    """The rows of one estimator: K AdamW steps from the merged cold start, measured before each."""
    cfg, prompts, seed = dataclasses.replace(cfg, estimator=estimator, compile=False), cfg.opd_prompts, cfg.seed
    model = load_model(cfg)
    teachers, anchor, _ = load_teachers(model, cfg)
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
        row = dict(estimator=estimator, step=k, kl=kl["all"], grad_norm=g.norm().item(),
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


def main(argv=None):
    def flags(group):
        group.add_argument("--steps", type=int, default=5, help="AdamW steps per estimator")
        group.add_argument("--out", default="results/estimator_step.json", help="the rows, as JSON")
    cfg, args = parse_args(argv, __doc__, flags)
    out = {est: run(cfg, est, args.steps) for est in ("pathwise", "released", "logratio")}
    write_json(args.out, {"rows": out, "settings": {"steps": args.steps, "prompts": cfg.opd_prompts}})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
