"""
Evaluation: fixed-seed ODE samples on each task's test prompts, scored by the four rewards
(Flow-OPD §4-5: 40 Euler steps, CFG 4.5 for evaluation; 10 SDE steps only for training).

Metrics: geneval (GenEval-like partial score on composition prompts, plus strict accuracy), ocr (on text
prompts), pickscore (0-1, on scene prompts), deqa (raw 1-5, on every test prompt), and the paper's
avg = (geneval + ocr + deqa/5 + pickscore)/4 (the paper divides raw PickScore by 26; ours is on 0-1 already).

Determinism: prompt i of a split always gets the initial noise drawn from seed + i, whatever the batching,
so two models are compared on the same noise.

Tables: `python eval.py --adapter ROW=PATH ... --seeds 0 1 2 --out results/NAME.json` writes
{"rows": {ROW: {METRIC: {"mean", "std", "n"}}}, "meta"}; `--prompts FILE` evaluates any prompt file
(prompts.py formats), `--ood` the out-of-domain composition set (compbench.py, scored per category).
`python train.py --stage all` builds the paper's tables with these functions (results/main.json, ood.json).

Reward calibration: `python eval.py --calibrate N` scores N images per GenEval sub-task and OCR, ground truth
passed through the model's autoencoder and the model's own samples, and how many of those rewards change
under +-2/255 uniform pixel noise (reward_calibration, noise_flips; the numbers are in rewards.py).

Self-check: python eval.py --model checkpoints/base --limit 8
"""
import argparse
import json
import os

import numpy as np
import torch

from world import toy_world
from flow_matching import euler_sample
from rewards import REWARDS, geneval_details


def initial_noise(n, shape, seed):
    """(n, *shape) standard normal; sample i depends only on seed + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@torch.no_grad()
def sample_images(model, prompts, steps=40, cfg_scale=4.5, seed=0, batch_size=64, shift=None):
    """ODE samples (B, 3, H, W) in [0, 1] for a list of prompts with the currently active adapter, on the
    model's time grid (models.T2IModel.time_grid; shift: model.shift unless given; the world 1, SD3.5 3)."""
    dev = model.transformer.device
    x1 = initial_noise(len(prompts), model.latent_shape, seed)
    sigmas = model.time_grid(steps, shift).to(dev)
    images = []
    for i in range(0, len(prompts), batch_size):
        v_fn = model.velocity_fn(prompts[i:i + batch_size], cfg_scale)
        images.append(model.decode(euler_sample(v_fn, x1[i:i + batch_size].to(dev), sigmas)).cpu())
    return torch.cat(images)


def score_task(task, images, records, rewards=REWARDS):
    """Mean reward of images made for one task's records; deqa is reported on the raw 1-5 scale."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    out = {"deqa": rewards["deqa"](images, prompts, meta)}
    out[task] = rewards[task](images, prompts, meta)
    if task == "geneval" and rewards["geneval"] is REWARDS["geneval"]:  # per-tag strict accuracy: world scorer
        _, strict = geneval_details(images, meta)
        out["geneval_strict"] = strict.float()
        for tag in toy_world.GENEVAL_TAGS:
            mask = torch.tensor([m["tag"] == tag for m in meta])
            if mask.any():
                out[f"geneval_strict/{tag}"] = strict.float()[mask]
    return out


def world_records(split="test", limit=None):
    """{task: records}: the miniature world's prompts of one split, the first `limit` of each task."""
    return {task: toy_world.prompts(task, split)[:limit] for task in toy_world.TASKS}


def evaluate(model, adapter=None, split="test", limit=None, steps=40, cfg_scale=4.5, seed=0, records=None,
             rewards=REWARDS):
    """{metric: mean} for one adapter (None = base) over `records` ({task: records}; default: the world's
    `split` prompts, `limit` per task), each task scored by its own reward and by deqa."""
    model.adapter(adapter)
    per_metric = {}
    for task, recs in (records or world_records(split, limit)).items():
        images = sample_images(model, [r["prompt"] for r in recs], steps, cfg_scale, seed)
        for k, v in score_task(task, images, recs, rewards).items():
            per_metric.setdefault(k, []).append(v)
    metrics = {k: torch.cat(v).mean().item() for k, v in per_metric.items()}
    if all(k in metrics for k in ("geneval", "ocr", "pickscore", "deqa")):
        metrics["avg"] = (metrics["geneval"] + metrics["ocr"] + metrics["deqa"] / 5 + metrics["pickscore"]) / 4
    return metrics


