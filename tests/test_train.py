"""
Smoke and behaviour tests for train.py: the Config flags, both training stages end to end at tiny size (every
output goes to pytest's tmp_path; nothing under checkpoints/ is written), a GRPO run whose reward rises, and
the OPD core's loss and gradient scale. The committed base (checkpoints/base) is loaded once and deep-copied
(tests/conftest.py: fast_load). The tools' stages (pretraining, grpo_snr, the paper's tables): test_tools.py.
"""
import hashlib
import json
import shutil
import os
import re
import sys

import pytest
import torch

import train
from opd_loss import flow_opd_loss, kl_weight
from router import target_velocity
from safetensors.torch import load_file
from sde_sampler import gaussian_logprob, sde_step
from support import checkpoint, models, provenance, rollouts, teachers
from support.config import Config
from support.resolve import eval_settings, main_protocol, prompt_pool
from world import toy_world
from helpers import ROOT, TINY, load_base as _load_base, read_jsonl as _jsonl
from tiny_sd3 import save_random_loras

# --------------------------------------------------------------------------------------------- config
def test_parse_config(capsys):
    cfg = train.parse_config(["--grpo_iters", "7", "--lr", "2e-4", "--eval_at_end", "false", "--compile", "True",
                              "--teachers", "ocr", "deqa", "--snapshots", "10", "20", "--estimator", "logratio"])
    assert cfg.grpo_iters == 7 and isinstance(cfg.grpo_iters, int)
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.eval_at_end is False and cfg.compile is True
    assert cfg.teachers == ["ocr", "deqa"] and all(isinstance(t, str) for t in cfg.teachers)
    assert cfg.snapshots == [10, 20]
    assert cfg.estimator == "logratio"
    default = train.parse_config([])
    assert default.teachers == ["geneval", "ocr", "pickscore", "deqa"] and default.eval_at_end is True
    assert default.routes == ["geneval", "ocr", "pickscore"] and default.mar_anchor == "deqa"
    assert train.parse_config(["--noise_level", "0"]).noise_level == 0.0

    with pytest.raises(SystemExit):
        train.main(["--stage", "nonsense"])
    msg = capsys.readouterr().err
    assert "nonsense" in msg and all(s in msg for s in ("teachers", "grpo_mix", "distill"))

    with pytest.raises((AssertionError, ValueError), match="noise_level"):
        Config(noise_level=-0.1)
    with pytest.raises(SystemExit):
        train.parse_config(["--noise_level", "-1"])
    assert "--noise_level -1.0: must be >= 0" in capsys.readouterr().err


def test_deqa_teacher_weight_sets_the_blend_and_others_keep_their_reward():
    assert teachers.reward_weights("deqa", Config()) == {"deqa": 0.4, "pickscore": 0.6}   # the paper's
    assert teachers.reward_weights("deqa", Config(deqa_teacher_weight=1.0)) == {"deqa": 1.0}
    assert teachers.reward_weights("ocr", Config(deqa_teacher_weight=1.0)) == {"task": 1.0}
    with pytest.raises(ValueError, match="deqa_teacher_weight"):
        Config(deqa_teacher_weight=1.5)


