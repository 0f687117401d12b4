"""
The paper's open questions (Flow-OPD §5-6) in the miniature world: per question, Flow-OPD runs that differ from
the main job in one setting, trained per seed, scored on the main protocol (noise seed = the run's seed) and
compared, paired, with the main job's configuration of the same seed (run `default`).

    python -m tools.questions --question teacher_count --seed 0     train what is missing, evaluate, record
    python -m tools.questions_report                                  results/questions.json and figures

  teacher_count    1-4 routed teachers: geneval, + ocr, + pickscore (the main job), + deqa as a task of its own
                   (router.QUALITY_TASK_WEIGHT: a quarter-share of prompts drawn from every dataset). Why deqa and
                   not a fifth task: it is the paper's own fourth expert, trained on all three datasets, while a
                   fifth task would need a new prompt set, reward, judge calibration and teacher first.
  biased_teacher   the geneval teacher swapped for geneval_red (support/teachers.BIASED: its judge wants every
                   object red), with MAR at the paper's λ, off, and at 0.2; the detection signal is in the runs'
                   logs (reward/<task> of the student's own samples and kl/<teacher>, train.opd_iteration)
  routing          hard vs soft routing (ε = 0.5, router.target_velocity), clean and with the biased teacher
  mar              the anchor (deqa teacher, base, pickscore teacher) and λ (0, 0.02, 0.05, 0.2)
  noise_level      the SDE's noise level a at 1.2 instead of the paper's 0.7 (exercise 6; exercise 5 reads routing)
  guidance         peers' options (not the paper's): the geneval teacher's velocities at CFG 1 (a public OPD
                   config), and training without CFG (guidance 1 everywhere); evaluated at the main protocol's CFG
  cold_start_cost  merge (exact ΔW), merge_average (A/B means), sft: CPU seconds, peak memory and samples drawn to
                   build each (a fresh process per measurement), its score, and its student's (tools.paper_tables'
                   rows of the same seed, the missing merge_average one trained here)

Runs live in runs/questions/seed<S>/ (each with its own cold start), checkpoint every 10 iterations and resume; a
saved student is not retrained; two processes may share the work (a lock per run). The report reads only committed
records: results/questions/seed<S>/<run>.json (evaluation, log, sha256, command), cold_start_cost.json. Intervals
over seeds are t-based (metrics.over_seeds). About 4 CPU-minutes a run (two at a time, one thread each).
"""
import dataclasses
import glob
import json
import os
import resource
import subprocess
import sys
import time

import torch

from eval import evaluate_cached
from rewards import REWARDS_VERSION
from support import models
from support.config import parse_args
from support.metrics import read_jsonl, write_json
from support.provenance import this_command, weights_sha256
from support.resolve import eval_settings, load_model
from support.teachers import load_teachers
from train import make_student, stage_distill, stage_teachers

BIASED_TEACHER = "geneval_red"
# The committed geneval teacher's recipe (its provenance.json) but 300 iterations, not 100: at 100 the biased reward
# had only begun to rise (flat for 80 iterations) and the teacher drew no more red than the base (results/HISTORY.md).
BIASED_ITERS = 300
METRICS = ("geneval_acc", "geneval", "ocr", "pickscore", "deqa", "avg", "geneval_acc/colors", "geneval_acc/color_attr")


def biased(cfg, **kw):
    """Overrides of a run whose geneval route goes to the biased teacher (the others are the committed ones)."""
    spec = lambda task, folder: f"{task}={os.path.join(cfg.teacher_dir, folder)}"
    return dict(teacher=[spec("geneval", BIASED_TEACHER)] + [spec(t, t) for t in ("ocr", "pickscore", "deqa")], **kw)


