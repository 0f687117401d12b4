"""
The tools' stages at tiny size: pretraining the world's base (tools.pretrain_world), the signal share of a
GRPO gradient (tools.grpo_snr) and the paper's tables (tools.paper_tables). Outputs go to tmp_path.
"""
import json

import pytest
import torch
from PIL import Image

from helpers import BASE, TINY
from support import models, provenance, rollouts
from support.config import parse_args
from tools import grpo_snr, paper_tables, pretrain_world


@pytest.mark.slow
def test_pretrain_smoke(tmp_path):
    base = tmp_path / "base"
    pretrain_world.main(["--ae_steps", "2", "--pretrain_steps", "2", "--pretrain_batch", "4",
                         "--pretrain_dataset", "64", "--eval_at_end", "false", "--base", str(base), "--device", "cpu"])
    model = models.load_world_model(str(base))
    assert model.latent_shape == (8, 8, 8)
    with torch.no_grad():
        imgs = rollouts.sample_images(model, ["a photo of a circle"], steps=2)
    assert imgs.shape == (1, 3, 32, 32) and torch.isfinite(imgs).all()
    log = json.load(open(base / "pretrain_log.json"))
    assert log["config"]["pretrain_steps"] == 2 and log["device"] == "cpu"
    assert [step for step, _ in log["loss"]] == [0, 1]
    assert not (tmp_path / "base.tmp").exists()
    made = json.load(open(base / "provenance.json"))
    assert made["iterations"] == 2 and made["built_from"] == {} and made["weights_sha256"] == provenance.weights_sha256(str(base))


@pytest.mark.slow
def test_grpo_snr_writes_one_row_per_teacher_and_keeps_earlier_rows(tmp_path, fast_load, capsys):
    """tools.grpo_snr: independent gradients of a fresh LoRA, no optimizer step, one row per teacher.
    (Whether a reward is learnable is not asserted: at this size even brightness, which GRPO raises in
    test_grpo_reward_rises, has kappa within noise of 0; grpo.gradient_signal has its exact tests.)"""
    (tmp_path / "grpo_snr.json").write_text(json.dumps({"rows_first_world": {"ocr": {"kappa": 0.0}}}))
    grpo_snr.main(["--teachers", "deqa", "pickscore", "--snr_batches", "3", "--lora_rank", "4",
                "--lora_alpha", "8", "--results_dir", str(tmp_path)] + TINY)   # continuous rewards: no tied groups
    table = json.load(open(tmp_path / "grpo_snr.json"))
    rows = table["rows"]
    assert sorted(rows) == ["deqa", "pickscore"] and table["rows_first_world"] == {"ocr": {"kappa": 0.0}}
    for r in rows.values():
        assert -1 <= r["kappa"] <= 1 and r["se"] >= 0 and r["samples_per_batch"] == 4 and r["seconds_per_batch"] > 0
    assert "[deqa] kappa = " in capsys.readouterr().out
    assert Image.open(tmp_path / "grpo_snr.png").size == (480, 240)   # the bar chart of every row
    # a later run adds its rows beside the earlier ones (and replaces a teacher's own); brightness is the control
    grpo_snr.main(["--teachers", "brightness", "--snr_batches", "3", "--lora_rank", "4",
                "--lora_alpha", "8", "--results_dir", str(tmp_path)] + TINY)
    again = json.load(open(tmp_path / "grpo_snr.json"))["rows"]
    assert sorted(again) == ["brightness", "deqa", "pickscore"] and again["deqa"] == rows["deqa"]




