"""
`python -m tools.paper_tables --seed S`: the whole Flow-OPD pipeline for one seed and the paper's tables in miniature
(Flow-OPD §4-5: Table 1's rows, the MAR and cold-start ablations, T2I-CompBench as our compbench.py).

Per seed S, resumable stage by stage (whatever exists is reused): the four teachers
(shared by all seeds), GRPO-Mix, the cold starts and the Flow-OPD variants under runs/seedS/, then every row
evaluated on the test prompts and the out-of-domain set (noise seed S; cached beside each adapter), written
to results/seedS.json and aggregated over every seed present into results/main.json and results/ood.json
(eval.write_table's schema), with a sample grid and training curves.
Every seed file records {row: sha256 of the weights evaluated} ("models"); seeds whose base or teacher rows
came from other weights are refused, not merged (merged_models).
Departure: the paper's tables are over one training run each; ours are the mean over seeds with a t-based 95%
interval (support/metrics.summarise), and the teachers are not retrained per seed (only their evaluation noise
varies).
"""
import dataclasses
import glob
import json
import os
import time

import torch
from tqdm import tqdm

from eval import evaluate_cached, evaluate_ood
from rewards import REWARDS, REWARDS_VERSION, geneval_details
from support import figures, models
from support.config import parse_args
from support.metrics import format_metrics, read_jsonl, scalars, table_markdown, write_json, write_table
from support.provenance import stamp, weights_sha256
from support.resolve import eval_settings, main_protocol, ood_settings
from support.rollouts import sample_images
from train import stage_distill, stage_teachers
from world import compbench, toy_world


# Probe evaluations every CURVE_EVERY iterations of GRPO-Mix and of the two main Flow-OPD students: their avg
# against the images each has sampled (results/sample_cost_seed<S>.png), the paper's comparison at equal cost.
CURVE_EVERY = 10

# Flow-OPD rows built by stage_all: row -> overrides of the distill stage. The main table's three, and
# the two ablations' (the OPD estimator; the cold start by A/B averaging, beside exact dW and SFT above).
MAIN_VARIANTS = {"flow_opd/merge": dict(cold_start="merge", eval_every=CURVE_EVERY),
                 "flow_opd/sft": dict(cold_start="sft", eval_every=CURVE_EVERY),
                 "flow_opd/merge_no_mar": dict(cold_start="merge", mar_anchor="none")}
ABLATION_VARIANTS = {"flow_opd/merge_logratio": dict(cold_start="merge", estimator="logratio"),
                     "flow_opd/merge_released": dict(cold_start="merge", estimator="released"),
                     "flow_opd/merge_average": dict(cold_start="merge_average")}


def selected_variants(cfg):
    return {**MAIN_VARIANTS, **(ABLATION_VARIANTS if cfg.ablations else {})}


def pipeline_rows(cfg, run):
    """row -> adapter folder (None: the base) for every model stage_all evaluates."""
    rows = {"base": None, **{f"teacher/{t}": os.path.join(cfg.teacher_dir, t) for t in toy_world.TASKS + ("deqa",)},
            "grpo_mix": os.path.join(run, "grpo_mix")}
    variants = selected_variants(cfg)
    for row, overrides in variants.items():
        cs = overrides["cold_start"]
        rows[f"cold_start/{cs}"] = os.path.join(run, "cold_start", cs)
    rows.update({row: os.path.join(run, "students", row.split("/")[1], "adapter") for row in variants})
    return rows


def stage_all(cfg):
    """The whole pipeline for one seed, resumable stage by stage (what exists is reused): the four teachers
    (shared by all seeds), then per seed GRPO-Mix, the cold starts and the Flow-OPD variants (train.py's
    stages), and the evaluation of every row (results/seed<S>.json, aggregated over seeds into
    results/main.json and results/ood.json)."""
    t0, run = time.time(), os.path.join(cfg.runs_dir, f"seed{cfg.seed}")
    timings, trained = {}, not os.path.isdir(os.path.join(run, "grpo_mix"))
    if not os.path.isdir(cfg.base):
        raise SystemExit(f"no base model at {cfg.base}: pretrain one first with `python -m tools.pretrain_world "
                         f"--base {cfg.base}`")
    stage_teachers(dataclasses.replace(cfg, eval_at_end=False))
    stage_teachers(dataclasses.replace(cfg, teacher_dir=run, eval_at_end=False, eval_every=CURVE_EVERY), ["grpo_mix"])
    if trained:   # a rerun that finds GRPO-Mix keeps the first run's time (evaluate_rows merges them)
        timings["teachers_and_grpo_mix"] = (time.time() - t0) / 60
    rows = pipeline_rows(cfg, run)
    for row, overrides in selected_variants(cfg).items():
        if os.path.isdir(rows[row]):
            print(f"[{row}] found {rows[row]}, skipping")
            continue
        t1, name = time.time(), row.split("/")[1]
        print(f"[{row}] distilling")
        stage_distill(dataclasses.replace(cfg, name=name, student_dir=os.path.join(run, "students"),
                                          cold_start_dir=os.path.join(run, "cold_start"), eval_at_end=False,
                                          **overrides))
        timings[row] = (time.time() - t1) / 60
    evaluate_rows(cfg, rows, timings)
    print(f"paper tables, seed {cfg.seed}: {(time.time() - t0) / 60:.1f} min")