def runs(cfg):
    """run name -> overrides of the distill stage (the defaults are the main job's)."""
    pick = os.path.join(cfg.teacher_dir, "pickscore")
    return {"default": {}, "routes_1": dict(routes=["geneval"]), "routes_2": dict(routes=["geneval", "ocr"]),
            "routes_4": dict(routes=["geneval", "ocr", "pickscore", "deqa"]),
            "biased": biased(cfg), "biased_no_mar": biased(cfg, mar_anchor="none"),
            "biased_mar_0.2": biased(cfg, mar_lambda=0.2), "soft": dict(soft_routing=0.5),
            "biased_soft": biased(cfg, soft_routing=0.5),
            "mar_deqa_0.05": dict(mar_lambda=0.05), "mar_deqa_0.2": dict(mar_lambda=0.2),
            "mar_base_0.02": dict(mar_anchor="base"), "mar_base_0.2": dict(mar_anchor="base", mar_lambda=0.2),
            "mar_pickscore_0.02": dict(mar_anchor=pick), "mar_pickscore_0.2": dict(mar_anchor=pick, mar_lambda=0.2),
            "merge_average": dict(cold_start="merge_average"),
            "geneval_cfg_1": dict(teacher_guidance=["geneval=1.0"]), "no_cfg": dict(guidance_scale=1.0),
            "noise_1.2": dict(noise_level=1.2)}


# question -> {row: where its scores come from}, the reference row first. "run:NAME" is a run of runs();
# "paper:ROW" a row of tools.paper_tables' results/seed<S>.json; "cold:NAME" the cold start of run NAME; a list
# is tried in order (paper_tables trains merge_average on seeds 0 and 1 only).
QUESTIONS = {
    "teacher_count": {"3 teachers (main job)": "run:default", "1 teacher (geneval)": "run:routes_1",
                      "2 teachers (+ ocr)": "run:routes_2", "4 teachers (+ deqa)": "run:routes_4"},
    "biased_teacher": {"clean": "run:default", "biased": "run:biased", "biased, no MAR": "run:biased_no_mar",
                       "biased, MAR λ 0.2": "run:biased_mar_0.2", "clean, no MAR": "paper:flow_opd/merge_no_mar"},
    "routing": {"hard": "run:default", "soft 0.5": "run:soft", "biased, hard": "run:biased",
                "biased, soft 0.5": "run:biased_soft"},
    "mar": {"deqa, λ 0.02 (paper)": "run:default", "λ 0 (no MAR)": "paper:flow_opd/merge_no_mar",
            "deqa, λ 0.05": "run:mar_deqa_0.05", "deqa, λ 0.2": "run:mar_deqa_0.2", "base, λ 0.02": "run:mar_base_0.02",
            "base, λ 0.2": "run:mar_base_0.2", "pickscore, λ 0.02": "run:mar_pickscore_0.02",
            "pickscore, λ 0.2": "run:mar_pickscore_0.2"},
    # not in the paper's discussion: peers' settings (issue 22), each student evaluated at the main protocol's CFG
    "guidance": {"CFG 4.5 everywhere (main job)": "run:default", "geneval teacher at CFG 1": "run:geneval_cfg_1",
                 "no CFG in training": "run:no_cfg"},
    # exercise 6 (exercise 5 reads "routing"): the SDE's a in sigma_t = a sqrt(t / (1 - t)), the paper's 0.7 first
    "noise_level": {"a 0.7 (paper, main job)": "run:default", "a 1.2": "run:noise_1.2"},
    "cold_start_cost": {"merge → student": "paper:flow_opd/merge", "sft → student": "paper:flow_opd/sft",
                        "merge_average → student": ["paper:flow_opd/merge_average", "run:merge_average"],
                        "merge (cold start)": "paper:cold_start/merge", "sft (cold start)": "paper:cold_start/sft",
                        "merge_average (cold start)": ["paper:cold_start/merge_average", "cold:merge_average"]},
}
COLD_STARTS = ("merge", "merge_average", "sft")


run_dir = lambda cfg, seed: os.path.join(cfg.runs_dir, "questions", f"seed{seed}")
record_path = lambda cfg, seed, name: os.path.join(cfg.results_dir, "questions", f"seed{seed}", f"{name}.json")
lock_path = lambda cfg, name: os.path.join(run_dir(cfg, cfg.seed), f"{name}.lock")