@torch.no_grad()
def evaluate_ood(model, adapter=None, steps=40, cfg_scale=4.5, seed=0):
    """Out-of-domain composition (compbench.py): the geneval score and strict accuracy per category."""
    from world import compbench
    model.adapter(adapter)
    recs = compbench.records()
    images = sample_images(model, [r["prompt"] for r in recs], steps, cfg_scale, seed)
    return {k: v.float().mean().item() for k, v in compbench.score(images, recs).items()}


def evaluate_cached(model, adapter, folder, fn=evaluate, **kw):
    """fn(model, adapter, **kw) (evaluate or evaluate_ood), remembered in folder/eval.json per function and
    setting. An adapter folder is replaced whole when it is retrained (save_adapter writes a new folder and
    renames it), so a cached score never outlives its weights; sampling is seeded, so a cached score equals
    a fresh one. Custom `records` or `rewards` are not cached."""
    if "records" in kw or "rewards" in kw:
        return fn(model, adapter, **kw)
    # evaluate's keys are its bare settings (the committed caches use them); other functions are named
    key = json.dumps(kw, sort_keys=True) if fn is evaluate else json.dumps({fn.__name__: kw}, sort_keys=True)
    path = os.path.join(folder, "eval.json")
    cache = json.load(open(path)) if os.path.isfile(path) else {}
    if key not in cache:
        cache[key] = fn(model, adapter, **kw)
        write_json(path, cache)
    return cache[key]


def write_json(path, obj):
    """Write, then rename: a crash leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------------------
# Reward calibration: does a reward give ground truth full marks, and is it stable to invisible noise?

def calibration_records(per_stratum, seed=0):
    """{stratum: records}: `per_stratum` records drawn with replacement from every GenEval sub-task (train and
    test prompts) and from the OCR test prompts (toy_world.stratum names the strata)."""
    rng = np.random.default_rng(seed)
    pools = {}
    for r in toy_world.prompts("geneval", "train") + toy_world.prompts("geneval", "test") + toy_world.prompts("ocr", "test"):
        pools.setdefault(toy_world.stratum(r), []).append(r)
    return {s: [pool[i] for i in rng.integers(len(pool), size=per_stratum)] for s, pool in pools.items()}


def noise_flips(reward, images, records, amplitude=2 / 255, draws=3, seed=0):
    """(rewards (B,), flip share (B,)): how often reward(images) changes when uniform noise in
    [-amplitude, amplitude] is added to the pixels (clamped to [0, 1]), averaged over `draws` noise draws."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    gen = torch.Generator().manual_seed(seed)
    clean = reward(images, prompts, meta)
    flips = [reward((images + (torch.rand(images.shape, generator=gen) * 2 - 1) * amplitude).clamp(0, 1),
                    prompts, meta) != clean for _ in range(draws)]
    return clean, torch.stack(flips).float().mean(0)


@torch.no_grad()
def reward_calibration(model, per_stratum=100, seed=0, samples=False, steps=40, cfg_scale=4.5):
    """{stratum: {"reward": mean, "flip": share}} of each GenEval sub-task's and OCR's reward on ground truth
    rendered by toy_world and passed through the model's autoencoder (what a perfect generator could
    draw), or with samples=True on the model's own ODE samples of the same prompts."""
    rng, out = np.random.default_rng(seed), {}
    for stratum, recs in calibration_records(per_stratum, seed).items():
        if samples:
            images = sample_images(model, [r["prompt"] for r in recs], steps, cfg_scale, seed)
        else:
            truth = toy_world.to_tensor([toy_world.render(r, rng) for r in recs])
            images = model.decode(model.encode_images(truth))
        clean, flips = noise_flips(REWARDS[recs[0]["task"]], images, recs, seed=seed)
        out[stratum] = {"reward": clean.mean().item(), "flip": flips.mean().item()}
    return out


# ----------------------------------------------------------------------------------------------------------
# Tables over seeds: {"rows": {ROW: {METRIC: {"mean": m, "std": s, "n": seeds}}}, "meta": {...}}