def evaluate_rows(cfg, rows, timings):
    """Evaluate each row on the test prompts and the OOD set (noise seed = cfg.seed; cached in the adapter
    folders), write results/seed<S>.json, and aggregate every seed present into main.json and ood.json."""
    model = models.load_world_model(cfg.base, cfg.device)
    kw = eval_settings(cfg)
    ood_kw = ood_settings(cfg)
    main, ood = {}, {}
    for row, folder in tqdm(rows.items(), desc="evaluate"):
        adapter = None if folder is None else row
        if folder is not None:
            model.load_adapter(folder, row)
        cache = folder or os.path.join(cfg.runs_dir, "base_eval")
        main[row] = evaluate_cached(model, adapter, cache, **kw)
        ood[row] = evaluate_cached(model, adapter, cache, fn=evaluate_ood, **ood_kw)
        if main_protocol(kw):   # the scores the model folder's provenance carries
            stamp(folder or cfg.base, scores=scalars(main[row]), protocol=kw)
        print(format_metrics(row, main[row]))
    weights = {row: weights_sha256(folder or cfg.base) for row, folder in rows.items()}
    path = os.path.join(cfg.results_dir, f"seed{cfg.seed}.json")
    earlier = json.load(open(path)).get("minutes", {}) if os.path.isfile(path) else {}  # a rerun's untouched rows
    write_json(path, {"main": main, "ood": ood, "minutes": {**earlier, **timings}, "eval": kw, "models": weights,
                      "rewards": REWARDS_VERSION})
    seeds = sorted(glob.glob(os.path.join(cfg.results_dir, "seed*.json")))
    runs = [json.load(open(p)) for p in seeds]
    meta = {"seeds": [os.path.basename(p)[4:-5] for p in seeds], "eval": {k: v for k, v in kw.items() if k != "seed"},
            "note": "base and teachers are shared by all seeds (only their evaluation noise varies)",
            "models": merged_models(dict(zip(seeds, runs)))}
    tables = {part: write_table(os.path.join(cfg.results_dir, f"{part}.json"),
                                {row: [r[part][row] for r in runs if row in r[part]] for row in rows}, meta)
              for part in ("main", "ood")}
    print(table_markdown(tables["main"]))
    draw_pictures(cfg, model, rows)


def shared_row(row):
    """Rows every seed evaluates with the same weights: the base and the teachers (not retrained per seed)."""
    return row == "base" or row.startswith("teacher/")


def merged_models(runs):
    """{row: sha256} for the shared rows, {row: [sha256 of each seed]} for the others, from {path: seed json};
    refuses (SystemExit naming them) seeds whose shared rows evaluated other weights, that were scored by other
    rewards (rewards.REWARDS_VERSION), or that predate either record, since a table over them would average
    different models or judges."""
    out = {}
    for path, run in runs.items():
        if "models" not in run or run.get("rewards") != REWARDS_VERSION:
            raise SystemExit(f"{path} has no 'models' record or was scored by rewards version {run.get('rewards')}, "
                             f"not {REWARDS_VERSION}: rerun its seed with `python -m tools.paper_tables --seed S`, "
                             f"or move it out of the results folder")
        for row, sha in run["models"].items():
            if not shared_row(row):
                out.setdefault(row, []).append(sha)
            elif out.setdefault(row, sha) != sha:
                first = next(p for p, r in runs.items() if r.get("models", {}).get(row) == out[row])
                raise SystemExit(f"{row} differs between seeds: {first} evaluated weights {out[row][:12]}, {path} "
                                 f"{sha[:12]}. Rerun the seeds made with the old weights (delete their runs/seedS "
                                 f"rows and seedS.json) before merging them into one table")
    return out


