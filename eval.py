"""
Evaluation: fixed-noise ODE samples on each task's test prompts, scored by the four rewards
(Flow-OPD §4-5: 40 Euler steps, CFG 4.5 for evaluation; 10 SDE steps only for training), with GenEval's
protocol of several images per prompt and a standard error for every score.

Prompts. Every test prompt of a task, or a subset stratified by sub-task (`stratified_subset`: equal numbers
per metadata["tag"], the six GenEval tags for geneval; one stratum where there is no tag), chosen with a fixed
seed (SUBSET_SEED), so every model and every noise seed is scored on the same prompts. Never "the first N":
a prompt file lists its tags in blocks. The same rule applies to --eval_prompts files.
Noise. Image j of prompt i (i = the prompt's index in its task's full list) starts from noise seeded by
(seed, i, j) only (`noise_seed`), whatever the subset, batching or order, so two models are paired on the
same noise, and the images of one prompt differ.
Metrics.
  geneval        the partial score (reward-server's `score`, the training reward) on composition prompts
  geneval_acc    the paper's GenEval number: GenEval accuracy per tag (`geneval_acc/<tag>`), then their mean
                 over the tags present. The world's accuracy is its strict correctness (rewards.geneval_details);
                 a reward-server backend gives GenEval's own `correct` (reward_backends, only_strict=False).
  ocr, pickscore the task's reward on its prompts (pickscore on 0-1)
  deqa           raw 1-5, on every test prompt (pooled over the tasks)
  avg            (geneval + ocr + deqa/5 + pickscore)/4 (the paper divides raw PickScore by 26; ours is 0-1)
  web/<task>, blurred   the world only: shares of samples in the task's web style and blurred (world/styles.py)
Standard errors (`se/<metric>`), clustered by prompt: the images of one prompt share it, so they are not
independent draws; each prompt's images are averaged first, and a mean over n prompts has
se = std(per-prompt means)/sqrt(n). A score made of several independent groups of prompts (geneval_acc: the
tags; deqa and avg: the tasks) is sum_g w_g * mean_g with se = sqrt(sum_g w_g^2 se_g^2) (`combine`). These
are sampling errors over prompts and noise for one trained model, not over training seeds.
Paired differences (`paired_difference`): model A minus model B on the same prompts and noise, the same
statistics applied to the per-prompt differences; much tighter than two separate se's when the models are
correlated (`python eval.py --lora ROW=PATH --paired`).
Sizes. prompts_per_task (0 = all), images_per_prompt, batch_size (images per sampling call) and the model's
decode_batch (VAE micro-batch, support/models.T2IModel.decode) bound memory on every path; images are kept as uint8 on
the host and turned into floats per chunk of SCORE_CHUNK for the rewards.

Tables: `python eval.py --lora ROW=PATH ... --seeds 0 1 2 --out results/NAME.json` writes
{"rows": {ROW: {METRIC: {"mean", "std", "n"}}}, "meta"}; `--eval_prompts TASK=FILE` evaluates prompt files
(support/prompts.py formats), `--ood` the out-of-domain composition set (world/compbench.py, per category).
Any model train.py loads (`--model`: a world folder, an SD3 pipeline folder or hub id), with the real-image
rewards of the `--*_reward` flags; every flag but this file's own is train.py's (`python eval.py --help`).
--lora (alias --adapter) takes a PEFT folder, a diffusers LoRA or a hub id. An SD3 model has no world styles
(web/<task>, blurred are not scored) and no OOD set (--ood is refused with what to pass instead).
`python -m tools.paper_tables` builds the paper's tables with these functions (results/main.json, ood.json).

Self-check: python eval.py --model checkpoints/base --eval_prompts_per_task 12 --eval_images_per_prompt 2
"""
import dataclasses
import json
import os
import time

import numpy as np
import torch

from rewards import REWARDS, REWARDS_VERSION, geneval_details
from support.config import parse_args
from support.metrics import (format_metrics, format_paired, paired_difference, scalars, summarise, summarise_prompts,
                             write_json)
from support.provenance import weights_sha256
from support.resolve import (eval_settings, load_lora, load_model, named_paths, ood_settings, prompt_pool,
                             reward_registry)
from support.rollouts import sample_uint8, to_float
from world import compbench, styles, toy_world

SUBSET_SEED = 0     # the stratified subset is part of the protocol: fixed, whatever the noise seed
SCORE_CHUNK = 64    # images turned into floats and scored at a time (the reward servers' batch)
CACHE_EXCLUDE = ("batch_size",)  # settings that do not change the scores stay out of eval.json keys


