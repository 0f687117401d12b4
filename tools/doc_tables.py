"""
`python -m tools.doc_tables [--check]`: the tables of README.md, results/RESULTS.md and exercises/ANSWERS.md,
written from results/*.json. A generated table sits between a line `<!-- table NAME -->` and a line
`<!-- /table -->`; this rewrites what lies between them with TABLES[NAME](); --check only says which differ
(exit 1), as tests/test_docs.py does, so a table in the docs can never drift from the results it quotes.

Statistics: a cell over seeds is the mean ± its t-based 95% half-width (n - 1 df, metrics.t_ci95); a claim is a
paired difference per seed (metrics.paired_difference), then over seeds (metrics.over_seeds); its verdict is
read off that interval. The open questions' tables are tools/questions_report's.
"""
import functools
import glob
import json
import os
import re

from support.config import parse_args
from support.metrics import STYLES, markdown_table, over_seeds, paired_difference, table_markdown
from support.provenance import ROOT
from tools import questions_report

DOCS = ("README.md", os.path.join("results", "RESULTS.md"), os.path.join("exercises", "ANSWERS.md"))
BLOCK = re.compile(r"(<!-- table (\S+) -->\n)(.*?)(<!-- /table -->)", re.S)
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def results(name):
    return json.load(open(os.path.join(ROOT, "results", name)))


def seed_runs():
    """{seed: results/seed<S>.json} for every seed present."""
    paths = sorted(glob.glob(os.path.join(ROOT, "results", "seed*.json")))
    return {int(os.path.basename(p)[4:-5]): json.load(open(p)) for p in paths}


# ------------------------------------------------------------------------------------------ the judges
def judges_deqa():
    images = results("judges.json")["images"]["deqa"]
    names = [k for k in images if not k.endswith(", red/blue")]
    cell = lambda k: f"{images[k]['before']:.2f} → {images[k]['after']:.2f}" if k in images else "(a world scene)"
    return markdown_table(["pattern", "black/white: deqa before → after", "red/blue: before → after"],
                          [(k, cell(k), cell(f"{k}, red/blue")) for k in names])


def judges_geneval():
    images = results("judges.json")["images"]["geneval"]
    found = lambda r: f"{r['found'][0] or 'no shape'}, {r['score']:.2f}"
    return markdown_table(["blob", "scored for", "before: found, geneval", "after: found, geneval"],
                          [(k, v["prompt"], found(v["before"]), found(v["after"])) for k, v in images.items()])


def judges_models():
    j = results("judges.json")
    m, arrow = j["models"], lambda r, k, f=".3f": f"{r[k]['before']:{f}} → {r[k]['after']:{f}}"
    return markdown_table(["committed model (before the retrain)", "geneval", "geneval strict", "deqa on composition",
                           "blobs of no shape", "samples with a pattern"],
                          [(row, arrow(r, "geneval"), arrow(r, "strict"), arrow(r, "deqa/geneval", ".2f"),
                            f"{j['no_shape_share'][row]:.3f}", f"{j['pattern_share'][row]:.3f}")
                           for row, r in m.items()])


def judges_retrain():
    r = results("judges.json")["geneval_retrain"]
    cols, fmt = r["columns"], lambda col, x: f"{x:.2f}" if col.startswith("deqa") else f"{x:.3f}"
    return markdown_table(["noise seed", "geneval teacher"] + cols, [(s, row, *(fmt(c, x) for c, x in zip(cols, v)))
                                                            for s in ("0", "1") for row, v in r[s].items()])


def judges_empty():
    e, arrow = results("judges.json")["empty"], lambda d: f"{d['before']:.2f} → {d['after']:.2f}"
    return (markdown_table(["image that draws nothing", "sharp: deqa before → after", "through the autoencoder"],
                           [(k, arrow(v["sharp"]), arrow(v["autoencoded"])) for k, v in e["images"].items()]) + "\n\n" +
            markdown_table(["model: samples of pickscore prompts", "deqa before → after", "samples whose deqa changed"],
                           [(k, arrow(v), f"{v['changed']:.3f}") for k, v in e["models"].items()]))