def summarise(per_seed):
    """{row: [metrics of seed 0, seed 1, ...]} -> {row: {metric: {mean, std, n}}} (std: sample std, 0 if n = 1)."""
    rows = {}
    for row, runs in per_seed.items():
        rows[row] = {}
        for k in runs[0]:
            x = torch.tensor([r[k] for r in runs if k in r], dtype=torch.float64)
            rows[row][k] = {"mean": x.mean().item(), "std": x.std().item() if len(x) > 1 else 0.0, "n": len(x)}
    return rows


def write_table(path, per_seed, meta):
    """Write {"rows": summarise(per_seed), "meta": meta} to path (atomically) and return it."""
    table = {"rows": summarise(per_seed), "meta": meta}
    write_json(path, table)
    return table


def table_markdown(table, metrics=("geneval", "ocr", "pickscore", "deqa", "avg")):
    """A markdown table of mean ± std (the rows and metrics of a written table)."""
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row, m in table["rows"].items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" if k in m else "" for k in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_metrics(name, m):
    return (f"{name:<22} geneval {m['geneval']:.3f}  ocr {m['ocr']:.3f}  pickscore {m['pickscore']:.3f}  "
            f"deqa {m['deqa']:.2f}  avg {m['avg']:.3f}")


def records_by_task(path):
    """{task: records} of a prompt file (prompts.read_prompts: our jsonl, GenEval metadata jsonl, or txt)."""
    import prompts as prompt_files
    out = {}
    for r in prompt_files.read_prompts(path):
        out.setdefault(r["task"], []).append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Evaluate the base and adapters; optionally write a table over seeds.")
    ap.add_argument("--model", default="checkpoints/base", help="world model folder")
    ap.add_argument("--adapter", action="append", default=[], metavar="ROW=PATH",
                    help="a PEFT adapter folder to evaluate as row ROW (repeatable); the base is always row 'base'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="initial-noise seeds; the table has mean ± std")
    ap.add_argument("--limit", type=int, default=None, help="prompts per task (default: all test prompts)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--cfg_scale", type=float, default=4.5)
    ap.add_argument("--prompts", default=None, help="evaluate a prompt file instead of the world's test split")
    ap.add_argument("--ood", action="store_true", help="the out-of-domain composition set (compbench.py)")
    ap.add_argument("--calibrate", type=int, default=None, metavar="N",
                    help="reward calibration instead: N images per GenEval sub-task and OCR, ground truth through "
                         "the autoencoder and the model's samples, reward and share flipped by +-2/255 noise")
    ap.add_argument("--out", default=None, help="write results/NAME.json: {rows: {ROW: {METRIC: {mean, std, n}}}}")
    args = ap.parse_args(argv)
    import models
    model = models.load_world_model(args.model)
    if args.calibrate:
        truth, drawn = (reward_calibration(model, args.calibrate, args.seeds[0], samples, args.steps, args.cfg_scale)
                        for samples in (False, True))
        print("| stratum | ground truth through the AE | flipped by ±2/255 | model samples | flipped by ±2/255 |")
        print("|---|---|---|---|---|")
        for s in truth:
            print(f"| {s} | {truth[s]['reward']:.3f} | {truth[s]['flip']:.1%} | {drawn[s]['reward']:.3f} | "
                  f"{drawn[s]['flip']:.1%} |")
        return
    rows = {"base": None}
    for spec in args.adapter:
        row, sep, path = spec.partition("=")
        if not sep or not os.path.isdir(path):
            raise SystemExit(f"--adapter expects ROW=PATH with PATH an adapter folder, got {spec!r}")
        model.load_adapter(path, row)
        rows[row] = row
    records = records_by_task(args.prompts) if args.prompts else None
    per_seed = {}
    for row, adapter in rows.items():
        for seed in args.seeds:
            kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=seed)
            m = (evaluate_ood(model, adapter, **kw) if args.ood
                 else evaluate(model, adapter, limit=args.limit, records=records, **kw))
            per_seed.setdefault(row, []).append(m)
            print(f"{row:<24} seed {seed}  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if "/" not in k))
    if args.out:
        write_table(args.out, per_seed, {"model": args.model, "seeds": args.seeds, "steps": args.steps,
                                         "cfg_scale": args.cfg_scale, "limit": args.limit,
                                         "prompts": args.prompts or ("compbench" if args.ood else "world test")})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
