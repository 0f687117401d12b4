"""
The real path end to end on a tiny Stable Diffusion 3 pipeline saved in diffusers' folder layout
(tests/tiny_sd3.py): `train.py --stage distill --model PIPELINE --teacher NAME=PEFT_FOLDER ... --mar FOLDER
--prompts TASK=FILE` in flow_grpo's prompt formats, exactly the command one runs on SD3.5-Medium with the
published teachers, at toy size on the CPU. Also: a teacher trained for another architecture is refused
with a message naming the mismatch.
"""
import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import models  # noqa: E402
import train  # noqa: E402
from world import toy_world  # noqa: E402
from tiny_sd3 import IMAGE_SIZE, save_random_loras, save_tiny_sd3_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    """A tiny SD3 pipeline folder, three PEFT teacher folders and an anchor made on it, and prompt files
    in flow_grpo's formats (GenEval metadata jsonl, OCR txt)."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = str(root / "pipeline")
    save_tiny_sd3_pipeline(pipe)
    model = models.load_sd3(pipe, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    save_random_loras(model, root, ("geneval", "ocr", "deqa"), std=0.05)
    with open(root / "geneval_metadata.jsonl", "w") as f:
        for r in toy_world.prompts("geneval", "train")[:6]:
            f.write(json.dumps(r["metadata"] | {"prompt": r["prompt"]}) + "\n")
    with open(root / "ocr.txt", "w") as f:
        f.write("".join(r["prompt"] + "\n" for r in toy_world.prompts("ocr", "train")[:6]))
    return root


def _argv(root, students, extra=()):
    return ["--stage", "distill", "--model", str(root / "pipeline"), "--device", "cpu",
            "--teacher", f"geneval={root / 'geneval'}", "--teacher", f"ocr={root / 'ocr'}",
            "--mar", str(root / "deqa"), "--prompts", f"geneval={root / 'geneval_metadata.jsonl'}",
            "--prompts", f"ocr={root / 'ocr.txt'}", "--resolution", str(IMAGE_SIZE),
            "--student_dir", str(students), "--cold_start_dir", str(students / "cold"),
            "--opd_iters", "2", "--opd_prompts", "2", "--num_steps", "3", "--micro_batch", "2",
            "--train_timesteps", "1", "--log_rewards", "false", "--compile", "false",
            "--checkpoint_every", "1"] + list(extra)


def test_sd35_pipeline_distill_with_peft_teachers_end_to_end(sd3_world, tmp_path, capsys):
    students = tmp_path / "students"
    train.main(_argv(sd3_world, students))
    out = capsys.readouterr().out
    assert "teachers {'geneval': 'geneval', 'ocr': 'ocr'}, MAR anchor anchor" in out
    assert "no --eval_prompts for the --prompts given: not evaluated" in out and "flow_opd/" not in out
    run = students / "merge"
    rows = [json.loads(line) for line in open(run / "train_log.jsonl")]
    assert [r["iter"] for r in rows] == [0, 1] and all(r["kl"] > 0 and r["mar"] > 0 for r in rows)
    assert (run / "checkpoint-2" / "optimizer.pt").exists()
    # the student loads in a fresh diffusers pipeline through load_lora_weights
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(str(sd3_world / "pipeline"), dtype=torch.float32)
    pipe.load_lora_weights(str(run / "export"))
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_sd35_pipeline_rejects_teacher_of_another_architecture(sd3_world, tmp_path):
    world_teacher = os.path.join(ROOT, "checkpoints", "teachers", "ocr")  # made for the world model
    argv = _argv(sd3_world, tmp_path / "students") + ["--teacher", f"ocr={world_teacher}"]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    msg = str(e.value)
    assert msg.startswith("teacher ocr:") and "does not fit this model" in msg, msg


def test_sd35_pipeline_prompt_file_error_names_line(sd3_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n{oops\n')
    argv = _argv(sd3_world, tmp_path / "students") + ["--prompts", f"geneval={bad}"]
    with pytest.raises(SystemExit, match="line 2"):
        train.main(argv)