def calibration():
    c = results("calibration.json")
    cell = lambda v: (f"{v['reward']:.3f} ± {v['ci95']:.3f}", f"{v['flip']:.1%}")
    return markdown_table(["stratum", "ground truth through the AE", "flipped by ±2/255", "model samples",
                           "flipped by ±2/255"], [(k, *cell(v), *cell(c["samples"][k]))
                                                  for k, v in c["ground_truth"].items()])


def style_costs():
    c = results("style_costs.json")["styles"]
    keys = ("clean", "web", "blurred", "deqa/clean", "deqa/web", "deqa/blurred", "web_detected")
    return markdown_table(["stratum", "clean", "web style", "blurred", "deqa clean", "deqa web", "deqa blurred",
                           "web style detected"], [(k, *(f"{v[x]:.2f}" for x in keys)) for k, v in c.items()])


def base_scores():
    """The base's row of main.json, one metric a line (only the evaluation noise varies over its seeds)."""
    m = results("main.json")["rows"]["base"]
    keys = ["geneval_acc"] + [f"geneval_acc/{t}" for t in TAGS] + ["geneval", "ocr", "pickscore", "deqa", "avg",
                                                                     "web/geneval", "web/ocr", "web/pickscore", "blurred"]
    return markdown_table(["metric", "base (mean ± t 95% over noise seeds)", "seeds"],
                          [(k, f"{m[k]['mean']:.3f} ± {m[k]['ci95']:.3f}", m[k]["n"]) for k in keys if k in m])


# ------------------------------------------------------------------------------------ the paper's tables
def main_table(metrics=None):
    """results/main.json over seeds: the shown metrics (table_markdown's), or `metrics`."""
    return table_markdown(results("main.json"), *([metrics] if metrics else []))


def ood_table():
    table = results("ood.json")
    cats = [k for k in next(iter(table["rows"].values())) if not k.startswith("se/")]
    return table_markdown(table, metrics=tuple(cats))


# Claims: (what, row a, row b, metric, sign the claim expects). a - b, paired on the same prompts and noise.
CLAIMS = [
    ("Flow-OPD beats GRPO-Mix", "flow_opd/merge", "grpo_mix", "avg", +1),
    ("Flow-OPD beats its cold start", "flow_opd/merge", "cold_start/merge", "avg", +1),
    ("MAR raises quality", "flow_opd/merge", "flow_opd/merge_no_mar", "deqa", +1),
    ("MAR costs nothing on avg", "flow_opd/merge", "flow_opd/merge_no_mar", "avg", 0),
    ("merge is the better cold start", "cold_start/merge", "cold_start/sft", "avg", +1),
    ("merge is the better start after Flow-OPD", "flow_opd/merge", "flow_opd/sft", "avg", +1),
    ("the student is level with the geneval teacher on its reward", "flow_opd/merge", "teacher/geneval",
     "geneval_acc", 0),
    ("the student is level with the ocr teacher on its reward", "flow_opd/merge", "teacher/ocr", "ocr", 0),
    ("the student is level with the pickscore teacher on its reward", "flow_opd/merge", "teacher/pickscore",
     "pickscore", 0),
    ("the student beats the geneval teacher on avg", "flow_opd/merge", "teacher/geneval", "avg", +1),
    ("the student beats the ocr teacher on avg", "flow_opd/merge", "teacher/ocr", "avg", +1),
    ("the student beats the pickscore teacher on avg", "flow_opd/merge", "teacher/pickscore", "avg", +1),
]
ABLATIONS = [("logratio estimator", "flow_opd/merge_logratio", "flow_opd/merge", "avg", 0),
             ("released estimator", "flow_opd/merge_released", "flow_opd/merge", "avg", 0),
             ("A/B-averaged merge (student)", "flow_opd/merge_average", "flow_opd/merge", "avg", 0),
             ("A/B-averaged merge (cold start)", "cold_start/merge_average", "cold_start/merge", "avg", 0)]


def claim(a, b, metric, runs=None):
    """over_seeds of a - b on metric, over every seed that has both rows."""
    runs = runs if runs is not None else seed_runs()
    diffs = [paired_difference(r["main"][a], r["main"][b])[metric] for r in runs.values()
             if a in r["main"] and b in r["main"]]
    return over_seeds(diffs)