def train_run(cfg, name):
    """Distil run `name` for cfg.seed unless its student is saved; checkpoints every 10 iterations, resumes."""
    root = run_dir(cfg, cfg.seed)
    student = os.path.join(root, "students", name)
    if os.path.isdir(os.path.join(student, "adapter")):
        return student
    overrides = runs(cfg)[name]
    if overrides.get("teacher") and not os.path.isdir(os.path.join(cfg.teacher_dir, BIASED_TEACHER)):
        stage_teachers(dataclasses.replace(cfg, grpo_iters=BIASED_ITERS, seed=0, checkpoint_every=20,
                                           resume_from_checkpoint="latest", eval_at_end=False), [BIASED_TEACHER])
    resume = "latest" if glob.glob(os.path.join(student, "checkpoint-*")) else ""
    t0 = time.time()
    stage_distill(dataclasses.replace(cfg, name=name, student_dir=os.path.join(root, "students"),
                                      cold_start_dir=os.path.join(root, "cold_start", name), eval_at_end=False,
                                      checkpoint_every=10, checkpoints_total_limit=1, resume_from_checkpoint=resume,
                                      **overrides))
    write_json(os.path.join(student, "minutes.json"), {"minutes": (time.time() - t0) / 60, "resumed": bool(resume)})
    return student


def record_run(cfg, model, name):
    """results/questions/seed<S>/<name>.json: the student's (and for merge_average its cold start's) evaluation,
    the run's training log, the weights' sha256 and the command; the evaluations are cached in the run folder."""
    root, kw = run_dir(cfg, cfg.seed), eval_settings(cfg)
    student = os.path.join(root, "students", name)
    out = {"command": f"python -m tools.questions --seed {cfg.seed} (run {name}: {runs(cfg)[name]})",
           "recorded_by": this_command(), "rewards": REWARDS_VERSION, "log": [e for e in read_jsonl(os.path.join(student, "train_log.jsonl"))
                                                  if e.get("stage") == "distill"],
           **json.load(open(os.path.join(student, "minutes.json")))}
    folders = {"student": os.path.join(student, "adapter")}
    if name in COLD_STARTS:
        folders["cold_start"] = os.path.join(root, "cold_start", name, runs(cfg)[name]["cold_start"])
    for part, folder in folders.items():
        adapter = f"{name}_{part}".replace(".", "_")   # one adapter per run and part on the one backbone
        model.load_adapter(folder, adapter)
        out[part] = evaluate_cached(model, adapter, folder, **kw)
        out[f"sha256/{part}"] = weights_sha256(folder)
    write_json(record_path(cfg, cfg.seed, name), out)


def claim(cfg, name):
    """Whether this process may train run `name` of cfg.seed now: two questions share runs (default, biased) and
    two processes run at a time, so a run is claimed by a lock file holding the pid; a dead process's lock is
    taken over. False while another live process holds it."""
    path = lock_path(cfg, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path, "x") as f:
            f.write(str(os.getpid()))
        return True
    except FileExistsError:
        pid = open(path).read().strip()
        if pid and os.path.exists(f"/proc/{pid}"):
            return False
        os.remove(path)
        return claim(cfg, name)


def current(path):
    """Whether a record (or tools.paper_tables' results/seed<S>.json) at `path` was scored by these rewards
    (rewards.REWARDS_VERSION): one of older judges counts as missing, so its run is trained and scored again
    rather than paired with rows of other judges."""
    return os.path.isfile(path) and json.load(open(path)).get("rewards") == REWARDS_VERSION


def paper_rows(cfg, seed):
    """tools.paper_tables' rows of `seed` scored by these rewards ({} where there are none)."""
    path = os.path.join(cfg.results_dir, f"seed{seed}.json")
    return json.load(open(path))["main"] if current(path) else {}