def failed_by_every_row(samples, recs):
    """The prompts of the grid that no row draws right: GenEval strict correctness for composition prompts
    (the world's and the out-of-domain set's), the task reward >= 0.5 for the others. samples: {row: (N, 3,
    H, W) in [0, 1]} for recs (N records)."""
    ok = torch.zeros(len(recs), dtype=torch.bool)
    meta, prompts = [r["metadata"] for r in recs], [r["prompt"] for r in recs]
    for images in samples.values():
        for task in {r["task"] for r in recs}:
            idx = [i for i, r in enumerate(recs) if r["task"] == task]
            x, m, p = images[idx], [meta[i] for i in idx], [prompts[i] for i in idx]
            good = geneval_details(x, m).strict if task == "geneval" else REWARDS[task](x, p, m) >= 0.5
            ok[idx] |= good.bool().cpu()
    return [prompts[i] for i in range(len(recs)) if not ok[i]]


def sample_cost(cfg, run, rows):
    """The cost comparison of GRPO-Mix and Flow-OPD in images sampled: each probe curve (stage *_eval in the
    logs, --eval_every), the images each needs to first reach GRPO-Mix's final probe avg, and the images the
    teachers sampled before any distillation (their logs' GRPO iterations x prompts_per_iter x group_size of
    this config) and the SFT cold start's ODE samples. Returns ({row: probe entries}, summary dict)."""
    probes = lambda path, stage: [e for e in read_jsonl(path) if e.get("stage") == stage]
    curves = {"grpo_mix": probes(os.path.join(run, "train_log.jsonl"), "grpo_mix_eval")}
    for row in ("flow_opd/merge", "flow_opd/sft"):
        curves[row] = probes(os.path.join(os.path.dirname(rows[row]), "train_log.jsonl"), "distill_eval")
    curves = {k: v for k, v in curves.items() if v}
    per_iter = cfg.prompts_per_iter * cfg.group_size
    teacher_log = read_jsonl(os.path.join(cfg.teacher_dir, "train_log.jsonl"))
    teachers = {t: len({e["iter"] for e in teacher_log if e.get("stage") == t and "reward" in e}) * per_iter
                for t in cfg.routes + ["deqa"]}
    summary = {"teachers_images": teachers, "sft_cold_start_images": cfg.sft_samples * len(cfg.routes)}
    if "grpo_mix" in curves:
        target = curves["grpo_mix"][-1]["eval/avg"]
        summary["grpo_mix_final_probe_avg"] = target
        summary["images_to_reach_it"] = {row: next((e["images"] for e in c if e["eval/avg"] >= target), None)
                                         for row, c in curves.items()}
        summary["final_probe_avg"] = {row: c[-1]["eval/avg"] for row, c in curves.items()}
        summary["final_images"] = {row: c[-1]["images"] for row, c in curves.items()}
    return curves, summary


def draw_pictures(cfg, model, rows):
    """results/grid_seed<S>.png: every row's samples on fixed prompts (2 test prompts per task and 4 OOD
    compositions) from the same noise, with the prompts every row fails noted under it;
    results/curves_*.png: the training curves of the teachers and GRPO-Mix, and of the Flow-OPD variants
    (KL on a log scale, MAR, per-task reward of the training samples); results/sample_cost_seed<S>.png and
    .json: GRPO-Mix's and the main students' probe avg against the images each sampled (sample_cost)."""
    recs = [r for t in toy_world.TASKS for r in toy_world.prompts(t, "test")[:2]] + compbench.records()[::24][:4]
    prompts = [r["prompt"] for r in recs]
    samples = {}
    for row, folder in rows.items():
        model.adapter(None if folder is None else row)
        samples[row] = sample_images(model, prompts, cfg.eval_steps, cfg.guidance_scale, cfg.seed)
    out = lambda name: os.path.join(cfg.results_dir, name)
    failed = failed_by_every_row(samples, recs)
    notes = [f"no row draws right ({len(failed)} of {len(recs)}): " + "; ".join(failed)] if failed else []
    figures.image_grid(samples, prompts, path=out(f"grid_seed{cfg.seed}.png"), notes=notes)
    run = os.path.join(cfg.runs_dir, f"seed{cfg.seed}")
    logs = {"": os.path.join(cfg.teacher_dir, "train_log.jsonl"), "seed": os.path.join(run, "train_log.jsonl")}
    figures.training_curves({k: p for k, p in logs.items() if os.path.isfile(p)}, ["reward", "web", "kl"],
                          out(f"curves_teachers_seed{cfg.seed}.png"))
    logs = {row: os.path.join(os.path.dirname(folder), "train_log.jsonl") for row, folder in rows.items()
            if row.startswith("flow_opd/")}
    figures.training_curves(logs, ["kl", "mar", "reward/geneval", "reward/ocr", "reward/pickscore"],
                          out(f"curves_distill_seed{cfg.seed}.png"), log_keys=("kl",))
    curves, summary = sample_cost(cfg, run, rows)
    if curves:
        figures.training_curves(curves, ["eval/avg"], out(f"sample_cost_seed{cfg.seed}.png"), smooth=1,
                              x_key="images")
        write_json(out(f"sample_cost_seed{cfg.seed}.json"), summary)
    print(f"pictures: {out(f'grid_seed{cfg.seed}.png')}, curves_*_seed{cfg.seed}.png")