# --------------------------------------------------------------------------------------------- stages
@pytest.mark.slow
def test_teachers_stage_smoke(tmp_path, fast_load, capsys):
    # pickscore: a continuous reward, so a group of 2 never ties and B moves in 2 iterations (the web-style
    # base reads most of its signs as 0, so OCR groups of 2 often tie)
    argv = ["--stage", "teachers", "--teachers", "pickscore", "--teacher_dir", str(tmp_path), "--lora_rank", "4",
            "--lora_alpha", "8", "--eval_every", "2", "--probe_prompts_per_task", "1"] + TINY
    train.main(argv)
    folder = tmp_path / "pickscore"
    state = load_file(str(folder / "adapter_model.safetensors"))
    assert state and all(k.startswith("base_model.model.") for k in state)
    assert any(".lora_A." in k for k in state) and any(".lora_B." in k for k in state)
    conf = json.load(open(folder / "adapter_config.json"))
    assert conf["r"] == 4 and conf["lora_alpha"] == 8
    assert set(conf["target_modules"]) == set(models.LORA_TARGETS)
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # trained: B left zero

    model = _load_base()
    model.load_adapter(str(folder), "ocr")  # loadable by the project's own loader

    probes = [r for r in _jsonl(tmp_path / "train_log.jsonl") if r["stage"] == "pickscore_eval"]
    n = int(TINY[TINY.index("--prompts_per_iter") + 1]) * int(TINY[TINY.index("--group_size") + 1])
    assert [(r["iter"], r["images"]) for r in probes] == [(0, 0), (2, 2 * n)]  # before training and after it
    assert all(0 <= r["eval/pickscore"] <= 1 and "eval/avg" in r for r in probes)
    rows = [r for r in _jsonl(tmp_path / "train_log.jsonl") if "reward" in r]
    assert [r["iter"] for r in rows] == [0, 1] and all(r["stage"] == "pickscore" for r in rows)
    assert all(0.0 <= r["web"] <= 1.0 and 0.0 <= r["blurred"] <= 1.0 for r in rows)   # the rollouts' style shares
    for r in rows:
        assert 0.0 <= r["reward"] <= 1.0
        # on-policy, fp32, one optimizer step per iteration: the ratio is exactly 1 before the update
        assert r["ratio_min"] == 1.0 and r["ratio_max"] == 1.0 and r["clipfrac"] == 0.0
    assert (folder / "eval.json").exists()  # the end-of-stage evaluation, cached next to the adapter
    made = json.load(open(folder / "provenance.json"))   # how it was made, from what, and its scores
    assert made["weights_sha256"] == provenance.weights_sha256(str(folder)) and made["seed"] == 0
    assert made["iterations"] == 2 and made["command"].startswith("python ") and made["commit"]   # this process
    assert made["built_from"]["base"]["sha256"] == provenance.weights_sha256(made["built_from"]["base"]["path"])
    assert "scores" not in made   # its tiny evaluation is not the main protocol (resolve.main_protocol)
    assert main_protocol(eval_settings(Config())) and not main_protocol({**eval_settings(Config()), "seed": 1})

    capsys.readouterr()
    mtime = os.path.getmtime(folder / "adapter_model.safetensors")
    train.main(argv)
    assert "skipping" in capsys.readouterr().out
    assert os.path.getmtime(folder / "adapter_model.safetensors") == mtime


@pytest.mark.slow
def test_grpo_reward_rises(monkeypatch):
    """Reward = mean brightness of the decoded image, which the base does not maximise; a short GRPO run
    (fixed seed; lr tuned on the web-style base: 1e-2 rose on seeds 0, 1 and 2, 5e-3 stayed flat on seeds 0 and
    1; on the first base 5e-3 rose and 1e-2 overshot) must raise it."""
    monkeypatch.setitem(teachers.TEACHER_TASKS, "brightness", {"geneval": 1})
    # balance_tags false: prompts drawn uniformly, the stream the learning rate was tuned on (with 2 prompts
    # per iteration, which prompts are drawn moves the mean reward by more than the learning does early on)
    cfg = train.parse_config(["--grpo_iters", "9", "--prompts_per_iter", "2", "--group_size", "4",
                              "--micro_batch", "8", "--num_steps", "4", "--lr", "1e-2", "--seed", "0",
                              "--device", "cpu", "--balance_tags", "false"])
    model = _load_base()
    prompts = [r["prompt"] for r in toy_world.prompts("geneval", "test")[:8]]
    before = rollouts.sample_images(model, prompts, steps=cfg.num_steps, seed=0).mean().item()
    rows = []
    torch.manual_seed(0)
    train.train_grpo(model, "brightness", cfg, lambda **kw: rows.append(kw), prompt_pool([], "train"),
                     teachers.rewards_for("brightness", cfg))
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 9
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.01, rewards
    model.adapter("brightness")
    after = rollouts.sample_images(model, prompts, steps=cfg.num_steps, seed=0).mean().item()
    assert after > before + 0.05, (before, after)
    model.adapter(None)  # the base itself is untouched by the adapter's training
    again = rollouts.sample_images(model, prompts, steps=cfg.num_steps, seed=0).mean().item()
    assert again == pytest.approx(before, abs=1e-6)


