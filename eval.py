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
Standard errors (`se/<metric>`), clustered by prompt: the images of one prompt share it, so they are not
independent draws; each prompt's images are averaged first, and a mean over n prompts has
se = std(per-prompt means)/sqrt(n). A score made of several independent groups of prompts (geneval_acc: the
tags; deqa and avg: the tasks) is sum_g w_g * mean_g with se = sqrt(sum_g w_g^2 se_g^2) (`combine`). These
are sampling errors over prompts and noise for one trained model, not over training seeds.
Paired differences (`paired_difference`): model A minus model B on the same prompts and noise, the same
statistics applied to the per-prompt differences; much tighter than two separate se's when the models are
correlated (`python eval.py --adapter ROW=PATH --paired`).
Sizes. prompts_per_task (0 = all), images_per_prompt, batch_size (images per sampling call) and the model's
decode_batch (VAE micro-batch, models.T2IModel.decode) bound memory on every path; images are kept as uint8 on
the host and turned into floats per chunk of SCORE_CHUNK for the rewards.

Tables: `python eval.py --adapter ROW=PATH ... --seeds 0 1 2 --out results/NAME.json` writes
{"rows": {ROW: {METRIC: {"mean", "std", "n"}}}, "meta"}; `--prompts FILE` evaluates any prompt file
(prompts.py formats), `--ood` the out-of-domain composition set (compbench.py, scored per category).
`python train.py --stage all` builds the paper's tables with these functions (results/main.json, ood.json).

Self-check: python eval.py --model checkpoints/base --prompts_per_task 12 --images_per_prompt 2
"""
import argparse
import json
import math
import os

import numpy as np
import torch

import toy_world
from flow_matching import euler_sample, time_grid
from rewards import REWARDS, geneval_details

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


def world_records(split="test"):
    """{task: records}: the miniature world's prompts of one split."""
    return {task: toy_world.prompts(task, split) for task in toy_world.TASKS}


# ------------------------------------------------------------------------------------- noise, images
def noise_seed(seed, prompt_index, image_index):
    """A 64-bit generator seed from (seed, prompt, image) alone. SeedSequence mixes the three, so nearby
    settings share no noise (seed + i would give seed 1's prompt 0 the noise of seed 0's prompt 1)."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1, np.uint64)[0])


def initial_noise(ids, shape, seed):
    """(len(ids), *shape) standard normal; row k depends only on (seed, *ids[k]), ids = [(prompt, image)]."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, p, j)))
                        for p, j in ids])


def to_uint8(images):
    """(B, 3, H, W) float in [0, 1] -> uint8 (4x smaller on the host; what image files and reward servers get)."""
    return (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)


def to_float(images):
    """uint8 (B, 3, H, W) -> float32 in [0, 1]."""
    return images.float() / 255


@torch.no_grad()
def sample_uint8(model, prompts, noise_ids=None, steps=40, cfg_scale=4.5, seed=0, batch_size=16, shift=None):
    """ODE samples (B, 3, H, W) uint8 on the host for a list of prompts with the currently active adapter, on
    the model's time grid (shift: model.shift unless given; the world 1, SD3.5 3). noise_ids[k] = (prompt index,
    image index) of sample k (default (k, 0)); at most batch_size samples are drawn at a time and the VAE
    decodes model.decode_batch of them at a time."""
    dev = model.transformer.device
    noise_ids = noise_ids or [(k, 0) for k in range(len(prompts))]
    sigmas = time_grid(steps, model.shift if shift is None else shift).to(dev)
    images = []
    for i in range(0, len(prompts), batch_size):
        x1 = initial_noise(noise_ids[i:i + batch_size], model.latent_shape, seed).to(dev)
        v_fn = model.velocity_fn(prompts[i:i + batch_size], cfg_scale)
        images.append(to_uint8(model.decode(euler_sample(v_fn, x1, sigmas))).cpu())
    return torch.cat(images)


def sample_images(model, prompts, steps=40, cfg_scale=4.5, seed=0, batch_size=16, shift=None):
    """sample_uint8 as floats in [0, 1], one image per prompt (sample k: noise (seed, k, 0)); for grids and
    small draws."""
    return to_float(sample_uint8(model, prompts, None, steps, cfg_scale, seed, batch_size, shift))


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


