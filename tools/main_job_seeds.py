"""
The main job over three evaluation-and-training seeds, paired: after

    python train.py --stage distill                                  (seed 0, checkpoints/students/merge)
    python train.py --stage distill --seed S --name merge_seedS      (S = 1, 2)

every row's scores are cached in its adapter folder (eval.json, 30 prompts per task x 2 images, noise seed S).
This prints, per seed (± paired se) and as the mean over seeds ± its t-based 95% interval, the student minus its cold start, minus each routed
teacher on that teacher's reward, minus the 3-seed tables' GRPO-Mix and Flow-OPD students
(results/seed<S>.json, same prompts and noise), and the geneval teacher minus the base; it writes
results/main_job_3seeds.json.

    python -m tools.main_job_seeds
"""
import json
import os

from support import metrics

SEEDS = (0, 1, 2)


def cached(folder, seed):
    """The evaluate() result cached in folder/eval.json for the main job's protocol and noise seed."""
    for key, value in json.load(open(os.path.join(folder, "eval.json"))).items():
        k = json.loads(key)
        if k.get("seed") == seed and k.get("prompts_per_task") == 30 and k.get("images_per_prompt") == 2:
            return value
    raise SystemExit(f"{folder}/eval.json has no seed-{seed} evaluation: run the main job with --seed {seed}")


def comparisons(seed):
    student = cached(f"checkpoints/students/{'merge' if seed == 0 else f'merge_seed{seed}'}/adapter", seed)
    cold, tables = cached("checkpoints/cold_start/merge", seed), json.load(open(f"results/seed{seed}.json"))["main"]
    teacher = {t: cached(f"checkpoints/teachers/{t}", seed) for t in ("geneval", "ocr", "pickscore")}
    return {"student - cold start (avg)": (student, cold, "avg"),
            "student - cold start (geneval_acc)": (student, cold, "geneval_acc"),
            "student - teacher/geneval (geneval_acc)": (student, teacher["geneval"], "geneval_acc"),
            "student - teacher/geneval (geneval)": (student, teacher["geneval"], "geneval"),
            "student - teacher/ocr (ocr)": (student, teacher["ocr"], "ocr"),
            "student - teacher/pickscore (pickscore)": (student, teacher["pickscore"], "pickscore"),
            "student - grpo_mix of the tables (avg)": (student, tables["grpo_mix"], "avg"),
            "student - flow_opd/merge of the tables (avg)": (student, tables["flow_opd/merge"], "avg"),
            "teacher/geneval - teacher/geneval of the tables (geneval_acc)":
                (teacher["geneval"], tables["teacher/geneval"], "geneval_acc"),
            "teacher/geneval - base (geneval_acc)": (teacher["geneval"], tables["base"], "geneval_acc"),
            "teacher/geneval - base (geneval)": (teacher["geneval"], tables["base"], "geneval")}


def main():
    per_seed = {s: {name: metrics.paired_difference(a, b)[m] for name, (a, b, m) in comparisons(s).items()}
                for s in SEEDS}
    print("| | " + " | ".join(f"seed {s}" for s in SEEDS) + " | mean ± t-based 95% interval over seeds |")
    print("|---|" + "---|" * (len(SEEDS) + 1))
    out = {}
    for name in per_seed[SEEDS[0]]:
        out[name] = row = metrics.over_seeds([per_seed[s][name] for s in SEEDS])
        cells = [f"{x['mean']:+.3f} ± {x['se']:.3f}" for x in row["per_seed"]] + [f"{row['mean']:+.3f} ± {row['ci95']:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    with open("results/main_job_3seeds.json", "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