@pytest.mark.slow
def test_distill_stage_smoke(tmp_path, teacher_dir, fast_load, capsys):
    students, cold = tmp_path / "students", tmp_path / "cold"
    common = ["--stage", "distill", "--teacher_dir", str(teacher_dir), "--student_dir", str(students),
              "--cold_start_dir", str(cold), "--opd_iters", "2", "--opd_prompts", "3", "--compile", "false"] + TINY

    train.main(common)  # with the end-of-stage evaluation (eval_steps 2, 2 prompts per task)
    out = capsys.readouterr().out
    assert "cold start merge" in out and "flow_opd/merge" in out
    assert (cold / "merge" / "adapter_model.safetensors").exists()
    conf = json.load(open(cold / "merge" / "adapter_config.json"))
    assert conf["r"] == 4 * 3 and conf["lora_alpha"] == 8 * 3  # exact mean dW of 3 routed rank-4 teachers
    assert (students / "merge" / "adapter" / "adapter_model.safetensors").exists()
    scores = json.load(open(students / "merge" / "scores.json"))   # the printed table, as a results file
    assert list(scores["rows"]) == ["cold start (merge)", "teacher/geneval", "teacher/ocr", "teacher/pickscore",
                                    "flow_opd/merge"]
    assert scores["models"]["flow_opd/merge"] == provenance.weights_sha256(str(students / "merge" / "adapter"))
    assert scores["paired"]["avg"]["mean"] == pytest.approx(
        scores["rows"]["flow_opd/merge"]["avg"] - scores["rows"]["cold start (merge)"]["avg"], abs=1e-9)
    rows = _jsonl(students / "merge" / "train_log.jsonl")
    assert [r["iter"] for r in rows] == [0, 1]
    for r in rows:
        assert r["kl"] > 0 and r["mar"] > 0  # random teachers differ from the merge and from the anchor
        assert any(k.startswith("reward/") for k in r)
    model = _load_base()
    model.load_adapter(str(students / "merge" / "adapter"), "student")

    fast = ["--eval_at_end", "false"]
    # the cold start is reused, not rebuilt; periodic checkpoints and evaluation during distillation
    train.main(common + fast + ["--name", "again", "--checkpoint_every", "1", "--eval_every", "2"])
    assert "cold start: using" in capsys.readouterr().out
    made = json.load(open(cold / "merge" / "provenance.json"))
    assert made["built_from"]["ocr"]["sha256"] == provenance.weights_sha256(str(teacher_dir / "ocr"))
    rows = _jsonl(students / "again" / "train_log.jsonl")
    # a probe before the first iteration and after the second, at the images sampled so far (3 prompts x 1)
    assert [r["stage"] for r in rows] == ["distill_eval", "distill", "distill", "distill_eval"]
    assert [rows[0]["images"], rows[-1]["images"]] == [0, 6]
    assert {"eval/geneval", "eval/ocr", "eval/pickscore", "eval/deqa", "eval/avg"} <= set(rows[-1])
    for n in (1, 2):
        assert (students / "again" / f"checkpoint-{n}" / "adapter_model.safetensors").exists()

    train.main(common + fast + ["--mar_anchor", "none"])
    capsys.readouterr()
    rows = _jsonl(students / "merge_no_mar" / "train_log.jsonl")
    assert (students / "merge_no_mar" / "adapter" / "adapter_model.safetensors").exists()
    assert all(r["mar"] == 0.0 for r in rows)

    for est in ("logratio", "released"):
        train.main(common + fast + ["--estimator", est, "--name", est])
        rows = _jsonl(students / est / "train_log.jsonl")
        assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["kl"], r["mar"]])).all() for r in rows)
        assert (students / est / "adapter" / "adapter_model.safetensors").exists()


