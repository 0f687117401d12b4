"""
Tests for infer.py: the command line end to end on the committed world base with a committed teacher (a PEFT
folder), and on the tiny SD3 pipeline (tests/tiny_sd3.py) with a LoRA exported in diffusers format; the LoRA
format detection and its error. A few sampling steps only.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_infer.py
"""
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
import infer  # noqa: E402
import tiny_sd3  # noqa: E402
from checkpoint import export_lora  # noqa: E402
from models import load_sd3  # noqa: E402

BASE = os.path.join(ROOT, "checkpoints", "base")
OCR_TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "ocr")


def _run(tmp_path, *args):
    out = str(tmp_path / "grid.png")
    infer.main([*args, "--prompt", 'a sign that says "K7"', "--num_images", "2", "--steps", "2",
                "--device", "cpu", "--out", out])
    with Image.open(out) as im:
        return im.size, torch.from_numpy(np.asarray(im).copy())


def test_infer_world_base_with_peft_teacher(tmp_path):
    size, with_lora = _run(tmp_path, "--model", BASE, "--lora", OCR_TEACHER)
    assert size == (2 * 32, 32)  # two 32x32 images side by side
    _, base = _run(tmp_path, "--model", BASE)
    assert not torch.equal(with_lora, base)  # the teacher changes the images


@pytest.mark.filterwarnings("ignore")
def test_infer_sd3_pipeline_with_diffusers_lora(tmp_path):
    path = str(tiny_sd3.save_tiny_sd3_pipeline(tmp_path / "tiny_sd3"))
    model = load_sd3(path, dtype=torch.float32, device="cpu")
    model.add_lora("student", rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters("student"):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    out = export_lora(model, "student", str(tmp_path / "export"))
    side = tiny_sd3.IMAGE_SIZE
    size, from_file = _run(tmp_path, "--model", path, "--lora", os.path.join(out, "pytorch_lora_weights.safetensors"))
    assert size == (2 * side, side)
    assert torch.equal(_run(tmp_path, "--model", path, "--lora", out)[1], from_file)  # the export folder, too
    assert not torch.equal(_run(tmp_path, "--model", path)[1], from_file)  # the LoRA changes the images


def test_infer_lora_detection_error_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*pytorch_lora_weights.safetensors"):
        infer.load_lora(None, str(tmp_path))


def test_infer_image_grid_layout():
    images = torch.zeros(3, 3, 4, 5)
    images[2] = 1.0  # third image white: first column of the second row
    grid = infer.image_grid(images, cols=2)
    assert grid.size == (10, 8)
    assert grid.getpixel((0, 4)) == (255, 255, 255) and grid.getpixel((5, 4)) == (0, 0, 0)