def score_task(task, images, records, rewards=REWARDS):
    """{metric: (B,) per image} for uint8 images made for one task's records: the task's reward, deqa (raw
    1-5) and for geneval the accuracy (`geneval_acc`); scored SCORE_CHUNK images at a time."""
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
        for k, v in part.items():
            out.setdefault(k, []).append(v.float())
    return {k: torch.cat(v) for k, v in out.items()}


# ---------------------------------------------------------------------------------------- statistics
def clustered_mean_se(per_prompt):
    """(mean, se) of a mean over prompts, per_prompt (n,) = each prompt's mean over its images; NaN entries
    (a reward that does not apply) are left out; se = std (ddof 1) / sqrt(n), NaN for n < 2."""
    x = torch.as_tensor(per_prompt, dtype=torch.float64)
    x = x[~x.isnan()]
    if len(x) == 0:
        return math.nan, math.nan
    return x.mean().item(), (x.std() / math.sqrt(len(x))).item() if len(x) > 1 else math.nan


def combine(parts):
    """(sum_g w_g mean_g, sqrt(sum_g w_g^2 se_g^2)) over independent groups of prompts, parts = [(w_g, per-prompt
    values of group g)]."""
    stats = [(w, *clustered_mean_se(x)) for w, x in parts]
    return sum(w * m for w, m, _ in stats), math.sqrt(sum((w * s) ** 2 for w, _, s in stats))


def summarise_prompts(per_prompt):
    """{metric: mean, "se/<metric>": se} from {task: {"index": [...], "tag": [...], metric: [per-prompt means]}}
    (the "per_prompt" entry evaluate returns); see the module docstring for the metrics and their se."""
    out = {}

    def put(name, parts):
        out[name], out[f"se/{name}"] = combine(parts)

    tasks = {task: {k: torch.tensor(v, dtype=torch.float64) for k, v in p.items() if k not in ("index", "tag")}
             for task, p in per_prompt.items()}
    for task, p in tasks.items():
        if task in p:
            put(task, [(1.0, p[task])])
    total = sum(len(p["index"]) for p in per_prompt.values())
    put("deqa", [(len(per_prompt[t]["index"]) / total, p["deqa"]) for t, p in tasks.items()])
    if "geneval_acc" in tasks.get("geneval", {}):
        acc, tags = tasks["geneval"]["geneval_acc"], per_prompt["geneval"]["tag"]
        other = sorted(set(tags) - set(toy_world.GENEVAL_TAGS), key=str)   # a prompt file's own tags, if any
        present = [t for t in toy_world.GENEVAL_TAGS if t in tags] + other
        by_tag = {t: acc[[k for k, tag in enumerate(tags) if tag == t]] for t in present}
        for t in present:
            put(f"geneval_acc/{t}", [(1.0, by_tag[t])])
        put("geneval_acc", [(1 / len(present), by_tag[t]) for t in present])
    if all(t in tasks and t in tasks[t] for t in ("geneval", "ocr", "pickscore")):
        # avg = sum over tasks T of the mean over T's prompts of y = (task reward + (n_T / N) deqa / 5) / 4:
        # one group per task, so the covariance of a prompt's deqa with its task reward is counted
        put("avg", [(1.0, ((p[t] if t in p else 0) + len(per_prompt[t]["index"]) / total * p["deqa"] / 5) / 4)
                    for t, p in tasks.items()])
    return out


