"""
`python -m tools.questions_report`: results/questions.json and the figures of the paper's open questions, from the
records tools.questions writes (results/questions/seed<S>/<run>.json, cold_start_cost.json) and tools.paper_tables'
rows (results/seed<S>.json): each row's scores over seeds, and its difference from the question's first row,
paired per seed on the same prompts and noise, then over seeds with a t-based 95% interval (metrics.over_seeds).
The biased teacher's detection signal, measured (detection): its runs' logged KL and rewards minus the clean runs'.
Figures: results/questions_<Q>.png (each row − the reference on avg), questions_biased_detection.png (the
detection signal: the student's own rewards and KL per routed teacher, clean vs biased runs) and
questions_biased_grid.png (the base, the committed geneval teacher and the biased one on colour prompts).
"""
import glob
import json
import os

import torch

from support import figures, models
from support.config import parse_args
from support.metrics import markdown_table, over_seeds, paired_difference, summarise, write_json
from support.rollouts import sample_images
from support.teachers import BIASED
from tools.questions import BIASED_TEACHER, COLD_STARTS, METRICS, QUESTIONS, current, paper_rows, record_path
from world import judges, toy_world

def scores_of(cfg, seed, spec, paper):
    """An evaluation (with per-prompt scores) for a row spec of QUESTIONS, or None if not recorded."""
    for s in (spec if isinstance(spec, list) else [spec]):
        kind, what = s.split(":", 1)
        if kind == "paper" and what in paper:
            return paper[what]
        path = record_path(cfg, seed, what)
        if kind in ("run", "cold") and current(path):
            return json.load(open(path))["student" if kind == "run" else "cold_start"]
    return None


def report(cfg):
    """results/questions.json: {"questions": {Q: {"command", "rows": {ROW: {METRIC: {mean, se, ci95, n}}}}}}, each
    row's scores over seeds and its difference from the question's first row per seed (paired_per_seed: {SEED:
    {METRIC: {mean, se}}}), then over seeds with a t interval (paired/METRIC); and one figure per question, results/questions_<Q>.png."""
    seeds = sorted(int(os.path.basename(p)[4:]) for p in glob.glob(os.path.join(cfg.results_dir, "questions", "seed*")))
    paper = {s: paper_rows(cfg, s) for s in seeds}
    out = {}
    for question, rows in QUESTIONS.items():
        ref_name = next(iter(rows))
        table = {}
        for row, spec in rows.items():
            per = {s: scores_of(cfg, s, spec, paper[s]) for s in seeds}
            per = {s: e for s, e in per.items() if e is not None}
            ref = {s: scores_of(cfg, s, rows[ref_name], paper[s]) for s in per}
            if not per:
                continue
            cells = {m: {k: v[k] for k in ("mean", "se", "ci95", "n")}
                     for m, v in summarise({row: list(per.values())})[row].items() if m in METRICS}
            pairs = {s: paired_difference(e, ref[s]) for s, e in per.items() if ref[s] is not None}
            for m in METRICS if row != ref_name else ():
                d = over_seeds([pairs[s][m] for s in sorted(pairs)]) if pairs and all(
                    m in p for p in pairs.values()) else None   # a tiny evaluation may miss a GenEval tag
                if d:
                    cells[f"paired/{m}"] = {k: d[k] for k in ("mean", "se", "ci95", "n")}
            if row != ref_name:   # each seed's own paired difference (exercises 5 and 6 show them)
                cells["paired_per_seed"] = {str(s): {m: {k: p[m][k] for k in ("mean", "se")} for m in METRICS if m in p}
                                            for s, p in sorted(pairs.items())}
            table[row] = {**cells, "seeds": sorted(per)}
        out[question] = {"command": f"python -m tools.questions --question {question} --seed S  (S = 0, 1, 2)",
                         "reference": ref_name, "rows": table}
    costs = os.path.join(cfg.results_dir, "questions", "cold_start_cost.json")
    if os.path.isfile(costs):   # {kind: {seed: measurement}}: over the seeds measured, as the scores are
        c = json.load(open(costs))
        for kind, cells in summarise({k: list(c[k].values()) for k in COLD_STARTS if k in c}).items():
            out["cold_start_cost"]["rows"].setdefault(f"{kind} (cold start)", {}).update(
                {f"cost/{m}": {k: v[k] for k in ("mean", "se", "ci95", "n")} for m, v in cells.items()})
    out["biased_teacher"].update(biased_evidence(cfg), detection=detection(cfg, seeds))
    write_json(os.path.join(cfg.results_dir, "questions.json"), {"questions": out})
    draw(cfg, out, seeds)
    print(f"wrote {os.path.join(cfg.results_dir, 'questions.json')}")


