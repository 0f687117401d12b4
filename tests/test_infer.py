"""
Tests for tools/infer.py: the command line end to end on the committed world base with a committed teacher (a PEFT
folder), and on the tiny SD3 pipeline (tests/tiny_sd3.py) with a LoRA exported in diffusers format: the images
equal StableDiffusion3Pipeline's own call with the export loaded by pipe.load_lora_weights; a grid of several
prompts and LoRAs; the LoRA format detection and its error. A few sampling steps only.
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


@pytest.fixture(scope="module")
def sd3_export(tmp_path_factory):
    """(the tiny SD3 pipeline's folder, a random LoRA on it exported by checkpoint.export_lora, its PEFT folder)."""
    root = tmp_path_factory.mktemp("infer_sd3")
    path = str(tiny_sd3.save_tiny_sd3_pipeline(root / "tiny_sd3"))
    model = load_sd3(path, dtype=torch.float32, device="cpu")
    model.add_lora("student", rank=4, alpha=8)
    with torch.no_grad():
        for p in model.lora_parameters("student"):
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    out = export_lora(model, "student", str(root / "export"))
    return path, out, os.path.join(out, "peft")


@pytest.mark.filterwarnings("ignore")
def test_infer_sd3_pipeline_with_diffusers_lora(tmp_path, sd3_export):
    path, out, _ = sd3_export
    side = tiny_sd3.IMAGE_SIZE
    from_file = _run(tmp_path, "--model", path, "--lora", os.path.join(out, "pytorch_lora_weights.safetensors"),
                     side=side)
    assert from_file.shape == (2, side, side, 3)
    assert torch.equal(_run(tmp_path, "--model", path, "--lora", out, side=side), from_file)  # the export folder, too
    assert not torch.equal(_run(tmp_path, "--model", path, side=side), from_file)  # the LoRA changes the images


@pytest.mark.filterwarnings("ignore")
def test_infer_sd3_equals_the_pipeline_call_with_the_export_loaded_by_diffusers(tmp_path, sd3_export):
    """infer's SD3 images are those of StableDiffusion3Pipeline called in a script on the same seed, with the export
    loaded by pipe.load_lora_weights; the PEFT folder gives the same images as the export."""
    from diffusers import StableDiffusion3Pipeline
    path, out, peft = sd3_export
    prompt = 'a sign that says "K7"'
    rows = infer.main(["--model", path, "--lora", f"export={out}", "--lora", f"peft={peft}", "--prompt", prompt,
                       "--num_images", "2", "--eval_steps", "3", "--seed", "5", "--device", "cpu",
                       "--out", str(tmp_path / "grid.png")])
    pipe = StableDiffusion3Pipeline.from_pretrained(path, dtype=torch.float32)
    pipe.load_lora_weights(out)
    want = pipe(prompt, num_images_per_prompt=2, num_inference_steps=3, guidance_scale=4.5, max_sequence_length=128,
                generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert rows["export"].shape == want.shape == (2, 3, tiny_sd3.IMAGE_SIZE, tiny_sd3.IMAGE_SIZE)
    torch.testing.assert_close(rows["export"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows["peft"], rows["export"], rtol=1e-5, atol=1e-6)
    assert (rows["export"] - rows["export"].mean()).abs().max() > 0.01   # images, not a constant


@pytest.mark.filterwarnings("ignore")
def test_infer_grid_of_several_prompts_and_loras(tmp_path, sd3_export):
    """--prompt twice, --lora twice: one grid, a labelled row per LoRA and the prompts over their columns; each
    prompt's images are those of a run on that prompt alone (image j of every prompt from the same noise)."""
    path, out, peft = sd3_export
    common = ["--model", path, "--num_images", "2", "--eval_steps", "2", "--device", "cpu"]
    prompts = ['a sign that says "K7"', "a cat"]
    grid = str(tmp_path / "grid.png")
    rows = infer.main(common + ["--lora", f"export={out}", "--lora", peft, "--out", grid,
                                "--prompt", prompts[0], "--prompt", prompts[1]])
    assert list(rows) == ["export", peft] and all(r.shape[0] == 4 for r in rows.values())
    with Image.open(grid) as im:   # the prompts' lines on top, two rows of upscaled samples, no notes
        assert im.size[1] == figures.PAD + figures.HEADER_LINES * figures.LINE + 2 * (infer.GRID_PX + figures.PAD)
    alone = [infer.main(common + ["--lora", f"export={out}", "--prompt", p, "--out", str(tmp_path / "one.png")])
             ["export"] for p in prompts]
    assert torch.equal(rows["export"], torch.cat(alone)) and not torch.equal(alone[0], alone[1])


def test_infer_lora_detection_error_names_expected_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors.*pytorch_lora_weights.safetensors"):
        resolve.load_lora(None, str(tmp_path))