def paired_difference(a, b):
    """{metric: {"mean", "se"}} of model a minus model b (two evaluate() results on the same prompts and
    noise): the per-prompt differences summarised as one evaluation is (all metrics are linear in them)."""
    pa, pb = a["per_prompt"], b["per_prompt"]
    if {t: p["index"] for t, p in pa.items()} != {t: p["index"] for t, p in pb.items()}:
        raise ValueError("paired_difference needs two evaluations on the same prompts: evaluate both with the same "
                         "prompts_per_task and prompt records")
    if a.get("settings") != b.get("settings"):
        raise ValueError(f"paired_difference needs the same settings (noise seed, steps, images per prompt), got "
                         f"{a.get('settings')} and {b.get('settings')}")
    diff = {t: {**{k: v for k, v in p.items() if k in ("index", "tag")},
                **{k: (torch.tensor(v, dtype=torch.float64) - torch.tensor(pb[t][k], dtype=torch.float64)).tolist()
                   for k, v in p.items() if k not in ("index", "tag") and k in pb[t]}}
            for t, p in pa.items()}
    s = summarise_prompts(diff)
    return {k: {"mean": v, "se": s[f"se/{k}"]} for k, v in s.items() if not k.startswith("se/")}


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(model, adapter=None, prompts_per_task=0, images_per_prompt=1, steps=40, cfg_scale=4.5, seed=0,
             batch_size=16, records=None, rewards=REWARDS, split="test"):
    """{metric: mean, "se/<metric>": se, "per_prompt": ..., "settings": ...} for one adapter (None = the base)
    over `records` ({task: records}; default: the world's `split` prompts): per task a stratified subset of
    prompts_per_task prompts (0 = all), images_per_prompt images each, scored by the task's reward and deqa.
    "per_prompt" holds each prompt's index, tag and per-prompt means, for paired_difference."""
    model.adapter(adapter)
    per_prompt = {}
    for task, recs in (records or world_records(split)).items():
        index = stratified_subset(recs, prompts_per_task)
        chosen = [recs[i] for i in index for _ in range(images_per_prompt)]
        ids = [(i, j) for i in index for j in range(images_per_prompt)]
        images = sample_uint8(model, [r["prompt"] for r in chosen], ids, steps, cfg_scale, seed, batch_size)
        scores = score_task(task, images, chosen, rewards)
        per_prompt[task] = {"index": index, "tag": [(recs[i].get("metadata") or {}).get("tag") for i in index],
                            **{k: v.reshape(len(index), images_per_prompt).double().nanmean(1).tolist()
                               for k, v in scores.items()}}
    return {**summarise_prompts(per_prompt), "per_prompt": per_prompt,
            "settings": dict(prompts_per_task=prompts_per_task, images_per_prompt=images_per_prompt, steps=steps,
                             cfg_scale=cfg_scale, seed=seed)}


@torch.no_grad()
def evaluate_ood(model, adapter=None, steps=40, cfg_scale=4.5, seed=0):
    """Out-of-domain composition (compbench.py): the geneval score and strict accuracy per category."""
    import compbench
    model.adapter(adapter)
    recs = compbench.records()
    images = sample_images(model, [r["prompt"] for r in recs], steps, cfg_scale, seed)
    return {k: v.float().mean().item() for k, v in compbench.score(images, recs).items()}


def evaluate_cached(model, adapter, folder, fn=evaluate, **kw):
    """fn(model, adapter, **kw) (evaluate or evaluate_ood), remembered in folder/eval.json per function and
    setting (the key: the settings that change scores, as sorted JSON; batch sizes are left out). An adapter
    folder is replaced whole when it is retrained (save_adapter writes a new folder and renames it), so a
    cached score never outlives its weights; sampling is seeded, so a cached score equals a fresh one up to
    float summation order. Custom `records` or `rewards` are not cached."""
    if "records" in kw or "rewards" in kw:
        return fn(model, adapter, **kw)
    settings = {k: v for k, v in kw.items() if k not in CACHE_EXCLUDE}
    # evaluate's keys are its bare settings; other functions are named
    key = json.dumps(settings if fn is evaluate else {fn.__name__: settings}, sort_keys=True)
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
# Tables over seeds: {"rows": {ROW: {METRIC: {"mean": m, "std": s, "n": seeds}}}, "meta": {...}}

def summarise(per_seed):
    """{row: [metrics of seed 0, seed 1, ...]} -> {row: {metric: {mean, std, n}}} (std: sample std over seeds,
    0 if n = 1); only numeric entries (not per_prompt or settings)."""
    rows = {}
    for row, runs in per_seed.items():
        rows[row] = {}
        for k, v in runs[0].items():
            if not isinstance(v, (int, float)):
                continue
            x = torch.tensor([r[k] for r in runs if k in r], dtype=torch.float64)
            rows[row][k] = {"mean": x.mean().item(), "std": x.std().item() if len(x) > 1 else 0.0, "n": len(x)}
    return rows


def write_table(path, per_seed, meta):
    """Write {"rows": summarise(per_seed), "meta": meta} to path (atomically) and return it."""
    table = {"rows": summarise(per_seed), "meta": meta}
    write_json(path, table)
    return table