def test_missing_teacher_is_an_error_naming_the_command_that_trains_it(tmp_path, fast_load):
    """Loading never trains as a side effect: a missing teacher stops the stage with the command to run."""
    with pytest.raises(SystemExit) as e:
        train.main(["--stage", "distill", "--teacher_dir", str(tmp_path / "teachers"), "--routes", "ocr",
                    "--mar_anchor", "base", "--student_dir", str(tmp_path / "students")] + TINY)
    assert f"python train.py --stage teachers --teachers ocr --teacher_dir {tmp_path / 'teachers'}" in str(e.value)
    assert not (tmp_path / "teachers").exists() and not (tmp_path / "students").exists()


# --------------------------------------------------------------------------------------------- OPD core
def _core_inputs(seed=0, B=3, shape=(2, 4, 4), a=0.7):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, *shape, generator=g)
    t = torch.rand(B, generator=g) * 0.7 + 0.2
    t_next = t - 0.1
    v_s = torch.randn(B, *shape, generator=g)
    step = sde_step(x_t, v_s, t, t_next, a, generator=g)
    old_logp = gaussian_logprob(step.x_next, step.mean, step.std)
    return x_t, step.x_next, v_s, t, t_next, step.std.reshape(B), old_logp, g


def _total(x_t, x_next, v_s, v_T, v_A, t, t_next, std, old_logp, a, est, lam):
    return flow_opd_loss(x_t=x_t, x_next=x_next, t=t, t_next=t_next, std=std, old_logp=old_logp, v_student=v_s,
                         v_teacher=v_T, v_anchor=v_A, noise_level=a, estimator=est, mar_lambda=lam)


def test_total_loss_gradient():
    a, lam = 0.7, 0.02
    x_t, x_next, v, t, t_next, std, old_logp, g = _core_inputs(a=a)
    B, D = x_t.shape[0], x_t[0].numel()

    for est in ("pathwise", "logratio", "released"):  # student == teacher == anchor: nothing to learn
        v_s = v.clone().requires_grad_(True)
        loss, kl, mar = _total(x_t, x_next, v_s, v.clone(), v.clone(), t, t_next, std, old_logp, a, est, lam)
        assert loss.abs().item() < 1e-7, est
        assert torch.equal(kl, torch.zeros(B)) and mar.item() == 0.0

    v_T = v + 0.3 * torch.randn(v.shape, generator=g)
    v_A = v + 0.5 * torch.randn(v.shape, generator=g)
    v_s = v.clone().requires_grad_(True)
    loss, kl, mar = _total(x_t, x_next, v_s, v_T, v_A, t, t_next, std, old_logp, a, "pathwise", lam)
    loss.backward()

    w = kl_weight(t, t_next, a)  # (B,)
    v_s_ref = v.clone().requires_grad_(True)
    sq = lambda u: (v_s_ref - u).pow(2).flatten(1).sum(1)  # noqa: E731
    opd_term = (w * sq(v_T)).mean() / D
    mar_term = lam * (w * sq(v_A)).mean() / D
    (opd_term + mar_term).backward()

    assert torch.allclose(loss, opd_term + mar_term, rtol=1e-4)
    assert torch.allclose(kl, w * (v - v_T).pow(2).flatten(1).sum(1), rtol=1e-4)  # exact summed step KL
    assert torch.allclose(mar, mar_term.detach(), rtol=1e-4)
    # relative to the gradient's scale: float32 sums in another order differ by ~1e-7 of it on entries near 0
    assert torch.allclose(v_s.grad, v_s_ref.grad, rtol=1e-4, atol=1e-6 * v_s_ref.grad.abs().max().item())

    # no anchor: the MAR term vanishes and the gradient is the OPD term's alone
    v_s2 = v.clone().requires_grad_(True)
    loss2, _, mar2 = _total(x_t, x_next, v_s2, v_T, None, t, t_next, std, old_logp, a, "pathwise", lam)
    loss2.backward()
    assert mar2.item() == 0.0 and torch.allclose(loss2, opd_term.detach(), rtol=1e-4)
    v_ref2 = v.clone().requires_grad_(True)
    ((w * (v_ref2 - v_T).pow(2).flatten(1).sum(1)).mean() / D).backward()
    assert torch.allclose(v_s2.grad, v_ref2.grad, rtol=1e-4, atol=1e-6 * v_ref2.grad.abs().max().item())


