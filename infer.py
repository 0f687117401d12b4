"""
Images from one prompt, with a base model alone or with a trained LoRA, saved as one PNG grid.

    python infer.py --model checkpoints/base --lora checkpoints/teachers/ocr --prompt 'a sign that says "K7"'
    python infer.py --model stabilityai/stable-diffusion-3.5-medium --lora jieliu/SD3.5M-FlowGRPO-Text \
        --resolution 512 --prompt 'a sign that says "Flow-OPD"'

--model: the miniature world's model folder (transformer/, vae/, text_encoder/, tokenizer/) or an SD3 pipeline
(a folder with model_index.json, or a hub id). --lora: a PEFT folder (adapter_model.safetensors +
adapter_config.json, as training saves), or a diffusers SD3 LoRA (a .safetensors file, or a folder with
pytorch_lora_weights.safetensors, as checkpoint.export_lora and diffusers' trainers write), or a hub id of
either (downloaded once, as train.py's --teacher). --resolution: pixels; the SD3.5-M LoRAs of Flow-GRPO and
Flow-OPD are trained at 512, while the pipeline's native size is 1024 (the default, 0, keeps the native size).
Sampling is eval.sample_images (Euler ODE with CFG); image i uses the noise eval.noise_seed(seed, i, 0). SD3 pipelines sample on
their scheduler's grid (shift 3.0 for SD3.5) unless --shift is given; the world model uses 1.0, as in training.
"""
import argparse
import os

import numpy as np
import torch

import models
from hub import ModelUnavailableError
from config import adapter_folder
from rollouts import sample_images

PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
DIFFUSERS_PREFIX = "transformer."  # diffusers' prefix for the transformer's LoRA keys


def load_diffusers_lora(model, path, name):
    """A diffusers SD3 LoRA as adapter `name`: without the "transformer." prefix its keys are PEFT's own."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, set_peft_model_state_dict
    raw, metadata = StableDiffusion3Pipeline.lora_state_dict(path, return_lora_metadata=True)
    others = [k for k in raw if not k.startswith(DIFFUSERS_PREFIX)]
    if others:
        raise ValueError(f"{path!r} has LoRA weights outside the transformer (e.g. {others[0]!r}); only "
                         "transformer LoRAs are supported")
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}
    models.check_adapter_fits(model.transformer, state, path)
    if metadata:  # the LoraConfig that export_lora (and diffusers' own trainers) store
        config = LoraConfig(**{k.removeprefix(DIFFUSERS_PREFIX): v for k, v in metadata.items()})
    else:  # none stored: rank from the factors and alpha = r, diffusers' own assumption for such files
        ranks = {v.shape[0] for k, v in state.items() if ".lora_A." in k}
        if len(ranks) != 1:
            raise ValueError(f"{path!r} stores no LoRA config and has mixed ranks {sorted(ranks)}")
        r = ranks.pop()
        config = LoraConfig(r=r, lora_alpha=r, target_modules=sorted({k.rsplit(".lora_", 1)[0] for k in state}))
    model.add_adapter(config, name)
    set_peft_model_state_dict(model.transformer, state, adapter_name=name)


def load_lora(model, path, name="lora"):
    """Load a PEFT folder or a diffusers LoRA (file or folder) as adapter `name`, by the files present."""
    if os.path.isfile(path) and path.endswith(".safetensors"):
        return load_diffusers_lora(model, path, name)
    if all(os.path.isfile(os.path.join(path, f)) for f in PEFT_FILES):
        return model.load_adapter(path, name)
    if os.path.isfile(os.path.join(path, DIFFUSERS_FILE)):
        return load_diffusers_lora(model, os.path.join(path, DIFFUSERS_FILE), name)
    raise FileNotFoundError(f"no LoRA at {path!r}: expected a PEFT folder ({' + '.join(PEFT_FILES)}), a folder "
                            f"with {DIFFUSERS_FILE}, or a diffusers LoRA .safetensors file")


def image_grid(images, cols):
    """(N, 3, H, W) in [0, 1] -> one PIL image, `cols` images wide, filled row by row."""
    from PIL import Image
    n, _, h, w = images.shape
    rows = -(-n // cols)
    grid = torch.zeros(3, rows * h, cols * w)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    pixels = (grid.permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8).numpy()  # (rows*h, cols*w, 3)
    return Image.fromarray(np.ascontiguousarray(pixels))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    ap.add_argument("--model", required=True, help="world model folder, SD3 pipeline folder or hub id")
    ap.add_argument("--lora", default=None, help="PEFT folder, diffusers LoRA file or folder, or a hub id of either")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--num_images", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--guidance_scale", type=float, default=4.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shift", type=float, default=None, help="time shift (default: the scheduler's, else 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--resolution", type=int, default=0, help="pixels (Flow-GRPO/Flow-OPD LoRAs: 512); 0: native")
    ap.add_argument("--out", default="samples.png")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32  # bf16 matmuls are slow on CPUs
    try:
        model = models.load_model(args.model, args.device, dtype)
    except (FileNotFoundError, ModelUnavailableError) as e:
        raise SystemExit(f"--model: {e}") from None
    if args.resolution:
        model.set_resolution(args.resolution)
    if args.lora:
        lora = args.lora if os.path.exists(args.lora) else adapter_folder("--lora", args.lora)  # a hub id
        load_lora(model, lora, "lora")
    model.adapter("lora" if args.lora else None)
    images = sample_images(model, [args.prompt] * args.num_images, args.steps, args.guidance_scale, args.seed,
                           shift=args.shift)  # (N, 3, H, W); shift None: the model's own (models.T2IModel.shift)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    image_grid(images, cols=int(np.ceil(np.sqrt(args.num_images)))).save(args.out)
    print(f"{args.num_images} images ({images.shape[-1]}x{images.shape[-2]}) -> {args.out}")
    return args.out


if __name__ == "__main__":
    main()