def table_markdown(table, metrics=("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")):
    """A markdown table of mean ± std (the rows and metrics of a written table)."""
    lines = ["| | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for row, m in table["rows"].items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" if k in m else "" for k in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scalars(m):
    """The numbers of an evaluate() result (for logs), without per_prompt and settings."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


SHOWN = ("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")


def format_metrics(name, m):
    """One line: each shown metric as mean ± se (deqa on 1-5 with 2 decimals)."""
    cells = [f"{k} {m[k]:.{2 if k == 'deqa' else 3}f}" + (f"±{m['se/' + k]:.{2 if k == 'deqa' else 3}f}"
                                                           if f"se/{k}" in m else "") for k in SHOWN if k in m]
    return f"{name:<22} " + "  ".join(cells)


def format_paired(name, diff):
    """One line of paired differences: each shown metric as mean ± se, signed."""
    return f"{name:<22} " + "  ".join(f"{k} {diff[k]['mean']:+.3f}±{diff[k]['se']:.3f}" for k in SHOWN if k in diff)


def records_by_task(path):
    """{task: records} of a prompt file (prompts.read_prompts: our jsonl, GenEval metadata jsonl, or txt)."""
    import prompts as prompt_files
    out = {}
    for r in prompt_files.read_prompts(path):
        out.setdefault(r["task"], []).append(r)
    return out


def main(argv=None):
    from config import Config
    d = Config()
    ap = argparse.ArgumentParser(description="Evaluate the base and adapters; optionally write a table over seeds.")
    ap.add_argument("--model", default="checkpoints/base", help="world model folder")
    ap.add_argument("--adapter", action="append", default=[], metavar="ROW=PATH",
                    help="a PEFT adapter folder to evaluate as row ROW (repeatable); the base is always row 'base'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="initial-noise seeds; the table has mean ± std")
    ap.add_argument("--prompts_per_task", "--limit", type=int, default=d.eval_prompts_per_task,
                    help="prompts per task, stratified by sub-task (0: all; GenEval's protocol)")
    ap.add_argument("--images_per_prompt", type=int, default=d.eval_images_per_prompt, help="GenEval: 4")
    ap.add_argument("--batch_size", type=int, default=d.eval_batch, help="images per sampling call")
    ap.add_argument("--decode_batch", type=int, default=d.decode_batch, help="latents per VAE decode call")
    ap.add_argument("--steps", type=int, default=d.eval_steps)
    ap.add_argument("--cfg_scale", type=float, default=d.cfg_scale)
    ap.add_argument("--prompts", default=None, help="evaluate a prompt file instead of the world's test split")
    ap.add_argument("--ood", action="store_true", help="the out-of-domain composition set (compbench.py)")
    ap.add_argument("--paired", action="store_true", help="also print each adapter minus the base, paired "
                    "on prompts and noise (mean ± se), and write them under 'paired' in --out")
    ap.add_argument("--out", default=None, help="write results/NAME.json: {rows: {ROW: {METRIC: {mean, std, n}}}}")
    args = ap.parse_args(argv)
    if args.paired and args.ood:
        raise SystemExit("--paired compares per-prompt scores of evaluate(); --ood has none: drop one of them")
    import models
    model = models.load_world_model(args.model)
    model.decode_batch = args.decode_batch
    rows = {"base": None}
    for spec in args.adapter:
        row, sep, path = spec.partition("=")
        if not sep or not os.path.isdir(path):
            raise SystemExit(f"--adapter expects ROW=PATH with PATH an adapter folder, got {spec!r}")
        model.load_adapter(path, row)
        rows[row] = row
    records = records_by_task(args.prompts) if args.prompts else None
    per_seed, paired = {}, {}
    for row, adapter in rows.items():
        for seed in args.seeds:
            kw = dict(steps=args.steps, cfg_scale=args.cfg_scale, seed=seed)
            m = (evaluate_ood(model, adapter, **kw) if args.ood else
                 evaluate(model, adapter, args.prompts_per_task, args.images_per_prompt, batch_size=args.batch_size,
                          records=records, **kw))
            per_seed.setdefault(row, []).append(m)
            print(f"seed {seed}  " + (format_metrics(row, m) if not args.ood else
                                      f"{row:<22} " + "  ".join(f"{k} {v:.3f}" for k, v in m.items())))
            if args.paired and row != "base":
                paired.setdefault(row, []).append(paired_difference(m, per_seed["base"][len(per_seed[row]) - 1]))
                print(f"seed {seed}  " + format_paired(f"{row} - base", paired[row][-1]))
    if args.out:
        meta = {"model": args.model, "seeds": args.seeds, "steps": args.steps, "cfg_scale": args.cfg_scale,
                "prompts_per_task": args.prompts_per_task, "images_per_prompt": args.images_per_prompt,
                "prompts": args.prompts or ("compbench" if args.ood else "world test")}
        table = {"rows": summarise(per_seed), "meta": meta, **({"paired": paired} if paired else {})}
        write_json(args.out, table)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