@pytest.mark.slow
def test_resume_distill_matches_uninterrupted_run(tmp_path, teacher_dir, fast_load):
    """A distill run stopped after its checkpoint at iteration 2 and resumed (--resume_from_checkpoint
    latest) logs the same numbers and ends with the same student, bit for bit, as one run of 3 iterations."""
    common = ["--stage", "distill", "--teacher_dir", str(teacher_dir), "--student_dir", str(tmp_path / "s"),
              "--cold_start_dir", str(tmp_path / "cold"), "--opd_prompts", "3", "--compile", "false",
              "--eval_at_end", "false", "--ema_decay", "0.5"] + TINY
    train.main(common + ["--name", "whole", "--opd_iters", "3"])
    train.main(common + ["--name", "cut", "--opd_iters", "2", "--checkpoint_every", "2"])
    train.main(common + ["--name", "cut", "--opd_iters", "3", "--resume_from_checkpoint", "latest"])
    whole, cut = _jsonl(tmp_path / "s" / "whole" / "train_log.jsonl"), _jsonl(tmp_path / "s" / "cut" / "train_log.jsonl")
    assert [r["iter"] for r in cut] == [0, 1, 2] and cut == whole
    a = load_file(tmp_path / "s" / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "s" / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "s" / "cut" / "export" / "pytorch_lora_weights.safetensors").exists()
    with pytest.raises(SystemExit, match="checkpoint"):
        train.main(common + ["--name", "never", "--resume_from_checkpoint", "latest"])


