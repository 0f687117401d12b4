"""
Every command of exercises/EXERCISES.md runs, in a reduced form, so no exercise rots: train.py and the tools
with a couple of iterations, tiny batches and few steps, outputs in a temporary folder; eval.py with 2
prompts and 2 steps. They run in this process (the entry point's main(argv), a self-check through runpy),
not as subprocesses: the import of torch and diffusers is paid once. The full commands take minutes on a
CPU; these take seconds each.
"""
import ast
import contextlib
import functools
import io
import json
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
                 "--sft_samples", "4", "--sft_steps", "2", "--eval_prompts_per_task", "2", "--eval_steps", "2",
                 "--eval_images_per_prompt", "1"]   # tools.questions evaluates what it trains


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


# ------------------------------------------------------------------------------------------------
# The deterministic numbers of exercises/ANSWERS.md: those that follow from the maths or from a fixed-seed
# self-check, or are read off committed files, without a training run. Each test reads the number from
# the answer's own text, recomputes it with the project's functions (or runs the exercise's command and
# reads its printed line) and asserts that the text quotes it to its printed precision, so the answers
# cannot drift from the code. The measured scores of trainings are left to their runs.
# ------------------------------------------------------------------------------------------------
ANSWERS = open(os.path.join(ROOT, "exercises", "ANSWERS.md")).read()


def section(text, n):
    """Exercise n's section of EXERCISES.md or ANSWERS.md, raw (its code blocks keep their lines)."""
    found = re.search(rf"^## {n}\. .*?(?=^## |\Z)", text, re.M | re.S)
    assert found, f"no exercise {n}"
    return found.group(0)


def quoted(n, pattern):
    """The groups that regex `pattern` captures in exercise n's answer, its whitespace collapsed (a quote may
    span lines); fails, naming the pattern, when the answer no longer says it."""
    found = re.search(pattern, " ".join(section(ANSWERS, n).split()))
    assert found, f"exercise {n}'s answer no longer says {pattern!r}"
    return found.groups()


def agrees(value, text):
    """Whether the quoted text ('0.61', '5.0e-6', '65,536', '5') is value rounded to the digits it shows:
    |value − quoted| < half a unit of its last digit. Strict, so that a number read off a printed line is
    quoted as printed, not rounded a second time (0.805 is not '0.81' when the value is 0.8048)."""
    mantissa, _, exponent = text.replace(",", "").lower().partition("e")
    half = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    return abs(value - float(text.replace(",", ""))) < half


def commands(n):
    """The `python ...` lines of exercise n in EXERCISES.md, in order."""
    return [line.strip() for block in re.findall(r"```bash\n(.*?)```", section(TEXT, n), re.S)
            for line in block.splitlines() if line.strip().startswith("python ")]


@functools.lru_cache(maxsize=None)
def printed_by(command):
    """What one of the exercises' no-training commands prints (run once per session, from the root)."""
    with contextlib.chdir(ROOT):
        return run_command(command, None)


def test_answer_1_kl_identity_error_and_equal_policies():
    """Exercise 1: `python opd_loss.py` prints the two KL rows (gaussian_kl of the two steps and
    kl_weight·‖Δv‖²), their max relative error and the KL of equal policies. The answer says the rows agree
    in every printed digit, quotes the error (about 5e-6, float32's cancellation of the two means' x_t terms)
    and says equal policies give exactly 0."""
    out = printed_by(commands(1)[0])
    rows = re.findall(r"^(?:gaussian_kl|w\(t\)·‖Δv‖²)\s+(tensor\(\[.*?\]\))", out, re.M)
    rel = float(re.search(r"max rel err (\S+)", out).group(1))
    equal = ast.literal_eval(re.search(r"KL of equal policies: (\[.*?\])", out).group(1))
    (error,) = quoted(1, r"two rows agree in every printed digit, with a maximum relative error of about (\S+) in")
    assert len(rows) == 2 and rows[0] == rows[1], rows
    # float32 rounding: its size is the claim, its last digits depend on the CPU's kernels (within 2x here)
    assert float(error) / 2 <= rel <= 2 * float(error), f"the self-check prints max rel err {rel:.3g}, the answer quotes {error}"
    assert quoted(1, r"(equal policies give exactly 0)") and equal == [0.0] * len(equal), equal