def pending_runs(cfg, question, paper):
    """The runs `question` needs for cfg.seed that are not recorded yet (a paper_tables row present is used)."""
    out = []
    for spec in QUESTIONS[question].values():
        for s in (spec if isinstance(spec, list) else [spec]):
            kind, what = s.split(":", 1)
            if kind == "paper" and what in paper:
                break
            if kind in ("run", "cold"):
                if not current(record_path(cfg, cfg.seed, what)) and what not in out:
                    out.append(what)
                break
    return out


def run_question(cfg, question):
    """Train and record every run `question` needs for cfg.seed; a run another process is training is left for
    later, and waited for at the end."""
    paper, model = paper_rows(cfg, cfg.seed), None   # tools.paper_tables' rows, where they exist
    while todo := pending_runs(cfg, question, paper):
        mine = next((name for name in todo if claim(cfg, name)), None)
        if mine is None:
            print(f"seed {cfg.seed}: {', '.join(todo)} are being trained by another process; waiting", flush=True)
            time.sleep(30)
            continue
        train_run(cfg, mine)
        model = model or models.load_world_model(cfg.base, cfg.device)
        record_run(cfg, model, mine)
        os.remove(lock_path(cfg, mine))
    if question == "cold_start_cost":
        measure_costs(cfg)


# ------------------------------------------------------------------ the cold starts' cost (fresh processes)

def measure_one(cfg, kind):
    """Build cold start `kind` from the committed teachers in a temporary folder and print its cost as JSON:
    CPU seconds (this process, all threads), wall seconds, the peak resident memory above what the base and
    teachers take, and the images drawn to build it."""
    model = load_model(cfg)
    teachers, _, sources = load_teachers(model, dataclasses.replace(cfg, mar_anchor="none"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    folder = os.path.join(cfg.runs_dir, "questions", "cost", f"seed{cfg.seed}")
    c0, w0 = time.process_time(), time.time()
    make_student(model, dataclasses.replace(cfg, cold_start=kind, cold_start_dir=folder), teachers, sources)
    cpu, wall = time.process_time() - c0, time.time() - w0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "peak_mb_above_models": peak - before, "peak_mb": peak,
                      "samples": cfg.sft_samples * len(teachers) if kind == "sft" else 0,
                      "threads": torch.get_num_threads()}))


def measure_costs(cfg):
    """results/questions/cold_start_cost.json: each cold start built in a fresh process (the seed's entry is kept)."""
    path = os.path.join(cfg.results_dir, "questions", "cold_start_cost.json")
    table = json.load(open(path)) if os.path.isfile(path) else {}
    for kind in COLD_STARTS:
        if str(cfg.seed) in table.get(kind, {}):
            continue
        folder = os.path.join(cfg.runs_dir, "questions", "cost", f"seed{cfg.seed}", kind)
        subprocess.run(["rm", "-rf", folder], check=True)   # measured from scratch, never reused
        same = [f"--{k}={getattr(cfg, k)}" for k in ("seed", "base", "teacher_dir", "runs_dir", "sft_samples",
                                                      "sft_steps", "lora_rank", "lora_alpha", "guidance_scale")]
        out = subprocess.run([sys.executable, "-m", "tools.questions", "--measure_cold_start", kind, *same],
                             capture_output=True, text=True, check=True).stdout
        table.setdefault(kind, {})[str(cfg.seed)] = json.loads(out.strip().splitlines()[-1])
        write_json(path, {**table, "command": "python -m tools.questions --question cold_start_cost --seed S"})


def main(argv=None):
    def flags(g):
        g.add_argument("--question", choices=list(QUESTIONS), help="train and record this question's runs for --seed")
        g.add_argument("--measure_cold_start", choices=COLD_STARTS,
                       help="build one cold start and print its cost (measure_costs runs it in a fresh process)")
    cfg, args = parse_args(argv, __doc__, flags)
    if args.measure_cold_start:
        measure_one(cfg, args.measure_cold_start)
    elif args.question:
        run_question(cfg, args.question)
    else:
        raise SystemExit("say which question: --question Q --seed S (then python -m tools.questions_report)")


if __name__ == "__main__":
    main()