@pytest.mark.slow
def test_resume_teacher_matches_uninterrupted_run(tmp_path, fast_load, monkeypatch):
    """A teacher whose GRPO run dies after its checkpoint at iteration 2 and is resumed (--resume_from_checkpoint
    latest) logs the same numbers and ends with the same adapter, bit for bit, as one run of 3 iterations."""
    common = ["--stage", "teachers", "--teachers", "ocr", "--lora_rank", "4", "--lora_alpha", "8",
              "--eval_at_end", "false"] + TINY + ["--grpo_iters", "3"]  # argparse keeps a flag's last value
    train.main(common + ["--teacher_dir", str(tmp_path / "whole")])

    class Killed(Exception):
        pass

    real_step, calls = train.optimizer_step, []

    def dies_at_third_step(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "optimizer_step", dies_at_third_step)
    with pytest.raises(Killed):
        train.main(common + ["--teacher_dir", str(tmp_path / "cut"), "--checkpoint_every", "2"])
    monkeypatch.setattr(train, "optimizer_step", real_step)
    assert not (tmp_path / "cut" / "ocr").exists() and (tmp_path / "cut" / "runs" / "ocr" / "checkpoint-2").is_dir()
    train.main(common + ["--teacher_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "minutes"} for r in rows]
    whole, cut = _jsonl(tmp_path / "whole" / "train_log.jsonl"), _jsonl(tmp_path / "cut" / "train_log.jsonl")
    assert [r.get("iter") for r in cut] == [0, 1, 2, None] and strip(cut) == strip(whole)
    a = load_file(tmp_path / "whole" / "ocr" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "ocr" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="latest"):   # a folder that exists, but a teacher resumes its own newest
        train.main(common + ["--teacher_dir", str(tmp_path / "other"), "--resume_from_checkpoint", str(tmp_path)])


@pytest.mark.slow
def test_torchrun_ddp_distill_two_gloo_processes(tmp_path, teacher_dir):
    """torchrun with 2 CPU processes (gloo): prompts are sharded, gradients averaged, and both replicas end
    with identical student weights; rank 0 alone writes the log and the student."""
    import subprocess
    students = tmp_path / "students"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
           os.path.join(ROOT, "train.py"), "--stage", "distill", "--teacher_dir", str(teacher_dir),
           "--student_dir", str(students), "--cold_start_dir", str(tmp_path / "cold"), "--opd_iters", "2",
           "--opd_prompts", "2", "--compile", "false", "--eval_at_end", "false", "--checkpoint_every", "2"] + TINY
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # the two processes' lines may interleave on the shared stdout, so match them anywhere
    spreads = dict(re.findall(r"rank (\d): max parameter spread across processes ([0-9.e+-]+?)(?=rank|\s|$)", out.stdout))
    assert sorted(spreads) == ["0", "1"] and all(float(s) == 0 for s in spreads.values()), out.stdout
    assert "x 2 processes" in out.stdout
    assert [r["iter"] for r in _jsonl(students / "merge" / "train_log.jsonl")] == [0, 1]
    assert (students / "merge" / "checkpoint-2" / "rng.pt").exists()
    assert (students / "merge" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_distill_world_with_per_teacher_guidance_and_without_cfg(tmp_path, teacher_dir, fast_load):
    """The world runs of issue 22's measurement: --teacher_guidance geneval=1.0, and --guidance_scale 1 (no CFG)."""
    common = ["--stage", "distill", "--teacher_dir", str(teacher_dir), "--student_dir", str(tmp_path / "s"),
              "--cold_start_dir", str(tmp_path / "cold"), "--opd_iters", "2", "--opd_prompts", "3", "--compile",
              "false", "--eval_at_end", "false"] + TINY
    for name, flags in (("own", ["--teacher_guidance", "geneval=1.0"]), ("nocfg", ["--guidance_scale", "1"]),
                        ("default", [])):
        train.main(common + flags + ["--name", name])
    rows = {n: _jsonl(tmp_path / "s" / n / "train_log.jsonl") for n in ("own", "nocfg", "default")}
    assert all(len(r) == 2 and all(x["kl"] > 0 for x in r) for r in rows.values())
    assert rows["own"] != rows["default"] and rows["nocfg"] != rows["default"]   # the flags change the targets


def test_soft_routing_mixes_every_teacher_and_hard_routing_picks_one(teacher_dir):
    model, names = _load_base(), ["geneval", "ocr", "pickscore"]
    for n in names:
        model.load_adapter(str(teacher_dir / n), n)
    cfg = train.parse_config(["--device", "cpu"])
    x = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 0.6)
    conds = rollouts.guided_conds(model, ["a photo of a circle", 'a sign that says "K7"', "a photo of a square"],
                                  cfg.guidance_scale)
    routed = ["geneval", "ocr", "ocr"]
    per = {}
    for n in names:
        model.adapter(n)
        per[n] = model.velocity(x, t, *conds)
    # relative tolerances: a batch of 2 and a batch of 3 sum in different orders on some CPUs (~1e-5 at |v| ~ 6)
    close = lambda a, b: torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # noqa: E731
    hard = target_velocity(model, x, t, conds, routed, names)
    for b, n in enumerate(routed):
        assert close(hard[b], per[n][b])
    eps = 0.3
    soft = target_velocity(model, x, t, conds, routed, names, soft_routing=eps)
    for b, n in enumerate(routed):
        want = (1 - eps) * per[n][b] + eps / 3 * sum(per[k][b] for k in names)
        assert close(soft[b], want)
    assert (soft - hard).abs().max() > 1e-2 * hard.abs().max()  # the teachers differ: mixing changes the target
    # --teacher_guidance ocr=1: the ocr teacher's samples unguided, the geneval teacher's as before
    own = target_velocity(model, x, t, conds, routed, names, scales={"ocr": 1.0})
    model.adapter("ocr")
    plain = model.velocity(x, t, conds[0], conds[1], 1.0)
    assert close(own[0], hard[0]) and close(own[1], plain[1]) and close(own[2], plain[2])
    assert (own[1:] - hard[1:]).abs().max() > 1e-2 * hard.abs().max()   # guidance matters on these teachers


def test_sde_window_lies_in_its_range():
    gen = torch.Generator().manual_seed(0)
    starts = lambda frac, window=2: {rollouts.trained_steps(Config(sde_window_range=frac), gen, window)[0]
                                     for _ in range(200)}
    assert starts(0.5) == {0, 1, 2, 3}          # T = 10: a 2-step window inside steps 0-4
    assert starts(0.2) == {0}                   # steps 0-1 only: where the world's styles are decided
    assert starts(0.1) == {0}                   # never narrower than the window itself
    assert rollouts.trained_steps(Config(sde_window_range=0.2), gen, 2) == [0, 1]
    with pytest.raises(ValueError, match="--sde_window_range 2: must be in"):
        Config(sde_window_range=2)


def test_stamp_forgets_what_it_recorded_for_other_weights(tmp_path):
    """provenance.json describes the weights beside it: after a retrain, the old command and scores are gone."""
    (tmp_path / "adapter_model.safetensors").write_bytes(b"one")
    provenance.stamp(str(tmp_path), command="python train.py --seed 1", scores={"avg": 0.5})
    assert provenance.stamp(str(tmp_path), protocol={"steps": 40})["scores"] == {"avg": 0.5}   # same weights: kept
    (tmp_path / "adapter_model.safetensors").write_bytes(b"two")
    record = provenance.stamp(str(tmp_path), seed=2)
    assert record == {"seed": 2, "weights_sha256": hashlib.sha256(b"two").hexdigest()}


@pytest.mark.slow
def test_a_cold_start_is_rebuilt_when_a_teacher_is_retrained(tmp_path, teacher_dir, fast_load, capsys):
    """The same teacher folders with other weights in one of them: the merge is rebuilt, not reused."""
    shutil.copytree(teacher_dir, tmp_path / "teachers")
    argv = ["--stage", "distill", "--teacher_dir", str(tmp_path / "teachers"), "--student_dir", str(tmp_path / "s"),
            "--cold_start_dir", str(tmp_path / "cold"), "--opd_iters", "1", "--opd_prompts", "1", "--compile", "false",
            "--eval_at_end", "false"] + TINY
    train.main(argv)
    model = _load_base()
    torch.manual_seed(1)
    save_random_loras(model, tmp_path / "teachers", ("ocr",), std=0.01)   # "retrained"
    capsys.readouterr()
    train.main(argv)
    assert "rebuilding it" in capsys.readouterr().out
    made = json.load(open(tmp_path / "cold" / "merge" / "provenance.json"))
    assert made["built_from"]["ocr"]["sha256"] == provenance.weights_sha256(str(tmp_path / "teachers" / "ocr"))


# ------------------------------------------------------------------------------------- fp16 loss scaling
def _fp16_step(scaler, loss_weight, ema=False):
    """One optimizer step of an fp32 LoRA-like parameter whose loss is backpropagated through fp16 activations
    (as a LoRA on an fp16 transformer): d loss / d p = 2 * loss_weight per element, flowing through fp16."""
    p = torch.nn.Parameter(torch.ones(4))
    opt, avg = torch.optim.AdamW([p], lr=0.1, weight_decay=0.0), checkpoint.EMA([p], decay=0.5)
    y = p.half() * torch.full((4,), 2.0, dtype=torch.float16)           # fp16 activations
    rollouts.scaled(y.float().sum() * loss_weight, scaler).backward()
    grad = p.grad.clone()
    rollouts.optimizer_step([p], opt, avg if ema else None, scaler)
    return p.detach(), grad, avg.shadow[0]


def test_fp16_loss_scaler_keeps_a_gradient_that_would_underflow():
    assert rollouts.loss_scaler(Config(device="cpu")) is None        # the world on the CPU: no AMP, no scaler
    assert rollouts.loss_scaler(Config(device="cpu", mixed_precision="bf16")) is None
    scaler = rollouts.loss_scaler(Config(device="cpu", mixed_precision="fp16"))
    assert scaler.get_scale() == 2.0 ** 16
    # 1e-8 per activation is below fp16's smallest subnormal (6e-8): without a scaler the gradient is exactly 0
    p, grad, _ = _fp16_step(None, 1e-8)
    assert torch.equal(grad, torch.zeros(4)) and torch.equal(p, torch.ones(4))   # silently not trained
    p, grad, _ = _fp16_step(scaler, 1e-8)
    assert torch.allclose(grad / scaler.get_scale(), torch.full((4,), 2e-8), rtol=2e-3)   # the true gradient
    want = 1 - 0.1 * 2e-8 / (2e-8 + 1e-8)   # Adam's first step: lr * g / (|g| + eps), eps = 1e-8
    assert torch.allclose(p, torch.full((4,), want), rtol=1e-4)
    # an overflowing step is skipped, the EMA with it, and the scale halves
    p, _, shadow = _fp16_step(scaler, 1e30, ema=True)
    assert torch.equal(p, torch.ones(4)) and torch.equal(shadow, torch.ones(4)) and scaler.get_scale() == 2.0 ** 15


# ------------------------------------------------------------------------------------ --report_to tensorboard
class _Writer:
    """A stand-in for torch.utils.tensorboard.SummaryWriter that keeps what it is given."""
    made = []

    def __init__(self, folder):
        self.folder, self.scalars, self.images = folder, {}, {}
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_images(self, tag, images, step):
        self.images.setdefault(tag, []).append((step, tuple(images.shape), images.min().item(), images.max().item()))

    def flush(self):
        pass


def test_report_to_tensorboard_without_tensorboard_says_so_and_keeps_the_json_log(tmp_path, monkeypatch, capsys):
    from support import report
    log = lambda **kw: None   # noqa: E731
    assert report.tensorboard_log(log, Config(), str(tmp_path)) is log   # the default: nothing imported
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    assert report.tensorboard_log(log, Config(report_to="tensorboard"), str(tmp_path)) is log
    assert capsys.readouterr().out == ("--report_to tensorboard: tensorboard is not installed (pip install "
                                       "tensorboard); logging to the JSON-lines log only\n")
    assert report.tensorboard_log(None, Config(report_to="tensorboard"), str(tmp_path)) is None   # rank > 0
    report.log_grid(log, None, {}, "distill_eval", 0)   # no TensorBoard log: no grid, nothing sampled


@pytest.mark.slow
def test_report_to_tensorboard_writes_scalars_and_probe_grids(tmp_path, teacher_dir, fast_load, monkeypatch):
    """The scalars and the probe grids go to TensorBoard; the JSON-lines log is the same as without it."""
    import types
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=_Writer))
    _Writer.made.clear()
    common = ["--stage", "distill", "--teacher_dir", str(teacher_dir), "--student_dir", str(tmp_path / "s"),
              "--cold_start_dir", str(tmp_path / "cold"), "--opd_iters", "2", "--opd_prompts", "2", "--compile",
              "false", "--eval_at_end", "false", "--eval_every", "2", "--probe_prompts_per_task", "1"] + TINY
    train.main(common + ["--name", "tb", "--report_to", "tensorboard"])
    train.main(common + ["--name", "plain"])
    assert _jsonl(tmp_path / "s" / "tb" / "train_log.jsonl") == _jsonl(tmp_path / "s" / "plain" / "train_log.jsonl")
    (writer,) = _Writer.made
    assert writer.folder == str(tmp_path / "s" / "tb" / "tensorboard")
    rows = [r for r in _jsonl(tmp_path / "s" / "tb" / "train_log.jsonl") if r["stage"] == "distill"]
    assert writer.scalars["distill/kl"] == [(r["iter"], r["kl"]) for r in rows] and len(rows) == 2
    assert [step for step, _ in writer.scalars["distill_eval/eval/avg"]] == [0, 2]
    grids = writer.images["distill_eval/probe"]
    assert [g[0] for g in grids] == [0, 2] and all(g[1][:2] == (len(toy_world.TASKS), 3) for g in grids)
    assert all(0 <= g[2] <= g[3] <= 1 for g in grids) and grids[0][2] < grids[0][3]   # images, not blanks


def test_report_to_tensorboard_with_the_real_package(tmp_path):
    """Where tensorboard is installed (it is not a requirement): the event file holds the scalars and the grid."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from support import report
    log = report.tensorboard_log(lambda **kw: None, Config(report_to="tensorboard"), str(tmp_path))
    log(stage="distill", iter=3, kl=0.5, mar=0.25)
    report.log_grid(log, _load_base(), {"steps": 2, "guidance_scale": 4.5, "seed": 0, "batch_size": 4}, "probe", 3)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 4})
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("distill/kl")] == [(3, 0.5)]
    assert events.Tags()["images"] == ["probe/probe"]