def test_answer_1_term_ratio_is_a_squared_over_two():
    """Exercise 1's follow-up: the ratio of w(t)'s two terms, σ_t(1−t)/(2t) over 1/σ_t, printed by the
    self-check at three times for its a = 0.7, is a²/2 = 0.245 at each, the value and times the answer quotes."""
    line = re.search(r"over 1/σ_t at t = (.*?): (\[.*?\])", printed_by(commands(1)[0]))
    value, *times = quoted(1, r"is a²/2 at every t \((\S+) printed at t = (\S+), (\S+) and (\S+)\)")
    assert [float(t) for t in line.group(1).split(",")] == [float(t) for t in times], line.group(0)
    ratios = ast.literal_eval(line.group(2))
    assert all(agrees(r, value) for r in ratios), f"printed {ratios}, the answer quotes {value}"


def test_answer_4_averaged_factors_on_random_loras():
    """Exercise 4: `python cold_start.py` prints the relative error of B̄Ā (merge_average, the released
    A/B average) against the mean of B·A on three random rank-2 LoRAs; the answer quotes it."""
    printed = re.search(r"rel\. error of B̄Ā vs mean\(BA\) = (\S+)", printed_by(commands(4)[0])).group(1)
    (value,) = quoted(4, r"relative error of B̄Ā against the mean of B·A is (\d\S*\d)")
    assert agrees(float(printed), value), f"cold_start.py prints {printed}, the answer quotes {value}"


def test_answer_4_averaged_factors_on_the_committed_teachers():
    """Exercise 4: the `cold start merge_average: … max relative error vs mean dW` line of train.py is
    merge_average's max_rel_error over the routed teachers (merge_into, mode "average"); recomputed here from
    the committed adapters' files. It changes whenever a committed teacher is retrained."""
    from safetensors.torch import load_file
    from cold_start import merge_average
    cfg = train.parse_config([])
    teachers = [load_file(os.path.join(ROOT, cfg.teacher_dir, name, "adapter_model.safetensors"))
                for name in cfg.routes]
    error = merge_average(teachers).max_rel_error
    (value,) = quoted(4, r"On the three committed teachers the cold-start line reports (\d\S*\d)")
    assert len(cfg.routes) == 3 and agrees(error, value), f"merge_average gives {error:.3g}, the answer quotes {value}"


def test_answer_6_kl_weights_and_their_ratios():
    """Exercise 6: the first command prints kl_weight(t, t − 0.1, a) at three t for three a. The answer
    quotes the nine weights and the row ratios (a = 1.2 and a = 0.3 over a = 0.7), the same at every t
    because a only scales w(t) by (a/2 + 1/a)²."""
    command = commands(6)[0]
    weights = ast.literal_eval(printed_by(command).strip())   # {a: [w(t) for t]}
    times = ast.literal_eval(re.search(r"torch\.tensor\((\[.*?\])\)", command).group(1))
    num = r"(\d[\d.]*\d|\d)"
    got = quoted(6, r"w\(t\) at t = (.*?) is " + "; ".join([rf"{num}, {num}, {num} for a = {num}"] * 3))
    assert [float(t) for t in got[0].split(", ")] == times, got[0]
    for i in range(3):
        *values, a = got[1 + 4 * i: 5 + 4 * i]
        assert all(agrees(w, v) for w, v in zip(weights[float(a)], values)), (a, weights[float(a)], values)
    ratios = re.findall(r"a = (\S+) over a = (\S+) is (\S+) at every t", " ".join(section(ANSWERS, 6).split()))
    assert len(ratios) == 2, ratios
    for a, b, value in ratios:
        rows = [w / v for w, v in zip(weights[float(a)], weights[float(b)])]
        assert all(agrees(r, value) for r in rows), (a, b, rows, value)


