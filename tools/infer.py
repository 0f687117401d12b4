"""
Images from one prompt, with a base model alone or with a trained LoRA, saved as one labelled PNG grid.

    python -m tools.infer --model checkpoints/base --lora checkpoints/teachers/ocr --prompt 'a sign that says "K7"'
    python -m tools.infer --model stabilityai/stable-diffusion-3.5-medium --lora jieliu/SD3.5M-FlowGRPO-Text \
        --resolution 512 --prompt 'a sign that says "Flow-OPD"'

--model: the miniature world's model folder (transformer/, vae/, text_encoder/, tokenizer/) or an SD3 pipeline
(a folder with model_index.json, or a hub id). --lora: a PEFT folder (adapter_model.safetensors +
adapter_config.json, as training saves), or a diffusers SD3 LoRA (a .safetensors file, or a folder with
pytorch_lora_weights.safetensors, as checkpoint.export_lora and diffusers' trainers write), or a hub id of
either (support/resolve.load_lora). --resolution: pixels; the SD3.5-M LoRAs of Flow-GRPO and Flow-OPD are
trained at 512, while the pipeline's native size is 1024 (0 keeps the native size). Sampling is
rollouts.sample_images (Euler ODE with CFG, --eval_steps steps); image i uses the noise
rollouts.noise_seed(seed, i, 0). SD3 pipelines sample on their scheduler's grid (shift 3.0 for SD3.5) unless
--shift is given; the world model uses 1.0, as in training. Every other flag is train.py's.
"""
import os

from support import figures
from support.config import parse_args
from support.resolve import load_lora, load_model
from support.rollouts import sample_images

GRID_PX = 128  # samples are upscaled (nearest) to at least this many px a side: 32 px world samples show


def infer_flags(group):
    group.add_argument("--lora", default=None, help="PEFT folder, diffusers LoRA file or folder, or a hub id of either")
    group.add_argument("--prompt", required=True, help="the prompt of every image")
    group.add_argument("--num_images", type=int, default=4, help="images drawn, each from its own noise")
    group.add_argument("--shift", type=float, default=None, help="time shift; none: the scheduler's, else 1")
    group.add_argument("--out", default="samples.png", help="the PNG grid written")


def parse(argv=None):
    """(Config, infer's own flags)."""
    return parse_args(argv, __doc__.split("\n\n")[0].strip(), infer_flags)


def main(argv=None):
    cfg, args = parse(argv)
    model = load_model(cfg)
    if args.lora:
        load_lora(model, args.lora, "lora")
    model.adapter("lora" if args.lora else None)
    images = sample_images(model, [args.prompt] * args.num_images, cfg.eval_steps, cfg.guidance_scale, cfg.seed,
                           shift=args.shift)  # (N, 3, H, W); shift None: the model's own (models.T2IModel.shift)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # one labelled row (figures.image_grid, as the paper tables' grids); the prompt, shared by all, goes under it
    figures.image_grid({"base + LoRA" if args.lora else "base": images}, path=args.out,
                       scale=max(1, GRID_PX // images.shape[-1]), notes=[f"prompt: {args.prompt}"])
    print(f"{args.num_images} images ({images.shape[-1]}x{images.shape[-2]}) -> {args.out}")
    return images


if __name__ == "__main__":
    main()
