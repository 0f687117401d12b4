"""
From per-prompt scores to the numbers reported (Flow-OPD §4-5's metrics; eval.py's protocol makes the scores):
the metrics and their standard errors (`summarise_prompts`), paired differences of two models
(`paired_difference`), tables over seeds (`summarise`, `write_table`, `table_markdown`: results/main.json and
ood.json) and the lines the stages print. The metric definitions and why the errors are clustered by prompt
are in eval.py's docstring. Table schema: {"rows": {ROW: {METRIC: {"mean", "std", "n"}}}, "meta": {...}}; its
std is over seeds (training and noise), while se/<metric> is over prompts and noise for one model.
"""
import json
import math
import os
import time

import torch

from world import toy_world


def write_json(path, obj):
    """Write, then rename: a crash leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# Tables over seeds: {"rows": {ROW: {METRIC: {"mean", "std", "se": std/√n, "ci95", "n": seeds}}}, "meta": {...}}

def t_ci95(se, n):
    """Half-width of the two-sided 95% interval of a mean of n values with standard error se: Student's t with
    n - 1 degrees of freedom (4.30 se for three seeds, not 1.96 se); nan for n < 2."""
    from scipy.stats import t   # scipy comes with the world's judges (ndimage)
    return float(t.ppf(0.975, n - 1) * se) if n > 1 else math.nan


def summarise(per_seed):
    """{row: [metrics of seed 0, seed 1, ...]} -> {row: {metric: {mean, std, se, ci95, n}}} (std: sample std
    over seeds, 0 if n = 1; se = std/√n, the standard error of the mean over seeds; ci95 = t_ci95(se, n));
    only numeric entries (not per_prompt or settings)."""
    rows = {}
    for row, runs in per_seed.items():
        rows[row] = {}
        for k, v in runs[0].items():
            if not isinstance(v, (int, float)):
                continue
            x = torch.tensor([r[k] for r in runs if k in r], dtype=torch.float64)
            std = x.std().item() if len(x) > 1 else 0.0
            se = std / len(x) ** 0.5
            rows[row][k] = {"mean": x.mean().item(), "std": std, "se": se, "ci95": t_ci95(se, len(x)), "n": len(x)}
    return rows


def over_seeds(diffs):
    """A paired difference over training seeds, diffs = [{"mean", "se"} of each seed (paired_difference)]:
    {"mean", "se": std over seeds/√n, "ci95": t_ci95(se, n), "pooled_se": sqrt(mean of se²)/√n (the
    within-seed sampling error of the mean alone), "n", "per_seed"}. The t interval is the one to judge a claim
    by: it counts the seed-to-seed spread that training adds."""
    x = torch.tensor([d["mean"] for d in diffs], dtype=torch.float64)
    n = len(diffs)
    se = (x.std() / n ** 0.5).item() if n > 1 else math.nan
    pooled = math.sqrt(sum(d["se"] ** 2 for d in diffs) / n) / n ** 0.5
    return {"mean": x.mean().item(), "se": se, "ci95": t_ci95(se, n), "pooled_se": pooled, "n": n, "per_seed": diffs}


def write_table(path, per_seed, meta):
    """Write {"rows": summarise(per_seed), "meta": meta} to path (atomically) and return it."""
    table = {"rows": summarise(per_seed), "meta": meta}
    write_json(path, table)
    return table


def table_markdown(table, metrics=("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")):
    """A markdown table of the mean over seeds ± the t-based 95% interval (ci95; ± 0 for one seed), and the
    number of seeds (the rows and metrics of a written table)."""
    lines = ["| | " + " | ".join(metrics) + " | seeds |", "|---" * (len(metrics) + 2) + "|"]
    for row, m in table["rows"].items():
        half = lambda c: 0.0 if c["n"] < 2 else c["ci95"]
        cells = [f"{m[k]['mean']:.3f} ± {half(m[k]):.3f}" if k in m else "" for k in metrics]
        n = max((c["n"] for c in m.values()), default=0)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def markdown_table(header, rows):
    """A markdown table: the header's cells, then one line per row (each cell str()'d)."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def scalars(m):
    """The numbers of an evaluate() result (for logs), without per_prompt and settings."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float))}


SHOWN = ("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg")
STYLES = ("web/geneval", "web/ocr", "web/pickscore", "blurred")   # the world's style shares (world/styles.py)


def format_metrics(name, m):
    """One line: each shown metric as mean ± se (deqa on 1-5 with 2 decimals)."""
    cells = [f"{k} {m[k]:.{2 if k == 'deqa' else 3}f}" + (f"±{m['se/' + k]:.{2 if k == 'deqa' else 3}f}"
                                                           if f"se/{k}" in m else "") for k in SHOWN if k in m]
    styles = [f"{k} {m[k]:.2f}" for k in STYLES if k in m]
    return f"{name:<22} " + "  ".join(cells) + (f"\n{'':<22} styles: " + "  ".join(styles) if styles else "")


def format_paired(name, diff):
    """One line of paired differences: each shown metric as mean ± se, signed."""
    return f"{name:<22} " + "  ".join(f"{k} {diff[k]['mean']:+.3f}±{diff[k]['se']:.3f}" for k in SHOWN if k in diff)


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
    for task, p in tasks.items():   # the world's style shares (eval.score_task), per task and blur pooled
        if "web" in p:
            put(f"web/{task}", [(1.0, p["web"])])
    if all("blurred" in p for p in tasks.values()) and tasks:
        put("blurred", [(len(per_prompt[t]["index"]) / total, p["blurred"]) for t, p in tasks.items()])
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


def read_jsonl(path):
    """The entries of a JSON-lines log (jsonl_logger's), [] if there is none yet."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(s) for s in f if s.strip()]


def jsonl_logger(path, fresh=False):
    """log(**metrics) appends one JSON line to path, opening the file per line: nothing lost on a crash.
    fresh: a new run, so an existing log is first renamed to <name>-<its last write time>.jsonl (kept, not
    appended to: one run per file, and a resumed run passes fresh=False to continue its own)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fresh and os.path.isfile(path):
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        root, ext = os.path.splitext(path)
        os.replace(path, f"{root}-{stamp}{ext}")

    def log(**metrics):
        with open(path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    return log