# ------------------------------------------------------------------------------------------ prompts
def stratified_subset(records, n, seed=SUBSET_SEED):
    """Sorted indices of at most n records, equal numbers per stratum (metadata["tag"]; records without a tag
    form one stratum), each stratum's picks drawn by `seed`. A stratum with fewer records than the others'
    share gives all it has (the world's geneval test set has 3 single_object prompts), so the counts are q or
    less per stratum, q the largest that fits n. n <= 0 or n >= len(records): every record.
    n < number of strata: one record from each of n strata drawn by `seed`."""
    if n <= 0 or n >= len(records):
        return list(range(len(records)))
    strata = {}
    for i, r in enumerate(records):   # strata in order of first appearance: deterministic for a given file
        strata.setdefault((r.get("metadata") or {}).get("tag"), []).append(i)
    rng = np.random.default_rng(seed)
    members = [[group[j] for j in rng.permutation(len(group))] for group in strata.values()]
    if n < len(members):
        return sorted(members[k][0] for k in rng.permutation(len(members))[:n])
    q = 1
    while q < max(map(len, members)) and sum(min(len(m), q + 1) for m in members) <= n:
        q += 1
    return sorted(i for m in members for i in m[:q])


# ------------------------------------------------------------------------------------------- scoring
def geneval_score_and_accuracy(fn, images, prompts, meta):
    """(partial score, GenEval accuracy or None), each (B,): the world's detector gives strict correctness; a
    backend with score_and_accuracy (reward_backends.GenEvalServerReward) gives GenEval's `correct`."""
    if fn is REWARDS["geneval"]:
        score, strict = geneval_details(images, meta)
        return score, strict.float()
    if hasattr(fn, "score_and_accuracy"):
        return fn.score_and_accuracy(images, prompts, meta)
    return fn(images, prompts, meta), None


def in_world(model):
    """Whether `model` is the miniature world's, whose style shares and OOD set apply: an SD3 pipeline carries
    its scheduler (models.load_sd3), the world model none."""
    return getattr(model, "scheduler", None) is None


def score_task(task, images, records, rewards=REWARDS, world=True):
    """{metric: (B,) per image} for uint8 images made for one task's records: the task's reward, deqa (raw
    1-5), for geneval the accuracy (`geneval_acc`) and, for a world model (`world`) on the world's prompts and
    rewards, the style shares (`web`, `blurred`); scored SCORE_CHUNK images at a time."""
    out = {}
    for i in range(0, len(records), SCORE_CHUNK):
        x, recs = to_float(images[i:i + SCORE_CHUNK]), records[i:i + SCORE_CHUNK]
        prompts, meta = [r["prompt"] for r in recs], [r["metadata"] for r in recs]
        part = {"deqa": rewards["deqa"](x, prompts, meta)}
        if task == "geneval":
            part["geneval"], acc = geneval_score_and_accuracy(rewards["geneval"], x, prompts, meta)
            if acc is not None:
                part["geneval_acc"] = acc
        else:
            part[task] = rewards[task](x, prompts, meta)
        if world and rewards is REWARDS and task in toy_world.TASKS:   # the world's styles (world/styles.py)
            part["web"], part["blurred"] = styles.web_style(task, x, recs), styles.blurred(x)
        for k, v in part.items():
            out.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(model, adapter=None, prompts_per_task=0, images_per_prompt=1, steps=40, guidance_scale=4.5, seed=0,
             batch_size=16, records=None, rewards=REWARDS, split="test"):
    """{metric: mean, "se/<metric>": se, "per_prompt": ..., "settings": ...} for one adapter (None = the base)
    over `records` ({task: records}; default: the world's `split` prompts): per task a stratified subset of
    prompts_per_task prompts (0 = all), images_per_prompt images each, scored by the task's reward and deqa.
    "per_prompt" holds each prompt's index, tag and per-prompt means, for paired_difference."""
    model.adapter(adapter)
    per_prompt = {}
    for task, recs in (records or {t: toy_world.prompts(t, split) for t in toy_world.TASKS}).items():
        index = stratified_subset(recs, prompts_per_task)
        chosen = [recs[i] for i in index for _ in range(images_per_prompt)]
        ids = [(i, j) for i in index for j in range(images_per_prompt)]
        images = sample_uint8(model, [r["prompt"] for r in chosen], ids, steps, guidance_scale, seed, batch_size)
        scores = score_task(task, images, chosen, rewards, in_world(model))
        per_prompt[task] = {"index": index, "tag": [(recs[i].get("metadata") or {}).get("tag") for i in index],
                            **{k: v.reshape(len(index), images_per_prompt).double().nanmean(1).tolist()
                               for k, v in scores.items()}}
    return {**summarise_prompts(per_prompt), "per_prompt": per_prompt,
            "settings": dict(prompts_per_task=prompts_per_task, images_per_prompt=images_per_prompt, steps=steps,
                             guidance_scale=guidance_scale, seed=seed)}


