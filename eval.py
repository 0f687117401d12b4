"""
Evaluation: fixed-seed ODE samples on each task's test prompts, scored by the four rewards
(Flow-OPD §4-5: 40 Euler steps, CFG 4.5 for evaluation; 10 SDE steps only for training).

Metrics: geneval (GenEval-like partial score on composition prompts, plus strict accuracy), ocr (on text
prompts), pickscore (0-1, on scene prompts), deqa (raw 1-5, on every test prompt), and the paper's
avg = (geneval + ocr + deqa/5 + pickscore)/4 (the paper divides raw PickScore by 26; ours is on 0-1 already).

Determinism: prompt i of a split always gets the initial noise drawn from seed + i, whatever the batching,
so two models are compared on the same noise.

Self-check: python eval.py --model checkpoints/base
"""
import argparse
import json
import os

import torch

import toy_world
from flow_matching import euler_sample, time_grid
from rewards import REWARDS, geneval_details


def initial_noise(n, shape, seed):
    """(n, *shape) standard normal; sample i depends only on seed + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])


@torch.no_grad()
def sample_images(model, prompts, steps=40, cfg_scale=4.5, seed=0, batch_size=64, shift=1.0):
    """ODE samples (B, 3, H, W) in [0, 1] for a list of prompts with the currently active adapter."""
    dev = model.transformer.device
    x1 = initial_noise(len(prompts), model.latent_shape, seed)
    sigmas = time_grid(steps, shift).to(dev)
    images = []
    for i in range(0, len(prompts), batch_size):
        v_fn = model.velocity_fn(prompts[i:i + batch_size], cfg_scale)
        images.append(model.decode(euler_sample(v_fn, x1[i:i + batch_size].to(dev), sigmas)).cpu())
    return torch.cat(images)


def score_task(task, images, records):
    """Mean reward of images made for one task's records; deqa is reported on the raw 1-5 scale."""
    prompts, meta = [r["prompt"] for r in records], [r["metadata"] for r in records]
    out = {"deqa": REWARDS["deqa"](images, prompts, meta)}
    out[task] = REWARDS[task](images, prompts, meta)
    if task == "geneval":
        _, strict = geneval_details(images, meta)
        out["geneval_strict"] = strict.float()
        for tag in toy_world.GENEVAL_TAGS:
            mask = torch.tensor([m["tag"] == tag for m in meta])
            if mask.any():
                out[f"geneval_strict/{tag}"] = strict.float()[mask]
    return out


def evaluate(model, adapter=None, split="test", limit=None, steps=40, cfg_scale=4.5, seed=0):
    """{metric: mean} for one adapter (None = base) over the tasks' prompts."""
    model.adapter(adapter)
    per_metric = {}
    for task in toy_world.TASKS:
        records = toy_world.prompts(task, split)[:limit]
        images = sample_images(model, [r["prompt"] for r in records], steps, cfg_scale, seed)
        for k, v in score_task(task, images, records).items():
            per_metric.setdefault(k, []).append(v)
    metrics = {k: torch.cat(v).mean().item() for k, v in per_metric.items()}
    metrics["avg"] = (metrics["geneval"] + metrics["ocr"] + metrics["deqa"] / 5 + metrics["pickscore"]) / 4
    return metrics


def evaluate_cached(model, adapter, folder, **kw):
    """evaluate(), remembered in folder/eval.json per setting. The adapter folder is replaced whole when
    it is retrained (save_adapter writes a new folder and renames it), so a cached score never outlives
    its weights; sampling is seeded, so a cached score equals a fresh one."""
    path, key = os.path.join(folder, "eval.json"), json.dumps(kw, sort_keys=True)
    cache = json.load(open(path)) if os.path.isfile(path) else {}
    if key not in cache:
        cache[key] = evaluate(model, adapter, **kw)
        with open(path + ".tmp", "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(path + ".tmp", path)
    return cache[key]


def format_metrics(name, m):
    return (f"{name:<22} geneval {m['geneval']:.3f}  ocr {m['ocr']:.3f}  pickscore {m['pickscore']:.3f}  "
            f"deqa {m['deqa']:.2f}  avg {m['avg']:.3f}")


if __name__ == "__main__":
    import models
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="checkpoints/base")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    m = models.load_world_model(args.model)
    print(format_metrics("base", evaluate(m, None, limit=args.limit, steps=args.steps)))