def sample_cost_over_seeds(cfg, out):
    """The cost comparison of GRPO-Mix and Flow-OPD across seeds, in images sampled: every probe curve the
    seeds under --runs_dir logged (sample_cost), and a longer GRPO-Mix run if one exists (`python train.py
    --stage grpo_mix --teacher_dir runs/grpo_mix_long --grpo_iters 120 --eval_every 20`), the mean over seeds
    of each row drawn twice: against the images each model sampled itself (out), and against the total, where
    a Flow-OPD student also pays for its teachers' GRPO samples and the SFT cold start for its ODE samples
    (out with _total before .png). Prints, per seed, the images each curve needs to reach GRPO-Mix's final avg."""
    per_row, offsets = {}, {}   # row -> {images: [probe avg of each seed]}; row -> images paid before it
    for run in sorted(glob.glob(os.path.join(cfg.runs_dir, "seed*"))):
        curves, summary = sample_cost(cfg, run, pipeline_rows(cfg, run))
        teachers = sum(summary["teachers_images"].values())
        for row, entries in curves.items():
            sft = summary["sft_cold_start_images"] if row.endswith("sft") else 0   # the SFT cold start's samples
            offsets[row] = 0 if row == "grpo_mix" else teachers + sft
            for e in entries:
                per_row.setdefault(row, {}).setdefault(e["images"], []).append(e["eval/avg"])
        print(os.path.basename(run), json.dumps({k: summary.get(k) for k in (
            "grpo_mix_final_probe_avg", "images_to_reach_it", "final_probe_avg", "teachers_images")}))
    # the mean over seeds at each probe (a probe every CURVE_EVERY iterations, the same in every seed)
    own = {f"{row} ({len(next(iter(pts.values())))} seeds)": [
        {"iter": k, "images": n, "eval/avg": sum(v) / len(v)} for k, (n, v) in enumerate(sorted(pts.items()))]
        for row, pts in per_row.items()}
    total = {label: [{**e, "images": e["images"] + offsets[label.split(" (")[0]]} for e in entries]
             for label, entries in own.items()}
    entries = [e for e in read_jsonl(os.path.join(cfg.runs_dir, "grpo_mix_long", "train_log.jsonl"))
               if e.get("stage") == "grpo_mix_eval"]
    if entries:
        own["grpo_mix 120 it (seed 0)"] = total["grpo_mix 120 it (seed 0)"] = entries
    if not own:
        raise SystemExit(f"no probe curves under {cfg.runs_dir}: run `python -m tools.paper_tables --seed S` first")
    for curves, path in ((own, out), (total, out.replace(".png", "_total.png"))):
        figures.training_curves(curves, ["eval/avg"], path, smooth=1, x_key="images")
        print("wrote", path)


def main(argv=None):
    cfg, args = parse_args(argv, __doc__, lambda g: g.add_argument(
        "--sample_cost_over_seeds", metavar="PNG", default="", help="only draw the cost figure over every seed "
        "under --runs_dir to PNG (sample_cost_over_seeds), e.g. results/sample_cost.png"))
    if args.sample_cost_over_seeds:
        sample_cost_over_seeds(cfg, args.sample_cost_over_seeds)
    else:
        stage_all(cfg)


if __name__ == "__main__":
    main()
