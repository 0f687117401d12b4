"""
The cost comparison of GRPO-Mix and Flow-OPD across seeds, in images sampled: every probe curve that
`python train.py --stage all --seed S` logged (GRPO-Mix and the two main students; pipeline.sample_cost),
and a longer GRPO-Mix run if one exists (`python train.py --stage grpo_mix --teacher_dir
runs/grpo_mix_long --grpo_iters 120 --eval_every 20`, seed 0's noise), drawn twice: against the images
each model sampled itself, and against the total, where a Flow-OPD student also pays for its teachers'
GRPO samples (and the SFT cold start for its ODE samples).

    python scripts/sample_cost_figure.py [--runs_dir runs] [--out results/sample_cost.png]

Prints, per seed, the images each curve needs to first reach GRPO-Mix's final probe avg; draws the mean
over seeds of each row's curve.
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pipeline  # noqa: E402
import plots  # noqa: E402
from config import Config  # noqa: E402
from rollouts import read_jsonl  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs_dir", default="runs")
    ap.add_argument("--out", default="results/sample_cost.png")
    args = ap.parse_args()
    cfg = Config(runs_dir=args.runs_dir)
    per_row, offsets = {}, {}   # row -> {images: [probe avg of each seed]}; row -> images paid before it
    for run in sorted(glob.glob(os.path.join(args.runs_dir, "seed*"))):
        curves, summary = pipeline.sample_cost(cfg, run, pipeline.pipeline_rows(cfg, run))
        teachers = sum(summary["teachers_images"].values())
        for row, entries in curves.items():
            offsets[row] = 0 if row == "grpo_mix" else teachers + (summary["sft_cold_start_images"] if row.endswith("sft") else 0)
            for e in entries:
                per_row.setdefault(row, {}).setdefault(e["images"], []).append(e["eval/avg"])
        print(os.path.basename(run), json.dumps({k: summary.get(k) for k in (
            "grpo_mix_final_probe_avg", "images_to_reach_it", "final_probe_avg", "teachers_images")}))
    # the mean over seeds at each probe (a probe every pipeline.CURVE_EVERY iterations, the same in every seed)
    own = {f"{row} ({len(next(iter(pts.values())))} seeds)": [
        {"iter": k, "images": n, "eval/avg": sum(v) / len(v)} for k, (n, v) in enumerate(sorted(pts.items()))]
        for row, pts in per_row.items()}
    total = {label: [{**e, "images": e["images"] + offsets[label.split(" (")[0]]} for e in entries]
             for label, entries in own.items()}
    entries = [e for e in read_jsonl(os.path.join(args.runs_dir, "grpo_mix_long", "train_log.jsonl"))
               if e.get("stage") == "grpo_mix_eval"]
    if entries:
        own["grpo_mix 120 it (seed 0)"] = total["grpo_mix 120 it (seed 0)"] = entries
        print("grpo_mix long seed0", [(e["images"], round(e["eval/avg"], 3)) for e in entries])
    if not own:
        raise SystemExit(f"no probe curves under {args.runs_dir}: run `python train.py --stage all --seed S` first")
    a = plots.training_curves(own, ["eval/avg"], smooth=1, x_key="images", panel_height=260)
    b = plots.training_curves(total, ["eval/avg"], smooth=1, x_key="images", panel_height=260)
    canvas = plots.Image.new("RGB", (a.width, a.height + b.height + 2 * plots.LINE), "white")
    draw = plots.ImageDraw.Draw(canvas)
    draw.text((4, 0), "probe avg against the images each model sampled itself", fill=(0, 0, 0), font=plots._font())
    canvas.paste(a, (0, plots.LINE))
    draw.text((4, a.height + plots.LINE), "... and against the total, the teachers' GRPO samples included",
              fill=(0, 0, 0), font=plots._font())
    canvas.paste(b, (0, a.height + 2 * plots.LINE))
    canvas.save(args.out)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