def draw(cfg, out, seeds):
    """One bar chart per question (each row minus the reference on avg, ± t 95%) and the detection curves of the
    biased teacher (the student's own geneval reward and its KL to each teacher, clean vs biased runs)."""
    for question, q in out.items():
        bars = {row: (c["paired/avg"]["mean"], c["paired/avg"]["ci95"]) for row, c in q["rows"].items()
                if "paired/avg" in c}
        if bars:
            figures.bar_chart(bars, f"{question}: avg, each row − {q['reference']} (paired, ± t 95% over seeds)",
                              os.path.join(cfg.results_dir, f"questions_{question}.png"), width=720)
    logs = {f"{name} seed {s}": json.load(open(record_path(cfg, s, name)))["log"]
            for name in ("default", "biased") for s in seeds if current(record_path(cfg, s, name))}
    finite = lambda k: any(isinstance(e.get(k), float) and e[k] == e[k] for log in logs.values() for e in log)
    keys = [k for k in ("reward/geneval", "reward/ocr", "kl/geneval", "kl/ocr") if finite(k)]
    if keys:
        figures.training_curves(logs, keys,
                                os.path.join(cfg.results_dir, "questions_biased_detection.png"), smooth=5)


DETECTION_KEYS = ("kl/geneval", "kl/ocr", "kl/pickscore", "reward/geneval", "reward/ocr", "reward/pickscore")


def detection(cfg, seeds, keys=DETECTION_KEYS):
    """The detection signal, measured: per logged key, the biased run minus the clean one of the same seed, per
    iteration (the two draw the same prompts: the teacher changes no draw), its mean over the run with the
    iterations' standard error, then over seeds with a t interval (metrics.over_seeds). An iteration where either
    run did not route that teacher (nan) is left out."""
    logs = {s: [json.load(open(record_path(cfg, s, n)))["log"] for n in ("biased", "default")] for s in seeds
            if all(current(record_path(cfg, s, n)) for n in ("biased", "default"))}
    finite = lambda e, key: isinstance(e.get(key), float) and e[key] == e[key]
    out = {}
    for key in keys:
        per_seed = []
        for biased, clean in logs.values():
            d = torch.tensor([b[key] - c[key] for b, c in zip(biased, clean) if finite(b, key) and finite(c, key)],
                             dtype=torch.float64)
            if len(d) > 1:
                per_seed.append({"mean": d.mean().item(), "se": (d.std() / len(d) ** 0.5).item()})
        if per_seed:
            out[key] = {k: v for k, v in over_seeds(per_seed).items() if k in ("mean", "se", "ci95", "n")}
    return out


def biased_evidence(cfg, n=48):
    """What a reader sees of the bias: the share of red objects among those detected in one sample of each of n
    composition test prompts that ask for colours (none of them red-only), for the base, the committed geneval
    teacher and the biased one; and results/questions_biased_grid.png, the three on the first 8 of them."""
    folder = os.path.join(cfg.teacher_dir, BIASED_TEACHER)
    if not os.path.isdir(folder):
        return {}
    model = models.load_world_model(cfg.base, cfg.device)
    recs = [r for r in toy_world.prompts("geneval", "test") if r["metadata"]["tag"] in ("colors", "color_attr")
            and any(c.get("color") != "red" for c in r["metadata"]["include"])][:n]
    samples, shares = {}, {}
    for name, path in (("base", None), ("geneval teacher", os.path.join(cfg.teacher_dir, "geneval")),
                       (BIASED_TEACHER, folder)):
        if path:
            model.load_adapter(path, name.replace(" ", "_"))
        model.adapter(path and name.replace(" ", "_"))
        images = sample_images(model, [r["prompt"] for r in recs], cfg.eval_steps, cfg.guidance_scale, 0)
        objs = [o for found in judges.detect(images) for o in found]   # the share of red objects among those found
        samples[name], shares[name] = images[:8], sum(o.colour == BIASED[BIASED_TEACHER] for o in objs) / len(objs)
    figures.image_grid(samples, [r["prompt"] for r in recs[:8]],
                       path=os.path.join(cfg.results_dir, "questions_biased_grid.png"))
    return {"red_share": shares, "prompts": len(recs)}


# ------------------------------------------------------- the documents' tables (tools/doc_tables renders them)
D = 8 * 8 * 8   # latent elements of the world's images: `mar` is logged per element, `kl` summed


def _cell(c):
    return f"{c['mean']:+.3f} ± {c['ci95']:.3f}" if c["n"] > 1 else f"{c['mean']:+.3f} (1 seed)"


