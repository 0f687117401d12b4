"""
Every command of EXERCISES.md runs, in a reduced form (train.py: a couple of iterations, tiny batches and
few steps, outputs in a temporary folder; eval.py and infer.py: 2 prompts, 2 steps), so no exercise rots.
The full commands take minutes on a CPU; these take seconds each.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = open(os.path.join(ROOT, "EXERCISES.md")).read()
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", TEXT, re.S)
            for line in block.splitlines() if line.strip().startswith("python ")]
TRAIN_REDUCED = ["--grpo_iters", "2", "--prompts_per_iter", "4", "--group_size", "2", "--micro_batch", "8",
                 "--train_timesteps", "1", "--num_steps", "4", "--opd_iters", "1", "--opd_prompts", "3",
                 "--compile", "false", "--device", "cpu", "--eval_at_end", "false", "--snr_batches", "3",
                 "--sft_samples", "4", "--sft_steps", "2"]


def reduced(argv, tmp):
    """The exercise's command with smaller settings appended (argparse keeps a flag's last value) and every
    output redirected to tmp; committed checkpoints are only read."""
    script = argv[1]
    if script == "train.py":
        out = ["--student_dir", f"{tmp}/students", "--cold_start_dir", f"{tmp}/cold", "--runs_dir", f"{tmp}/runs",
               "--results_dir", f"{tmp}/results"]
        if "teachers" in argv:
            out += ["--teacher_dir", f"{tmp}/teachers"]
        return argv + TRAIN_REDUCED + out
    if script == "eval.py":
        return argv + ["--limit", "2", "--steps", "2"]
    if script == "infer.py":
        return argv + ["--steps", "2", "--num_images", "1", "--out", f"{tmp}/samples.png"]
    return argv


def test_exercises_are_numbered_and_each_has_a_command_and_an_answer_kept_apart():
    titles = re.findall(r"^## (\d+)\. (.+)$", TEXT, re.M)
    assert len(titles) >= 10 and [n for n, _ in titles] == [str(i + 1) for i in range(len(titles))]
    for section in re.split(r"^## \d+\. ", TEXT, flags=re.M)[1:]:
        assert "```bash" in section and "**Output.**" in section, section[:80]
        assert "**Expected.**" not in section   # the measured answers live in EXERCISES_ANSWERS.md
    answers = open(os.path.join(ROOT, "EXERCISES_ANSWERS.md")).read()
    assert re.findall(r"^## (\d+)\. (.+)$", answers, re.M) == titles   # one answer per exercise, same titles
    for section in re.split(r"^## \d+\. ", answers, flags=re.M)[1:]:
        assert len(section.split()) > 40, section[:80]   # an answer with its numbers and reason, not a stub


@pytest.mark.parametrize("command", COMMANDS)
def test_exercise_command_runs(command, tmp_path):
    argv = reduced(shlex.split(command), tmp_path)
    argv[0] = sys.executable
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:]