def test_answer_7_zero_spread_share_of_the_committed_ocr_teacher():
    """Exercise 7: the share of G = 8 groups without spread in the committed OCR teacher's log, the mean
    `zero_std_frac` over its iterations, and their count, as the answer quotes them."""
    log = [json.loads(line) for line in open(os.path.join(ROOT, "checkpoints", "teachers", "train_log.jsonl"))]
    fracs = [e["zero_std_frac"] for e in log if e.get("stage") == "ocr" and "zero_std_frac" in e]   # iterations
    percent, iterations = quoted(7, r"against (\d+)% with G = 8 in the committed OCR teacher's (\d+) iterations")
    assert len(fracs) == int(iterations) and agrees(100 * sum(fracs) / len(fracs), percent), (len(fracs), fracs)


def test_answer_10_ratios_and_clipfracs_printed_by_grpo():
    """Exercise 10: `python grpo.py` prints the PPO ratio and clip fraction of two summed log-prob changes on
    D = 256 latent elements (clipped_surrogate, ε = 1e-4 on the mean-reduced log-prob); the answer quotes
    D, both changes, both ratios, clipfrac 0 for the first and 'clipped' for the second."""
    lines = re.findall(r"summed log-prob change (\S+) nats over D = (\d+): ratio (\S+), clipfrac (\S+)",
                       printed_by(commands(10)[0]))
    D, small, ratio_small, clip_small, large, ratio_large = quoted(
        10, r"on D = (\d+) \((\S+) nats: ratio (\S+), clipfrac (\d+); (\S+) nats: ratio (\S+), clipped\)")
    assert [(float(n), int(d)) for n, d, _, _ in lines] == [(float(small), int(D)), (float(large), int(D))], lines
    assert agrees(float(lines[0][2]), ratio_small) and float(lines[0][3]) == float(clip_small) == 0.0, lines[0]
    assert agrees(float(lines[1][2]), ratio_large) and float(lines[1][3]) == 1.0, lines[1]


def test_answer_10_clip_allows_about_D_times_1e4_nats():
    """Exercise 10: the summed log-prob change that ε = 1e-4 (the teachers' clip_range) lets through on D
    elements, D·log(1 + ε) ≈ D·1e-4, quoted for the world's D = 512 and SD3.5's D = 65,536. Checked with
    clipped_surrogate itself (fp64, so the bound is not blurred by float32's ulps near 1): a change half a
    printed unit below the quoted value is not clipped, half a unit above it is."""
    import torch
    from grpo import clipped_surrogate
    eps = train.parse_config([]).clip_range
    pairs = re.findall(r"\(D = ([\d,]+)\),? (?:that is )?(\d[\d.]*) nats", " ".join(section(ANSWERS, 10).split()))
    assert [int(d.replace(",", "")) for d, _ in pairs] == [512, 65_536], pairs
    for d, value in pairs:
        D, half = int(d.replace(",", "")), 0.5 * 10.0 ** -len(value.partition(".")[2])
        for total, clipped in ((float(value) - half, 0.0), (float(value) + half, 1.0)):
            s = clipped_surrogate(torch.full((4,), total / D, dtype=torch.float64), torch.zeros(4, dtype=torch.float64),
                                  torch.ones(4, dtype=torch.float64), eps)
            assert s.clipfrac.item() == clipped, f"D = {D}: {total} nats gives clipfrac {s.clipfrac.item()}"


def test_answer_10_committed_teachers_never_clip():
    """Exercise 10's second command reads the committed teachers' log: the number of GRPO iterations, the
    smallest and largest PPO ratio and the largest clip fraction. It changes when a teacher is retrained."""
    out = printed_by(commands(10)[1])
    count, low, high, clip = re.search(r"(\d+) iterations; ratio (\S+) \.\. (\S+) ; max clipfrac (\S+)", out).groups()
    iterations, ratio, clipfrac = quoted(10, r"log has (\d+) iterations, every ratio exactly (\S+) and the largest "
                                             r"clip fraction (\d[\d.]*\d|\d)")
    assert int(count) == int(iterations), f"the log has {count} iterations, the answer quotes {iterations}"
    assert float(low) == float(high) == float(ratio) and float(clip) == float(clipfrac), out