def verdict(c, sign):
    """What the interval says of a claim that a - b has the sign `sign` (0: that they are level)."""
    lo, hi = c["mean"] - c["ci95"], c["mean"] + c["ci95"]
    if c["n"] < 2:
        return "one seed: no interval"
    if lo <= 0 <= hi:
        return "level within the interval" if sign == 0 else "not settled"
    side = "+" if lo > 0 else "−"
    return f"differs ({side})" if sign == 0 else ("holds" if (lo > 0) == (sign > 0) else "reversed")


def _claims(claims):
    runs, out = seed_runs(), []
    for what, a, b, metric, sign in claims:
        c = claim(a, b, metric, runs)
        per = ", ".join(f"{d['mean']:+.3f} ± {d['se']:.3f}" for d in c["per_seed"])
        out.append((what, f"{a} − {b}", metric, per, f"**{c['mean']:+.3f} ± {c['ci95']:.3f}**",
                    f"{c['pooled_se']:.3f}", c["n"], verdict(c, sign)))
    return markdown_table(["claim", "difference", "metric", "per seed (± paired se)", "mean ± t 95%", "pooled se",
                           "seeds", "verdict"], out)


def headline():
    """The main claims as a list: what, the difference, its interval and verdict."""
    runs, out = seed_runs(), []
    for what, a, b, metric, sign in CLAIMS[:6]:
        c = claim(a, b, metric, runs)
        out.append(f"- {what}: {a} − {b} on {metric} {c['mean']:+.3f} ± {c['ci95']:.3f} ({c['n']} seeds): "
                   f"{verdict(c, sign)}.")
    return "\n".join(out)


def estimator_step():
    span = lambda steps, k: f"{min(e[k] for e in steps):.2f}–{max(e[k] for e in steps):.2f}"
    return markdown_table(["estimator", "step KL after each AdamW step", "cosine with pathwise", "norm / pathwise"],
                          [(est, " → ".join(f"{e['kl']:.2f}" for e in steps), span(steps, "cos_with_pathwise"),
                            span(steps, "norm_ratio_to_pathwise")) for est, steps in results("estimator_step.json")["rows"].items()])


def minutes():
    runs = seed_runs()
    rows = list(dict.fromkeys(r for run in runs.values() for r in run.get("minutes", {})))   # first-seen order
    return markdown_table(["stage"] + [f"seed {s}" for s in runs],
                          [(r, *(f"{run['minutes'][r]:.1f}" if r in run.get("minutes", {}) else ""
                                 for run in runs.values())) for r in rows])


# Exercise answers (exercises/ANSWERS.md) that the 3-seed tables answer: (what, a, b, metric, sign) as CLAIMS.
ANSWERS = {
    "answer_mar": [("MAR on, minus off: quality", "flow_opd/merge", "flow_opd/merge_no_mar", "deqa", 0),
                   ("MAR on, minus off: avg", "flow_opd/merge", "flow_opd/merge_no_mar", "avg", 0)],
    "answer_merge_average": [
        ("A/B averaging minus exact ΔW: cold start", "cold_start/merge_average", "cold_start/merge", "avg", 0),
        ("A/B averaging minus exact ΔW: student", "flow_opd/merge_average", "flow_opd/merge", "avg", 0),
        ("distillation's gain from the A/B start", "flow_opd/merge_average", "cold_start/merge_average", "avg", +1),
        ("distillation's gain from the exact merge", "flow_opd/merge", "cold_start/merge", "avg", +1)],
    "answer_estimators": [("released minus pathwise", "flow_opd/merge_released", "flow_opd/merge", "avg", 0),
                          ("logratio minus pathwise", "flow_opd/merge_logratio", "flow_opd/merge", "avg", 0)],
    "answer_cold_starts": [("merge minus SFT, cold starts", "cold_start/merge", "cold_start/sft", "avg", 0),
                           ("merge minus SFT, after Flow-OPD", "flow_opd/merge", "flow_opd/sft", "avg", 0),
                           ("distillation's gain from the merge", "flow_opd/merge", "cold_start/merge", "avg", +1),
                           ("distillation's gain from SFT", "flow_opd/sft", "cold_start/sft", "avg", +1)],
}