@pytest.mark.slow
def test_paper_tables_tiny_writes_tables_and_pictures_and_resumes(tmp_path, teacher_dir, fast_load, capsys):
    """tools.paper_tables at toy size from committed-style teachers: GRPO-Mix, three Flow-OPD variants with their
    cold starts, the tables in the documented schema, a grid and curves; a second call reuses everything."""
    argv = ["--teacher_dir", str(teacher_dir), "--runs_dir", str(tmp_path / "runs"),
            "--results_dir", str(tmp_path / "results"), "--ablations", "false", "--opd_iters", "1",
            "--opd_prompts", "3", "--sft_samples", "4", "--sft_steps", "2", "--compile", "false"] + TINY
    paper_tables.main(argv)
    table = json.load(open(tmp_path / "results" / "main.json"))
    assert list(table["rows"]) == ["base", "teacher/geneval", "teacher/ocr", "teacher/pickscore", "teacher/deqa",
                                   "grpo_mix", "cold_start/merge", "cold_start/sft", "flow_opd/merge",
                                   "flow_opd/sft", "flow_opd/merge_no_mar"]
    cell = table["rows"]["flow_opd/merge"]["avg"]
    assert set(cell) == {"mean", "std", "se", "ci95", "n"} and cell["n"] == 1 and cell["se"] == 0 and 0 <= cell["mean"] <= 1
    seed0 = json.load(open(tmp_path / "results" / "seed0.json"))
    assert seed0["models"]["teacher/ocr"] == provenance.weights_sha256(str(teacher_dir / "ocr"))
    assert table["meta"]["models"]["base"] == provenance.weights_sha256(BASE)
    student = tmp_path / "runs" / "seed0" / "students" / "merge" / "adapter"
    made = json.load(open(student / "provenance.json"))
    assert made["weights_sha256"] == seed0["models"]["flow_opd/merge"] == provenance.weights_sha256(str(student))
    assert made["built_from"]["ocr"]["sha256"] == seed0["models"]["teacher/ocr"] and made["iterations"] == 1
    assert "geneval_acc" in table["rows"]["base"] and "se/geneval_acc" in table["rows"]["base"]
    ood = json.load(open(tmp_path / "results" / "ood.json"))
    assert {"colour", "shape", "counting", "spatial"} <= set(ood["rows"]["grpo_mix"])
    for png in ("grid_seed0.png", "curves_teachers_seed0.png", "curves_distill_seed0.png", "sample_cost_seed0.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
    # the probes before training (GRPO-Mix's 2 iterations and the students' 1 end before the next probe)
    cost = json.load(open(tmp_path / "results" / "sample_cost_seed0.json"))
    assert cost["final_images"] == {"grpo_mix": 0, "flow_opd/merge": 0, "flow_opd/sft": 0}
    assert cost["images_to_reach_it"]["grpo_mix"] == 0 and cost["sft_cold_start_images"] == 4 * 3
    # the figure over seeds reads the same logs
    capsys.readouterr()
    paper_tables.main(argv + ["--sample_cost_over_seeds", str(tmp_path / "cost.png")])
    assert "seed0" in capsys.readouterr().out
    assert Image.open(tmp_path / "cost.png").size[0] == 640 and (tmp_path / "cost_total.png").exists()
    paper_tables.main(argv)  # resumable: nothing is trained again
    out = capsys.readouterr().out
    assert "[grpo_mix] found" in out and out.count("skipping") >= 8 and "distilling" not in out


def test_seeds_whose_shared_rows_came_from_other_weights_are_not_merged():
    """A seed evaluated with another geneval teacher or other rewards (or one that predates either record) is
    refused with a message naming the row and both files, or the file and its version; per-seed rows (students)
    may differ."""
    v = {"rewards": paper_tables.REWARDS_VERSION}
    a = {"models": {"base": "b" * 64, "teacher/geneval": "1" * 64, "flow_opd/merge": "s0"}, **v}
    b = {"models": {"base": "b" * 64, "teacher/geneval": "1" * 64, "flow_opd/merge": "s1"}, **v}
    assert paper_tables.merged_models({"seed0.json": a, "seed1.json": b}) == {
        "base": "b" * 64, "teacher/geneval": "1" * 64, "flow_opd/merge": ["s0", "s1"]}
    c = {"models": {**b["models"], "teacher/geneval": "2" * 64}, **v}
    with pytest.raises(SystemExit, match=r"teacher/geneval differs between seeds: seed0.json .* 111111111111, seed2.json 222222222222"):
        paper_tables.merged_models({"seed0.json": a, "seed2.json": c})
    with pytest.raises(SystemExit, match="seed3.json has no 'models' record"):
        paper_tables.merged_models({"seed0.json": a, "seed3.json": {"main": {}}})
    with pytest.raises(SystemExit, match="seed4.json has no 'models' record or was scored by rewards version 4, not"):
        paper_tables.merged_models({"seed0.json": a, "seed4.json": {**b, "rewards": 4}})


@pytest.mark.slow
def test_questions_tiny_trains_records_resumes_and_reports(tmp_path, teacher_dir, fast_load, capsys):
    """tools.questions at toy size: teacher_count's four runs (1-4 routed teachers, deqa as a task of its own) and
    the biased teacher's, each recorded with its evaluation, log (KL per routed teacher) and weights; a second
    call trains nothing, and a record scored by older rewards counts as missing; the report writes the documented schema, a bar chart per question and the grid."""
    import shutil
    from tools import questions, questions_report
    shutil.copytree(teacher_dir / "geneval", tmp_path / "teachers" / "geneval_red")   # stands in for the biased one
    for t in ("geneval", "ocr", "pickscore", "deqa"):
        shutil.copytree(teacher_dir / t, tmp_path / "teachers" / t)
    argv = ["--teacher_dir", str(tmp_path / "teachers"), "--runs_dir", str(tmp_path / "runs"), "--results_dir",
            str(tmp_path / "results"), "--opd_iters", "1", "--opd_prompts", "6", "--compile", "false"] + TINY
    questions.main(argv + ["--question", "teacher_count"])
    rec = lambda run: json.load(open(tmp_path / "results" / "questions" / "seed0" / f"{run}.json"))
    assert rec("routes_1")["log"][0].keys() >= {"kl", "kl/geneval"} and "kl/ocr" not in rec("routes_1")["log"][0]
    four = rec("routes_4")["log"][0]
    assert {k for k in four if k.startswith("kl/")} <= {"kl/geneval", "kl/ocr", "kl/pickscore", "kl/deqa"}
    made = json.load(open(tmp_path / "runs" / "questions" / "seed0" / "students" / "routes_4" / "adapter" /
                          "provenance.json"))
    assert set(made["built_from"]) >= {"geneval", "ocr", "pickscore", "deqa"}   # deqa routed and merged in
    questions.main(argv + ["--question", "biased_teacher"])
    made = json.load(open(tmp_path / "runs" / "questions" / "seed0" / "students" / "biased" / "adapter" /
                          "provenance.json"))
    assert made["built_from"]["geneval"]["path"].endswith("geneval_red")
    assert rec("biased")["sha256/student"] == provenance.weights_sha256(
        str(tmp_path / "runs" / "questions" / "seed0" / "students" / "biased" / "adapter"))
    capsys.readouterr()
    questions.main(argv + ["--question", "teacher_count"])   # everything recorded: nothing trained again
    assert "student saved" not in capsys.readouterr().out
    cfg = parse_args(argv)[0]
    assert questions.pending_runs(cfg, "teacher_count", {}) == []
    old = {**rec("routes_1"), "rewards": questions.REWARDS_VERSION - 1}   # scored by older judges: missing again
    (tmp_path / "results" / "questions" / "seed0" / "routes_1.json").write_text(json.dumps(old))
    assert questions.pending_runs(cfg, "teacher_count", {}) == ["routes_1"]
    (tmp_path / "results" / "questions" / "seed0" / "routes_1.json").write_text(json.dumps({**old, "rewards": questions.REWARDS_VERSION}))
    questions_report.main(argv)
    q = json.load(open(tmp_path / "results" / "questions.json"))["questions"]
    paired = questions_report.per_seed_table(q, "teacher_count", "1 teacher (geneval)")   # exercises 5 and 6's form
    assert "| seed 0 |" in paired and "over" not in paired   # one seed: no interval over seeds
    assert set(q) == set(questions.QUESTIONS) and q["teacher_count"]["command"].startswith("python -m tools.questions")
    rows = q["teacher_count"]["rows"]
    assert list(rows) == list(questions.QUESTIONS["teacher_count"])
    assert set(rows["1 teacher (geneval)"]["paired/avg"]) == {"mean", "se", "ci95", "n"}
    assert rows["1 teacher (geneval)"]["avg"]["n"] == 1 and "paired/avg" not in rows["3 teachers (main job)"]
    assert set(q["biased_teacher"]["red_share"]) == {"base", "geneval teacher", "geneval_red"}
    for png in ("questions_teacher_count.png", "questions_biased_teacher.png", "questions_biased_grid.png"):
        assert (tmp_path / "results" / png).stat().st_size > 1000
