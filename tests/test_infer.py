"""
Tests for tools/infer.py: the command line end to end on the committed world base with a committed teacher (a PEFT
folder), and on the tiny SD3 pipeline (tests/tiny_sd3.py) with a LoRA exported in diffusers format; the LoRA
format detection and its error. A few sampling steps only.
Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_infer.py
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import BASE, ROOT
from tools import infer
import tiny_sd3
from support.checkpoint import export_lora
from support.models import load_sd3
from support import figures, resolve

OCR_TEACHER = os.path.join(ROOT, "checkpoints", "teachers", "ocr")


def _run(tmp_path, *args, side=32):
    """The 2 samples (2, side, side, 3) read back from the grid infer writes: one labelled row (figures.image_grid)
    of the samples upscaled by nearest neighbour, the prompt noted under it."""
    out = str(tmp_path / "grid.png")
    infer.main([*args, "--prompt", 'a sign that says "K7"', "--num_images", "2", "--eval_steps", "2",
                "--device", "cpu", "--out", out])
    with Image.open(out) as im:
        grid = np.asarray(im.convert("RGB"))
    scale = max(1, infer.GRID_PX // side)
    cell, pad = side * scale, figures.PAD
    assert grid.shape[0] == pad + cell + pad + figures.LINE + pad   # the row, then one line of notes
    assert grid.shape[1] >= figures.LABEL_WIDTH + 2 * (cell + pad)
    assert (grid[pad:pad + cell, :figures.LABEL_WIDTH] < 128).any()   # the row is labelled
    assert (grid[pad + cell + pad:] < 128).any()                      # the prompt is noted
    cells = grid[pad:pad + cell, grid.shape[1] - 2 * (cell + pad):]   # the last 2 (cell + pad) columns
    samples = np.stack([cells[:, j * (cell + pad):j * (cell + pad) + cell][::scale, ::scale] for j in range(2)])
    assert (samples.repeat(scale, 1).repeat(scale, 2) == np.stack(
        [cells[:, j * (cell + pad):j * (cell + pad) + cell] for j in range(2)])).all()   # nearest upscale
    return torch.from_numpy(samples.copy())


def test_infer_world_base_with_peft_teacher(tmp_path):
    with_lora = _run(tmp_path, "--model", BASE, "--lora", OCR_TEACHER)
    assert with_lora.shape == (2, 32, 32, 3)  # two 32x32 images side by side
    base = _run(tmp_path, "--model", BASE)
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
    from_file = _run(tmp_path, "--model", path, "--lora", os.path.join(out, "pytorch_lora_weights.safetensors"),
                     side=side)
    assert from_file.shape == (2, side, side, 3)
    assert torch.equal(_run(tmp_path, "--model", path, "--lora", out, side=side), from_file)  # the export folder, too
    assert not torch.equal(_run(tmp_path, "--model", path, side=side), from_file)  # the LoRA changes the images


def test_infer_lora_detection_error_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*pytorch_lora_weights.safetensors"):
        resolve.load_lora(None, str(tmp_path))