def question_table(question, verdict, questions):
    """One question's rows: seeds, avg over seeds, each metric's paired difference from the reference row
    (mean ± t 95% over seeds) and the verdict the avg interval gives (doc_tables.verdict, sign 0)."""
    q, keys = questions[question], ("avg", "geneval_acc", "ocr", "pickscore", "deqa", "geneval_acc/colors")
    rows = [(row, len(c["seeds"]), f"{c['avg']['mean']:.3f}",
             *(_cell(c[f"paired/{k}"]) if f"paired/{k}" in c else "reference" for k in keys),
             verdict(c["paired/avg"], 0) if "paired/avg" in c else "") for row, c in q["rows"].items()]
    header = [f"row (− {q['reference']})", "seeds", "avg"] + [f"Δ {k}" for k in keys] + ["verdict (Δ avg)"]
    return markdown_table(header, rows)


def cost_table(questions):
    """The cold starts' cost (mean over the seeds measured, one thread) beside their scores and their students'."""
    r = questions["cold_start_cost"]["rows"]
    rows = [(k, f"{r[f'{k} (cold start)']['cost/cpu_s']['mean']:.1f}",
             f"{r[f'{k} (cold start)']['cost/peak_mb_above_models']['mean']:.0f}",
             f"{r[f'{k} (cold start)']['cost/samples']['mean']:.0f}", r[f"{k} (cold start)"]["cost/cpu_s"]["n"],
             f"{r[f'{k} (cold start)']['avg']['mean']:.3f}", f"{r[f'{k} → student']['avg']['mean']:.3f}")
            for k in COLD_STARTS]
    return markdown_table(["cold start", "CPU s", "peak MB above the models", "images drawn", "seeds", "its avg",
                   "its student's avg"], rows)


def units_table(results_dir):
    """Exercise 3's units: the logged MAR term (λ·KL_anchor/D) and the step KL to the routed teacher (summed), in
    nats, over the first and last 5 iterations, mean over the seeds recorded by these rewards, at λ 0.02 and 0.2."""
    rows = []
    for run, lam in (("default", 0.02), ("mar_deqa_0.2", 0.2)):
        logs = [json.load(open(p))["log"] for p in sorted(glob.glob(os.path.join(results_dir, "questions", "seed*",
                                                                                  f"{run}.json"))) if current(p)]
        if not logs:
            continue
        mean = lambda k, part: sum(sum(e[k] for e in part(log)) / len(part(log)) for log in logs) / len(logs)
        first, last = (lambda log: log[:5]), (lambda log: log[-5:])
        rows.append((run, lam, len(logs), f"{mean('mar', first):.4f} → {mean('mar', last):.4f}",
                     f"{mean('mar', first) * D / lam:.2f} → {mean('mar', last) * D / lam:.2f}",
                     f"{mean('kl', first):.2f} → {mean('kl', last):.2f}"))
    return markdown_table(["run", "λ", "seeds", "logged mar", "KL to the anchor (nats)",
                           "KL to the routed teacher (nats)"], rows)


def per_seed_table(questions, question, row):
    """Exercises 5 and 6: a question's row minus its reference row, paired per seed (mean ± the paired se over the
    test images), then over the seeds (mean ± t 95%) where there are several."""
    q, keys = questions[question], ("geneval_acc", "geneval", "ocr", "pickscore", "avg")
    c = q["rows"][row]
    rows = [(f"seed {s}", *(f"{d[k]['mean']:+.3f} ± {d[k]['se']:.3f}" for k in keys))
            for s, d in c["paired_per_seed"].items()]
    if len(rows) > 1:
        rows.append((f"over {len(rows)} seeds (t 95%)", *(f"**{_cell(c[f'paired/{k}'])}**" for k in keys)))
    return markdown_table([f"{row} − {q['reference']} (paired)"] + list(keys), rows)


def tables(results_dir, verdict):
    """{table name: renderer} for tools/doc_tables."""
    questions = lambda: json.load(open(os.path.join(results_dir, "questions.json")))["questions"]
    out = {f"question_{q}": (lambda q=q: question_table(q, verdict, questions())) for q in QUESTIONS}
    red = lambda: markdown_table(["model", "share of red objects"], [(m, f"{v:.3f}") for m, v in
                                                             questions()["biased_teacher"]["red_share"].items()])
    detect = lambda: markdown_table(["logged per iteration", "biased − clean", "seeds", "verdict"],
                            [(k, _cell(c), c["n"], verdict(c, 0)) for k, c in
                             questions()["biased_teacher"]["detection"].items()])
    return {**out, "question_cost": lambda: cost_table(questions()), "question_red_share": red,
            "question_biased_detection": detect,
            "answer_mar_units": lambda: units_table(results_dir),
            "answer_routing": lambda: per_seed_table(questions(), "routing", "soft 0.5"),
            "answer_noise": lambda: per_seed_table(questions(), "noise_level", "a 1.2")}


def main(argv=None):
    report(parse_args(argv, __doc__)[0])


if __name__ == "__main__":
    main()