def answer_seesaw():
    """Exercise 8: the deqa teacher minus the base on every task (results/exercises/seesaw.json)."""
    t = results(os.path.join("exercises", "seesaw.json"))
    d, rows = t["paired"]["deqa"][0], t["rows"]
    keys = ("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")
    share = ("web/geneval", "web/ocr", "web/pickscore", "blurred")
    return (markdown_table(["deqa teacher − base (paired)"] + list(keys), [("mean ± se", *(
        f"{d[k]['mean']:+.3f} ± {d[k]['se']:.3f}" for k in keys))]) + "\n\n" +
            markdown_table(["style share"] + list(share), [(r, *(f"{rows[r][k]['mean']:.2f}" for k in share))
                                                  for r in ("base", "deqa")]))


def answer_snr():
    """Exercise 9: the signal share kappa of one GRPO gradient per reward (results/exercises/grpo_snr.json)."""
    rows = results(os.path.join("exercises", "grpo_snr.json"))["rows"]
    return markdown_table(["reward", "kappa ± se", "batches for SNR 1", "batches measured", "seconds per batch"],
                          [(k, f"{r['kappa']:.3f} ± {r['se']:.3f}", f"{r['batches_for_snr1']:.0f}", r["batches"],
                            f"{r['seconds_per_batch']:.1f}") for k, r in rows.items()])


def answer_group_size():
    """Exercise 7: G = 2 OCR teachers' zero-spread share and their OCR minus the base's, paired (group_size.json)."""
    runs, base = results(os.path.join("exercises", "group_size.json")), seed_runs()
    return markdown_table(["seed", "mean zero_std_frac", "teacher ocr", "base ocr", "teacher − base (paired)"], [(
        s, f"{sum(r['zero_std_frac']) / len(r['zero_std_frac']):.3f}", f"{r['teacher']['ocr']:.3f}",
        f"{base[int(s)]['main']['base']['ocr']:.3f}", "{mean:+.3f} ± {se:.3f}".format(**paired_difference(
            r["teacher"], base[int(s)]["main"]["base"])["ocr"])) for s, r in runs.items()])


def main_job():
    j = results("main_job.json")
    metrics = ("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")
    fmt = lambda m, k, sign="": (f"{m[k]:{sign}.2f}" if k == "deqa" else f"{m[k]:{sign}.3f} ± {m['se/' + k]:.3f}")
    rows = [(row, *(fmt(m, k) for k in metrics)) for row, m in j["rows"].items()]
    d = j["paired"]
    rows.append(("student − cold start (paired)", *(f"{d[k]['mean']:+.2f}" if k == "deqa" else
                                                      f"{d[k]['mean']:+.3f} ± {d[k]['se']:.3f}" for k in metrics)))
    return (markdown_table(["model"] + ["deqa (1–5)" if k == "deqa" else k for k in metrics], rows) +
            f"\n\n`{j['command']}`: {j['minutes']:.1f} min from start to the student's scores.")


TABLES = {f.__name__: f for f in (judges_deqa, judges_geneval, judges_models, judges_retrain, judges_empty, calibration,
                                  style_costs, base_scores, main_table, ood_table, headline, main_job, estimator_step,
                                  minutes, answer_seesaw, answer_snr, answer_group_size)}
TABLES.update(questions_report.tables(os.path.join(ROOT, "results"), verdict),
              per_tag=functools.partial(main_table, tuple(f"geneval_acc/{t}" for t in TAGS)),
              styles=functools.partial(main_table, STYLES), claims=functools.partial(_claims, CLAIMS),
              ablations=functools.partial(_claims, ABLATIONS), **{n: functools.partial(_claims, r) for n, r in ANSWERS.items()})


def render(text):
    """text with every generated table rewritten; an unknown table name is an error that lists the known ones."""
    def one(m):
        if m.group(2) not in TABLES:
            raise KeyError(f"no table {m.group(2)!r} in tools/doc_tables.py (known: {', '.join(TABLES)})")
        return m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4)
    return BLOCK.sub(one, text)


def main(argv=None):
    _, args = parse_args(argv, __doc__, lambda g: g.add_argument(
        "--check", action="store_true", help="only say which documents differ (exit 1), write nothing"))
    check, stale = args.check, []
    for doc in DOCS:
        path = os.path.join(ROOT, doc)
        text = open(path).read()
        new = render(text)
        if new != text:
            stale.append(doc)
            if not check:
                open(path, "w").write(new)
    print(("stale: " if check else "rewrote: ") + (", ".join(stale) or "nothing"))
    if check and stale:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