@torch.no_grad()
def evaluate_ood(model, adapter=None, prompts_per_task=0, steps=40, guidance_scale=4.5, seed=0, batch_size=16):
    """Out-of-domain composition (world/compbench.py, a T2I-CompBench stand-in): {category: GenEval partial
    score, category + "/strict": strict accuracy}, on a subset stratified by category (prompts_per_task as
    for evaluate, at least one per category; 0 = all 96), one image per prompt."""
    model.adapter(adapter)
    recs = compbench.records()
    n = prompts_per_task and max(prompts_per_task, len(compbench.CATEGORIES))  # every category scored
    recs = [recs[i] for i in stratified_subset(recs, n)]
    images = to_float(sample_uint8(model, [r["prompt"] for r in recs], None, steps, guidance_scale, seed, batch_size))
    return {k: v.float().mean().item() for k, v in ood_scores(images, recs).items()}


def ood_scores(images, records):
    """{category: (N_cat,) GenEval partial score, category + "/strict": (N_cat,) strict accuracy 0/1} for
    images (B, 3, H, W) in [0, 1] made for `records` (compbench records, any subset and order)."""
    meta = [r["metadata"] for r in records]
    unknown = {m.get("tag") for m in meta} - set(compbench.CATEGORIES)
    if unknown:
        raise ValueError(f"records with tags {sorted(map(str, unknown))} are not compbench records "
                         f"{compbench.CATEGORIES}")
    result, out = geneval_details(images, meta), {}
    for cat in compbench.CATEGORIES:
        idx = torch.tensor([i for i, m in enumerate(meta) if m["tag"] == cat], dtype=torch.long)
        if len(idx):
            out[cat], out[cat + "/strict"] = result.score[idx], result.strict[idx].float()
    return out


def log_probe(model, adapter, probe, log, **fields):
    """--eval_every during training: evaluate(model, adapter, **probe) and log its scalars as eval/<metric>
    beside `fields` (stage, iter, images sampled so far); the adapter stays the active one."""
    scores = evaluate(model, adapter, **probe)
    log(**fields, **{f"eval/{k}": v for k, v in scalars(scores).items()})
    model.adapter(adapter)  # evaluate ran it without gradients; training goes on with them


def evaluate_cached(model, adapter, folder, fn=evaluate, **kw):
    """fn(model, adapter, **kw) (evaluate or evaluate_ood), remembered in folder/eval.json per function and
    setting. The key: the settings that change scores (batch sizes left out), the rewards' version and the
    sha256 of the weights evaluated (the adapter's and the base's, support/provenance.py), as sorted JSON;
    entries of other weights are dropped when the file is written, so a cached score never outlives its
    weights. Sampling is seeded, so a cached score equals a fresh one up to float summation order. Custom
    `records` or `rewards` are not cached. Says what it evaluates, and for how long, whenever it samples."""
    custom = "records" in kw or "rewards" in kw
    weights = model_weights(model, adapter and folder)
    settings = {**{k: v for k, v in kw.items() if k not in CACHE_EXCLUDE + ("records",)}, "rewards": REWARDS_VERSION,
                "weights": weights}
    key = json.dumps(settings if fn is evaluate else {fn.__name__: settings}, sort_keys=True)  # other fns named
    path = os.path.join(folder, "eval.json")
    cache = json.load(open(path)) if os.path.isfile(path) and not custom else {}
    if key not in cache:
        t0 = time.time()
        where = "not cached: custom prompts or rewards" if custom else f"cached in {path}"
        print(f"evaluating {adapter or 'the base'} ({fn.__name__}, {settings}); {where}", flush=True)
        cache[key] = fn(model, adapter, **kw)
        if not custom:   # re-read: parallel runs (other seeds) on this folder may have added entries meanwhile
            now = json.load(open(path)) if os.path.isfile(path) else {}
            write_json(path, {**{k: v for k, v in now.items() if _cached_weights(k) == weights}, key: cache[key]})
        print(f"evaluated {adapter or 'the base'} in {(time.time() - t0) / 60:.1f} min", flush=True)
    return cache[key]


