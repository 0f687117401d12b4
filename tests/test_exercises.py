"""
Every command of exercises/EXERCISES.md runs, in a reduced form, so no exercise rots: train.py and the tools
with a couple of iterations, tiny batches and few steps, outputs in a temporary folder; eval.py with 2
prompts and 2 steps. They run in this process (the entry point's main(argv), a self-check through runpy),
not as subprocesses: the import of torch and diffusers is paid once. The full commands take minutes on a
CPU; these take seconds each.
"""
import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys

import pytest

import eval as eval_py
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = open(os.path.join(ROOT, "exercises", "EXERCISES.md")).read()
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", TEXT, re.S)
            for line in block.splitlines() if line.strip().startswith("python ")]
TRAIN_REDUCED = ["--grpo_iters", "2", "--prompts_per_iter", "4", "--group_size", "2", "--micro_batch", "8",
                 "--train_timesteps", "1", "--num_steps", "4", "--opd_iters", "1", "--opd_prompts", "3",
                 "--compile", "false", "--device", "cpu", "--eval_at_end", "false", "--snr_batches", "3",
                 "--sft_samples", "4", "--sft_steps", "2"]


def reduced(argv, tmp):
    """The exercise's flags with smaller settings appended (argparse keeps a flag's last value) and every
    output redirected to tmp; committed checkpoints are only read."""
    out = ["--student_dir", f"{tmp}/students", "--cold_start_dir", f"{tmp}/cold", "--runs_dir", f"{tmp}/runs",
           "--results_dir", f"{tmp}/results"]
    if "teachers" in argv:
        out += ["--teacher_dir", f"{tmp}/teachers"]
    return argv + TRAIN_REDUCED + out


def run_command(command, tmp):
    """Run one `python ...` line of the exercises here, its output captured; returns what it printed."""
    argv = shlex.split(command)[1:]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        if argv[0] == "-c":
            exec(compile(argv[1], "<exercise>", "exec"), {})
        elif argv[0] == "train.py":
            train.main(reduced(argv[1:], tmp))
        elif argv[0] == "eval.py":
            eval_py.main(argv[1:] + ["--eval_prompts_per_task", "2", "--eval_steps", "2"])
        elif argv[:2] == ["-m", "pytest"]:   # the selection exists; the suite itself runs those tests
            out = subprocess.run([sys.executable, *argv, "--collect-only"], cwd=ROOT, capture_output=True,
                                 text=True, timeout=120)
            assert out.returncode == 0 and "::" in out.stdout, out.stdout[-1500:] + out.stderr[-1500:]
            print(out.stdout)
        elif argv[0] == "-m":
            module = sys.modules.get(argv[1]) or __import__(argv[1], fromlist=["main"])
            module.main(reduced(argv[2:], tmp))
        else:   # a paper file's self-check
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
    return printed.getvalue()


def test_exercises_are_numbered_and_each_has_a_command_and_an_answer_kept_apart():
    titles = re.findall(r"^## (\d+)\. (.+)$", TEXT, re.M)
    assert len(titles) >= 10 and [n for n, _ in titles] == [str(i + 1) for i in range(len(titles))]
    for section in re.split(r"^## \d+\. ", TEXT, flags=re.M)[1:]:
        assert "```bash" in section and "**Output.**" in section, section[:80]
        assert "**Expected.**" not in section   # the measured answers live in exercises/ANSWERS.md
    answers = open(os.path.join(ROOT, "exercises", "ANSWERS.md")).read()
    assert re.findall(r"^## (\d+)\. (.+)$", answers, re.M) == titles   # one answer per exercise, same titles
    for section in re.split(r"^## \d+\. ", answers, flags=re.M)[1:]:
        assert len(section.split()) > 40, section[:80]   # an answer with its numbers and reason, not a stub


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_exercise_command_runs(command, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)   # the commands name committed files relative to the repository root
    assert run_command(command, tmp_path).strip()   # it printed its answer