def model_weights(model, adapter_folder=None):
    """{"base": sha256, "adapter": sha256 or None} of what an evaluation runs: the model's own weights (the
    folder it was loaded from, models.load_model) and the adapter folder's, if any."""
    if not hasattr(model, "_source_sha256"):   # hashed once per loaded model
        model._source_sha256 = weights_sha256(model.source) if os.path.isdir(getattr(model, "source", "")) else None
    return {"base": model._source_sha256, "adapter": weights_sha256(adapter_folder) if adapter_folder else None}


def _cached_weights(key):
    """The "weights" of an eval.json key (None for keys written before weights were part of them)."""
    d = json.loads(key)
    if "weights" not in d and len(d) == 1:   # {function name: settings}
        d = next(iter(d.values()))
    return d.get("weights") if isinstance(d, dict) else None


def eval_flags(group):
    """eval.py's own flags; the model, sizes, steps and guidance are Config's (support/config.py)."""
    group.add_argument("--lora", "--adapter", dest="lora", action="append", default=[], metavar="ROW=PATH_OR_ID",
                       help="a LoRA to evaluate as row ROW (repeatable): a PEFT folder, a diffusers LoRA or a hub id "
                            "(ID@REVISION pins one; resolve.load_lora); the base is always row 'base'")
    group.add_argument("--other_model", action="append", default=[], metavar="ROW=PATH",
                       help="another full world model to evaluate as row ROW, paired with --model like an adapter")
    group.add_argument("--seeds", type=int, nargs="+", default=None, help="noise seeds (default: --seed)")
    group.add_argument("--tasks", nargs="+", default=None, help="only these tasks' prompts (default: all)")
    group.add_argument("--ood", action="store_true", help="the out-of-domain composition set (world/compbench.py)")
    group.add_argument("--paired", action="store_true", help="also each row minus the base, paired on prompts and "
                       "noise (mean ± se), written under 'paired' in --out")
    group.add_argument("--out", default=None, help="write a table {rows: {ROW: {METRIC: {mean, std, n}}}} here")


def main(argv=None):
    cfg, args = parse_args(argv, __doc__.split("\n\n")[0], eval_flags)
    if args.paired and args.ood:
        raise SystemExit("--paired compares per-prompt scores of evaluate(); --ood has none: drop one of them")
    model = load_model(cfg)
    if args.ood and not in_world(model):
        raise SystemExit("--ood is the miniature world's out-of-domain set (world/compbench.py, scored by its shape "
                         "detector); an SD3 model has none: drop --ood and pass --eval_prompts TASK=FILE")
    rows = {"base": (model, None)}   # row -> (model, adapter)
    for row, path in named_paths(args.lora).items():
        load_lora(model, path, row)
        rows[row] = (model, row)
    for row, path in named_paths(args.other_model).items():
        rows[row] = (load_model(dataclasses.replace(cfg, base=path)), None)
    records = prompt_pool(cfg.eval_prompts, "test")
    if args.tasks:
        if set(args.tasks) - set(records):
            raise SystemExit(f"--tasks {' '.join(args.tasks)}: the prompts have tasks {', '.join(records)}")
        records = {t: records[t] for t in args.tasks}
    per_seed, paired, rewards, seeds = {}, {}, reward_registry(cfg), args.seeds or [cfg.seed]
    for row, (model, adapter) in rows.items():
        for seed in seeds:
            if args.ood:
                m = evaluate_ood(model, adapter, **{**ood_settings(cfg), "seed": seed})
            else:
                m = evaluate(model, adapter, **{**eval_settings(cfg), "seed": seed}, records=records, rewards=rewards)
            per_seed.setdefault(row, []).append(m)
            print(f"seed {seed}  " + (format_metrics(row, m) if not args.ood else
                                      f"{row:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items())))
            if args.paired and row != "base":
                paired.setdefault(row, []).append(paired_difference(m, per_seed["base"][len(per_seed[row]) - 1]))
                print(f"seed {seed}  " + format_paired(f"{row} - base", paired[row][-1]))
    if args.out:
        meta = {"model": cfg.base, "seeds": seeds, **{k: v for k, v in eval_settings(cfg).items() if k != "seed"},
                "tasks": list(records), "prompts": cfg.eval_prompts or ("compbench" if args.ood else "world test")}
        write_json(args.out, {"rows": summarise(per_seed), "meta": meta, **({"paired": paired} if paired else {})})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
